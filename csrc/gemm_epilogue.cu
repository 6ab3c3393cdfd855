// GEMMs through cuBLASLt with fused epilogues, plus the elementwise and reduction kernels around them.
//
// The GEMM is cuBLASLt's (tuned per architecture; not hand-rolled). Epilogues used:
//   BIAS    forward of every linear: bias added in the epilogue, and the residual added as C with beta = 1
//           (C and D are distinct, so the residual is read, not copied and overwritten);
//   BGRADB  weight-gradient GEMM of the backward: the bias gradient is a by-product of reading dY.
// Activations (exact erf GELU, tanh GELU, QuickGELU) and LayerScale are applied by
// vk_linear_epilogue_fwd/bwd below, one elementwise pass after the GEMM, not by cuBLASLt's
// GELU_AUX_BIAS / DGELU_BGRAD epilogues: vitkern's numerics contract is the exact erf GELU (paper,
// timm), and cuBLASLt documents neither which GELU form its epilogue evaluates nor its error bound.
// LayerScale's gamma cannot ride in cuBLASLt's per-row alpha vector either: the bias is added after
// alpha, and gamma multiplies act(xW^T + b). The pre-activation h = xW^T + b is the saved tensor.
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "vitkern_kernels.h"

namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // cuBLAS's own recommendation for Hopper
constexpr int kStatusNoAlgo = 2000;                    // no cuBLASLt algorithm for this problem
constexpr int kStatusCudaBase = 3000;                  // 3000 + cudaError_t

struct Handles {
  std::mutex mu;
  cublasLtHandle_t h[64] = {};
};
Handles& handles() {
  static Handles hs;
  return hs;
}

int handle_for_current_device(cublasLtHandle_t* out) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return kStatusCudaBase + e;
  if (dev < 0 || dev >= 64) return kStatusCudaBase + cudaErrorInvalidDevice;
  Handles& hs = handles();
  std::lock_guard<std::mutex> lock(hs.mu);
  if (hs.h[dev] == nullptr) {
    cublasStatus_t s = cublasLtCreate(&hs.h[dev]);
    if (s != CUBLAS_STATUS_SUCCESS) return static_cast<int>(s);
  }
  *out = hs.h[dev];
  return 0;
}

uint32_t alignment_of(const void* p) {
  uint32_t a = 256;
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  while (a > 2 && (v % a) != 0) a >>= 1;
  return a;
}

// The heuristic's choice depends only on the problem, never on the data, so it is cached.
// The bias (or bias-gradient) pointer's alignment is part of the key: the heuristic reads that pointer
// from the matmul descriptor to decide which alignment the algorithm may assume.
using AlgoKey =
    std::tuple<int, int, int, int, int64_t, int64_t, int64_t, int, int, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t>;
struct AlgoCache {
  std::mutex mu;
  std::map<AlgoKey, cublasLtMatmulAlgo_t> algos;
};
AlgoCache& algo_cache() {
  static AlgoCache c;
  return c;
}

// RAII for the four descriptor kinds so every early return frees what it made.
struct Descs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

#define VK_LT(call)                                  \
  do {                                               \
    cublasStatus_t s_ = (call);                      \
    if (s_ != CUBLAS_STATUS_SUCCESS) return int(s_); \
  } while (0)

