// Attention statistics for inspection, recomputed from q, k and the forward's log-sum-exp (the
// CUDA twin of vitkern/kernels/triton/attention_stats.py; entry points in attention_stats.h).
//
// The fused forward never holds the [tokens, tokens] probabilities but saves lse, so any entry is
// p_ij = exp2(scale log2(e) q_i.k_j - log2(e) lse_i). Two kernels, CTAs of 128 threads over a tile
// of 16 query rows x 64 keys (each thread: one key, 8 rows):
//   attention_stats_rows_kernel  grid (batch * heads, query tiles): the prefix rows and the
//                                per-tile distance partial sums (one writer each, no atomics);
//   attention_stats_full_kernel  grid (batch, query tiles, key tiles), heads looped inside: the
//                                probabilities fused over heads (mean, max, min).
// q and k are staged in shared memory as fp32 with scalar loads, so any head_dim up to 128 and any
// alignment work; the scores are FMA dot products. This pass is for inspection: its cost is one
// QK^T and one exp per (query, key) pair it covers, with no PV product (docs/perf/attention_stats.md).
#include "attention_stats.h"
#include "common.cuh"

namespace vk {
namespace {

constexpr int kStatsThreads = 128;
constexpr int kStatsRows = 16;  // query rows per tile
constexpr int kStatsKeys = 64;  // keys per tile = threads / (rows per thread group)
constexpr int kRowsPerThread = kStatsRows * kStatsKeys / kStatsThreads;  // 8
constexpr int kStatsMaxHeadDim = 128;
constexpr float kStatsLog2e = 1.4426950408889634f;

// Stages `rows` rows of one head's q or k (base: element (b, token 0, which, h, 0)) as fp32 into
// s[r * ld + d], zero past `tokens` and past head_dim.
template <typename T>
__device__ __forceinline__ void stage_f32(float* s, int ld, const T* __restrict__ base, int64_t stride_t, int r0,
                                          int rows, int tokens, int head_dim) {
  for (int idx = threadIdx.x; idx < rows * head_dim; idx += kStatsThreads) {
    const int r = idx / head_dim, d = idx % head_dim;
    s[r * ld + d] = r0 + r < tokens ? to_f(base[(r0 + r) * stride_t + d]) : 0.f;
  }
}

// The thread's scores for key `key` (its column of sK) against query rows row0 .. row0 + 7 of sQ.
__device__ __forceinline__ void tile_scores(const float* sQ, const float* sK, int ldk, int head_dim, int key, int row0,
                                            float (&s)[kRowsPerThread]) {
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) s[r] = 0.f;
  for (int d = 0; d < head_dim; ++d) {
    const float kv = sK[key * ldk + d];
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) s[r] = fmaf(sQ[(row0 + r) * kStatsMaxHeadDim + d], kv, s[r]);
  }
}

// Pixel position (.x column, .y row) of patch token i >= prefix: computed once per row or key, so a
// (query, key) pair costs two subtractions, the norm and one FMA (no integer division per pair).
__device__ __forceinline__ float2 patch_position(int i, int prefix, int grid_w, float patch_h, float patch_w) {
  const int p = i - prefix;
  return make_float2(float(p % grid_w) * patch_w, float(p / grid_w) * patch_h);
}

