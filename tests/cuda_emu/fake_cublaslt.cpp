// A fake cuBLASLt for the CPU emulator: host-only, synchronous, plain host pointers.
//
// It implements exactly the cuBLASLt subset that csrc/gemm_epilogue.cu calls, written from NVIDIA's
// documented semantics (the doc comments of the real cublasLt.h, which this file includes, and the
// cuBLAS guide), NOT from what gemm_epilogue.cu assumes. It is an independent oracle: a wrong layout,
// transpose, leading dimension, bias length or epilogue choice in the caller should either fail loudly
// (CUBLAS_STATUS_INVALID_VALUE) or compute what the real library would, so the test sees the mistake.
//
// Anything whose meaning is not pinned down by the documentation, or that gemm_epilogue.cu does not
// use, returns CUBLAS_STATUS_NOT_SUPPORTED instead of guessing (batching, other epilogues, device
// pointer mode, other memory orders, ...).
//
// Arithmetic: every input element is converted to double (exact for fp16 / bf16 / fp32), the products
// are accumulated in double, alpha / beta / bias / C are applied in double, and the result is rounded
// once to D's type with round-to-nearest-even (__double2half / __double2bfloat16 of the real
// cuda_fp16.h / cuda_bf16.h, documented as round-to-nearest-even; a C++ double->float cast for fp32).
// D is written only after everything has been computed, so C (or A, B) aliasing D is harmless.
//
// The `stream` argument is ignored: the emulator is synchronous.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <vector>

// ------------------------------------------------------------------------------------------------
// The objects behind the opaque handles. The public handle types are pointers to structs (some only
// declared); we allocate our own structs and cast. A magic number catches garbage or destroyed handles.

struct cublasLtContext {  // declared (never defined) by cublasLt.h: cublasLtHandle_t is cublasLtContext*
  uint32_t magic = 0x4c54484eu;
};