// One cuBLASLt matmul in column-major terms (the row-major problem transposed, see vk_gemm).
int lt_matmul(int dtype, int a_trans, int b_trans, int64_t m, int64_t n, int64_t k, const void* A, const void* B,
              const void* bias, const void* C, void* D, void* dbias_a, void* workspace, size_t workspace_bytes,
              cudaStream_t stream) {
  cublasLtHandle_t handle;
  if (int s = handle_for_current_device(&handle)) return s;
  const cudaDataType_t t = dtype == VK_BF16 ? CUDA_R_16BF : CUDA_R_16F;
  // Row-major D[m, n] is column-major D^T [n, m] = op(B)^T op(A)^T: the col-major problem has
  // M' = n, N' = m, K' = k, first operand from B, second from A.
  const cublasOperation_t op1 = b_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op2 = a_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  const void* epi_ptr = nullptr;
  if (dbias_a != nullptr && bias != nullptr) return kStatusCudaBase + cudaErrorInvalidValue;  // one epilogue at a time
  if (dbias_a != nullptr) {
    epi = CUBLASLT_EPILOGUE_BGRADB;  // reduces the second operand (A^T) over K': length N' = m
    epi_ptr = dbias_a;
  } else if (bias != nullptr) {
    epi = CUBLASLT_EPILOGUE_BIAS;  // one value per row of the col-major D: length M' = n
    epi_ptr = bias;
  }
  Descs ds;
  VK_LT(cublasLtMatmulDescCreate(&ds.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  VK_LT(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &op1, sizeof(op1)));
  VK_LT(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &op2, sizeof(op2)));
  VK_LT(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (epi_ptr != nullptr)
    VK_LT(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &epi_ptr, sizeof(epi_ptr)));
  // Stored shapes (column-major rows, cols, ld) of each operand.
  if (b_trans) VK_LT(cublasLtMatrixLayoutCreate(&ds.a, t, k, n, k));  // B row-major [n, k]
  else VK_LT(cublasLtMatrixLayoutCreate(&ds.a, t, n, k, n));          // B row-major [k, n]
  if (a_trans) VK_LT(cublasLtMatrixLayoutCreate(&ds.b, t, m, k, m));  // A row-major [k, m]
  else VK_LT(cublasLtMatrixLayoutCreate(&ds.b, t, k, m, k));          // A row-major [m, k]
  VK_LT(cublasLtMatrixLayoutCreate(&ds.d, t, n, m, n));
  // Without C, D is passed as C with D's own descriptor (the documented in-place form, beta = 0).
  if (C != nullptr) VK_LT(cublasLtMatrixLayoutCreate(&ds.c, t, n, m, n));
  const cublasLtMatrixLayout_t c_desc = C != nullptr ? ds.c : ds.d;

  const void* Cp = C != nullptr ? C : D;
  const float alpha = 1.f, beta = C != nullptr ? 1.f : 0.f;
  const uint32_t al_1 = alignment_of(B), al_2 = alignment_of(A), al_c = alignment_of(Cp), al_d = alignment_of(D);
  int dev = 0;
  cudaGetDevice(&dev);
  const AlgoKey key{dev, dtype, a_trans, b_trans, m, n, k, int(epi), C != nullptr, al_1, al_2, al_c, al_d,
                    epi_ptr != nullptr ? alignment_of(epi_ptr) : 0u};
  cublasLtMatmulAlgo_t algo;
  bool found = false;
  {
    AlgoCache& cache = algo_cache();
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.algos.find(key);
    if (it != cache.algos.end()) {
      algo = it->second;
      found = true;
    }
  }
  if (!found) {
    VK_LT(cublasLtMatmulPreferenceCreate(&ds.pref));
    VK_LT(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                               sizeof(workspace_bytes)));
    VK_LT(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_1, sizeof(al_1)));
    VK_LT(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_2, sizeof(al_2)));
    VK_LT(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
    VK_LT(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d)));
    cublasLtMatmulHeuristicResult_t result = {};
    int returned = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle, ds.op, ds.a, ds.b, c_desc, ds.d, ds.pref, 1, &result, &returned);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || (s == CUBLAS_STATUS_SUCCESS && returned == 0)) return kStatusNoAlgo;
    if (s != CUBLAS_STATUS_SUCCESS) return int(s);
    algo = result.algo;
    AlgoCache& cache = algo_cache();
    std::lock_guard<std::mutex> lock(cache.mu);
    cache.algos[key] = algo;
  }
  VK_LT(cublasLtMatmul(handle, ds.op, &alpha, B, ds.a, A, ds.b, &beta, Cp, c_desc, D, ds.d, &algo, workspace,
                       workspace_bytes, stream));
  return 0;
}

}  // namespace

