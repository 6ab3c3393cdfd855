// LayerNorm over the last dim of a row-major [rows, dim] tensor, dim <= 1280 (ViT-H).
//
// One warp owns one row and keeps it in registers (at most 40 values per lane, fewer for narrower rows), so the mean and the
// variance are computed in two exact passes over registers, not from E[x^2] - E[x]^2. Rows whose
// dim is a multiple of 8 move 16 bytes per lane per access; any other dim takes the scalar path.
// Statistics are fp32 and saved for the backward; y is written in the input dtype, which is also
// the GEMM's input dtype on the LN + GEMM path (ln_linear).
#include "common.cuh"
#include "vitkern_kernels.h"

namespace vk {
namespace {

constexpr int kWarps = 8;        // rows per CTA
constexpr int kBwdBlocks = 512;  // fixed so the dweight/dbias reduction order never depends on the device

// Column of the i-th register value of `lane`. VEC: N / 8 chunks of 8 contiguous columns, chunk c of lane
// l starting at (c * 32 + l) * 8 (a warp covers 256 contiguous columns per chunk). Scalar: strided.
template <bool VEC> __device__ __forceinline__ int column(int i, int lane) {
  return VEC ? ((i / 8) * 32 + lane) * 8 + (i % 8) : i * 32 + lane;
}

template <typename T, bool VEC, int N>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int dim, int lane, float (&v)[N]) {
  if constexpr (VEC) {
#pragma unroll
    for (int c = 0; c < N / 8; ++c) {
      const int col = (c * 32 + lane) * 8;
      float tmp[8];
      if (col < dim) {
        load8(row + col, tmp);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) tmp[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) v[c * 8 + j] = tmp[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int col = i * 32 + lane;
      v[i] = col < dim ? to_f(row[col]) : 0.f;
    }
  }
}

template <typename T, bool VEC, int N>
__device__ __forceinline__ void store_row(T* __restrict__ row, int dim, int lane, const float (&v)[N]) {
  if constexpr (VEC) {
#pragma unroll
    for (int c = 0; c < N / 8; ++c) {
      const int col = (c * 32 + lane) * 8;
      if (col < dim) {
        float tmp[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) tmp[j] = v[c * 8 + j];
        store8(row + col, tmp);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int col = i * 32 + lane;
      if (col < dim) row[col] = from_f<T>(v[i]);
    }
  }
}

// x, y: [rows, dim]; weight, bias: [dim]; mean, rstd: [rows] fp32.
template <typename T, bool VEC, int N>
__global__ void __launch_bounds__(kWarps * 32)
layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                      T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                      idx_t rows, int dim, float eps) {
  const int lane = threadIdx.x % 32;
  const idx_t row = static_cast<idx_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  float v[N];
  load_row<T, VEC, N>(x + row * dim, dim, lane, v);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) s += v[i];
  const float mean = warp_sum(s) / dim;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = column<VEC>(i, lane) < dim ? v[i] - mean : 0.f;
    ss += d * d;
  }
  const float rstd = rsqrtf(warp_sum(ss) / dim + eps);
  float w[N], b[N];
  load_row<T, VEC, N>(weight, dim, lane, w);
  load_row<T, VEC, N>(bias, dim, lane, b);
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = (v[i] - mean) * rstd * w[i] + b[i];
  store_row<T, VEC, N>(y + row * dim, dim, lane, v);
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dy, x, dx: [rows, dim]; weight: [dim]; mean, rstd: [rows] fp32;
// partial: [gridDim.x, 2, dim] fp32, this CTA's sums of dy * xhat (dweight) and dy (dbias).
template <typename T, bool VEC, int N>
__global__ void __launch_bounds__(kWarps * 32)
layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                      const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                      T* __restrict__ dx, float* __restrict__ partial, idx_t rows, int dim) {
  __shared__ float acc[2 * 1280];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  float w[N], dw[N], db[N];
  load_row<T, VEC, N>(weight, dim, lane, w);
#pragma unroll
  for (int i = 0; i < N; ++i) dw[i] = db[i] = 0.f;
  for (idx_t row = static_cast<idx_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<idx_t>(gridDim.x) * kWarps) {
    float xv[N], g[N];
    load_row<T, VEC, N>(x + row * dim, dim, lane, xv);
    load_row<T, VEC, N>(dy + row * dim, dim, lane, g);
    const float mean = mean_in[row], rstd = rstd_in[row];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      // Padding columns load 0 for dy and weight, so they add nothing below.
      const float xhat = (xv[i] - mean) * rstd;
      db[i] += g[i];
      dw[i] += g[i] * xhat;
      g[i] *= w[i];
      xv[i] = xhat;
      sum_g += g[i];
      sum_gx += g[i] * xhat;
    }
    const float mg = warp_sum(sum_g) / dim, mgx = warp_sum(sum_gx) / dim;
#pragma unroll
    for (int i = 0; i < N; ++i) g[i] = rstd * (g[i] - mg - xv[i] * mgx);
    store_row<T, VEC, N>(dx + row * dim, dim, lane, g);
  }
  // Fixed-order CTA reduction: warp 0 writes, warps 1..7 add in turn (each lane owns its columns).
  for (int k = 0; k < kWarps; ++k) {
    if (warp == k) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int col = column<VEC>(i, lane);
        if (col < dim) {
          acc[col] = (k == 0 ? 0.f : acc[col]) + dw[i];
          acc[1280 + col] = (k == 0 ? 0.f : acc[1280 + col]) + db[i];
        }
      }
    }
    __syncthreads();
  }
  float* out = partial + static_cast<idx_t>(blockIdx.x) * 2 * dim;
  for (int col = threadIdx.x; col < dim; col += blockDim.x) {
    out[col] = acc[col];
    out[dim + col] = acc[1280 + col];
  }
}

