// The torch layer of the CUDA extension: schemas (TORCH_LIBRARY_FRAGMENT), input checks, output
// allocation, and the calls into the kernel files (vitkern_kernels.h). The only file that includes
// torch headers, and only the light ones (no torch/extension.h, no pybind11), to keep its compile short.
//
// Every op is functional: it allocates and returns its outputs (so torch.compile sees plain ops with
// fake implementations, registered in vitkern/ops/_cuda.py). Inputs are 2-D row-major where the
// Python layer flattens leading dims. With VITKERN_POISON_OUTPUTS=1 (the test suite sets it) every
// output is NaN-filled before the kernels run, so an element a kernel forgets to write fails a test.
//
// VK_EMULATION (defined only by the tests' CPU emulator, tests/cuda_emu/emulator.py): the same torch
// layer over the kernels compiled for the emulator: ops under torch.ops.vitkern_emu for CPU tensors,
// no stream and no device guard. Everything else in this file is compiled as it is for the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifdef VK_EMULATION
#define VK_LIBRARY vitkern_emu
#define VK_DISPATCH_KEY CPU
#define VK_DEVICE_GUARD(t)
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define VK_LIBRARY vitkern
#define VK_DISPATCH_KEY CUDA
#define VK_DEVICE_GUARD(t) c10::cuda::CUDAGuard guard((t).device())
#endif

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "vitkern_kernels.h"

namespace {

using at::Tensor;

bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("VITKERN_POISON_OUTPUTS");
    return v != nullptr && std::string(v) != "" && std::string(v) != "0";
  }();
  return on;
}

Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  Tensor t = at::empty(shape, opts);
  if (poison_outputs() && t.numel() > 0) t.fill_(std::nan(""));
  return t;
}

int dtype_code(const Tensor& t) { return t.scalar_type() == at::kBFloat16 ? 1 : 0; }

// A size narrowed to the 32-bit int a kernel launcher takes (vitkern_kernels.h): refused, naming the
// quantity, rather than wrapped into a smaller (or negative) launch.
int to_int(const char* op, const char* what, int64_t v) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(v >= 0 && v <= kMax, "vitkern::", op, ": ", what, " is ", v,
              "; the CUDA kernels take it as a 32-bit int (at most ", kMax, ")");
  return static_cast<int>(v);
}

#ifdef VK_EMULATION
bool on_kernel_device(const Tensor& t) { return t.is_cpu(); }
constexpr const char* kDeviceKind = "a CPU tensor (the CUDA emulator)";
#else
bool on_kernel_device(const Tensor& t) { return t.is_cuda(); }
constexpr const char* kDeviceKind = "a CUDA tensor";
#endif