namespace vk {
namespace {

// The activation of code ACT (VkActivation) and its derivative, in fp32.
template <int ACT> __device__ __forceinline__ float act_f(float x) {
  if constexpr (ACT == VK_ACT_GELU) return gelu_f(x);
  else if constexpr (ACT == VK_ACT_GELU_TANH) return gelu_tanh_f(x);
  else if constexpr (ACT == VK_ACT_QUICK_GELU) return quick_gelu_f(x);
  else return x;
}
template <int ACT> __device__ __forceinline__ float dact_f(float x) {
  if constexpr (ACT == VK_ACT_GELU) return dgelu_f(x);
  else if constexpr (ACT == VK_ACT_GELU_TANH) return dgelu_tanh_f(x);
  else if constexpr (ACT == VK_ACT_QUICK_GELU) return dquick_gelu_f(x);
  else return 1.0f;
}

// W consecutive elements starting at e (W = 8: one 16-byte access; the caller guarantees alignment).
template <typename T, int W> __device__ __forceinline__ void load_w(const T* p, float (&v)[W]) {
  if constexpr (W == 8) load8(p, v);
  else v[0] = to_f(*p);
}
template <typename T, int W> __device__ __forceinline__ void store_w(T* p, const float (&v)[W]) {
  if constexpr (W == 8) store8(p, v);
  else *p = from_f<T>(v[0]);
}

// out = act(h) * scale[col] (+ residual), h, residual, out [n / cols, cols] dense, scale [cols]
// (nullable: 1). VEC: 8 elements per access, which needs n % 8 == 0 and, with a scale, cols % 8 == 0
// (so the 8 share a row and scale's 8 are one aligned access).
template <typename T, int ACT, bool VEC>
__global__ void linear_epilogue_fwd_kernel(const T* __restrict__ h, const T* __restrict__ scale,
                                           const T* __restrict__ residual, T* __restrict__ out, idx_t n, idx_t cols) {
  constexpr int W = VEC ? 8 : 1;
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t i = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n / W; i += stride) {
    const idx_t e = i * W;
    float v[W], g[W], r[W];
    load_w<T, W>(h + e, v);
    if (scale != nullptr) load_w<T, W>(scale + e % cols, g);
    if (residual != nullptr) load_w<T, W>(residual + e, r);
#pragma unroll
    for (int j = 0; j < W; ++j)
      v[j] = act_f<ACT>(v[j]) * (scale != nullptr ? g[j] : 1.f) + (residual != nullptr ? r[j] : 0.f);
    store_w<T, W>(out + e, v);
  }
}

// dh = dout * scale[col] * act'(h) (scale nullable: 1), elementwise as the forward.
template <typename T, int ACT, bool VEC>
__global__ void linear_epilogue_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ h,
                                           const T* __restrict__ scale, T* __restrict__ dh, idx_t n, idx_t cols) {
  constexpr int W = VEC ? 8 : 1;
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t i = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n / W; i += stride) {
    const idx_t e = i * W;
    float d[W], v[W], g[W];
    load_w<T, W>(dout + e, d);
    load_w<T, W>(h + e, v);
    if (scale != nullptr) load_w<T, W>(scale + e % cols, g);
#pragma unroll
    for (int j = 0; j < W; ++j) d[j] *= (scale != nullptr ? g[j] : 1.f) * dact_f<ACT>(v[j]);
    store_w<T, W>(dh + e, d);
  }
}

