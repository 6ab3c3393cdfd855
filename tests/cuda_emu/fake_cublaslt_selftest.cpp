// Self-test shim for fake_cublaslt.cpp: one cuBLASLt matmul set up the way the cuBLASLt documentation
// says a user should (handle, matmul descriptor + attributes, one layout per matrix, preference,
// heuristic, matmul), callable from Python through ctypes (tests/cuda_emu/test_fake_cublaslt.py).
//
// The caller gives each matrix's STORED shape (rows, cols, ld, as passed to cublasLtMatrixLayoutCreate)
// so the test can also hand over inconsistent shapes and expect CUBLAS_STATUS_INVALID_VALUE.
// Returns the first status that is not CUBLAS_STATUS_SUCCESS, or CUBLAS_STATUS_SUCCESS;
// -1 when the heuristic returned no algorithm.
#include <cublasLt.h>

#include <cstdint>

namespace {

struct Objects {  // everything created, destroyed on every return path
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Objects() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
    if (handle) cublasLtDestroy(handle);
  }
};

#define CHECK(call)                                    \
  do {                                                 \
    cublasStatus_t s_ = (call);                        \
    if (s_ != CUBLAS_STATUS_SUCCESS) return int(s_);   \
  } while (0)

cublasStatus_t make_layout(cublasLtMatrixLayout_t* l, cudaDataType t, int order, uint64_t rows, uint64_t cols,
                           int64_t ld) {
  cublasStatus_t s = cublasLtMatrixLayoutCreate(l, t, rows, cols, ld);
  if (s != CUBLAS_STATUS_SUCCESS || order == CUBLASLT_ORDER_COL) return s;  // COL is the default order
  const int32_t o = order;
  return cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_ORDER, &o, sizeof(o));
}

uint32_t alignment_of(const void* p) {  // largest power of two <= 256 dividing the address
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) a >>= 1;
  return a;
}

}  // namespace

// ab_type, cd_type: cudaDataType of A and B, of C and D. trans_a, trans_b: 0 or 1. order: cublasLtOrder_t
// of all four matrices. epilogue: cublasLtEpilogue_t (1 = DEFAULT); bias: the bias (BIAS) or the bias
// gradient output (BGRADA, BGRADB), in cd_type. C may equal D (in place) or be NULL when beta == 0.
// align: 0 = tell the heuristic each pointer's actual alignment (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES,
// whose default 256 suits cudaMalloc but not host memory); > 0 = promise that alignment for all four.
extern "C" int fake_lt_selftest_matmul(int ab_type, int cd_type, int trans_a, int trans_b, int order,
                                       uint64_t a_rows, uint64_t a_cols, int64_t lda, const void* A,
                                       uint64_t b_rows, uint64_t b_cols, int64_t ldb, const void* B,
                                       uint64_t c_rows, uint64_t c_cols, int64_t ldc, const void* C,
                                       uint64_t d_rows, uint64_t d_cols, int64_t ldd, void* D, float alpha,
                                       float beta, int epilogue, void* bias, uint32_t align) {
  Objects o;
  CHECK(cublasLtCreate(&o.handle));

  // Operation: fp32 accumulation, fp32 alpha / beta on the host (the default pointer mode).
  CHECK(cublasLtMatmulDescCreate(&o.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CHECK(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CHECK(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const uint32_t epi = uint32_t(epilogue);
  CHECK(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (bias != nullptr)
    CHECK(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));

  // Layouts: stored rows, cols, leading dimension of each matrix.
  CHECK(make_layout(&o.a, cudaDataType(ab_type), order, a_rows, a_cols, lda));
  CHECK(make_layout(&o.b, cudaDataType(ab_type), order, b_rows, b_cols, ldb));
  CHECK(make_layout(&o.c, cudaDataType(cd_type), order, c_rows, c_cols, ldc));
  CHECK(make_layout(&o.d, cudaDataType(cd_type), order, d_rows, d_cols, ldd));

  // Heuristic: one algorithm, no workspace, for pointers of the given alignments.
  CHECK(cublasLtMatmulPreferenceCreate(&o.pref));
  const uint64_t ws = 0;
  CHECK(cublasLtMatmulPreferenceSetAttribute(o.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const void* Cp = C != nullptr ? C : D;
  const uint32_t al[4] = {align ? align : alignment_of(A), align ? align : alignment_of(B),
                          align ? align : alignment_of(Cp), align ? align : alignment_of(D)};
  const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) CHECK(cublasLtMatmulPreferenceSetAttribute(o.pref, al_attr[i], &al[i], sizeof(al[i])));
  cublasLtMatmulHeuristicResult_t result = {};
  int returned = 0;
  CHECK(cublasLtMatmulAlgoGetHeuristic(o.handle, o.op, o.a, o.b, o.c, o.d, o.pref, 1, &result, &returned));
  if (returned == 0) return -1;

  CHECK(cublasLtMatmul(o.handle, o.op, &alpha, A, o.a, B, o.b, &beta, Cp, o.c, D, o.d,
                       &result.algo, nullptr, 0, /*stream=*/nullptr));
  return CUBLAS_STATUS_SUCCESS;
}
