// Patch embedding around a cuBLASLt GEMM: patchify gather (im2col for a stride = kernel convolution),
// its inverse scatter for dx, and the epilogue that prepends the prefix tokens (class, distillation,
// register) and adds the position embedding (to every token, or to the patch tokens only). Patches are non-overlapping, so both gathers are permutations: no atomics.
//
// patches[(b * gh + gy) * gw + gx, (c * ph + py) * pw + px] = x[b, c, gy * ph + py, gx * pw + px]
// (the row-major flattening of a Conv2d weight [dim, chans, ph, pw], as vitkern.reference.patchify).
#include "common.cuh"
#include "vitkern_kernels.h"

namespace vk {
namespace {

// Element (row, col) of the patch matrix -> offset into the image. pw-wide runs are contiguous in
// both, so the vector path moves 8 consecutive px at once when pw % 8 == 0.
__device__ __forceinline__ idx_t image_offset(idx_t row, int col, int chans, int height, int width, int ph, int pw) {
  const int gw = width / pw, gh = height / ph;
  const idx_t b = row / (static_cast<idx_t>(gh) * gw);
  const int p = static_cast<int>(row % (static_cast<idx_t>(gh) * gw));
  const int gy = p / gw, gx = p % gw;
  const int c = col / (ph * pw), r = col % (ph * pw);
  const int py = r / pw, px = r % pw;
  return ((b * chans + c) * height + gy * ph + py) * width + gx * pw + px;
}

template <typename T, bool VEC, bool INVERSE>
__global__ void patch_gather_kernel(const T* __restrict__ src, T* __restrict__ dst, idx_t rows, int cols, int chans,
                                    int height, int width, int ph, int pw) {
  constexpr int W = VEC ? 8 : 1;
  const idx_t n = rows * cols / W;
  for (idx_t i = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<idx_t>(gridDim.x) * blockDim.x) {
    const idx_t e = i * W;
    const idx_t row = e / cols;
    const int col = static_cast<int>(e % cols);
    const idx_t img = image_offset(row, col, chans, height, width, ph, pw);
    // Forward: patches[e] = x[img]; INVERSE (dx): x[img] = dpatches[e].
    const idx_t from = INVERSE ? e : img, to = INVERSE ? img : e;
    if constexpr (VEC) {
      *reinterpret_cast<Vec8<T>*>(dst + to) = *reinterpret_cast<const Vec8<T>*>(src + from);
    } else {
      dst[to] = src[from];
    }
  }
}

// out: [batch, n_prefix + num_patches, dim]; tokens: [batch, num_patches, dim]; prefix: [n_prefix, dim];
// pos: [n_prefix + num_patches, dim], or with no_embed_class [num_patches, dim] for the patch rows only.
// n_prefix + num_patches fits an int (bindings.cpp checks the token count).
template <typename T, bool VEC>
__global__ void patch_embed_epilogue_kernel(const T* __restrict__ tokens, const T* __restrict__ prefix,
                                            const T* __restrict__ pos, T* __restrict__ out, int batch, int n_prefix,
                                            int num_patches, int dim, bool no_embed_class) {
  constexpr int W = VEC ? 8 : 1;
  const int seq = n_prefix + num_patches;
  const int pos_first = no_embed_class ? n_prefix : 0;  // the first token row pos covers
  const idx_t n = static_cast<idx_t>(batch) * seq * dim / W;
  for (idx_t i = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<idx_t>(gridDim.x) * blockDim.x) {
    const idx_t e = i * W;
    const int d = static_cast<int>(e % dim);
    const idx_t bt = e / dim;
    const int t = static_cast<int>(bt % seq);
    const idx_t b = bt / seq;
    const T* src = t < n_prefix ? prefix + static_cast<idx_t>(t) * dim + d
                                : tokens + (b * num_patches + (t - n_prefix)) * dim + d;
    float v[W];
    if constexpr (VEC) {
      load8(src, v);
    } else {
      v[0] = to_f(*src);
    }
    if (pos != nullptr && t >= pos_first) {
      const T* p_row = pos + static_cast<idx_t>(t - pos_first) * dim + d;
      float p[W];
      if constexpr (VEC) {
        load8(p_row, p);
      } else {
        p[0] = to_f(*p_row);
      }
#pragma unroll
      for (int j = 0; j < W; ++j) v[j] += p[j];
    }
    if constexpr (VEC) {
      store8(out + e, v);
    } else {
      out[e] = from_f<T>(v[0]);
    }
  }
}

unsigned grid_for(idx_t work) {
  const idx_t blocks = (work + 255) / 256;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <bool INVERSE>
cudaError_t gather(int dtype, const void* src, void* dst, int batch, int chans, int height, int width, int ph, int pw,
                   cudaStream_t stream) {
  if (ph <= 0 || pw <= 0 || height % ph || width % pw) return cudaErrorInvalidValue;
  const idx_t rows = static_cast<idx_t>(batch) * (height / ph) * (width / pw);
  const int cols = chans * ph * pw;
  if (rows * cols == 0) return cudaSuccess;
  const bool vec = pw % 8 == 0 && width % 8 == 0 && aligned16(src) && aligned16(dst);
  VK_DISPATCH(dtype, T, {
    if (vec)
      patch_gather_kernel<T, true, INVERSE><<<grid_for(rows * cols / 8), 256, 0, stream>>>(
          (const T*)src, (T*)dst, rows, cols, chans, height, width, ph, pw);
    else
      patch_gather_kernel<T, false, INVERSE><<<grid_for(rows * cols), 256, 0, stream>>>(
          (const T*)src, (T*)dst, rows, cols, chans, height, width, ph, pw);
  });
  return cudaGetLastError();
}

}  // namespace
}  // namespace vk

cudaError_t vk_patchify(int dtype, const void* x, void* patches, int batch, int chans, int height, int width, int ph,
                        int pw, cudaStream_t stream) {
  return vk::gather<false>(dtype, x, patches, batch, chans, height, width, ph, pw, stream);
}

cudaError_t vk_unpatchify(int dtype, const void* patches, void* x, int batch, int chans, int height, int width,
                          int ph, int pw, cudaStream_t stream) {
  return vk::gather<true>(dtype, patches, x, batch, chans, height, width, ph, pw, stream);
}

cudaError_t vk_patch_embed_epilogue(int dtype, const void* tokens, const void* prefix, const void* pos, void* out,
                                    int batch, int n_prefix, int num_patches, int dim, bool no_embed_class,
                                    cudaStream_t stream) {
  if (n_prefix < 0 || (n_prefix > 0 && prefix == nullptr)) return cudaErrorInvalidValue;
  const vk::idx_t n = static_cast<vk::idx_t>(batch) * (static_cast<vk::idx_t>(n_prefix) + num_patches) * dim;
  if (n == 0) return cudaSuccess;
  const bool vec = dim % 8 == 0 && vk::aligned16(tokens) && vk::aligned16(out) &&
                   (prefix == nullptr || vk::aligned16(prefix)) && (pos == nullptr || vk::aligned16(pos));
  VK_DISPATCH(dtype, T, {
    if (vec)
      vk::patch_embed_epilogue_kernel<T, true><<<vk::grid_for(n / 8), 256, 0, stream>>>(
          (const T*)tokens, (const T*)prefix, (const T*)pos, (T*)out, batch, n_prefix, num_patches, dim,
          no_embed_class);
    else
      vk::patch_embed_epilogue_kernel<T, false><<<vk::grid_for(n), 256, 0, stream>>>(
          (const T*)tokens, (const T*)prefix, (const T*)pos, (T*)out, batch, n_prefix, num_patches, dim,
          no_embed_class);
  });
  return cudaGetLastError();
}