// The LayerScale backward in one pass over [rows, cols]: dh = dout * scale[col] * act'(h), and the
// fp32 partial column sums of dout * act(h) (dscale's terms) of each chunk of rows into
// ws[chunk, cols] (chunks = gridDim.y, as colsum_partial_kernel; colsum_final_kernel adds them in a
// fixed order: deterministic). Block (32, 8): 32 column groups of W columns, 8 row lanes.
template <typename T, int ACT, bool VEC>
__global__ void linear_epilogue_bwd_dscale_kernel(const T* __restrict__ dout, const T* __restrict__ h,
                                                  const T* __restrict__ scale, T* __restrict__ dh, int64_t rows,
                                                  int64_t cols, float* __restrict__ ws) {
  constexpr int W = VEC ? 8 : 1;
  __shared__ float red[8][32 * W];
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * W;
  const int64_t chunks = gridDim.y;
  const int64_t per = (rows + chunks - 1) / chunks;
  const int64_t r0 = blockIdx.y * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  float acc[W];
#pragma unroll
  for (int j = 0; j < W; ++j) acc[j] = 0.f;
  if (col0 < cols) {
    float g[W];
    load_w<T, W>(scale + col0, g);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const int64_t e = r * cols + col0;
      float d[W], v[W];
      load_w<T, W>(dout + e, d);
      load_w<T, W>(h + e, v);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        acc[j] += d[j] * act_f<ACT>(v[j]);
        d[j] *= g[j] * dact_f<ACT>(v[j]);
      }
      store_w<T, W>(dh + e, d);
    }
  }
#pragma unroll
  for (int j = 0; j < W; ++j) red[threadIdx.y][threadIdx.x * W + j] = acc[j];
  __syncthreads();
  // The 8 row lanes' sums of each of the block's 32 * W columns, one column per thread.
  const int64_t block_col0 = static_cast<int64_t>(blockIdx.x) * 32 * W;
  for (int c = threadIdx.y * 32 + threadIdx.x; c < 32 * W; c += 256) {
    if (block_col0 + c >= cols) break;
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) t += red[i][c];
    ws[blockIdx.y * cols + block_col0 + c] = t;
  }
}

constexpr int kColsumMaxChunks = 128;
constexpr int kColsumRowsPerChunk = 256;

__host__ __device__ inline int64_t colsum_chunks(int64_t rows) {
  int64_t c = (rows + kColsumRowsPerChunk - 1) / kColsumRowsPerChunk;
  return c < 1 ? 1 : (c > kColsumMaxChunks ? kColsumMaxChunks : c);
}

// in: [rows, cols] with row stride ld; ws: [chunks, cols] fp32. Block (32, 8): 32 columns, 8 row lanes.
template <typename T>
__global__ void colsum_partial_kernel(const T* __restrict__ in, int64_t rows, int64_t cols, int64_t ld,
                                      float* __restrict__ ws) {
  __shared__ float red[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t chunks = gridDim.y;
  const int64_t per = (rows + chunks - 1) / chunks;
  const int64_t r0 = blockIdx.y * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  float s = 0.f;
  if (col < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) s += to_f(in[r * ld + col]);
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) t += red[i][threadIdx.x];
    ws[blockIdx.y * cols + col] = t;
  }
}

template <typename T>
__global__ void colsum_final_kernel(const float* __restrict__ ws, int64_t chunks, int64_t cols, T* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += ws[c * cols + col];
  out[col] = from_f<T>(s);
}

unsigned elementwise_grid(int64_t work) {
  const int64_t blocks = (work + 255) / 256;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace
}  // namespace vk

size_t vk_gemm_workspace_bytes() { return kWorkspaceBytes; }

const char* vk_status_string(int status) {
  if (status == 0) return "success";
  if (status == kStatusNoAlgo) return "cuBLASLt found no algorithm for this problem (shape, alignment or epilogue)";
  if (status >= kStatusCudaBase) return cudaGetErrorString(static_cast<cudaError_t>(status - kStatusCudaBase));
  return cublasLtGetStatusString(static_cast<cublasStatus_t>(status));
}