void check_input(const char* op, const char* name, const Tensor& t, const Tensor& like, int64_t ndim) {
  TORCH_CHECK(on_kernel_device(t), "vitkern::", op, ": ", name, " must be ", kDeviceKind, ", got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "vitkern::", op, ": ", name,
              " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "vitkern::", op, ": ", name, " must have dtype ",
              like.scalar_type(), " (like the first input), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "vitkern::", op, ": ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(ndim < 0 || t.dim() == ndim, "vitkern::", op, ": ", name, " must have ", ndim, " dims, got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "vitkern::", op, ": ", name, " must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "vitkern::", op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_stats(const char* op, const char* name, const Tensor& t, const Tensor& like, at::IntArrayRef expected) {
  TORCH_CHECK(on_kernel_device(t) && t.device() == like.device(), "vitkern::", op, ": ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "vitkern::", op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "vitkern::", op, ": ", name, " must be contiguous");
  check_shape(op, name, t, expected);
}

void check_cuda(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, "vitkern::", op, ": kernel launch failed: ", cudaGetErrorString(e));
}

void check_gemm(const char* op, const char* what, int status) {
  TORCH_CHECK(status == 0, "vitkern::", op, ": cuBLASLt GEMM for ", what, " failed: ", vk_status_string(status),
              " (status ", status, ")");
}

#ifdef VK_EMULATION
cudaStream_t stream() { return nullptr; }
#else
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

const void* ptr_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

Tensor gemm_workspace(const Tensor& like) {
  return at::empty({static_cast<int64_t>(vk_gemm_workspace_bytes())}, like.options().dtype(at::kByte));
}

// D[m, n] = A @ B (+ bias) (+ C), see vk_gemm. dbias_a: also the sum over k of A (length m).
void gemm(const char* op, const char* what, const Tensor& like, bool a_trans, bool b_trans, int64_t m, int64_t n,
          int64_t k, const Tensor& A, const Tensor& B, const void* bias, const void* C, Tensor& D, void* dbias_a) {
  Tensor ws = gemm_workspace(like);
  Tensor colsum_ws;
  float* colsum_ptr = nullptr;
  if (dbias_a != nullptr) {
    colsum_ws = at::empty({vk_colsum_workspace_floats(k, m)}, like.options().dtype(at::kFloat));
    colsum_ptr = colsum_ws.data_ptr<float>();
  }
  check_gemm(op, what,
             vk_gemm(dtype_code(like), a_trans, b_trans, m, n, k, A.data_ptr(), B.data_ptr(), bias, C, D.data_ptr(),
                     dbias_a, colsum_ptr, ws.data_ptr(), vk_gemm_workspace_bytes(), stream()));
}

// ---------------------------------------------------------------------------------------------- LayerNorm

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                  double eps) {
  const char* op = "cuda_layer_norm_fwd";
  check_input(op, "x", x, x, 2);
  check_input(op, "weight", weight, x, 1);
  check_input(op, "bias", bias, x, 1);
  const int64_t rows = x.size(0), dim = x.size(1);
  check_shape(op, "weight", weight, {dim});
  check_shape(op, "bias", bias, {dim});
  TORCH_CHECK(dim >= 1 && dim <= vk_layer_norm_max_dim(), "vitkern::", op, ": x's last dim must be in [1, ",
              vk_layer_norm_max_dim(), "], got ", dim);
  VK_DEVICE_GUARD(x);
  Tensor y = new_output({rows, dim}, x.options());
  Tensor mean = new_output({rows}, x.options().dtype(at::kFloat));
  Tensor rstd = new_output({rows}, x.options().dtype(at::kFloat));
  check_cuda(op, vk_layer_norm_fwd(dtype_code(x), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                   mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
                                   to_int(op, "x's last dim", dim), static_cast<float>(eps), stream()));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dout, const Tensor& x, const Tensor& weight,
                                                  const Tensor& mean, const Tensor& rstd) {
  const char* op = "cuda_layer_norm_bwd";
  check_input(op, "x", x, x, 2);
  check_input(op, "dout", dout, x, 2);
  check_input(op, "weight", weight, x, 1);
  const int64_t rows = x.size(0), dim = x.size(1);
  check_shape(op, "dout", dout, x.sizes());
  check_shape(op, "weight", weight, {dim});
  check_stats(op, "mean", mean, x, {rows});
  check_stats(op, "rstd", rstd, x, {rows});
  TORCH_CHECK(dim >= 1 && dim <= vk_layer_norm_max_dim(), "vitkern::", op, ": x's last dim must be in [1, ",
              vk_layer_norm_max_dim(), "], got ", dim);
  VK_DEVICE_GUARD(x);
  Tensor dx = new_output({rows, dim}, x.options());
  Tensor dw = new_output({dim}, x.options());
  Tensor db = new_output({dim}, x.options());
  Tensor partial = at::empty({vk_layer_norm_bwd_blocks(rows), 2, dim}, x.options().dtype(at::kFloat));
  check_cuda(op, vk_layer_norm_bwd(dtype_code(x), dout.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                   mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr(),
                                   db.data_ptr(), partial.data_ptr<float>(), rows, to_int(op, "x's last dim", dim),
                                   stream()));
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------------------------- linear

void check_linear_args(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_input(op, "x", x, x, 2);
  check_input(op, "weight", weight, x, 2);
  TORCH_CHECK(weight.size(1) == x.size(1), "vitkern::", op, ": weight must have shape (out_features, ", x.size(1),
              "), got ", weight.sizes());
  if (bias.has_value()) {
    check_input(op, "bias", *bias, x, 1);
    check_shape(op, "bias", *bias, {weight.size(0)});
  }
}

// The `int act` of the linear schemas: a VkActivation code (vitkern_kernels.h).
void check_act(const char* op, int64_t act) {
  TORCH_CHECK(act >= VK_ACT_NONE && act <= VK_ACT_QUICK_GELU, "vitkern::", op,
              ": act must be an activation code 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (quick_gelu), got ", act);
}

// out = act(x @ W^T + b) * scale (+ residual). Returns (out, preact): preact is the pre-activation
// h = x @ W^T + b when there is an elementwise epilogue (an activation or a scale; saved for the
// backward), else an empty tensor and the GEMM writes out itself (residual as its C).
std::tuple<Tensor, Tensor> linear_impl(const char* op, const Tensor& x, const Tensor& weight,
                                       const std::optional<Tensor>& bias, const std::optional<Tensor>& residual,
                                       const std::optional<Tensor>& scale, int64_t act) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  Tensor out = new_output({m, n}, x.options());
  if (act == VK_ACT_NONE && !scale.has_value()) {
    gemm(op, "x @ weight^T", x, false, true, m, n, k, x, weight, ptr_or_null(bias), ptr_or_null(residual), out,
         nullptr);
    return {out, at::empty({0}, x.options())};
  }
  Tensor preact = new_output({m, n}, x.options());
  gemm(op, "x @ weight^T", x, false, true, m, n, k, x, weight, ptr_or_null(bias), nullptr, preact, nullptr);
  check_cuda(op, vk_linear_epilogue_fwd(dtype_code(x), static_cast<int>(act), preact.data_ptr(), ptr_or_null(scale),
                                        ptr_or_null(residual), out.data_ptr(), m, n, stream()));
  return {out, preact};
}

std::tuple<Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                      const std::optional<Tensor>& residual, const std::optional<Tensor>& scale,
                                      int64_t act) {
  const char* op = "cuda_linear_fwd";
  check_linear_args(op, x, weight, bias);
  check_act(op, act);
  if (residual.has_value()) {
    check_input(op, "residual", *residual, x, 2);
    check_shape(op, "residual", *residual, {x.size(0), weight.size(0)});
  }
  if (scale.has_value()) {
    check_input(op, "scale", *scale, x, 1);
    check_shape(op, "scale", *scale, {weight.size(0)});
  }
  VK_DEVICE_GUARD(x);
  return linear_impl(op, x, weight, bias, residual, scale, act);
}

// Gradients of act(x @ W^T + b) * scale given dout: (dx, dweight, dbias, dscale); dbias is empty
// without a bias, dscale without a scale. With an activation or a scale, one pass over dout and preact
// forms dh = dout * scale * act'(preact) and dscale = column sums of dout * act(preact); then the GEMMs.
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_grads(const char* op, const Tensor& dout, const Tensor& x,
                                                        const Tensor& weight, const Tensor& preact,
                                                        const std::optional<Tensor>& scale, bool has_bias,
                                                        int64_t act) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  Tensor dh = dout;
  Tensor dscale = at::empty({0}, x.options());
  if (act != VK_ACT_NONE || scale.has_value()) {
    check_input(op, "preact", preact, x, 2);
    check_shape(op, "preact", preact, {m, n});
    dh = new_output({m, n}, x.options());
    Tensor ws;
    if (scale.has_value()) {
      dscale = new_output({n}, x.options());
      ws = at::empty({vk_colsum_workspace_floats(m, n)}, x.options().dtype(at::kFloat));
    }
    check_cuda(op, vk_linear_epilogue_bwd(dtype_code(x), static_cast<int>(act), dout.data_ptr(), preact.data_ptr(),
                                          ptr_or_null(scale), dh.data_ptr(),
                                          scale.has_value() ? dscale.data_ptr() : nullptr,
                                          scale.has_value() ? ws.data_ptr<float>() : nullptr, m, n, stream()));
  }
  Tensor dx = new_output({m, k}, x.options());
  Tensor dw = new_output({n, k}, x.options());
  Tensor db = has_bias ? new_output({n}, x.options()) : at::empty({0}, x.options());
  gemm(op, "dx = dh @ weight", x, false, false, m, k, n, dh, weight, nullptr, nullptr, dx, nullptr);
  gemm(op, "dweight = dh^T @ x", x, true, false, n, k, m, dh, x, nullptr, nullptr, dw,
       has_bias ? db.data_ptr() : nullptr);
  return {dx, dw, db, dscale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_bwd(const Tensor& dout, const Tensor& x, const Tensor& weight,
                                                      const Tensor& preact, const std::optional<Tensor>& scale,
                                                      bool has_bias, int64_t act) {
  const char* op = "cuda_linear_bwd";
  check_linear_args(op, x, weight, std::nullopt);
  check_act(op, act);
  check_input(op, "dout", dout, x, 2);
  check_shape(op, "dout", dout, {x.size(0), weight.size(0)});
  if (scale.has_value()) {
    check_input(op, "scale", *scale, x, 1);
    check_shape(op, "scale", *scale, {weight.size(0)});
  }
  VK_DEVICE_GUARD(x);
  return linear_grads(op, dout, x, weight, preact, scale, has_bias, act);
}

// ---------------------------------------------------------------------------------------------- ln_linear

// Returns (out, ln_out, mean, rstd, preact): ln_out = LayerNorm(x) in x's dtype (the GEMM's A operand,
// saved for dweight); preact as in linear_fwd (an activation, no scale).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_linear_fwd(const Tensor& x, const Tensor& ln_weight,
                                                                 const Tensor& ln_bias, const Tensor& weight,
                                                                 const std::optional<Tensor>& bias, double eps,
                                                                 int64_t act) {
  const char* op = "cuda_ln_linear_fwd";
  check_linear_args(op, x, weight, bias);
  check_act(op, act);
  check_input(op, "ln_weight", ln_weight, x, 1);
  check_input(op, "ln_bias", ln_bias, x, 1);
  check_shape(op, "ln_weight", ln_weight, {x.size(1)});
  check_shape(op, "ln_bias", ln_bias, {x.size(1)});
  auto [ln_out, mean, rstd] = layer_norm_fwd(x, ln_weight, ln_bias, eps);
  VK_DEVICE_GUARD(x);
  auto [out, preact] = linear_impl(op, ln_out, weight, bias, std::nullopt, std::nullopt, act);
  return {out, ln_out, mean, rstd, preact};
}

// Returns (dx, dln_weight, dln_bias, dweight, dbias).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_linear_bwd(const Tensor& dout, const Tensor& x,
                                                                 const Tensor& ln_weight, const Tensor& weight,
                                                                 const Tensor& ln_out, const Tensor& mean,
                                                                 const Tensor& rstd, const Tensor& preact,
                                                                 bool has_bias, int64_t act) {
  const char* op = "cuda_ln_linear_bwd";
  check_linear_args(op, x, weight, std::nullopt);
  check_act(op, act);
  check_input(op, "dout", dout, x, 2);
  check_shape(op, "dout", dout, {x.size(0), weight.size(0)});
  check_input(op, "ln_out", ln_out, x, 2);
  check_shape(op, "ln_out", ln_out, x.sizes());
  VK_DEVICE_GUARD(x);
  auto [dln, dw, db, dscale] = linear_grads(op, dout, ln_out, weight, preact, std::nullopt, has_bias, act);
  auto [dx, dlnw, dlnb] = layer_norm_bwd(dln, x, ln_weight, mean, rstd);
  return {dx, dlnw, dlnb, dw, db};
}

