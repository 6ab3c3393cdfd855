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
// Shared-memory rows are padded by 8 elements (16 bytes) so the 32-bit fragment reads of a warp
// fall in 32 distinct banks.
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

// ---------------------------------------------------------------------------------------------
// Forward. Grid (batch * heads, ceil(tokens / 64)). Shared: Q [64][ld], K [64][ld], V [64][ld].
// The minimum of 1 CTA per SM lifts ptxas's default register target (it otherwise settles at 128
// for head dim 64 and spills a few bytes); at about 140 registers 3 CTAs still fit on an SM.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
attention_fwd_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, T* __restrict__ out,
                     float* __restrict__ lse, int tokens, int heads, float scale) {
  constexpr int LD = smem_ld<D>();
  constexpr int BN = 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kTile * LD;
  T* sV = sK + BN * LD;

  const int bh = blockIdx.x, b = bh / heads, h = bh % heads;
  const int m0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32, g = lane_g(), t = lane_t();
  const int64_t hd = static_cast<int64_t>(heads) * D;
  const T* q_base = qkv + b * stride_b + h * D;
  const T* k_base = q_base + hd;
  const T* v_base = q_base + 2 * hd;

  stage_rows<T, D>(sQ, LD, q_base, stride_t, m0, kTile, tokens);
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) frag_a(sQ, LD, warp * 16, kk * 16, qf[kk]);

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  // Running max of scale * q.k (natural-log units) and the thread's partial row sums, rows g and g + 8.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int n0 = 0; n0 < tokens; n0 += BN) {
    __syncthreads();  // the previous tile's readers are done
    stage_rows<T, D>(sK, LD, k_base, stride_t, n0, BN, tokens);
    stage_rows<T, D>(sV, LD, v_base, stride_t, n0, BN, tokens);
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
        s[j][e] = key < tokens ? s[j][e] * scale : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      // Key n0 < tokens is unmasked, so the new max is finite; exp2(-inf) = 0 on the first tile.
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
    if (row >= tokens) continue;
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

// dK, dV. Grid (batch * heads, ceil(tokens / 64)); each warp owns 16 keys; query tiles of BM rows.
// Shared: K [64][ld], V [64][ld], Q [BM][ld], dO [BM][ld], lse [BM], delta [BM].
template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads)
attention_bwd_dkdv_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, const T* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dqkv,
                          int tokens, int heads, float scale) {
  constexpr int LD = smem_ld<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kTile * LD;
  T* sQ = sV + kTile * LD;
  T* sdO = sQ + BM * LD;
  float* sLse = reinterpret_cast<float*>(sdO + BM * LD);
  float* sDelta = sLse + BM;

  const int bh = blockIdx.x, b = bh / heads, h = bh % heads;
  const int n0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32, g = lane_g(), t = lane_t();
  const int64_t hd = static_cast<int64_t>(heads) * D;
  const T* q_base = qkv + b * stride_b + h * D;
  const T* do_base = dout + static_cast<int64_t>(b) * tokens * hd + h * D;
  const float* lse_row = lse + (static_cast<int64_t>(b) * heads + h) * tokens;
  const float* delta_row = delta + (static_cast<int64_t>(b) * heads + h) * tokens;

  stage_rows<T, D>(sK, LD, q_base + hd, stride_t, n0, kTile, tokens);
  stage_rows<T, D>(sV, LD, q_base + 2 * hd, stride_t, n0, kTile, tokens);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dn][e] = dv[dn][e] = 0.f;

  for (int m0 = 0; m0 < tokens; m0 += BM) {
    __syncthreads();
    stage_rows<T, D>(sQ, LD, q_base, stride_t, m0, BM, tokens);
    stage_rows<T, D>(sdO, LD, do_base, hd, m0, BM, tokens);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      // A query past the end gets lse = +inf, so its P column is exp2(-inf) = 0.
      sLse[i] = m0 + i < tokens ? lse_row[m0 + i] : INFINITY;
      sDelta[i] = m0 + i < tokens ? delta_row[m0 + i] : 0.f;
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

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + warp * 16 + g + 8 * r;
    if (key >= tokens) continue;
    T* dst = dqkv + (static_cast<int64_t>(b) * tokens + key) * 3 * hd + h * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(dst + hd + dn * 8) = pack2<T>(dk[dn][2 * r] * scale, dk[dn][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dst + 2 * hd + dn * 8) = pack2<T>(dv[dn][2 * r], dv[dn][2 * r + 1]);
    }
  }
}