// Both kernels: the minimum of 1 CTA per SM in __launch_bounds__ lifts ptxas's register target,
// which otherwise settles at 64 (sm_80) or 40 (sm_90a) registers and spills a few bytes; at about
// 90-126 registers 4 CTAs of 128 threads still fit on an SM.
//
// Shared: sQ [16][128] fp32, sK [64][head_dim + 1] fp32 (the +1 spreads a warp's 32 keys over 32
// banks), lse2 [16], warp partials [4].
template <typename T>
__global__ void __launch_bounds__(kStatsThreads, 1)
attention_stats_rows_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, const float* __restrict__ lse,
                            float* __restrict__ rows, float* __restrict__ dist, int tokens, int heads, int head_dim,
                            int prefix, int grid_w, float patch_h, float patch_w, float scale_log2) {
  extern __shared__ __align__(16) float stats_smem[];
  const int ldk = head_dim + 1;
  float* sQ = stats_smem;
  float* sK = sQ + kStatsRows * kStatsMaxHeadDim;
  float* sL = sK + kStatsKeys * ldk;
  float* sRed = sL + kStatsRows;

  const int bh = blockIdx.x, b = bh / heads, h = bh % heads;
  const int m0 = blockIdx.y * kStatsRows;
  const int64_t hd = int64_t(heads) * head_dim;
  const T* q_base = qkv + b * stride_b + int64_t(h) * head_dim;
  const T* k_base = q_base + hd;
  const int64_t stats = int64_t(bh) * tokens;

  stage_f32(sQ, kStatsMaxHeadDim, q_base, stride_t, m0, kStatsRows, tokens, head_dim);
  if (threadIdx.x < kStatsRows) {
    const int i = m0 + threadIdx.x;
    sL[threadIdx.x] = i < tokens ? lse[stats + i] * kStatsLog2e : 0.f;
  }
  const int key_in_tile = threadIdx.x % kStatsKeys;
  const int row0 = (threadIdx.x / kStatsKeys) * kRowsPerThread;
  float2 q_pos[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int i = m0 + row0 + r;
    q_pos[r] = dist != nullptr && i >= prefix ? patch_position(i, prefix, grid_w, patch_h, patch_w) : make_float2(0.f, 0.f);
  }
  float acc = 0.f;
  for (int n0 = 0; n0 < tokens; n0 += kStatsKeys) {
    __syncthreads();  // sQ/sL written (first tile); the previous tile's readers are done
    stage_f32(sK, ldk, k_base, stride_t, n0, kStatsKeys, tokens, head_dim);
    __syncthreads();
    float s[kRowsPerThread];
    tile_scores(sQ, sK, ldk, head_dim, key_in_tile, row0, s);
    const int j = n0 + key_in_tile;
    const float2 k_pos = dist != nullptr && j >= prefix ? patch_position(j, prefix, grid_w, patch_h, patch_w)
                                                        : make_float2(0.f, 0.f);
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int i = m0 + row0 + r;
      if (i >= tokens || j >= tokens) continue;
      const float p = exp2f(s[r] * scale_log2 - sL[row0 + r]);
      if (rows != nullptr && i < prefix) rows[(int64_t(bh) * prefix + i) * tokens + j] = p;
      // Prefix queries and keys are dropped without renormalizing (the usual definition).
      if (dist != nullptr && i >= prefix && j >= prefix) {
        const float dx = q_pos[r].x - k_pos.x, dy = q_pos[r].y - k_pos.y;
        acc += p * sqrtf(dy * dy + dx * dx);
      }
    }
  }
  if (dist == nullptr) return;  // uniform over the CTA: no thread is left at a barrier
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) sRed[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kStatsThreads / 32; ++w) total += sRed[w];  // fixed order: deterministic
    dist[int64_t(bh) * gridDim.y + blockIdx.y] = total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kStatsThreads, 1)
attention_stats_full_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, const float* __restrict__ lse,
                            float* __restrict__ full, int tokens, int heads, int head_dim, int fusion, float scale_log2) {
  extern __shared__ __align__(16) float stats_smem[];
  const int ldk = head_dim + 1;
  float* sQ = stats_smem;
  float* sK = sQ + kStatsRows * kStatsMaxHeadDim;
  float* sL = sK + kStatsKeys * ldk;

  const int b = blockIdx.x, m0 = blockIdx.y * kStatsRows, n0 = blockIdx.z * kStatsKeys;
  const int64_t hd = int64_t(heads) * head_dim;
  const int key_in_tile = threadIdx.x % kStatsKeys;
  const int row0 = (threadIdx.x / kStatsKeys) * kRowsPerThread;
  float acc[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = fusion == 3 ? INFINITY : 0.f;  // p >= 0: max starts at 0
  for (int h = 0; h < heads; ++h) {
    const T* q_base = qkv + b * stride_b + int64_t(h) * head_dim;
    __syncthreads();  // the previous head's readers are done
    stage_f32(sQ, kStatsMaxHeadDim, q_base, stride_t, m0, kStatsRows, tokens, head_dim);
    stage_f32(sK, ldk, q_base + hd, stride_t, n0, kStatsKeys, tokens, head_dim);
    if (threadIdx.x < kStatsRows) {
      const int i = m0 + threadIdx.x;
      sL[threadIdx.x] = i < tokens ? lse[(int64_t(b) * heads + h) * tokens + i] * kStatsLog2e : 0.f;
    }
    __syncthreads();
    float s[kRowsPerThread];
    tile_scores(sQ, sK, ldk, head_dim, key_in_tile, row0, s);
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const float p = exp2f(s[r] * scale_log2 - sL[row0 + r]);
      acc[r] = fusion == 1 ? acc[r] + p : fusion == 2 ? fmaxf(acc[r], p) : fminf(acc[r], p);
    }
  }
  const int j = n0 + key_in_tile;
  const float inv_heads = fusion == 1 ? 1.f / float(heads) : 1.f;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int i = m0 + row0 + r;
    if (i < tokens && j < tokens) full[(int64_t(b) * tokens + i) * tokens + j] = acc[r] * inv_heads;
  }
}