// ---------------------------------------------------------------------------------------------- attention

// qkv [batch, tokens, 3 * dim] (dense) or, packed (with cu_seqlens), [total_tokens, 3 * dim].
void check_qkv(const char* op, const Tensor& qkv, int64_t num_heads, bool packed) {
  TORCH_CHECK(on_kernel_device(qkv), "vitkern::", op, ": qkv must be ", kDeviceKind, ", got device ", qkv.device());
  TORCH_CHECK(qkv.scalar_type() == at::kHalf || qkv.scalar_type() == at::kBFloat16, "vitkern::", op,
              ": qkv must be float16 or bfloat16, got ", qkv.scalar_type());
  if (packed) {
    TORCH_CHECK(qkv.dim() == 2, "vitkern::", op, ": with cu_seqlens, qkv must be packed [total_tokens, 3 * dim], got shape ",
                qkv.sizes());
  } else {
    TORCH_CHECK(qkv.dim() == 3, "vitkern::", op, ": qkv must be [batch, tokens, 3 * dim], got shape ", qkv.sizes());
  }
  const int64_t last = qkv.size(-1);
  TORCH_CHECK(num_heads > 0 && last % (3 * num_heads) == 0, "vitkern::", op,
              ": qkv's last dim must be 3 * num_heads * head_dim with num_heads = ", num_heads, ", got ", last);
  const int64_t head_dim = last / (3 * num_heads);
  // Compared as int64 first: a head_dim past 2^31 must not wrap onto a supported one.
  TORCH_CHECK(head_dim <= 128 && vk_attention_supports_head_dim(int(head_dim)), "vitkern::", op,
              ": head_dim must be 64, 80 or 128, got ", head_dim);
  TORCH_CHECK(qkv.stride(-1) == 1, "vitkern::", op, ": qkv's last dim must be contiguous, got strides ",
              qkv.strides());
  const bool rows_aligned = packed ? qkv.stride(0) % 8 == 0 : qkv.stride(0) % 8 == 0 && qkv.stride(1) % 8 == 0;
  TORCH_CHECK(rows_aligned && reinterpret_cast<uintptr_t>(qkv.data_ptr()) % 16 == 0, "vitkern::", op,
              ": qkv rows must start 16-byte aligned (strides multiples of 8), got strides ", qkv.strides());
  if (!packed) {
    TORCH_CHECK(qkv.size(1) <= 65535 * 64, "vitkern::", op, ": at most ", 65535 * 64, " tokens, got ", qkv.size(1));
  }
}

