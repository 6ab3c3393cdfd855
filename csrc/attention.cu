// Multi-head attention on the packed QKV projection, FlashAttention-2 style, with mma.sync tensor cores.
//
// qkv: [batch, tokens, 3, heads, head_dim] (timm's packed layout, strides for batch and tokens);
// out: [batch, tokens, heads * head_dim]; lse: [batch, heads, tokens] fp32 (natural log of the
// softmax normalizer of scale * q.k). One CTA = 4 warps; each warp owns 16 rows of a 64-row tile and
// runs m16n8k16 mma.sync (sm_80+, bf16/fp16 in, fp32 accumulate).
//
// The design favours being right by construction over the last 20%:
//   * every operand is staged in shared memory with plain 16-byte copies (zero-filled past the last
//     token, so masked rows hold zeros, never garbage that 0 * NaN could leak);
//   * fragments are read from shared memory by three helpers whose index maps are the PTX ISA's
//     m16n8k16 layouts, written once (frag_a, frag_b_nk, frag_b_kn) and used by all three kernels;
//   * the backward recomputes P in two kernels (dK/dV per key tile, dQ per query tile) instead of
//     accumulating dQ with atomics: deterministic, and no fp32 dQ buffer;
//   * numerics at large logits (docs/perf/attention.md): the softmax works on natural-log scores
//     s = scale * q.k, so lse = max + log(sum) never rounds the max through a change of base and a
//     row with one dominant key recomputes p = 1 exactly; the dQ kernel runs first and computes
//     delta = rowsum(P * dP) / rowsum(P) from its own P and dP, so dP - delta cancels as in eager
//     PyTorch instead of leaving a rounding residue of |dO| |v| that a large q or k multiplies.
// Packed sequences (varlen, NaViT/NaFlex; docs/perf/cuda.md, "Packed sequences"): the same three kernels
// with cu_seqlens set take qkv [total, 3, heads, head_dim] as a batch of one and run the grid
// (sequences * heads, ceil(max_seqlen / 64)); each CTA reads its sequence's rows [begin, end) from
// cu_seqlens (seq_range), starts its tiles at `begin`, bounds its key (query) loop and every mask by
// `end`, and a CTA whose tile starts past `end` returns at once (zeroing its QK-norm workspace slice).
// Rows of other images are never staged, so each image's results are bit-identical to running it alone
// at its offset. lse and delta are [heads, total]. The dense path is the case begin = 0, end = tokens.
// Shared-memory rows are padded by 8 elements (16 bytes) so the 32-bit fragment reads of a warp
// fall in 32 distinct banks.
//
// QK-norm (timm's qk_norm=True; docs/perf/attention.md, "QK-norm (CUDA)"): a LayerNorm over head_dim of
// every head's q and/or k row (weight, bias [head_dim] and eps shared by the heads) applied as the rows
// are staged, so no normalized copy of q or k is ever written to memory:
//   * every kernel has a template flag QKN; QKN = false compiles the plain kernels exactly as before.
//     With QKN, q (k) is normalized when its weight pointer is set (a uniform run-time branch: q only,
//     k only, or both, from one instantiation);
//   * stage_norm_rows replaces stage_rows for q (k): a warp per row loads it from global memory, takes
//     mean and variance in fp32 (two passes over registers, as the eager reference), and writes
//     weight * xhat + bias rounded to T to shared memory. Rows past `tokens` stay zero, exactly as
//     before (no bias leaks into a masked row). The result depends on the row alone, so the forward,
//     dQ and dK/dV kernels stage bit-identical normalized rows and the backward's P is the forward's;
//   * backward: acc * scale in the dQ (dK) kernel is the gradient gy w.r.t. the normalized row, held
//     by a quad of lanes per row (columns dn * 8 + 2t, +1). The epilogue re-reads the raw row from
//     global memory, recomputes xhat with the (mean, rstd) its staging kept in shared memory, and
//     writes dx = rstd * (gy w - mean(gy w) - xhat mean(gy w xhat)) (row sums: in-thread over dn, then
//     __shfl_xor 1, 2 over the quad). The weight and bias gradients are per-CTA fp32 column sums of
//     gy xhat and gy over valid rows (in-thread over the two rows, xor 4, 8, 16 over the warp, then the
//     4 warps in order) written to a workspace [ctas, 2, head_dim], which norm_param_grad_kernel sums
//     in a fixed order: deterministic, no atomics.
#include <limits>

#include "common.cuh"
#include "vitkern_kernels.h"

namespace vk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 16 * kWarps;  // rows owned by one CTA (queries in fwd/dQ, keys in dK/dV)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Lane roles in every m16n8k16 fragment: g = lane / 4 (row of A and C, column n of B),
// t = lane % 4 (selects the pair of columns 2t, 2t+1 of A and C, rows 2t, 2t+1 of B).
__device__ __forceinline__ int lane_g() { return (threadIdx.x % 32) >> 2; }
__device__ __forceinline__ int lane_t() { return threadIdx.x & 3; }

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A[16 x 16] = s[row0 .. row0+15][k0 .. k0+15], s row-major with leading dim ld.
template <typename T>
__device__ __forceinline__ void frag_a(const T* s, int ld, int row0, int k0, uint32_t (&a)[4]) {
  const int g = lane_g(), t = lane_t();
  const T* p = s + (row0 + g) * ld + k0 + 2 * t;
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * ld);
  a[2] = ld32(p + 8);
  a[3] = ld32(p + 8 * ld + 8);
}

// B[16 x 8] with B[k][n] = s[n0 + n][k0 + k]: s stores n as rows (K for q.k^T, dO for dP = dO v^T ...).
template <typename T>
__device__ __forceinline__ void frag_b_nk(const T* s, int ld, int n0, int k0, uint32_t (&b)[2]) {
  const T* p = s + (n0 + lane_g()) * ld + k0 + 2 * lane_t();
  b[0] = ld32(p);
  b[1] = ld32(p + 8);
}