int64_t vk_colsum_workspace_floats(int64_t rows, int64_t cols) { return vk::colsum_chunks(rows) * cols; }

cudaError_t vk_colsum(int dtype, const void* in, int64_t rows, int64_t cols, int64_t ld, void* out, float* ws,
                      cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  const int64_t chunks = vk::colsum_chunks(rows);
  const int64_t col_blocks = (cols + 31) / 32;
  if (col_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  VK_DISPATCH(dtype, T, {
    vk::colsum_partial_kernel<T><<<dim3(unsigned(col_blocks), unsigned(chunks)), dim3(32, 8), 0, stream>>>(
        (const T*)in, rows, cols, ld, ws);
    vk::colsum_final_kernel<T><<<vk::ceil_div(cols, 256), 256, 0, stream>>>(ws, chunks, cols, (T*)out);
  });
  return cudaGetLastError();
}

int vk_gemm(int dtype, int a_trans, int b_trans, int64_t m, int64_t n, int64_t k, const void* A, const void* B,
            const void* bias, const void* C, void* D, void* dbias_a, float* colsum_ws, void* workspace,
            size_t workspace_bytes, cudaStream_t stream) {
  if (dtype != VK_F16 && dtype != VK_BF16) return kStatusCudaBase + cudaErrorInvalidValue;
  if (dbias_a != nullptr && bias != nullptr) return kStatusCudaBase + cudaErrorInvalidValue;
  const size_t elt = 2;  // fp16 / bf16
  if (m == 0) return 0;
  if (k == 0) {  // an empty reduction (a weight gradient over zero rows): D = 0, dbias = 0
    if (bias != nullptr || C != nullptr) return kStatusCudaBase + cudaErrorInvalidValue;
    cudaError_t e = n > 0 ? cudaMemsetAsync(D, 0, size_t(m) * size_t(n) * elt, stream) : cudaSuccess;
    if (e == cudaSuccess && dbias_a != nullptr) e = cudaMemsetAsync(dbias_a, 0, size_t(m) * elt, stream);
    return e == cudaSuccess ? 0 : kStatusCudaBase + e;
  }
  int s = n == 0 ? kStatusNoAlgo  // nothing to multiply; dbias_a (if asked) still is the sum over k of A
                 : lt_matmul(dtype, a_trans, b_trans, m, n, k, A, B, bias, C, D, dbias_a, workspace, workspace_bytes, stream);
  // Only "no algorithm for BGRADB" falls back; any other failure is reported as it is.
  if ((s != kStatusNoAlgo && s != int(CUBLAS_STATUS_NOT_SUPPORTED)) || dbias_a == nullptr) return s;
  // A plain GEMM, then the bias gradient separately: the sum over k of A. Only the weight-gradient
  // layout, A stored [k, m], occurs; its column sums are what is wanted.
  if (!a_trans) return kStatusCudaBase + cudaErrorInvalidValue;
  if (n > 0) {
    s = lt_matmul(dtype, a_trans, b_trans, m, n, k, A, B, nullptr, C, D, nullptr, workspace, workspace_bytes, stream);
    if (s != 0) return s;
  }
  cudaError_t e = vk_colsum(dtype, A, k, m, m, dbias_a, colsum_ws, stream);
  return e == cudaSuccess ? 0 : kStatusCudaBase + e;
}

// Runs the body (the variadic arguments) with ACT bound to the compile-time activation of code `act`;
// an unknown code returns cudaErrorInvalidValue.
#define VK_DISPATCH_ACT(act, ACT, ...)                                                       \
  do {                                                                                       \
    switch (act) {                                                                           \
      case VK_ACT_NONE: { constexpr int ACT = VK_ACT_NONE; __VA_ARGS__; } break;             \
      case VK_ACT_GELU: { constexpr int ACT = VK_ACT_GELU; __VA_ARGS__; } break;             \
      case VK_ACT_GELU_TANH: { constexpr int ACT = VK_ACT_GELU_TANH; __VA_ARGS__; } break;   \
      case VK_ACT_QUICK_GELU: { constexpr int ACT = VK_ACT_QUICK_GELU; __VA_ARGS__; } break; \
      default: return cudaErrorInvalidValue;                                                 \
    }                                                                                        \
  } while (0)

cudaError_t vk_linear_epilogue_fwd(int dtype, int act, const void* h, const void* scale, const void* residual,
                                   void* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  const bool vec = n % 8 == 0 && (scale == nullptr || cols % 8 == 0) && vk::aligned16(h) && vk::aligned16(out) &&
                   (scale == nullptr || vk::aligned16(scale)) && (residual == nullptr || vk::aligned16(residual));
  VK_DISPATCH(dtype, T, VK_DISPATCH_ACT(act, ACT, {
    if (vec)
      vk::linear_epilogue_fwd_kernel<T, ACT, true><<<vk::elementwise_grid(n / 8), 256, 0, stream>>>(
          (const T*)h, (const T*)scale, (const T*)residual, (T*)out, n, cols);
    else
      vk::linear_epilogue_fwd_kernel<T, ACT, false><<<vk::elementwise_grid(n), 256, 0, stream>>>(
          (const T*)h, (const T*)scale, (const T*)residual, (T*)out, n, cols);
  }));
  return cudaGetLastError();
}

cudaError_t vk_linear_epilogue_bwd(int dtype, int act, const void* dout, const void* h, const void* scale, void* dh,
                                   void* dscale, float* ws, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (dscale != nullptr && scale == nullptr) return cudaErrorInvalidValue;
  const int64_t n = rows * cols;
  if (cols == 0 || (n == 0 && dscale == nullptr)) return cudaSuccess;  // rows = 0 with dscale: dscale = 0
  const bool aligned = vk::aligned16(dout) && vk::aligned16(h) && vk::aligned16(dh) &&
                       (scale == nullptr || vk::aligned16(scale));
  if (dscale == nullptr) {
    const bool vec = aligned && n % 8 == 0 && (scale == nullptr || cols % 8 == 0);
    VK_DISPATCH(dtype, T, VK_DISPATCH_ACT(act, ACT, {
      if (vec)
        vk::linear_epilogue_bwd_kernel<T, ACT, true><<<vk::elementwise_grid(n / 8), 256, 0, stream>>>(
            (const T*)dout, (const T*)h, (const T*)scale, (T*)dh, n, cols);
      else
        vk::linear_epilogue_bwd_kernel<T, ACT, false><<<vk::elementwise_grid(n), 256, 0, stream>>>(
            (const T*)dout, (const T*)h, (const T*)scale, (T*)dh, n, cols);
    }));
    return cudaGetLastError();
  }
  const bool vec = aligned && cols % 8 == 0;
  const int64_t chunks = vk::colsum_chunks(rows);
  const int64_t col_blocks = (cols + (vec ? 255 : 31)) / (vec ? 256 : 32);
  if (col_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks)), block(32, 8);
  VK_DISPATCH(dtype, T, VK_DISPATCH_ACT(act, ACT, {
    if (vec)
      vk::linear_epilogue_bwd_dscale_kernel<T, ACT, true><<<grid, block, 0, stream>>>(
          (const T*)dout, (const T*)h, (const T*)scale, (T*)dh, rows, cols, ws);
    else
      vk::linear_epilogue_bwd_dscale_kernel<T, ACT, false><<<grid, block, 0, stream>>>(
          (const T*)dout, (const T*)h, (const T*)scale, (T*)dh, rows, cols, ws);
    vk::colsum_final_kernel<T><<<vk::ceil_div(cols, 256), 256, 0, stream>>>(ws, chunks, cols, (T*)dscale);
  }));
  return cudaGetLastError();
}