size_t stats_smem_bytes(int head_dim, bool reduce) {
  return sizeof(float) * (size_t(kStatsRows) * kStatsMaxHeadDim + size_t(kStatsKeys) * (head_dim + 1) + kStatsRows +
                          (reduce ? kStatsThreads / 32 : 0));
}

template <typename T>
cudaError_t launch_stats(const void* qkv, int64_t sb, int64_t st, const float* lse, float* rows, float* dist,
                         float* full, int batch, int tokens, int heads, int head_dim, int prefix, int grid_w,
                         float patch_h, float patch_w, float scale, int fusion, cudaStream_t stream) {
  const float scale_log2 = scale * kStatsLog2e;
  if (rows != nullptr || dist != nullptr) {
    // Without distances only the tiles that hold prefix rows run.
    const int tiles = dist != nullptr ? int(ceil_div(tokens, kStatsRows)) : int(ceil_div(prefix, kStatsRows));
    if (tiles > 0) {
      const size_t smem = stats_smem_bytes(head_dim, true);
      auto kernel = attention_stats_rows_kernel<T>;
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (e != cudaSuccess) return e;
      const dim3 grid(unsigned(batch) * unsigned(heads), unsigned(tiles));
      kernel<<<grid, kStatsThreads, smem, stream>>>((const T*)qkv, sb, st, lse, prefix > 0 ? rows : nullptr, dist,
                                                   tokens, heads, head_dim, prefix, grid_w, patch_h, patch_w,
                                                   scale_log2);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
  }
  if (full != nullptr) {
    const size_t smem = stats_smem_bytes(head_dim, false);
    auto kernel = attention_stats_full_kernel<T>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    const dim3 grid(unsigned(batch), ceil_div(tokens, kStatsRows), ceil_div(tokens, kStatsKeys));
    kernel<<<grid, kStatsThreads, smem, stream>>>((const T*)qkv, sb, st, lse, full, tokens, heads, head_dim, fusion,
                                                 scale_log2);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace vk

int vk_attention_stats_tiles(int tokens) { return int(vk::ceil_div(tokens, vk::kStatsRows)); }
int vk_attention_stats_max_head_dim() { return vk::kStatsMaxHeadDim; }

cudaError_t vk_attention_stats(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, const float* lse,
                               float* rows, float* dist, float* full, int batch, int tokens, int heads, int head_dim,
                               int prefix, int grid_w, float patch_h, float patch_w, float scale, int fusion,
                               cudaStream_t stream) {
  if (batch == 0 || tokens == 0) return cudaSuccess;
  if (batch < 0 || tokens < 0 || heads <= 0 || head_dim <= 0 || head_dim > vk::kStatsMaxHeadDim || prefix < 0 ||
      prefix > tokens || (dist != nullptr && grid_w <= 0) || (full != nullptr && (fusion < 1 || fusion > 3)) ||
      tokens > 65535 * vk::kStatsRows)
    return cudaErrorInvalidValue;
  VK_DISPATCH(dtype, T, {
    return vk::launch_stats<T>(qkv, stride_b, stride_t, lse, rows, dist, full, batch, tokens, heads, head_dim, prefix,
                               grid_w, patch_h, patch_w, scale, fusion, stream);
  });
  return cudaSuccess;
}