// B[16 x 8] with B[k][n] = s[k0 + k][n0 + n]: s stores k as rows (V for P v, K for dS k ...).
template <typename T>
__device__ __forceinline__ void frag_b_kn(const T* s, int ld, int k0, int n0, uint32_t (&b)[2]) {
  const int g = lane_g(), t = lane_t();
  const T* p = s + (k0 + 2 * t) * ld + n0 + g;
  b[0] = pack2<T>(to_f(p[0]), to_f(p[ld]));
  b[1] = pack2<T>(to_f(p[8 * ld]), to_f(p[9 * ld]));
}

// The A fragment of columns 16 kk .. 16 kk + 15 of a row block held as C accumulators, n-tiles 2kk, 2kk+1.
template <typename T>
__device__ __forceinline__ void acc_to_a(const float (&c0)[4], const float (&c1)[4], uint32_t (&a)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Copies rows [r0, r0 + rows) of one head's q, k or v (selected by `base`) into s, zero past `tokens`.
// base: the element (b, token 0, which, h, 0) of qkv; stride_t: elements between tokens.
template <typename T, int D>
__device__ __forceinline__ void stage_rows(T* s, int ld, const T* __restrict__ base, int64_t stride_t, int r0, int rows,
                                           int tokens) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    Vec8<T> v;
    if (r0 + r < tokens) {
      v = *reinterpret_cast<const Vec8<T>*>(base + (r0 + r) * stride_t + c);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v.v[j] = from_f<T>(0.f);
    }
    *reinterpret_cast<Vec8<T>*>(s + r * ld + c) = v;
  }
}

template <int D> __host__ __device__ constexpr int smem_ld() { return D + 8; }

// QK-norm arguments of one launch (all null for the plain path). q_weight == nullptr: q is not
// normalized (likewise k); a side that is normalized has both its weight and bias [D] in T.
// q_partial, k_partial: the backward's workspaces [ctas, 2, D] fp32 (ctas = batch * heads * tiles).
template <typename T> struct QkNorm {
  const T* q_weight;
  const T* q_bias;
  const T* k_weight;
  const T* k_bias;
  float q_eps, k_eps;
  float* q_partial;
  float* k_partial;
};

// Like stage_rows, with a LayerNorm over the D columns of every staged row (QK-norm): warp w stages rows
// w, w + 4, ...; lane l holds the column pairs 2 (l + 32 i). Statistics in fp32: the mean, then the mean
// of squared deviations from the registers (the eager reference's two passes); each element becomes
// (x - mean) * rstd * weight + bias rounded to T. Rows past `tokens` are zero, as in stage_rows.
// stats (nullable): (mean, rstd) of each valid row, indexed from r0, for the backward's epilogue.
template <typename T, int D>
__device__ __forceinline__ void stage_norm_rows(T* s, int ld, const T* __restrict__ base, int64_t stride_t, int r0,
                                                int rows, int tokens, const T* __restrict__ weight,
                                                const T* __restrict__ bias, float eps, float2* stats) {
  constexpr int kPairs = D / 2, kPer = (kPairs + 31) / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {  // warp-uniform: every lane reaches the shuffles
    T* dst = s + r * ld;
    if (r0 + r >= tokens) {
      for (int p = lane; p < kPairs; p += 32) *reinterpret_cast<uint32_t*>(dst + 2 * p) = pack2<T>(0.f, 0.f);
      continue;
    }
    const T* src = base + (r0 + r) * stride_t;
    float x[kPer][2];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = 2 * (lane + 32 * i);
      x[i][0] = c < D ? to_f(src[c]) : 0.f;
      x[i][1] = c < D ? to_f(src[c + 1]) : 0.f;
      sum += x[i][0] + x[i][1];
    }
    const float mean = warp_sum(sum) / D;
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (2 * (lane + 32 * i) >= D) continue;
      const float d0 = x[i][0] - mean, d1 = x[i][1] - mean;
      ss += d0 * d0 + d1 * d1;
    }
    const float rstd = rsqrtf(warp_sum(ss) / D + eps);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = 2 * (lane + 32 * i);
      if (c >= D) continue;
      const float y0 = (x[i][0] - mean) * rstd * to_f(weight[c]) + to_f(bias[c]);
      const float y1 = (x[i][1] - mean) * rstd * to_f(weight[c + 1]) + to_f(bias[c + 1]);
      *reinterpret_cast<uint32_t*>(dst + c) = pack2<T>(y0, y1);
    }
    if (stats != nullptr && lane == 0) stats[r] = make_float2(mean, rstd);
  }
}

// q or k staging: normalized when QKN and the side's weight is set, else stage_rows as before.
template <typename T, int D, bool QKN>
__device__ __forceinline__ void stage_qk(T* s, int ld, const T* __restrict__ base, int64_t stride_t, int r0, int rows,
                                         int tokens, const T* weight, const T* bias, float eps, float2* stats) {
  if constexpr (QKN) {
    if (weight != nullptr) {
      stage_norm_rows<T, D>(s, ld, base, stride_t, r0, rows, tokens, weight, bias, eps, stats);
      return;
    }
  }
  stage_rows<T, D>(s, ld, base, stride_t, r0, rows, tokens);
}