struct AttentionSizes {
  int batch, tokens, heads, head_dim;
};

// The launchers' int sizes, checked; the grid's x dimension is batch * heads (at most 2^31 - 1).
AttentionSizes attention_sizes(const char* op, int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim) {
  to_int(op, "batch * num_heads (the kernels' grid.x)", batch * heads);
  return {to_int(op, "batch", batch), to_int(op, "tokens", tokens), to_int(op, "num_heads", heads),
          to_int(op, "head_dim", head_dim)};
}

// The packed-sequence arguments (FlashAttention's varlen convention). cu_seqlens: int32 [num_seqs + 1] on
// qkv's device, contiguous; its values (0, ..., total, strictly increasing, max_seqlen >= every length) are
// not read here (that would synchronize with the device): vitkern.ops.attention checks them
// (vitkern/ops/_checks.py, check_cu_seqlens) before it calls the op. max_seqlen sizes the grid.
// Returns the number of sequences (0: dense, no cu_seqlens).
int check_varlen(const char* op, const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen, const Tensor& qkv,
                 int64_t num_heads) {
  if (!cu_seqlens.has_value()) {
    TORCH_CHECK(max_seqlen == 0, "vitkern::", op, ": max_seqlen = ", max_seqlen,
                " was given without cu_seqlens (dense attention takes max_seqlen = 0)");
    return 0;
  }
  const Tensor& cu = *cu_seqlens;
  TORCH_CHECK(on_kernel_device(cu) && cu.device() == qkv.device(), "vitkern::", op, ": cu_seqlens must be on ",
              qkv.device(), " (like qkv), got ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt, "vitkern::", op, ": cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2 && cu.is_contiguous(), "vitkern::", op,
              ": cu_seqlens must be contiguous 1-D [num_seqs + 1] with at least one sequence, got shape ", cu.sizes());
  TORCH_CHECK(max_seqlen > 0 && max_seqlen <= 65535 * 64, "vitkern::", op, ": max_seqlen must be in [1, ",
              65535 * 64, "] with cu_seqlens (the grid covers max_seqlen rows per sequence), got ", max_seqlen);
  const int64_t num_seqs = cu.size(0) - 1;
  to_int(op, "num_seqs * num_heads (the kernels' grid.x)", num_seqs * num_heads);
  to_int(op, "total_tokens + max_seqlen + 64 (the packed kernels' int row indices)", qkv.size(0) + max_seqlen + 64);
  return to_int(op, "num_seqs", num_seqs);
}