// dQ, and delta for the dK/dV kernel. Grid (batch * heads, ceil(tokens / 64)); each warp owns 16
// queries; key tiles of 64. Two sweeps over the keys: the first sums rowsum(P * dP) and rowsum(P)
// (their ratio is delta: the P-weighted mean of dP, so a common rounding factor of the recomputed
// row, from the rounding of lse, cancels from dS), the second forms dS = P * (dP - delta) and dQ.
// The first sweep costs two extra mma passes (S and dP) per key tile and replaces the delta kernel,
// which read out and dout from memory. Shared: Q [64][ld], dO [64][ld], K [64][ld], V [64][ld].
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
attention_bwd_dq_kernel(const T* __restrict__ qkv, int64_t stride_b, int64_t stride_t, const T* __restrict__ dout,
                        const float* __restrict__ lse, float* __restrict__ delta, T* __restrict__ dqkv,
                        int tokens, int heads, float scale) {
  constexpr int LD = smem_ld<D>();
  constexpr int BN = 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kTile * LD;
  T* sK = sdO + kTile * LD;
  T* sV = sK + BN * LD;

  const int bh = blockIdx.x, b = bh / heads, h = bh % heads;
  const int m0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32, g = lane_g(), t = lane_t();
  const int64_t hd = static_cast<int64_t>(heads) * D;
  const T* q_base = qkv + b * stride_b + h * D;
  const T* do_base = dout + static_cast<int64_t>(b) * tokens * hd + h * D;
  const float* lse_row = lse + (static_cast<int64_t>(b) * heads + h) * tokens;
  float* delta_row = delta + (static_cast<int64_t>(b) * heads + h) * tokens;

  stage_rows<T, D>(sQ, LD, q_base, stride_t, m0, kTile, tokens);
  stage_rows<T, D>(sdO, LD, do_base, hd, m0, kTile, tokens);
  float lse_r[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    // Rows past the end compute finite garbage (never stored): their q and dO rows are zero.
    lse_r[r] = row < tokens ? lse_row[row] : 0.f;
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
        if (t == 0 && row < tokens) delta_row[row] = dl[r];
      }
    }
    for (int n0 = 0; n0 < tokens; n0 += BN) {
      __syncthreads();
      stage_rows<T, D>(sK, LD, q_base + hd, stride_t, n0, BN, tokens);
      stage_rows<T, D>(sV, LD, q_base + 2 * hd, stride_t, n0, BN, tokens);
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
          const float pv = key < tokens ? exp2f((s[j][e] * scale - lse_r[e >> 1]) * kLog2e) : 0.f;
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

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= tokens) continue;
    T* dst = dqkv + (static_cast<int64_t>(b) * tokens + row) * 3 * hd + h * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<uint32_t*>(dst + dn * 8) = pack2<T>(dq[dn][2 * r] * scale, dq[dn][2 * r + 1] * scale);
  }
}

template <int D> constexpr int dkdv_bm() { return D > 80 ? 32 : 64; }

template <typename T, int D>
cudaError_t launch_fwd(const void* qkv, int64_t sb, int64_t st, void* out, float* lse, int batch, int tokens,
                       int heads, float scale, cudaStream_t stream) {
  constexpr int LD = smem_ld<D>();
  const size_t smem = size_t(3) * kTile * LD * sizeof(T);
  auto kernel = attention_fwd_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  const dim3 grid(unsigned(batch) * unsigned(heads), ceil_div(tokens, kTile));
  kernel<<<grid, kThreads, smem, stream>>>((const T*)qkv, sb, st, (T*)out, lse, tokens, heads, scale);
  return cudaGetLastError();
}

// out is not read: delta is recomputed from P and dP by the dQ kernel, which runs first.
template <typename T, int D>
cudaError_t launch_bwd(const void* qkv, int64_t sb, int64_t st, const void* dout, const float* lse, float* delta,
                       void* dqkv, int batch, int tokens, int heads, float scale, cudaStream_t stream) {
  constexpr int LD = smem_ld<D>();
  constexpr int BM = dkdv_bm<D>();
  const dim3 grid(unsigned(batch) * unsigned(heads), ceil_div(tokens, kTile));
  const size_t smem_q = size_t(4) * kTile * LD * sizeof(T);
  auto q = attention_bwd_dq_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(q, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_q));
  if (e != cudaSuccess) return e;
  q<<<grid, kThreads, smem_q, stream>>>((const T*)qkv, sb, st, (const T*)dout, lse, delta, (T*)dqkv, tokens, heads,
                                        scale);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const size_t smem_kv = (size_t(2) * kTile * LD + size_t(2) * BM * LD) * sizeof(T) + 2 * BM * sizeof(float);
  auto kv = attention_bwd_dkdv_kernel<T, D, BM>;
  e = cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_kv));
  if (e != cudaSuccess) return e;
  kv<<<grid, kThreads, smem_kv, stream>>>((const T*)qkv, sb, st, (const T*)dout, lse, delta, (T*)dqkv, tokens, heads,
                                          scale);
  return cudaGetLastError();
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

cudaError_t vk_attention_fwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, void* out, float* lse,
                             int batch, int tokens, int heads, int head_dim, float scale, cudaStream_t stream) {
  if (batch <= 0 || tokens <= 0 || heads <= 0) return batch == 0 || tokens == 0 ? cudaSuccess : cudaErrorInvalidValue;
  // 16-byte staging copies need every row start 16-byte aligned.
  if (!vk::aligned16(qkv) || stride_b % 8 || stride_t % 8 || tokens > 65535 * vk::kTile) return cudaErrorInvalidValue;
  VK_DISPATCH(dtype, T, VK_HEAD_DIM_DISPATCH(head_dim, {
    return vk::launch_fwd<T, D>(qkv, stride_b, stride_t, out, lse, batch, tokens, heads, scale, stream);
  }));
  return cudaSuccess;
}

// `out` is not read (kept in the entry point's signature for csrc/bindings.cpp): the dQ kernel recomputes
// delta = rowsum(P * dP) / rowsum(P) itself and writes it to `delta` (scratch) for the dK/dV kernel.
cudaError_t vk_attention_bwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, const void* out,
                             const void* dout, const float* lse, float* delta, void* dqkv, int batch, int tokens,
                             int heads, int head_dim, float scale, cudaStream_t stream) {
  if (batch <= 0 || tokens <= 0 || heads <= 0) return batch == 0 || tokens == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (!vk::aligned16(qkv) || !vk::aligned16(dout) || stride_b % 8 || stride_t % 8 || tokens > 65535 * vk::kTile)
    return cudaErrorInvalidValue;
  VK_DISPATCH(dtype, T, VK_HEAD_DIM_DISPATCH(head_dim, {
    return vk::launch_bwd<T, D>(qkv, stride_b, stride_t, dout, lse, delta, dqkv, batch, tokens, heads, scale, stream);
  }));
  return cudaSuccess;
}