// The LayerNorm backward of QK-norm for the CTA's 64 rows r0 + warp * 16 + (g, g + 8), from the C-fragment
// accumulators acc (columns dn * 8 + 2t, +1): gy = acc * scale is the gradient w.r.t. the normalized row.
//   dx = rstd * (gy w - mean(gy w) - xhat * mean(gy w xhat)), xhat = (x - mean) * rstd,
// with x re-read from `raw` (the element (b, token 0, which, h, 0) of qkv, tokens stride_t apart) and
// (mean, rstd) from stats (indexed from r0, as stage_norm_rows wrote them); dx is stored to `dst`
// (element (b, token 0, which, h, 0) of dqkv, tokens dst_t apart) for rows < tokens. The CTA's column
// sums over its valid rows of gy xhat (dweight) and gy (dbias) go to partial [2][D], reduced in a fixed
// order through `scratch` (kWarps * 2 * D floats of shared memory that may alias the staged tiles).
// Called by all threads (it synchronizes the CTA).
template <typename T, int D>
__device__ __forceinline__ void norm_bwd_epilogue(const float (&acc)[D / 8][4], float scale, const T* __restrict__ raw,
                                                  int64_t stride_t, int r0, int tokens, const T* __restrict__ weight,
                                                  const float2* stats, T* __restrict__ dst, int64_t dst_t,
                                                  float* scratch, float* __restrict__ partial) {
  const int warp = threadIdx.x / 32, g = lane_g(), t = lane_t();
  bool valid[2];
  float2 st[2];
  const T* x[2];
  T* out[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + warp * 16 + g + 8 * r;
    valid[r] = row < tokens;
    st[r] = valid[r] ? stats[row - r0] : make_float2(0.f, 0.f);
    x[r] = raw + (valid[r] ? row : 0) * stride_t;  // an invalid row reads row 0 and never uses it
    out[r] = dst + (valid[r] ? row : 0) * dst_t + 2 * t;
  }
  // Pass 1: the row means of gy w and gy w xhat (in-thread over dn, then over the quad).
  float m1[2] = {0.f, 0.f}, m2[2] = {0.f, 0.f};
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = dn * 8 + 2 * t + e;
      const float w = to_f(weight[c]);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float xhat = (to_f(x[r][c]) - st[r].x) * st[r].y;
        const float gw = acc[dn][2 * r + e] * scale * w;
        m1[r] += gw;
        m2[r] += gw * xhat;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    m1[r] += __shfl_xor_sync(0xffffffffu, m1[r], 1);
    m1[r] += __shfl_xor_sync(0xffffffffu, m1[r], 2);
    m2[r] += __shfl_xor_sync(0xffffffffu, m2[r], 1);
    m2[r] += __shfl_xor_sync(0xffffffffu, m2[r], 2);
    m1[r] /= D;
    m2[r] /= D;
  }
  __syncthreads();  // scratch may alias tiles the main loop was still reading
  // Pass 2: dx of the valid rows, and the column sums of gy xhat and gy over them (in-thread over the two
  // rows, then over g: the warp's 16 rows) into this warp's slice of scratch.
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    float dx[2][2], pw[2] = {0.f, 0.f}, pb[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = dn * 8 + 2 * t + e;
      const float w = to_f(weight[c]);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float xhat = (to_f(x[r][c]) - st[r].x) * st[r].y;
        const float gy = acc[dn][2 * r + e] * scale;
        dx[r][e] = st[r].y * (gy * w - m1[r] - xhat * m2[r]);
        if (valid[r]) {
          pw[e] += gy * xhat;
          pb[e] += gy;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (valid[r]) *reinterpret_cast<uint32_t*>(out[r] + dn * 8) = pack2<T>(dx[r][0], dx[r][1]);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) {
        pw[e] += __shfl_xor_sync(0xffffffffu, pw[e], o);
        pb[e] += __shfl_xor_sync(0xffffffffu, pb[e], o);
      }
      if (g == 0) {
        scratch[(warp * 2) * D + dn * 8 + 2 * t + e] = pw[e];
        scratch[(warp * 2 + 1) * D + dn * 8 + 2 * t + e] = pb[e];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * D; i += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += scratch[w * 2 * D + i];
    partial[i] = sum;
  }
}

// partial [ctas, 2, D] fp32 -> dweight, dbias [D] in T: column sums in a fixed order (no atomics).
// Block (32, 16): x picks one of the 2 D columns, y a slice of the CTAs (y, y + 16, ...); the 16 slices
// are then added in order.
template <typename T>
__global__ void __launch_bounds__(512) norm_param_grad_kernel(const float* __restrict__ partial, int64_t ctas, int D,
                                                              T* __restrict__ dweight, T* __restrict__ dbias) {
  __shared__ float part[16][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float sum = 0.f;
  if (col < 2 * D)
    for (int64_t k = threadIdx.y; k < ctas; k += 16) sum += partial[k * 2 * D + col];
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || col >= 2 * D) return;
  float total = 0.f;
#pragma unroll
  for (int y = 0; y < 16; ++y) total += part[y][threadIdx.x];
  if (col < D)
    dweight[col] = from_f<T>(total);
  else
    dbias[col - D] = from_f<T>(total);
}

// ---------------------------------------------------------------------------------------------
// The rows of one CTA's sequence. Dense (cu_seqlens null): sample b = blockIdx.x / heads, rows
// [0, tokens) of its own [tokens] block. Packed (varlen): qkv is a batch of one of `tokens` (the
// total) rows, and sequence s = blockIdx.x / heads owns the rows [cu_seqlens[s], cu_seqlens[s + 1]);
// every index below is then the dense one with b = 0, so out, dqkv and dout rows are the packed rows
// and lse, delta are [heads, total]. Every bound is `end` (never `tokens`), every loop starts at
// `begin`: keys, queries and masks stay inside the sequence, and no tile mixes two images.
struct SeqRange {
  int b, begin, end;
};
__device__ __forceinline__ SeqRange seq_range(const int* __restrict__ cu_seqlens, int s, int tokens) {
  if (cu_seqlens == nullptr) return {s, 0, tokens};
  return {0, cu_seqlens[s], cu_seqlens[s + 1]};
}

// The sequence's first row read again (volatile: never merged with seq_range's read), for code after a
// long loop: a load there is cheaper than keeping the row live in a register across the loop, which the
// dK/dV kernel at head dim 64 does not have at its 168-register (3 CTAs per SM) budget.
__device__ __forceinline__ int seq_begin_again(const int* cu_seqlens, int s) {
  return cu_seqlens == nullptr ? 0 : *reinterpret_cast<const volatile int*>(cu_seqlens + s);
}