namespace {

constexpr uint32_t kLayoutMagic = 0x4c41594fu, kDescMagic = 0x44455343u, kPrefMagic = 0x50524546u;
constexpr uint64_t kAlgoMagic = 0xfa4ec0b1a5a1905ull;

struct Layout {
  uint32_t magic = kLayoutMagic;
  cudaDataType type;
  uint64_t rows, cols;
  int64_t ld;
  int32_t order = CUBLASLT_ORDER_COL;  // "int32_t, default: CUBLASLT_ORDER_COL"
  int32_t batch_count = 1;            // "int32_t, default: 1"
  int64_t batch_stride = 0;
};

struct Desc {
  uint32_t magic = kDescMagic;
  int32_t compute_type;
  int32_t scale_type;
  int32_t pointer_mode = CUBLASLT_POINTER_MODE_HOST;  // "default: CUBLASLT_POINTER_MODE_HOST"
  int32_t transa = CUBLAS_OP_N;                       // "int32_t, default: CUBLAS_OP_N"
  int32_t transb = CUBLAS_OP_N;
  int32_t transc = CUBLAS_OP_N;                       // "Currently only CUBLAS_OP_N is supported."
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;      // "uint32_t, default: CUBLASLT_EPILOGUE_DEFAULT"
  const void* bias = nullptr;                         // "default: NULL"
  int32_t bias_type = -1;                             // "default: -1" (= same type as D, see below)
};

struct Pref {
  uint32_t magic = kPrefMagic;
  uint32_t search_mode = CUBLASLT_SEARCH_BEST_FIT;
  uint64_t max_workspace = 0;                         // "uint64_t, default: 0 - no workspace allowed"
  uint32_t min_align_a = 256, min_align_b = 256, min_align_c = 256, min_align_d = 256;  // "default: 256"
};

// What our one "algorithm" remembers between cublasLtMatmulAlgoGetHeuristic and cublasLtMatmul: the
// promised minimum alignments (an algorithm chosen for aligned pointers may rely on that alignment),
// the bias pointer's alignment (the heuristic "depend[s] on its value to determine expected pointer
// alignment", cublasLt.h on CUBLASLT_MATMUL_DESC_BIAS_POINTER), and the kind of problem it was chosen for.
enum AlgoSlot { kMagic, kAlignA, kAlignB, kAlignC, kAlignD, kAlignBias, kKind };

Layout* L(cublasLtMatrixLayout_t p) {
  Layout* l = reinterpret_cast<Layout*>(p);
  return l != nullptr && l->magic == kLayoutMagic ? l : nullptr;
}
Desc* D_(cublasLtMatmulDesc_t p) {
  Desc* d = reinterpret_cast<Desc*>(p);
  return d != nullptr && d->magic == kDescMagic ? d : nullptr;
}
Pref* P(cublasLtMatmulPreference_t p) {
  Pref* r = reinterpret_cast<Pref*>(p);
  return r != nullptr && r->magic == kPrefMagic ? r : nullptr;
}
bool valid_handle(cublasLtHandle_t h) { return h != nullptr && h->magic == 0x4c54484eu; }

// Copies an attribute value after checking its size, as documented for every *SetAttribute:
// "CUBLAS_STATUS_INVALID_VALUE if buf is NULL or sizeInBytes doesn't match size of internal storage".
template <typename T>
cublasStatus_t set(T* field, const void* buf, size_t size) {
  if (buf == nullptr || size != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(field, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}

// ------------------------------------------------------------------------------------------------
// Element access.

size_t type_size(int32_t t) {
  switch (t) {
    case CUDA_R_16F: return 2;
    case CUDA_R_16BF: return 2;
    case CUDA_R_32F: return 4;
    default: return 0;
  }
}

double load(const void* base, int32_t type, int64_t idx) {
  switch (type) {
    case CUDA_R_16F: return __half2float(static_cast<const __half*>(base)[idx]);
    case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx]);
    default: return static_cast<const float*>(base)[idx];
  }
}

void store(void* base, int32_t type, int64_t idx, double v) {  // round-to-nearest-even, once
  switch (type) {
    case CUDA_R_16F: static_cast<__half*>(base)[idx] = __double2half(v); break;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(base)[idx] = __double2bfloat16(v); break;
    default: static_cast<float*>(base)[idx] = static_cast<float>(v); break;
  }
}

// Element (i, j) of a stored matrix, in elements from its base pointer.
//   CUBLASLT_ORDER_COL: "Leading dimension is the stride (in elements) to the beginning of next column"
//   CUBLASLT_ORDER_ROW: "Leading dimension is the stride (in elements) to the beginning of next row"
int64_t offset(const Layout& l, uint64_t i, uint64_t j) {
  return l.order == CUBLASLT_ORDER_COL ? int64_t(i) + int64_t(j) * l.ld : int64_t(i) * l.ld + int64_t(j);
}

// Bytes spanned by a stored matrix (0 when it is empty), for overlap checks.
int64_t span_bytes(const Layout& l) {
  if (l.rows == 0 || l.cols == 0) return 0;
  return (offset(l, l.rows - 1, l.cols - 1) + 1) * int64_t(type_size(l.type));
}

bool overlap(const void* p, int64_t pn, const void* q, int64_t qn) {
  if (pn == 0 || qn == 0) return false;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  return a < b + uint64_t(qn) && b < a + uint64_t(pn);
}

uint32_t alignment_of(const void* p) {  // largest power of two <= 256 dividing the address
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) a >>= 1;
  return a;
}

bool is_op(int32_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }
bool is_transposed(int32_t op) { return op == CUBLAS_OP_T || op == CUBLAS_OP_C; }  // C == T for real types

// ------------------------------------------------------------------------------------------------
// The problem as cuBLASLt defines it: D = alpha * op(A) op(B) + beta * C, op(A) M x K, op(B) K x N,
// C and D M x N. check_problem validates everything that does not need the data pointers; both the
// heuristic and the matmul call it, so a bad setup fails at the first of the two.

struct Problem {
  uint64_t m, n, k;
  const Layout *a, *b, *c, *d;
  const Desc* desc;
};

bool epilogue_has_bias(uint32_t e) { return e == CUBLASLT_EPILOGUE_BIAS; }
bool epilogue_is_bgrad(uint32_t e) { return e == CUBLASLT_EPILOGUE_BGRADA || e == CUBLASLT_EPILOGUE_BGRADB; }