// partial: [blocks, 2, dim] fp32 -> dweight, dbias: [dim] (fixed summation order).
template <typename T>
__global__ void layer_norm_bwd_reduce_kernel(const float* __restrict__ partial, int blocks, int dim,
                                             T* __restrict__ dweight, T* __restrict__ dbias) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= dim) return;
  float sw = 0.f, sb = 0.f;
  for (int k = 0; k < blocks; ++k) {
    sw += partial[static_cast<idx_t>(k) * 2 * dim + col];
    sb += partial[static_cast<idx_t>(k) * 2 * dim + dim + col];
  }
  dweight[col] = from_f<T>(sw);
  dbias[col] = from_f<T>(sb);
}

}  // namespace
}  // namespace vk

using vk::idx_t;

int vk_layer_norm_max_dim() { return 1280; }

static bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int vk_layer_norm_bwd_blocks(int64_t rows) {
  const int64_t need = (rows + vk::kWarps - 1) / vk::kWarps;
  return static_cast<int>(need < vk::kBwdBlocks ? (need > 0 ? need : 1) : vk::kBwdBlocks);
}

// Values per lane: the smallest of 8, 16, 24, 32, 40 covering dim (256 columns per 8), so a
// ViT-B row (768) holds 24 values per lane, not 40, and the backward keeps its registers low.
#define VK_LN_DISPATCH_N(dim, ...)               \
  do {                                           \
    if ((dim) <= 256) {                          \
      constexpr int N = 8;                       \
      __VA_ARGS__;                               \
    } else if ((dim) <= 512) {                   \
      constexpr int N = 16;                      \
      __VA_ARGS__;                               \
    } else if ((dim) <= 768) {                   \
      constexpr int N = 24;                      \
      __VA_ARGS__;                               \
    } else if ((dim) <= 1024) {                  \
      constexpr int N = 32;                      \
      __VA_ARGS__;                               \
    } else {                                     \
      constexpr int N = 40;                      \
      __VA_ARGS__;                               \
    }                                            \
  } while (0)

cudaError_t vk_layer_norm_fwd(int dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                              float* rstd, int64_t rows, int dim, float eps, cudaStream_t stream) {
  if (dim <= 0 || dim > 1280 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const dim3 grid(vk::ceil_div(rows, vk::kWarps)), block(vk::kWarps * 32);
  const bool vec = dim % 8 == 0 && aligned16(x) && aligned16(weight) && aligned16(bias) && aligned16(y);
  VK_DISPATCH(dtype, T, VK_LN_DISPATCH_N(dim, {
    if (vec)
      vk::layer_norm_fwd_kernel<T, true, N><<<grid, block, 0, stream>>>(
          (const T*)x, (const T*)weight, (const T*)bias, (T*)y, mean, rstd, rows, dim, eps);
    else
      vk::layer_norm_fwd_kernel<T, false, N><<<grid, block, 0, stream>>>(
          (const T*)x, (const T*)weight, (const T*)bias, (T*)y, mean, rstd, rows, dim, eps);
  }));
  return cudaGetLastError();
}

cudaError_t vk_layer_norm_bwd(int dtype, const void* dy, const void* x, const void* weight, const float* mean,
                              const float* rstd, void* dx, void* dweight, void* dbias, float* partial,
                              int64_t rows, int dim, cudaStream_t stream) {
  if (dim <= 0 || dim > 1280 || rows < 0) return cudaErrorInvalidValue;
  const int blocks = vk_layer_norm_bwd_blocks(rows);
  const bool vec = dim % 8 == 0 && aligned16(dy) && aligned16(x) && aligned16(weight) && aligned16(dx);
  VK_DISPATCH(dtype, T, VK_LN_DISPATCH_N(dim, {
    if (vec)
      vk::layer_norm_bwd_kernel<T, true, N><<<blocks, vk::kWarps * 32, 0, stream>>>(
          (const T*)dy, (const T*)x, (const T*)weight, mean, rstd, (T*)dx, partial, rows, dim);
    else
      vk::layer_norm_bwd_kernel<T, false, N><<<blocks, vk::kWarps * 32, 0, stream>>>(
          (const T*)dy, (const T*)x, (const T*)weight, mean, rstd, (T*)dx, partial, rows, dim);
    vk::layer_norm_bwd_reduce_kernel<T><<<vk::ceil_div(dim, 256), 256, 0, stream>>>(
        partial, blocks, dim, (T*)dweight, (T*)dbias);
  }));
  return cudaGetLastError();
}