// A CTA past its sequence's last row (packed: grid.y covers max_seqlen) has nothing to do, but it
// still owns its slice [2][D] of a QK-norm workspace, which norm_param_grad_kernel sums: zeros.
template <int D>
__device__ __forceinline__ void zero_partial(float* __restrict__ partial) {
  const int64_t cta = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  for (int i = threadIdx.x; i < 2 * D; i += kThreads) partial[cta * 2 * D + i] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid (batch * heads, ceil(tokens / 64)); packed: (sequences * heads, ceil(max_seqlen / 64)).
// Shared: Q [64][ld], K [64][ld], V [64][ld].
// The minimum of 1 CTA per SM lifts ptxas's default register target (it otherwise settles at 128
// for head dim 64 and spills a few bytes); at about 140 registers 3 CTAs still fit on an SM.
template <typename T, int D, bool QKN>
__global__ void __launch_bounds__(kThreads, 1)
attention_fwd_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, T* __restrict__ out,
                     float* __restrict__ lse, int tokens, const int* __restrict__ cu_seqlens, int heads, float scale,
                     QkNorm<T> norm) {
  constexpr int LD = smem_ld<D>();
  constexpr int BN = 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kTile * LD;
  T* sV = sK + BN * LD;

  const int bh = blockIdx.x, h = bh % heads;
  const SeqRange seq = seq_range(cu_seqlens, bh / heads, tokens);
  const int b = seq.b, end = seq.end;
  const int m0 = seq.begin + blockIdx.y * kTile;
  if (m0 >= end) return;  // packed: this sequence is shorter than max_seqlen (uniform over the CTA)
  const int warp = threadIdx.x / 32, g = lane_g(), t = lane_t();
  const int64_t hd = static_cast<int64_t>(heads) * D;
  const T* q_base = qkv + b * stride_b + h * D;
  const T* k_base = q_base + hd;
  const T* v_base = q_base + 2 * hd;

  stage_qk<T, D, QKN>(sQ, LD, q_base, stride_t, m0, kTile, end, norm.q_weight, norm.q_bias, norm.q_eps, nullptr);
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) frag_a(sQ, LD, warp * 16, kk * 16, qf[kk]);

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  // Running max of scale * q.k (natural-log units) and the thread's partial row sums, rows g and g + 8.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int n0 = seq.begin; n0 < end; n0 += BN) {
    __syncthreads();  // the previous tile's readers are done
    stage_qk<T, D, QKN>(sK, LD, k_base, stride_t, n0, BN, end, norm.k_weight, norm.k_bias, norm.k_eps, nullptr);
    stage_rows<T, D>(sV, LD, v_base, stride_t, n0, BN, end);
    __syncthreads();
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        uint32_t bf[2];
        frag_b_nk(sK, LD, j * 8, kk * 16, bf);
        mma16816<T>(s[j], qf[kk], bf);
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = key < end ? s[j][e] * scale : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      // Key n0 < end is unmasked, so the new max is finite; exp2(-inf) = 0 on the first tile.
      const float m_new = fmaxf(m_run[r], mx[r]);
      alpha[r] = exp2f((m_run[r] - m_new) * kLog2e);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        // s - max is exact where p matters (Sterbenz): log2(e) multiplies a small exact difference.
        s[j][e] = exp2f((s[j][e] - m_run[e >> 1]) * kLog2e);
        l_run[e >> 1] += s[j][e];
      }
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha[0];
      o[dn][1] *= alpha[0];
      o[dn][2] *= alpha[1];
      o[dn][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a<T>(s[2 * kk], s[2 * kk + 1], pa);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        uint32_t bf[2];
        frag_b_kn(sV, LD, kk * 16, dn * 8, bf);
        mma16816<T>(o[dn], pa, bf);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= end) continue;
    const float inv = 1.f / l_run[r];
    T* dst = out + (static_cast<int64_t>(b) * tokens + row) * hd + h * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<uint32_t*>(dst + dn * 8) = pack2<T>(o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
    // max + log(sum): a row whose sum is 1 saves its max exactly.
    if (t == 0) lse[(static_cast<int64_t>(b) * heads + h) * tokens + row] = m_run[r] + log2f(l_run[r]) * kLn2;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: the dQ kernel first (it writes delta), then dK/dV. Both recompute S and dP with the same
// fragments and mma order as the forward, so P = exp(scale * q.k - lse) is the forward's.

// dK, dV. Grid as the forward's; each warp owns 16 keys; query tiles of BM rows.
// Shared: K [64][ld], V [64][ld], Q [BM][ld], dO [BM][ld], lse [BM], delta [BM].
// With QKN also (mean, rstd) of the CTA's 64 keys after delta, for the k-norm epilogue.
template <typename T, int D, int BM, bool QKN>
__global__ void __launch_bounds__(kThreads)
attention_bwd_dkdv_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, const T* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dqkv,
                          int tokens, const int* __restrict__ cu_seqlens, int heads, float scale,
                          QkNorm<T> norm) {
  constexpr int LD = smem_ld<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kTile * LD;
  T* sQ = sV + kTile * LD;
  T* sdO = sQ + BM * LD;
  float* sLse = reinterpret_cast<float*>(sdO + BM * LD);
  float* sDelta = sLse + BM;
  float2* sKStats = reinterpret_cast<float2*>(sDelta + BM);  // QKN only

  const int bh = blockIdx.x, h = bh % heads;
  const SeqRange seq = seq_range(cu_seqlens, bh / heads, tokens);
  const int b = seq.b, end = seq.end;
  const int n0 = seq.begin + blockIdx.y * kTile;
  if (n0 >= end) {  // packed: this sequence is shorter than max_seqlen (uniform over the CTA)
    if constexpr (QKN) {
      if (norm.k_weight != nullptr) zero_partial<D>(norm.k_partial);
    }
    return;
  }
  const int warp = threadIdx.x / 32, g = lane_g(), t = lane_t();
  const int64_t hd = static_cast<int64_t>(heads) * D;
  const T* q_base = qkv + b * stride_b + h * D;
  const T* do_base = dout + static_cast<int64_t>(b) * tokens * hd + h * D;
  // One offset for the rows of lse and delta (their bases stay kernel parameters): a register pair less
  // across the query loop than two row pointers.
  const int64_t stat_row = (static_cast<int64_t>(b) * heads + h) * tokens;

  stage_qk<T, D, QKN>(sK, LD, q_base + hd, stride_t, n0, kTile, end, norm.k_weight, norm.k_bias, norm.k_eps,
                      sKStats);
  stage_rows<T, D>(sV, LD, q_base + 2 * hd, stride_t, n0, kTile, end);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dn][e] = dv[dn][e] = 0.f;

  for (int m0 = seq.begin; m0 < end; m0 += BM) {
    __syncthreads();
    stage_qk<T, D, QKN>(sQ, LD, q_base, stride_t, m0, BM, end, norm.q_weight, norm.q_bias, norm.q_eps, nullptr);
    stage_rows<T, D>(sdO, LD, do_base, hd, m0, BM, end);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      // A query past the end gets lse = +inf, so its P column is exp2(-inf) = 0.
      sLse[i] = m0 + i < end ? lse[stat_row + m0 + i] : INFINITY;
      sDelta[i] = m0 + i < end ? delta[stat_row + m0 + i] : 0.f;
    }
    __syncthreads();
    // S^T[key j][query i] = k_j . q_i for this warp's 16 keys and the BM queries.
    float p[BM / 8][4], dp[BM / 8][4];