cublasStatus_t check_layout(const Layout& l) {
  if (type_size(l.type) == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (l.batch_count != 1) return CUBLAS_STATUS_NOT_SUPPORTED;  // batching not implemented by the fake
  if (l.order != CUBLASLT_ORDER_COL && l.order != CUBLASLT_ORDER_ROW) return CUBLAS_STATUS_NOT_SUPPORTED;
  // CUBLASLT_MATRIX_LAYOUT_LD: "Currently only non-negative values are supported, must be large enough so
  // that matrix memory locations are not overlapping (e.g. greater or equal to CUBLASLT_MATRIX_LAYOUT_ROWS
  // in case of CUBLASLT_ORDER_COL)." (and, by the same rule, >= COLS for CUBLASLT_ORDER_ROW)
  const uint64_t inner = l.order == CUBLASLT_ORDER_COL ? l.rows : l.cols;
  if (l.ld < 0 || uint64_t(l.ld) < inner) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t check_problem(const Desc* desc, const Layout* a, const Layout* b, const Layout* c, const Layout* d,
                             Problem* out) {
  if (desc == nullptr || a == nullptr || b == nullptr || c == nullptr || d == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  for (const Layout* l : {a, b, c, d})
    if (cublasStatus_t s = check_layout(*l)) return s;

  // Compute / scale type: only fp32 accumulation with fp32 alpha, beta (what gemm_epilogue uses).
  if (desc->compute_type != CUBLAS_COMPUTE_32F || desc->scale_type != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (desc->pointer_mode != CUBLASLT_POINTER_MODE_HOST) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (!is_op(desc->transa) || !is_op(desc->transb)) return CUBLAS_STATUS_INVALID_VALUE;
  if (desc->transc != CUBLAS_OP_N) return CUBLAS_STATUS_NOT_SUPPORTED;  // "Currently only CUBLAS_OP_N is supported."

  // Types: A and B alike, C and D alike; the fp32-compute combinations of the cuBLAS type table that
  // matter here: 16F x 16F -> 16F or 32F, 16BF x 16BF -> 16BF or 32F, 32F x 32F -> 32F.
  if (a->type != b->type || c->type != d->type) return CUBLAS_STATUS_NOT_SUPPORTED;
  const bool types_ok = (a->type == CUDA_R_32F) ? d->type == CUDA_R_32F : (d->type == a->type || d->type == CUDA_R_32F);
  if (!types_ok) return CUBLAS_STATUS_NOT_SUPPORTED;

  // Shapes: op(A) is M x K, op(B) is K x N, C and D are M x N.
  const bool ta = is_transposed(desc->transa), tb = is_transposed(desc->transb);
  const uint64_t m = ta ? a->cols : a->rows, k = ta ? a->rows : a->cols;
  const uint64_t kb = tb ? b->cols : b->rows, n = tb ? b->rows : b->cols;
  if (kb != k) return CUBLAS_STATUS_INVALID_VALUE;
  if (d->rows != m || d->cols != n) return CUBLAS_STATUS_INVALID_VALUE;
  // Out-of-place (C != D): C and D "must have the same data type, number of rows, number of columns,
  // batch size, and memory order"; only the leading dimensions may differ (cuBLAS guide, cublasLtMatmul
  // section; quoted from memory: that page could not be retrieved while writing this file).
  if (c->rows != d->rows || c->cols != d->cols || c->order != d->order) return CUBLAS_STATUS_INVALID_VALUE;

  // Epilogue.
  const uint32_t e = desc->epilogue;
  if (e != CUBLASLT_EPILOGUE_DEFAULT && !epilogue_has_bias(e) && !epilogue_is_bgrad(e))
    return CUBLAS_STATUS_NOT_SUPPORTED;  // RELU / GELU / D* / *_AUX: not implemented by the fake
  if (e != CUBLASLT_EPILOGUE_DEFAULT) {
    // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: "Bias vector elements are the same type as the elements of output
    // matrix (Dtype)" (exceptions only for IMMA and fp8 kernels); "default: -1". Other values: not pinned down.
    if (desc->bias_type != -1 && desc->bias_type != int32_t(d->type)) return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  *out = Problem{m, n, k, a, b, c, d, desc};
  return CUBLAS_STATUS_SUCCESS;
}

// The kind of problem an algorithm was chosen for (data types, transposes, epilogue, orders).
uint64_t problem_kind(const Problem& p) {
  uint64_t h = 1469598103934665603ull;
  for (uint64_t v : {uint64_t(p.a->type), uint64_t(p.b->type), uint64_t(p.c->type), uint64_t(p.d->type),
                     uint64_t(p.desc->transa), uint64_t(p.desc->transb), uint64_t(p.desc->epilogue),
                     uint64_t(p.a->order), uint64_t(p.b->order), uint64_t(p.c->order), uint64_t(p.d->order)})
    h = (h ^ v) * 1099511628211ull;
  return h;
}

}  // namespace

// ================================================================================================
// The API. Each function returns CUBLAS_STATUS_INVALID_VALUE for null / garbage handles and arguments.

// Test knob: answer "no algorithm" (success, zero results) for bias-gradient epilogues, as the real
// library may for some shapes and alignments, so a caller's fallback path can be exercised.
bool g_no_bgrad_algo = false;

extern "C" {

void fake_lt_set_no_bgrad_algo(int on) { g_no_bgrad_algo = on != 0; }

cublasStatus_t CUBLASWINAPI cublasLtCreate(cublasLtHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtDestroy(cublasLtHandle_t handle) {
  if (!valid_handle(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->magic = 0;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

const char* CUBLASWINAPI cublasLtGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

const char* CUBLASWINAPI cublasLtGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument (fake cuBLASLt)";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported (fake cuBLASLt)";
    default: return cublasLtGetStatusName(status);
  }
}

// ---- Matrix layouts.

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type,
                                                       uint64_t rows, uint64_t cols, int64_t ld) {
  if (layout == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  Layout* l = new Layout;
  l->type = type;
  l->rows = rows;
  l->cols = cols;
  l->ld = ld;
  *layout = reinterpret_cast<cublasLtMatrixLayout_t>(l);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  Layout* l = L(layout);
  if (l == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  l->magic = 0;
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout,
                                                             cublasLtMatrixLayoutAttribute_t attr, const void* buf,
                                                             size_t size) {
  Layout* l = L(layout);
  if (l == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {  // value types as documented in cublasLt.h
    case CUBLASLT_MATRIX_LAYOUT_TYPE: {  // uint32_t
      uint32_t v;
      if (cublasStatus_t s = set(&v, buf, size)) return s;
      l->type = cudaDataType(v);
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATRIX_LAYOUT_ORDER: return set(&l->order, buf, size);                       // int32_t
    case CUBLASLT_MATRIX_LAYOUT_ROWS: return set(&l->rows, buf, size);                         // uint64_t
    case CUBLASLT_MATRIX_LAYOUT_COLS: return set(&l->cols, buf, size);                         // uint64_t
    case CUBLASLT_MATRIX_LAYOUT_LD: return set(&l->ld, buf, size);                             // int64_t
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: return set(&l->batch_count, buf, size);           // int32_t
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: return set(&l->batch_stride, buf, size);  // int64_t
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

// ---- Matmul descriptor.

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute,
                                                     cudaDataType_t scale) {
  if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  Desc* d = new Desc;
  d->compute_type = compute;
  d->scale_type = scale;
  *desc = reinterpret_cast<cublasLtMatmulDesc_t>(d);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  Desc* d = D_(desc);
  if (d == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  d->magic = 0;
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                                           cublasLtMatmulDescAttributes_t attr, const void* buf,
                                                           size_t size) {
  Desc* d = D_(desc);
  if (d == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {  // value types as documented in cublasLt.h
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: return set(&d->compute_type, buf, size);   // int32_t
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE: return set(&d->scale_type, buf, size);       // int32_t
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: return set(&d->pointer_mode, buf, size);   // int32_t
    case CUBLASLT_MATMUL_DESC_TRANSA: return set(&d->transa, buf, size);               // int32_t
    case CUBLASLT_MATMUL_DESC_TRANSB: return set(&d->transb, buf, size);               // int32_t
    case CUBLASLT_MATMUL_DESC_TRANSC: return set(&d->transc, buf, size);               // int32_t
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return set(&d->epilogue, buf, size);           // uint32_t
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set(&d->bias, buf, size);           // (const) void*
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return set(&d->bias_type, buf, size);    // int32_t
    default: return CUBLAS_STATUS_NOT_SUPPORTED;  // scales, aux buffers, batch strides...: not implemented
  }
}

// ---- Heuristic preferences.

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *pref = reinterpret_cast<cublasLtMatmulPreference_t>(new Pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  Pref* p = P(pref);
  if (p == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  p->magic = 0;
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                                 cublasLtMatmulPreferenceAttributes_t attr,
                                                                 const void* buf, size_t size) {
  Pref* p = P(pref);
  if (p == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {  // value types as documented in cublasLt.h
    case CUBLASLT_MATMUL_PREF_SEARCH_MODE: return set(&p->search_mode, buf, size);               // uint32_t
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return set(&p->max_workspace, buf, size);     // uint64_t
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return set(&p->min_align_a, buf, size);     // uint32_t
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return set(&p->min_align_b, buf, size);     // uint32_t
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return set(&p->min_align_c, buf, size);     // uint32_t
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return set(&p->min_align_d, buf, size);     // uint32_t
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

// ---- Heuristic: validates the problem, then returns one dummy algorithm that needs no workspace.
//   "CUBLAS_STATUS_INVALID_VALUE if requestedAlgoCount is less or equal to zero"
//   "CUBLAS_STATUS_NOT_SUPPORTED if no heuristic function available for current configuration"

cublasStatus_t CUBLASWINAPI cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                           cublasLtMatrixLayout_t adesc, cublasLtMatrixLayout_t bdesc,
                                                           cublasLtMatrixLayout_t cdesc, cublasLtMatrixLayout_t ddesc,
                                                           cublasLtMatmulPreference_t pref, int requested,
                                                           cublasLtMatmulHeuristicResult_t results[], int* returned) {
  if (!valid_handle(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  const Pref* p = P(pref);
  if (p == nullptr || requested <= 0 || results == nullptr || returned == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *returned = 0;
  if (p->search_mode != CUBLASLT_SEARCH_BEST_FIT) return CUBLAS_STATUS_NOT_SUPPORTED;
  Problem pr;
  if (cublasStatus_t s = check_problem(D_(desc), L(adesc), L(bdesc), L(cdesc), L(ddesc), &pr)) return s;
  if (g_no_bgrad_algo && epilogue_is_bgrad(pr.desc->epilogue)) return CUBLAS_STATUS_SUCCESS;  // *returned == 0
  for (uint32_t a : {p->min_align_a, p->min_align_b, p->min_align_c, p->min_align_d})
    if (a == 0 || (a & (a - 1)) != 0) return CUBLAS_STATUS_INVALID_VALUE;  // alignments are powers of two

  cublasLtMatmulHeuristicResult_t r;
  std::memset(&r, 0, sizeof(r));
  r.algo.data[kMagic] = kAlgoMagic;
  r.algo.data[kAlignA] = p->min_align_a;
  r.algo.data[kAlignB] = p->min_align_b;
  r.algo.data[kAlignC] = p->min_align_c;
  r.algo.data[kAlignD] = p->min_align_d;
  r.algo.data[kAlignBias] = pr.desc->bias != nullptr ? alignment_of(pr.desc->bias) : 256;
  r.algo.data[kKind] = problem_kind(pr);
  r.workspaceSize = 0;
  r.state = CUBLAS_STATUS_SUCCESS;
  r.wavesCount = 1.0f;
  results[0] = r;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

// ---- The matmul: D = alpha * op(A) op(B) + beta * C, then the epilogue.

cublasStatus_t CUBLASWINAPI cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                                           const void* A, cublasLtMatrixLayout_t adesc, const void* B,
                                           cublasLtMatrixLayout_t bdesc, const void* beta, const void* C,
                                           cublasLtMatrixLayout_t cdesc, void* D, cublasLtMatrixLayout_t ddesc,
                                           const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                                           cudaStream_t /*stream: ignored, the emulator is synchronous*/) {
  (void)workspace;
  (void)workspace_bytes;  // our algorithm needs no workspace
  if (!valid_handle(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  Problem p;
  if (cublasStatus_t s = check_problem(D_(desc), L(adesc), L(bdesc), L(cdesc), L(ddesc), &p)) return s;
  if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  const double al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);  // scale type fp32
  const int32_t ta = p.a->type, tc = p.c->type, td = p.d->type;
  const uint32_t epi = p.desc->epilogue;
  const bool trans_a = is_transposed(p.desc->transa), trans_b = is_transposed(p.desc->transb);

  // Pointers: every matrix with at least one element must be given, except C when beta == 0 (not read).
  const int64_t a_bytes = span_bytes(*p.a), b_bytes = span_bytes(*p.b), d_bytes = span_bytes(*p.d);
  const int64_t c_bytes = be != 0.0 ? span_bytes(*p.c) : 0;
  if ((a_bytes > 0 && A == nullptr) || (b_bytes > 0 && B == nullptr) || (c_bytes > 0 && C == nullptr) ||
      (d_bytes > 0 && D == nullptr))
    return CUBLAS_STATUS_INVALID_VALUE;
  // The bias vector (length M for BIAS and BGRADA, N for BGRADB) lives at CUBLASLT_MATMUL_DESC_BIAS_POINTER.
  const int32_t bias_type = td;  // BIAS_DATA_TYPE is -1 (default) or Dtype, see check_problem
  const uint64_t bias_len = epi == CUBLASLT_EPILOGUE_BGRADB ? p.n : p.m;
  const int64_t bias_bytes = epi == CUBLASLT_EPILOGUE_DEFAULT ? 0 : int64_t(bias_len * type_size(bias_type));
  if (bias_bytes > 0 && p.desc->bias == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  // Whether alpha multiplies a bias gradient (BGRADA / BGRADB) is not documented: refuse to guess.
  if (epilogue_is_bgrad(epi) && al != 1.0) return CUBLAS_STATUS_NOT_SUPPORTED;

  // In place: "C == D and Cdesc == Ddesc" (cuBLAS guide, cublasLtMatmul, from memory); descriptors with the same
  // contents are accepted as equal. Any other overlap of C and D is undefined, so rejected here, and so
  // is D (or a bias gradient) overlapping the inputs A, B or the bias vector.
  if (C == D && C != nullptr) {
    if (p.c->ld != p.d->ld || p.c->order != p.d->order) return CUBLAS_STATUS_INVALID_VALUE;
  } else if (overlap(C, c_bytes, D, d_bytes)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (overlap(A, a_bytes, D, d_bytes) || overlap(B, b_bytes, D, d_bytes) ||
      overlap(p.desc->bias, bias_bytes, D, d_bytes))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (epilogue_is_bgrad(epi) && (overlap(p.desc->bias, bias_bytes, A, a_bytes) ||
                                 overlap(p.desc->bias, bias_bytes, B, b_bytes)))
    return CUBLAS_STATUS_INVALID_VALUE;

  // The algorithm. NULL is accepted: the cuBLAS guide documents it as an implicit heuristic query.
  if (algo != nullptr) {
    if (algo->data[kMagic] != kAlgoMagic) return CUBLAS_STATUS_INVALID_VALUE;
    if (algo->data[kKind] != problem_kind(p)) return CUBLAS_STATUS_INVALID_VALUE;  // chosen for another problem
    // An algorithm chosen under CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES (default 256) may rely on it.
    if ((A != nullptr && alignment_of(A) < algo->data[kAlignA]) ||
        (B != nullptr && alignment_of(B) < algo->data[kAlignB]) ||
        (C != nullptr && be != 0.0 && alignment_of(C) < algo->data[kAlignC]) ||
        (D != nullptr && alignment_of(D) < algo->data[kAlignD]))
      return CUBLAS_STATUS_INVALID_VALUE;
    if (p.desc->bias != nullptr && alignment_of(p.desc->bias) < algo->data[kAlignBias])
      return CUBLAS_STATUS_INVALID_VALUE;
  }

  // 1. Gather op(A) (M x K) and op(B) (K x N) as doubles: a[i][kk] and bt[j][kk] (op(B) transposed, so
  // both are read along kk). Then D = alpha * op(A) op(B) + beta * C, in double, into a temporary, so that
  // C aliasing D is harmless (C is read before anything is written).
  const uint64_t M = p.m, N = p.n, K = p.k;
  std::vector<double> a(M * K), bt(N * K), out(M * N);
  for (uint64_t i = 0; i < M; ++i)
    for (uint64_t kk = 0; kk < K; ++kk)
      a[i * K + kk] = load(A, ta, trans_a ? offset(*p.a, kk, i) : offset(*p.a, i, kk));
  for (uint64_t j = 0; j < N; ++j)
    for (uint64_t kk = 0; kk < K; ++kk)
      bt[j * K + kk] = load(B, ta, trans_b ? offset(*p.b, j, kk) : offset(*p.b, kk, j));
  for (uint64_t j = 0; j < N; ++j)
    for (uint64_t i = 0; i < M; ++i) {
      double acc = 0.0;
      for (uint64_t kk = 0; kk < K; ++kk) acc += a[i * K + kk] * bt[j * K + kk];
      double v = al * acc;
      if (be != 0.0) v += be * load(C, tc, offset(*p.c, i, j));  // beta == 0: C is not read
      out[i + j * M] = v;
    }

  // 2. Epilogue.
  std::vector<double> bgrad;
  if (epi == CUBLASLT_EPILOGUE_BIAS) {
    // cublasLt.h, CUBLASLT_EPILOGUE_BIAS: "Bias, apply (broadcasted) Bias from bias vector. Bias vector length
    // must match matrix D rows, it must be packed (stride between vector elements is 1). Bias vector is
    // broadcasted to all columns and added before applying final postprocessing."
    // => D[i, j] += bias[i], i < M (rows of D), for every column j.
    for (uint64_t j = 0; j < N; ++j)
      for (uint64_t i = 0; i < M; ++i) out[i + j * M] += load(p.desc->bias, bias_type, int64_t(i));
  } else if (epi == CUBLASLT_EPILOGUE_BGRADA) {
    // cublasLt.h, CUBLASLT_EPILOGUE_BGRADA: "Bias gradient based on the input matrix A. The bias size
    // corresponds to the number of rows of the matrix D. The reduction happens over the GEMM's "k" dimension.
    // Stores Bias gradient in the auxiliary output (see CUBLASLT_MATMUL_DESC_BIAS_POINTER)."
    // => bias[i] = sum_kk op(A)[i, kk], i < M. D itself is the plain GEMM result.
    // Not documented: whether alpha scales the gradient (the fake requires alpha == 1, see above).
    bgrad.assign(M, 0.0);
    for (uint64_t i = 0; i < M; ++i)
      for (uint64_t kk = 0; kk < K; ++kk) bgrad[i] += a[i * K + kk];
  } else if (epi == CUBLASLT_EPILOGUE_BGRADB) {
    // cublasLt.h, CUBLASLT_EPILOGUE_BGRADB: "Bias gradient based on the input matrix B. The bias size
    // corresponds to the number of columns of the matrix D. The reduction happens over the GEMM's "k"
    // dimension. Stores Bias gradient in the auxiliary output (see CUBLASLT_MATMUL_DESC_BIAS_POINTER)."
    // => bias[j] = sum_kk op(B)[kk, j], j < N. D itself is the plain GEMM result.
    bgrad.assign(N, 0.0);
    for (uint64_t j = 0; j < N; ++j)
      for (uint64_t kk = 0; kk < K; ++kk) bgrad[j] += bt[j * K + kk];
  }
  // 3. Store, rounding once to the output types. CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias gradient case:
  // "Bias gradient vector elements are the same type as the output elements (Ctype)".
  for (uint64_t j = 0; j < N; ++j)
    for (uint64_t i = 0; i < M; ++i) store(D, td, offset(*p.d, i, j), out[i + j * M]);
  for (size_t i = 0; i < bgrad.size(); ++i) store(const_cast<void*>(p.desc->bias), bias_type, int64_t(i), bgrad[i]);
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