// QK-norm arguments of one side (q or k): weight and bias [head_dim] in qkv's dtype, both given (that side is
// normalized) or both absent. Null pointers for an absent side.
struct NormSide {
  const void* weight = nullptr;
  const void* bias = nullptr;
  float eps = 0.f;
  bool on() const { return weight != nullptr; }
};

NormSide check_norm_side(const char* op, const char* side, const std::optional<Tensor>& weight,
                         const std::optional<Tensor>& bias, double eps, const Tensor& qkv, int64_t head_dim) {
  const std::string w_name = std::string(side) + "_weight", b_name = std::string(side) + "_bias";
  TORCH_CHECK(weight.has_value() == bias.has_value(), "vitkern::", op, ": ", w_name, " and ", b_name,
              " must be given together (", side, "-norm on: pass ones / zeros for an absent one) or both be None, got ",
              w_name, weight.has_value() ? " given" : " None", " and ", b_name, bias.has_value() ? " given" : " None");
  if (!weight.has_value()) return {};
  check_input(op, w_name.c_str(), *weight, qkv, 1);
  check_shape(op, w_name.c_str(), *weight, {head_dim});
  check_input(op, b_name.c_str(), *bias, qkv, 1);
  check_shape(op, b_name.c_str(), *bias, {head_dim});
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "vitkern::", op, ": ", side, "_eps must be a finite float >= 0, got ", eps);
  return {weight->data_ptr(), bias->data_ptr(), static_cast<float>(eps)};
}

// Dense: qkv [batch, tokens, 3 * dim] -> out [batch, tokens, dim], lse [batch, heads, tokens]. Packed (cu_seqlens
// given, with max_seqlen): qkv [total, 3 * dim] -> out [total, dim], lse [heads, total].
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& qkv, int64_t num_heads, double scale,
                                         const std::optional<Tensor>& q_weight, const std::optional<Tensor>& q_bias,
                                         double q_eps, const std::optional<Tensor>& k_weight,
                                         const std::optional<Tensor>& k_bias, double k_eps,
                                         const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen) {
  const char* op = "cuda_attention_fwd";
  const bool packed = cu_seqlens.has_value();
  check_qkv(op, qkv, num_heads, packed);
  const int num_seqs = check_varlen(op, cu_seqlens, max_seqlen, qkv, num_heads);
  const int64_t dim = qkv.size(-1) / 3, head_dim = dim / num_heads;
  const NormSide qn = check_norm_side(op, "q", q_weight, q_bias, q_eps, qkv, head_dim);
  const NormSide kn = check_norm_side(op, "k", k_weight, k_bias, k_eps, qkv, head_dim);
  VK_DEVICE_GUARD(qkv);
  if (packed) {
    const int64_t total = qkv.size(0);
    const AttentionSizes sizes = attention_sizes(op, num_seqs, total, num_heads, head_dim);
    Tensor out = new_output({total, dim}, qkv.options());
    Tensor lse = new_output({num_heads, total}, qkv.options().dtype(at::kFloat));
    check_cuda(op, vk_attention_varlen_fwd(dtype_code(qkv), qkv.data_ptr(), qkv.stride(0), out.data_ptr(),
                                           lse.data_ptr<float>(), cu_seqlens->data_ptr<int>(), sizes.batch,
                                           sizes.tokens, int(max_seqlen), sizes.heads, sizes.head_dim,
                                           static_cast<float>(scale), qn.weight, qn.bias, qn.eps, kn.weight, kn.bias,
                                           kn.eps, stream()));
    return {out, lse};
  }
  const int64_t batch = qkv.size(0), tokens = qkv.size(1);
  const AttentionSizes sizes = attention_sizes(op, batch, tokens, num_heads, head_dim);
  Tensor out = new_output({batch, tokens, dim}, qkv.options());
  Tensor lse = new_output({batch, num_heads, tokens}, qkv.options().dtype(at::kFloat));
  check_cuda(op, vk_attention_qknorm_fwd(dtype_code(qkv), qkv.data_ptr(), qkv.stride(0), qkv.stride(1),
                                         out.data_ptr(), lse.data_ptr<float>(), sizes.batch, sizes.tokens, sizes.heads,
                                         sizes.head_dim, static_cast<float>(scale), qn.weight, qn.bias, qn.eps,
                                         kn.weight, kn.bias, kn.eps, stream()));
  return {out, lse};
}