#pragma unroll
    for (int qi = 0; qi < BM / 8; ++qi)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[qi][e] = dp[qi][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      frag_a(sK, LD, warp * 16, kk * 16, ka);
      frag_a(sV, LD, warp * 16, kk * 16, va);
#pragma unroll
      for (int qi = 0; qi < BM / 8; ++qi) {
        uint32_t qb[2], dob[2];
        frag_b_nk(sQ, LD, qi * 8, kk * 16, qb);
        frag_b_nk(sdO, LD, qi * 8, kk * 16, dob);
        mma16816<T>(p[qi], ka, qb);    // S^T
        mma16816<T>(dp[qi], va, dob);  // dP^T[j][i] = v_j . do_i
      }
    }
#pragma unroll
    for (int qi = 0; qi < BM / 8; ++qi) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = qi * 8 + 2 * t + (e & 1);
        p[qi][e] = exp2f((p[qi][e] * scale - sLse[i]) * kLog2e);
        dp[qi][e] = p[qi][e] * (dp[qi][e] - sDelta[i]);  // dS^T (without the scale)
      }
    }
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      uint32_t pa[4], dsa[4];
      acc_to_a<T>(p[2 * kq], p[2 * kq + 1], pa);
      acc_to_a<T>(dp[2 * kq], dp[2 * kq + 1], dsa);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        uint32_t dob[2], qb[2];
        frag_b_kn(sdO, LD, kq * 16, dn * 8, dob);
        frag_b_kn(sQ, LD, kq * 16, dn * 8, qb);
        mma16816<T>(dv[dn], pa, dob);   // dV_j += P^T_ji dO_i
        mma16816<T>(dk[dn], dsa, qb);   // dK_j += dS^T_ji q_i
      }
    }
  }

  bool k_norm = false;
  if constexpr (QKN) k_norm = norm.k_weight != nullptr;
  const int k0 = seq_begin_again(cu_seqlens, bh / heads) + blockIdx.y * kTile;  // n0, not kept across the loop
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = k0 + warp * 16 + g + 8 * r;
    if (key >= end) continue;
    T* dst = dqkv + (static_cast<int64_t>(b) * tokens + key) * 3 * hd + h * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      if (!k_norm)
        *reinterpret_cast<uint32_t*>(dst + hd + dn * 8) = pack2<T>(dk[dn][2 * r] * scale, dk[dn][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dst + 2 * hd + dn * 8) = pack2<T>(dv[dn][2 * r], dv[dn][2 * r + 1]);
    }
  }
  if constexpr (QKN) {
    if (k_norm) {
      const int64_t cta = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
      norm_bwd_epilogue<T, D>(dk, scale, q_base + hd, stride_t, k0, end, norm.k_weight, sKStats,
                              dqkv + static_cast<int64_t>(b) * tokens * 3 * hd + hd + h * D, 3 * hd,
                              reinterpret_cast<float*>(smem_raw), norm.k_partial + cta * 2 * D);
    }
  }
}

// dQ, and delta for the dK/dV kernel. Grid as the forward's; each warp owns 16
// queries; key tiles of 64. Two sweeps over the keys: the first sums rowsum(P * dP) and rowsum(P)
// (their ratio is delta: the P-weighted mean of dP, so a common rounding factor of the recomputed
// row, from the rounding of lse, cancels from dS), the second forms dS = P * (dP - delta) and dQ.
// The first sweep costs two extra mma passes (S and dP) per key tile and replaces the delta kernel,
// which read out and dout from memory. Shared: Q [64][ld], dO [64][ld], K [64][ld], V [64][ld].
// With QKN also (mean, rstd) of the CTA's 64 queries after V, for the q-norm epilogue.
template <typename T, int D, bool QKN>
__global__ void __launch_bounds__(kThreads)
attention_bwd_dq_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, const T* __restrict__ dout,
                        const float* __restrict__ lse, float* __restrict__ delta, T* __restrict__ dqkv,
                        int tokens, const int* __restrict__ cu_seqlens, int heads, float scale,
                        QkNorm<T> norm) {
  constexpr int LD = smem_ld<D>();
  constexpr int BN = 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kTile * LD;
  T* sK = sdO + kTile * LD;
  T* sV = sK + BN * LD;
  float2* sQStats = reinterpret_cast<float2*>(sV + BN * LD);  // QKN only

  const int bh = blockIdx.x, h = bh % heads;
  const SeqRange seq = seq_range(cu_seqlens, bh / heads, tokens);
  const int b = seq.b, end = seq.end;
  const int m0 = seq.begin + blockIdx.y * kTile;
  if (m0 >= end) {  // packed: this sequence is shorter than max_seqlen (uniform over the CTA)
    if constexpr (QKN) {
      if (norm.q_weight != nullptr) zero_partial<D>(norm.q_partial);
    }
    return;
  }
  const int warp = threadIdx.x / 32, g = lane_g(), t = lane_t();
  const int64_t hd = static_cast<int64_t>(heads) * D;
  const T* q_base = qkv + b * stride_b + h * D;
  const T* do_base = dout + static_cast<int64_t>(b) * tokens * hd + h * D;
  const float* lse_row = lse + (static_cast<int64_t>(b) * heads + h) * tokens;
  float* delta_row = delta + (static_cast<int64_t>(b) * heads + h) * tokens;

  stage_qk<T, D, QKN>(sQ, LD, q_base, stride_t, m0, kTile, end, norm.q_weight, norm.q_bias, norm.q_eps, sQStats);
  stage_rows<T, D>(sdO, LD, do_base, hd, m0, kTile, end);
  float lse_r[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    // Rows past the end compute finite garbage (never stored): their q and dO rows are zero.
    lse_r[r] = row < end ? lse_row[row] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;
  // This thread's partial sums of P * dP and P for rows g and g + 8, then delta (sweep 1).
  float pdp[2] = {0.f, 0.f}, psum[2] = {0.f, 0.f}, dl[2] = {0.f, 0.f};

  for (int sweep = 0; sweep < 2; ++sweep) {
    if (sweep == 1) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        pdp[r] += __shfl_xor_sync(0xffffffffu, pdp[r], 1);
        pdp[r] += __shfl_xor_sync(0xffffffffu, pdp[r], 2);
        psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 1);
        psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 2);
        dl[r] = pdp[r] / psum[r];
        const int row = m0 + warp * 16 + g + 8 * r;
        if (t == 0 && row < end) delta_row[row] = dl[r];
      }
    }
    for (int n0 = seq.begin; n0 < end; n0 += BN) {
      __syncthreads();
      stage_qk<T, D, QKN>(sK, LD, q_base + hd, stride_t, n0, BN, end, norm.k_weight, norm.k_bias, norm.k_eps,
                          nullptr);
      stage_rows<T, D>(sV, LD, q_base + 2 * hd, stride_t, n0, BN, end);
      __syncthreads();
      float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[4], doa[4];
        frag_a(sQ, LD, warp * 16, kk * 16, qa);
        frag_a(sdO, LD, warp * 16, kk * 16, doa);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          uint32_t kb[2], vb[2];
          frag_b_nk(sK, LD, j * 8, kk * 16, kb);
          frag_b_nk(sV, LD, j * 8, kk * 16, vb);
          mma16816<T>(s[j], qa, kb);    // S = q k^T
          mma16816<T>(dp[j], doa, vb);  // dP = dO v^T
        }
      }
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + j * 8 + 2 * t + (e & 1);
          const float pv = key < end ? exp2f((s[j][e] * scale - lse_r[e >> 1]) * kLog2e) : 0.f;
          if (sweep == 0) {
            pdp[e >> 1] += pv * dp[j][e];
            psum[e >> 1] += pv;
          } else {
            dp[j][e] = pv * (dp[j][e] - dl[e >> 1]);  // dS (without the scale)
          }
        }
      }
      if (sweep == 0) continue;
#pragma unroll
      for (int kj = 0; kj < BN / 16; ++kj) {
        uint32_t dsa[4];
        acc_to_a<T>(dp[2 * kj], dp[2 * kj + 1], dsa);
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          uint32_t kb[2];
          frag_b_kn(sK, LD, kj * 16, dn * 8, kb);
          mma16816<T>(dq[dn], dsa, kb);  // dQ_i += dS_ij k_j
        }
      }
    }
  }

  if constexpr (QKN) {
    if (norm.q_weight != nullptr) {
      const int64_t cta = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
      norm_bwd_epilogue<T, D>(dq, scale, q_base, stride_t, m0, end, norm.q_weight, sQStats,
                              dqkv + static_cast<int64_t>(b) * tokens * 3 * hd + h * D, 3 * hd,
                              reinterpret_cast<float*>(smem_raw), norm.q_partial + cta * 2 * D);
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= end) continue;
    T* dst = dqkv + (static_cast<int64_t>(b) * tokens + row) * 3 * hd + h * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<uint32_t*>(dst + dn * 8) = pack2<T>(dq[dn][2 * r] * scale, dq[dn][2 * r + 1] * scale);
  }
}

template <int D> constexpr int dkdv_bm() { return D > 80 ? 32 : 64; }

template <typename T, int D, bool QKN>
cudaError_t launch_fwd(const void* qkv, int64_t sb, int64_t st, void* out, float* lse, int batch, int tokens,
                       const int* cu_seqlens, int grid_rows, int heads, float scale, const QkNorm<T>& norm,
                       cudaStream_t stream) {
  constexpr int LD = smem_ld<D>();
  const size_t smem = size_t(3) * kTile * LD * sizeof(T);
  auto kernel = attention_fwd_kernel<T, D, QKN>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  const dim3 grid(unsigned(batch) * unsigned(heads), ceil_div(grid_rows, kTile));
  kernel<<<grid, kThreads, smem, stream>>>((const T*)qkv, sb, st, (T*)out, lse, tokens, cu_seqlens, heads, scale,
                                           norm);
  return cudaGetLastError();
}