// Returns dqkv and the QK-norm gradients (dq_weight, dq_bias, dk_weight, dk_bias: [head_dim], empty for a
// side that is not normalized). Packed (cu_seqlens): dout, out [total, dim], lse [heads, total].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const Tensor& qkv, const Tensor& out, const Tensor& lse, int64_t num_heads, double scale,
    const std::optional<Tensor>& q_weight, const std::optional<Tensor>& q_bias, double q_eps,
    const std::optional<Tensor>& k_weight, const std::optional<Tensor>& k_bias, double k_eps,
    const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen) {
  const char* op = "cuda_attention_bwd";
  const bool packed = cu_seqlens.has_value();
  check_qkv(op, qkv, num_heads, packed);
  const int num_seqs = check_varlen(op, cu_seqlens, max_seqlen, qkv, num_heads);
  const int64_t dim = qkv.size(-1) / 3, head_dim = dim / num_heads;
  // Packed: the batch of one of `total` rows whose grid is (num_seqs * heads, ceil(max_seqlen / 64)).
  const int64_t batch = packed ? 1 : qkv.size(0), tokens = packed ? qkv.size(0) : qkv.size(1);
  const AttentionSizes sizes = attention_sizes(op, packed ? num_seqs : batch, tokens, num_heads, head_dim);
  const std::vector<int64_t> rows = packed ? std::vector<int64_t>{tokens, dim} : std::vector<int64_t>{batch, tokens, dim};
  check_input(op, "dout", dout, qkv, qkv.dim());
  check_shape(op, "dout", dout, rows);
  check_input(op, "out", out, qkv, qkv.dim());
  check_shape(op, "out", out, rows);
  const std::vector<int64_t> stats =
      packed ? std::vector<int64_t>{num_heads, tokens} : std::vector<int64_t>{batch, num_heads, tokens};
  check_stats(op, "lse", lse, qkv, stats);
  const NormSide qn = check_norm_side(op, "q", q_weight, q_bias, q_eps, qkv, head_dim);
  const NormSide kn = check_norm_side(op, "k", k_weight, k_bias, k_eps, qkv, head_dim);
  VK_DEVICE_GUARD(qkv);
  Tensor dqkv = new_output(packed ? std::vector<int64_t>{tokens, 3 * dim} : std::vector<int64_t>{batch, tokens, 3 * dim},
                           qkv.options());
  Tensor delta = at::empty(stats, qkv.options().dtype(at::kFloat));
  // A normalized side's weight/bias gradients, and the fp32 per-CTA partial sums they are reduced from
  // (poisoned like an output: a CTA that leaves its slice unwritten, e.g. one past a packed sequence's
  // end, makes the gradients NaN in the tests).
  const int64_t partial_floats =
      vk_attention_norm_partial_rows(sizes.batch, packed ? int(max_seqlen) : sizes.tokens, sizes.heads) * 2 * head_dim;
  auto grads = [&](const NormSide& side) {
    const int64_t n = side.on() ? head_dim : 0;
    return std::make_tuple(new_output({n}, qkv.options()), new_output({n}, qkv.options()),
                           new_output({side.on() ? partial_floats : 0}, qkv.options().dtype(at::kFloat)));
  };
  auto [dqw, dqb, q_partial] = grads(qn);
  auto [dkw, dkb, k_partial] = grads(kn);
  auto ptr = [](Tensor& t, bool on) { return on ? t.data_ptr() : nullptr; };
  float* qp = static_cast<float*>(ptr(q_partial, qn.on()));
  float* kp = static_cast<float*>(ptr(k_partial, kn.on()));
  if (packed) {
    check_cuda(op, vk_attention_varlen_bwd(
                       dtype_code(qkv), qkv.data_ptr(), qkv.stride(0), dout.data_ptr(), lse.data_ptr<float>(),
                       delta.data_ptr<float>(), dqkv.data_ptr(), cu_seqlens->data_ptr<int>(), sizes.batch,
                       sizes.tokens, int(max_seqlen), sizes.heads, sizes.head_dim, static_cast<float>(scale),
                       qn.weight, qn.bias, qn.eps, kn.weight, kn.bias, kn.eps, ptr(dqw, qn.on()), ptr(dqb, qn.on()),
                       ptr(dkw, kn.on()), ptr(dkb, kn.on()), qp, kp, stream()));
  } else {
    check_cuda(op, vk_attention_qknorm_bwd(
                       dtype_code(qkv), qkv.data_ptr(), qkv.stride(0), qkv.stride(1), dout.data_ptr(),
                       lse.data_ptr<float>(), delta.data_ptr<float>(), dqkv.data_ptr(), sizes.batch, sizes.tokens,
                       sizes.heads, sizes.head_dim, static_cast<float>(scale), qn.weight, qn.bias, qn.eps, kn.weight,
                       kn.bias, kn.eps, ptr(dqw, qn.on()), ptr(dqb, qn.on()), ptr(dkw, kn.on()), ptr(dkb, kn.on()),
                       qp, kp, stream()));
  }
  return {dqkv, dqw, dqb, dkw, dkb};
}

// ---------------------------------------------------------------------------------------------- patch_embed

void check_patch_args(const char* op, const Tensor& x, const Tensor& weight) {
  check_input(op, "x", x, x, 4);
  check_input(op, "weight", weight, x, 4);
  TORCH_CHECK(x.size(1) == weight.size(1), "vitkern::", op, ": x must have ", weight.size(1),
              " channels (weight is [dim, chans, ph, pw] = ", weight.sizes(), "), got ", x.size(1));
  TORCH_CHECK(x.size(2) % weight.size(2) == 0 && x.size(3) % weight.size(3) == 0, "vitkern::", op,
              ": x's height and width must be multiples of the patch size (", weight.size(2), ", ", weight.size(3),
              "), got (", x.size(2), ", ", x.size(3), ")");
}

// The image geometry as the gather kernels take it (ints), checked: the patch length chans * ph * pw is
// an int in the kernel too.
struct ImageSizes {
  int batch, chans, height, width, ph, pw;
};