// out is not read: delta is recomputed from P and dP by the dQ kernel, which runs first. With QK-norm the
// dQ (dK/dV) kernel leaves its per-CTA weight/bias gradient sums in norm.q_partial (k_partial), which
// norm_param_grad_kernel reduces into dweight, dbias (dq_w ... dk_b: [D] in T, set for a normalized side).
template <typename T, int D, bool QKN>
cudaError_t launch_bwd(const void* qkv, int64_t sb, int64_t st, const void* dout, const float* lse, float* delta,
                       void* dqkv, int batch, int tokens, const int* cu_seqlens, int grid_rows, int heads,
                       float scale, const QkNorm<T>& norm, void* dq_w, void* dq_b, void* dk_w, void* dk_b,
                       cudaStream_t stream) {
  constexpr int LD = smem_ld<D>();
  constexpr int BM = dkdv_bm<D>();
  const dim3 grid(unsigned(batch) * unsigned(heads), ceil_div(grid_rows, kTile));
  const size_t stats = QKN ? kTile * sizeof(float2) : 0;  // (mean, rstd) of the CTA's own 64 rows
  const size_t smem_q = size_t(4) * kTile * LD * sizeof(T) + stats;
  auto q = attention_bwd_dq_kernel<T, D, QKN>;
  cudaError_t e = cudaFuncSetAttribute(q, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_q));
  if (e != cudaSuccess) return e;
  q<<<grid, kThreads, smem_q, stream>>>((const T*)qkv, sb, st, (const T*)dout, lse, delta, (T*)dqkv, tokens,
                                        cu_seqlens, heads, scale, norm);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const size_t smem_kv =
      (size_t(2) * kTile * LD + size_t(2) * BM * LD) * sizeof(T) + 2 * BM * sizeof(float) + stats;
  auto kv = attention_bwd_dkdv_kernel<T, D, BM, QKN>;
  e = cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_kv));
  if (e != cudaSuccess) return e;
  kv<<<grid, kThreads, smem_kv, stream>>>((const T*)qkv, sb, st, (const T*)dout, lse, delta, (T*)dqkv, tokens,
                                          cu_seqlens, heads, scale, norm);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if constexpr (QKN) {
    const int64_t ctas = int64_t(grid.x) * grid.y;
    const dim3 block(32, 16), reduce_grid(ceil_div(2 * D, 32));
    if (norm.q_weight != nullptr) {
      norm_param_grad_kernel<T><<<reduce_grid, block, 0, stream>>>(norm.q_partial, ctas, D, (T*)dq_w, (T*)dq_b);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    if (norm.k_weight != nullptr) {
      norm_param_grad_kernel<T><<<reduce_grid, block, 0, stream>>>(norm.k_partial, ctas, D, (T*)dk_w, (T*)dk_b);
      e = cudaGetLastError();
    }
  }
  return e;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace
}  // namespace vk

bool vk_attention_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 80 || head_dim == 128; }

#define VK_HEAD_DIM_DISPATCH(hd, ...)  \
  do {                                 \
    if ((hd) == 64) {                  \
      constexpr int D = 64;            \
      __VA_ARGS__;                     \
    } else if ((hd) == 80) {           \
      constexpr int D = 80;            \
      __VA_ARGS__;                     \
    } else if ((hd) == 128) {          \
      constexpr int D = 128;           \
      __VA_ARGS__;                     \
    } else {                           \
      return cudaErrorInvalidValue;    \
    }                                  \
  } while (0)

int64_t vk_attention_norm_partial_rows(int batch, int tokens, int heads) {
  return int64_t(batch) * heads * vk::ceil_div(tokens, vk::kTile);
}

namespace {

// The launch checks shared by the entry points, then the typed launch (QKN when a side is normalized).
// Dense: cu_seqlens null, grid_rows = tokens. Packed: batch = the number of sequences, tokens = the total
// (qkv a batch of one), cu_seqlens [batch + 1] on the device and grid_rows = max_seqlen (>= every length).
cudaError_t attention_fwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, void* out, float* lse,
                          int batch, int tokens, const int* cu_seqlens, int grid_rows, int heads, int head_dim,
                          float scale, const void* q_weight, const void* q_bias, float q_eps, const void* k_weight,
                          const void* k_bias, float k_eps, cudaStream_t stream) {
  if (batch <= 0 || tokens <= 0 || heads <= 0) return batch == 0 || tokens == 0 ? cudaSuccess : cudaErrorInvalidValue;
  // 16-byte staging copies need every row start 16-byte aligned.
  if (!vk::aligned16(qkv) || stride_b % 8 || stride_t % 8 || grid_rows <= 0 || grid_rows > 65535 * vk::kTile)
    return cudaErrorInvalidValue;
  // A normalized side needs its weight and bias.
  if ((q_weight != nullptr) != (q_bias != nullptr) || (k_weight != nullptr) != (k_bias != nullptr))
    return cudaErrorInvalidValue;
  VK_DISPATCH(dtype, T, VK_HEAD_DIM_DISPATCH(head_dim, {
    const vk::QkNorm<T> norm{(const T*)q_weight, (const T*)q_bias, (const T*)k_weight, (const T*)k_bias, q_eps, k_eps,
                             nullptr, nullptr};
    if (q_weight == nullptr && k_weight == nullptr)
      return vk::launch_fwd<T, D, false>(qkv, stride_b, stride_t, out, lse, batch, tokens, cu_seqlens, grid_rows, heads,
                                         scale, norm, stream);
    return vk::launch_fwd<T, D, true>(qkv, stride_b, stride_t, out, lse, batch, tokens, cu_seqlens, grid_rows, heads,
                                      scale, norm, stream);
  }));
  return cudaSuccess;
}

cudaError_t attention_bwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, const void* dout,
                          const float* lse, float* delta, void* dqkv, int batch, int tokens, const int* cu_seqlens,
                          int grid_rows, int heads, int head_dim, float scale, const void* q_weight,
                          const void* q_bias, float q_eps, const void* k_weight, const void* k_bias, float k_eps,
                          void* dq_weight, void* dq_bias, void* dk_weight, void* dk_bias, float* q_partial,
                          float* k_partial, cudaStream_t stream) {
  if (batch <= 0 || tokens <= 0 || heads <= 0) return batch == 0 || tokens == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (!vk::aligned16(qkv) || !vk::aligned16(dout) || stride_b % 8 || stride_t % 8 || grid_rows <= 0 ||
      grid_rows > 65535 * vk::kTile)
    return cudaErrorInvalidValue;
  const bool qn = q_weight != nullptr, kn = k_weight != nullptr;
  if (qn != (q_bias != nullptr) || kn != (k_bias != nullptr)) return cudaErrorInvalidValue;
  if (qn && (dq_weight == nullptr || dq_bias == nullptr || q_partial == nullptr)) return cudaErrorInvalidValue;
  if (kn && (dk_weight == nullptr || dk_bias == nullptr || k_partial == nullptr)) return cudaErrorInvalidValue;
  VK_DISPATCH(dtype, T, VK_HEAD_DIM_DISPATCH(head_dim, {
    const vk::QkNorm<T> norm{(const T*)q_weight, (const T*)q_bias, (const T*)k_weight, (const T*)k_bias, q_eps, k_eps,
                             q_partial, k_partial};
    if (!qn && !kn)
      return vk::launch_bwd<T, D, false>(qkv, stride_b, stride_t, dout, lse, delta, dqkv, batch, tokens, cu_seqlens,
                                         grid_rows, heads, scale, norm, nullptr, nullptr, nullptr, nullptr, stream);
    return vk::launch_bwd<T, D, true>(qkv, stride_b, stride_t, dout, lse, delta, dqkv, batch, tokens, cu_seqlens,
                                      grid_rows, heads, scale, norm, dq_weight, dq_bias, dk_weight, dk_bias, stream);
  }));
  return cudaSuccess;
}

// Packed row indices are ints: a tile start begin + 64 blockIdx.y and a loop's last n0 + 64 stay below
// total + max_seqlen + 64, which must not overflow.
bool varlen_rows_fit(int total, int max_seqlen) {
  return int64_t(total) + max_seqlen + vk::kTile <= int64_t(std::numeric_limits<int>::max());
}

}  // namespace

cudaError_t vk_attention_fwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, void* out, float* lse,
                             int batch, int tokens, int heads, int head_dim, float scale, cudaStream_t stream) {
  return attention_fwd(dtype, qkv, stride_b, stride_t, out, lse, batch, tokens, nullptr, tokens, heads, head_dim,
                       scale, nullptr, nullptr, 0.f, nullptr, nullptr, 0.f, stream);
}

// `out` is not read (kept in the entry point's signature for csrc/bindings.cpp): the dQ kernel recomputes
// delta = rowsum(P * dP) / rowsum(P) itself and writes it to `delta` (scratch) for the dK/dV kernel.
cudaError_t vk_attention_bwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, const void* out,
                             const void* dout, const float* lse, float* delta, void* dqkv, int batch, int tokens,
                             int heads, int head_dim, float scale, cudaStream_t stream) {
  return attention_bwd(dtype, qkv, stride_b, stride_t, dout, lse, delta, dqkv, batch, tokens, nullptr, tokens, heads,
                       head_dim, scale, nullptr, nullptr, 0.f, nullptr, nullptr, 0.f, nullptr, nullptr, nullptr,
                       nullptr, nullptr, nullptr, stream);
}

cudaError_t vk_attention_qknorm_fwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, void* out,
                                    float* lse, int batch, int tokens, int heads, int head_dim, float scale,
                                    const void* q_weight, const void* q_bias, float q_eps, const void* k_weight,
                                    const void* k_bias, float k_eps, cudaStream_t stream) {
  return attention_fwd(dtype, qkv, stride_b, stride_t, out, lse, batch, tokens, nullptr, tokens, heads, head_dim,
                       scale, q_weight, q_bias, q_eps, k_weight, k_bias, k_eps, stream);
}

cudaError_t vk_attention_qknorm_bwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t,
                                    const void* dout, const float* lse, float* delta, void* dqkv, int batch,
                                    int tokens, int heads, int head_dim, float scale, const void* q_weight,
                                    const void* q_bias, float q_eps, const void* k_weight, const void* k_bias,
                                    float k_eps, void* dq_weight, void* dq_bias, void* dk_weight, void* dk_bias,
                                    float* q_partial, float* k_partial, cudaStream_t stream) {
  return attention_bwd(dtype, qkv, stride_b, stride_t, dout, lse, delta, dqkv, batch, tokens, nullptr, tokens, heads,
                       head_dim, scale, q_weight, q_bias, q_eps, k_weight, k_bias, k_eps, dq_weight, dq_bias,
                       dk_weight, dk_bias, q_partial, k_partial, stream);
}

cudaError_t vk_attention_varlen_fwd(int dtype, const void* qkv, int64_t stride_t, void* out, float* lse,
                                    const int* cu_seqlens, int num_seqs, int total, int max_seqlen, int heads,
                                    int head_dim, float scale, const void* q_weight, const void* q_bias, float q_eps,
                                    const void* k_weight, const void* k_bias, float k_eps, cudaStream_t stream) {
  if (num_seqs > 0 && cu_seqlens == nullptr) return cudaErrorInvalidValue;
  if (!varlen_rows_fit(total, max_seqlen)) return cudaErrorInvalidValue;
  return attention_fwd(dtype, qkv, 0, stride_t, out, lse, num_seqs, total, cu_seqlens, max_seqlen, heads, head_dim,
                       scale, q_weight, q_bias, q_eps, k_weight, k_bias, k_eps, stream);
}

cudaError_t vk_attention_varlen_bwd(int dtype, const void* qkv, int64_t stride_t, const void* dout, const float* lse,
                                    float* delta, void* dqkv, const int* cu_seqlens, int num_seqs, int total,
                                    int max_seqlen, int heads, int head_dim, float scale, const void* q_weight,
                                    const void* q_bias, float q_eps, const void* k_weight, const void* k_bias,
                                    float k_eps, void* dq_weight, void* dq_bias, void* dk_weight, void* dk_bias,
                                    float* q_partial, float* k_partial, cudaStream_t stream) {
  if (num_seqs > 0 && cu_seqlens == nullptr) return cudaErrorInvalidValue;
  if (!varlen_rows_fit(total, max_seqlen)) return cudaErrorInvalidValue;
  return attention_bwd(dtype, qkv, 0, stride_t, dout, lse, delta, dqkv, num_seqs, total, cu_seqlens, max_seqlen, heads,
                       head_dim, scale, q_weight, q_bias, q_eps, k_weight, k_bias, k_eps, dq_weight, dq_bias,
                       dk_weight, dk_bias, q_partial, k_partial, stream);
}