ImageSizes image_sizes(const char* op, const Tensor& x, const Tensor& weight) {
  to_int(op, "the patch length chans * ph * pw", x.size(1) * weight.size(2) * weight.size(3));
  return {to_int(op, "batch", x.size(0)), to_int(op, "chans", x.size(1)), to_int(op, "height", x.size(2)),
          to_int(op, "width", x.size(3)), to_int(op, "patch height", weight.size(2)),
          to_int(op, "patch width", weight.size(3))};
}

Tensor patchify(const char* op, const Tensor& x, const Tensor& weight) {
  const int64_t batch = x.size(0), chans = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ph = weight.size(2), pw = weight.size(3);
  const ImageSizes s = image_sizes(op, x, weight);
  Tensor patches = new_output({batch * (h / ph) * (w / pw), chans * ph * pw}, x.options());
  check_cuda(op, vk_patchify(dtype_code(x), x.data_ptr(), patches.data_ptr(), s.batch, s.chans, s.height, s.width,
                             s.ph, s.pw, stream()));
  return patches;
}

// The prefix tokens' count: cls_token is [1, n_prefix, dim] (class, distillation, register tokens).
int64_t prefix_tokens(const char* op, const std::optional<Tensor>& cls_token, const Tensor& x, int64_t dim) {
  if (!cls_token.has_value()) return 0;
  check_input(op, "cls_token", *cls_token, x, 3);
  TORCH_CHECK(cls_token->size(0) == 1 && cls_token->size(2) == dim, "vitkern::", op,
              ": cls_token must have shape (1, n_prefix, ", dim, ") (the prefix tokens), got ", cls_token->sizes());
  return cls_token->size(1);
}

// out = [prefix tokens; patches @ weight^T + bias] + pos_embed; pos_embed covers every token, or with
// no_embed_class only the patch tokens.
Tensor patch_embed_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& cls_token, const std::optional<Tensor>& pos_embed,
                       bool no_embed_class) {
  const char* op = "cuda_patch_embed_fwd";
  check_patch_args(op, x, weight);
  const int64_t batch = x.size(0), dim = weight.size(0);
  const int64_t num_patches = (x.size(2) / weight.size(2)) * (x.size(3) / weight.size(3));
  const int64_t n_prefix = prefix_tokens(op, cls_token, x, dim);
  const int64_t tokens = n_prefix + num_patches;
  to_int(op, "the token count n_prefix + num_patches", tokens);
  if (bias.has_value()) {
    check_input(op, "bias", *bias, x, 1);
    check_shape(op, "bias", *bias, {dim});
  }
  if (pos_embed.has_value()) {
    check_input(op, "pos_embed", *pos_embed, x, 3);
    check_shape(op, (no_embed_class ? "pos_embed (no_embed_class: the patch tokens only)" : "pos_embed"), *pos_embed,
                {1, no_embed_class ? num_patches : tokens, dim});
  }
  VK_DEVICE_GUARD(x);
  Tensor patches = patchify(op, x, weight);
  const int64_t m = patches.size(0), k = patches.size(1);
  Tensor proj = new_output({m, dim}, x.options());
  gemm(op, "patches @ weight^T", x, false, true, m, dim, k, patches, weight, ptr_or_null(bias), nullptr, proj,
       nullptr);
  Tensor out = new_output({batch, tokens, dim}, x.options());
  check_cuda(op, vk_patch_embed_epilogue(dtype_code(x), proj.data_ptr(), ptr_or_null(cls_token),
                                         ptr_or_null(pos_embed), out.data_ptr(), to_int(op, "batch", batch),
                                         to_int(op, "n_prefix", n_prefix), to_int(op, "num_patches", num_patches),
                                         to_int(op, "dim", dim), no_embed_class, stream()));
  return out;
}

// Returns (dx, dweight, dbias, dcls [1, n_prefix, dim], dpos); a gradient that was not asked for is an
// empty tensor (dcls too when n_prefix = 0). dcls and dpos are batch column sums of dout's rows read in
// place (vk_colsum with dout's row stride): dcls of the prefix rows, dpos of every row or, with
// no_embed_class, of the patch rows.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_bwd(const Tensor& dout, const Tensor& x,
                                                                   const Tensor& weight, bool has_bias,
                                                                   int64_t n_prefix, bool has_pos,
                                                                   bool no_embed_class, bool needs_dx) {
  const char* op = "cuda_patch_embed_bwd";
  check_patch_args(op, x, weight);
  const int64_t batch = x.size(0), dim = weight.size(0);
  const int64_t num_patches = (x.size(2) / weight.size(2)) * (x.size(3) / weight.size(3));
  TORCH_CHECK(n_prefix >= 0, "vitkern::", op, ": n_prefix must be >= 0, got ", n_prefix);
  const int64_t tokens = n_prefix + num_patches;
  check_input(op, "dout", dout, x, 3);
  check_shape(op, "dout", dout, {batch, tokens, dim});
  VK_DEVICE_GUARD(x);
  const Tensor none = at::empty({0}, x.options());
  Tensor dpos = none, dcls = none, dx = none;
  if (has_pos) {
    const int64_t pos_rows = no_embed_class ? num_patches : tokens;
    dpos = new_output({1, pos_rows, dim}, x.options());
    Tensor ws = at::empty({vk_colsum_workspace_floats(batch, pos_rows * dim)}, x.options().dtype(at::kFloat));
    const void* first = dout.narrow(1, tokens - pos_rows, pos_rows).data_ptr();
    check_cuda(op, vk_colsum(dtype_code(x), first, batch, pos_rows * dim, tokens * dim, dpos.data_ptr(),
                             ws.data_ptr<float>(), stream()));
  }
  if (n_prefix > 0) {
    dcls = new_output({1, n_prefix, dim}, x.options());
    Tensor ws = at::empty({vk_colsum_workspace_floats(batch, n_prefix * dim)}, x.options().dtype(at::kFloat));
    check_cuda(op, vk_colsum(dtype_code(x), dout.data_ptr(), batch, n_prefix * dim, tokens * dim, dcls.data_ptr(),
                             ws.data_ptr<float>(), stream()));
  }
  // The patch rows of dout as a dense [batch * num_patches, dim] GEMM operand.
  const Tensor dproj = (n_prefix > 0 ? dout.narrow(1, n_prefix, num_patches).contiguous() : dout).reshape({-1, dim});
  const Tensor patches = patchify(op, x, weight);
  const int64_t m = patches.size(0), k = patches.size(1);
  Tensor dw = new_output(weight.sizes(), x.options());
  Tensor db = has_bias ? new_output({dim}, x.options()) : none;
  gemm(op, "dweight = dproj^T @ patches", x, true, false, dim, k, m, dproj, patches, nullptr, nullptr, dw,
       has_bias ? db.data_ptr() : nullptr);
  if (needs_dx) {
    Tensor dpatches = new_output({m, k}, x.options());
    gemm(op, "dpatches = dproj @ weight", x, false, false, m, k, dim, dproj, weight, nullptr, nullptr, dpatches,
         nullptr);
    dx = new_output(x.sizes(), x.options());
    const ImageSizes s = image_sizes(op, x, weight);
    check_cuda(op, vk_unpatchify(dtype_code(x), dpatches.data_ptr(), dx.data_ptr(), s.batch, s.chans, s.height,
                                 s.width, s.ph, s.pw, stream()));
  }
  return {dx, dw, db, dcls, dpos};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(VK_LIBRARY, m) {
  m.def("cuda_layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_layer_norm_bwd(Tensor dout, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  // act: a VkActivation code (vitkern_kernels.h): 0 none, 1 gelu, 2 gelu_tanh, 3 quick_gelu.
  m.def("cuda_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? scale, int act) -> (Tensor, Tensor)");
  m.def("cuda_linear_bwd(Tensor dout, Tensor x, Tensor weight, Tensor preact, Tensor? scale, bool has_bias, int act) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_ln_linear_fwd(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor weight, Tensor? bias, float eps, int act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_ln_linear_bwd(Tensor dout, Tensor x, Tensor ln_weight, Tensor weight, Tensor ln_out, Tensor mean, Tensor rstd, Tensor preact, bool has_bias, int act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_attention_fwd(Tensor qkv, int num_heads, float scale, Tensor? q_weight=None, Tensor? q_bias=None, float q_eps=0., Tensor? k_weight=None, Tensor? k_bias=None, float k_eps=0., Tensor? cu_seqlens=None, int max_seqlen=0) -> (Tensor, Tensor)");
  m.def("cuda_attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, Tensor? q_weight=None, Tensor? q_bias=None, float q_eps=0., Tensor? k_weight=None, Tensor? k_bias=None, float k_eps=0., Tensor? cu_seqlens=None, int max_seqlen=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed, bool no_embed_class) -> Tensor");
  m.def("cuda_patch_embed_bwd(Tensor dout, Tensor x, Tensor weight, bool has_bias, int n_prefix, bool has_pos, bool no_embed_class, bool needs_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(VK_LIBRARY, VK_DISPATCH_KEY, m) {
  m.impl("cuda_layer_norm_fwd", &layer_norm_fwd);
  m.impl("cuda_layer_norm_bwd", &layer_norm_bwd);
  m.impl("cuda_linear_fwd", &linear_fwd);
  m.impl("cuda_linear_bwd", &linear_bwd);
  m.impl("cuda_ln_linear_fwd", &ln_linear_fwd);
  m.impl("cuda_ln_linear_bwd", &ln_linear_bwd);
  m.impl("cuda_attention_fwd", &attention_fwd);
  m.impl("cuda_attention_bwd", &attention_bwd);
  m.impl("cuda_patch_embed_fwd", &patch_embed_fwd);
  m.impl("cuda_patch_embed_bwd", &patch_embed_bwd);
}

// A Python module so that `import vitkern._C` (the setup.py build, which defines VK_PYTHON_MODULE)
// loads the library and runs the registrations above. The just-in-time build loads the same code
// with torch.ops.load_library and needs no Python headers.
#ifdef VK_PYTHON_MODULE
#include <Python.h>
#define VK_CONCAT_(a, b) a##b
#define VK_CONCAT(a, b) VK_CONCAT_(a, b)
#define VK_STR_(a) #a
#define VK_STR(a) VK_STR_(a)
extern "C" PyMODINIT_FUNC VK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, VK_STR(TORCH_EXTENSION_NAME),
                            "vitkern CUDA kernels; ops are under torch.ops.vitkern.cuda_*", -1, nullptr};
  return PyModule_Create(&def);
}
#endif
