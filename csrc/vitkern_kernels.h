// Host entry points of the kernel files: raw pointers, sizes, strides (elements) and a stream.
// This header is all bindings.cpp sees of the kernels, so the torch layer never compiles device code
// and the kernel files never compile torch headers. Dtype codes are VkDtype (common.cuh): 0 fp16, 1 bf16.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

// ---- LayerNorm (layernorm.cu): x, y, dy, dx [rows, dim] contiguous; weight, bias [dim]; mean, rstd [rows] fp32.
int vk_layer_norm_max_dim();
// Number of CTAs of the backward, i.e. the rows of its fp32 workspace `partial` [blocks, 2, dim].
int vk_layer_norm_bwd_blocks(int64_t rows);
cudaError_t vk_layer_norm_fwd(int dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                              float* rstd, int64_t rows, int dim, float eps, cudaStream_t stream);
cudaError_t vk_layer_norm_bwd(int dtype, const void* dy, const void* x, const void* weight, const float* mean,
                              const float* rstd, void* dx, void* dweight, void* dbias, float* partial,
                              int64_t rows, int dim, cudaStream_t stream);

// ---- GEMM with fused epilogues through cuBLASLt (gemm_epilogue.cu). Row-major view:
//   D[m, n] = A[m, k] @ B[k, n] (+ bias[n]) (+ C[m, n])
// A is stored [m, k] (a_trans = 0) or [k, m] (a_trans = 1); B is stored [k, n] (b_trans = 0) or
// [n, k] (b_trans = 1); all dense with leading dims equal to their row lengths. C (nullable) is
// [m, n], added with beta = 1 (the residual). dbias_a (nullable): also write sum over k of A, [m]
// (the bias gradient of a weight-gradient GEMM; CUBLASLT_EPILOGUE_BGRADB, or a reduction kernel when
// cuBLASLt has no algorithm for it, which then needs `colsum_ws` of vk_colsum_workspace_floats(k, m));
// bias and dbias_a are never both given. k = 0 (an empty reduction) writes D = 0 and dbias_a = 0 and
// takes neither bias nor C. Returns 0 or a status for vk_status_string.
int vk_gemm(int dtype, int a_trans, int b_trans, int64_t m, int64_t n, int64_t k, const void* A, const void* B,
            const void* bias, const void* C, void* D, void* dbias_a, float* colsum_ws, void* workspace,
            size_t workspace_bytes, cudaStream_t stream);
size_t vk_gemm_workspace_bytes();
const char* vk_status_string(int status);

// Activation codes of the linear epilogues: the `int act` of the launchers below and of the ops'
// schemas (csrc/bindings.cpp); vitkern/ops/_cuda.py's ACTIVATION_CODES maps the op's names to them.
enum VkActivation : int {
  VK_ACT_NONE = 0,        // identity
  VK_ACT_GELU = 1,        // exact GELU, x Phi(x) (erf)
  VK_ACT_GELU_TANH = 2,   // tanh GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  VK_ACT_QUICK_GELU = 3,  // QuickGELU, x sigmoid(1.702 x)
};

// The elementwise epilogue after a GEMM that wrote the pre-activation h = x W^T + b [rows, cols]
// (dense): out = act(h) * scale[col] (+ residual[row, col]) in fp32, rounded once. scale: [cols]
// (LayerScale's gamma; nullable: 1); residual: [rows, cols] (nullable). act: a VkActivation code.
cudaError_t vk_linear_epilogue_fwd(int dtype, int act, const void* h, const void* scale, const void* residual,
                                   void* out, int64_t rows, int64_t cols, cudaStream_t stream);
// Its backward: dh = dout * scale[col] * act'(h) [rows, cols]; and with dscale (only with a scale):
// dscale[col] = sum over rows of dout * act(h), fp32 partial sums per chunk of rows in `ws`
// (vk_colsum_workspace_floats(rows, cols) floats) added in a fixed order (deterministic), in the
// same pass over dout and h.
cudaError_t vk_linear_epilogue_bwd(int dtype, int act, const void* dout, const void* h, const void* scale, void* dh,
                                   void* dscale, float* ws, int64_t rows, int64_t cols, cudaStream_t stream);
// out[c] = sum_r in[r * ld + c] for r < rows, c < cols (fixed order; fp32 accumulation).
int64_t vk_colsum_workspace_floats(int64_t rows, int64_t cols);
cudaError_t vk_colsum(int dtype, const void* in, int64_t rows, int64_t cols, int64_t ld, void* out, float* ws,
                      cudaStream_t stream);

// ---- Attention (attention.cu). qkv: [batch, tokens, 3, heads, head_dim] with element strides
// (stride_b, stride_t) for its first two dims and the rest contiguous; out, dout, dqkv: [batch,
// tokens, heads * head_dim] contiguous; lse, delta: [batch, heads, tokens] fp32. head_dim in {64, 80, 128}.
bool vk_attention_supports_head_dim(int head_dim);
cudaError_t vk_attention_fwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, void* out, float* lse,
                             int batch, int tokens, int heads, int head_dim, float scale, cudaStream_t stream);
// dqkv is written whole (q, k and v parts), contiguous [batch, tokens, 3 * heads * head_dim]. The dQ
// kernel computes delta = rowsum(P dP) / rowsum(P) from its own P and dP into `delta` (scratch, then
// read by dK/dV); `out` is unused since then and kept so the bindings' signature did not change.
cudaError_t vk_attention_bwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, const void* out,
                             const void* dout, const float* lse, float* delta, void* dqkv, int batch, int tokens,
                             int heads, int head_dim, float scale, cudaStream_t stream);
// QK-norm (timm's qk_norm=True): the same kernels with a LayerNorm over head_dim of every head's q and/or k
// row applied as the rows are loaded (no normalized copy is written). q_weight, q_bias: [head_dim] in qkv's
// dtype, both set (q is normalized, eps q_eps) or both null (likewise k); all four null is the plain path.
// The backward also writes the LayerNorm weight/bias gradients dq_weight, dq_bias (dk_weight, dk_bias):
// [head_dim] in qkv's dtype, set for a normalized side, through the fp32 workspace q_partial (k_partial) of
// vk_attention_norm_partial_rows(batch, tokens, heads) * 2 * head_dim floats.
int64_t vk_attention_norm_partial_rows(int batch, int tokens, int heads);
cudaError_t vk_attention_qknorm_fwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, void* out,
                                    float* lse, int batch, int tokens, int heads, int head_dim, float scale,
                                    const void* q_weight, const void* q_bias, float q_eps, const void* k_weight,
                                    const void* k_bias, float k_eps, cudaStream_t stream);
cudaError_t vk_attention_qknorm_bwd(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t,
                                    const void* dout, const float* lse, float* delta, void* dqkv, int batch,
                                    int tokens, int heads, int head_dim, float scale, const void* q_weight,
                                    const void* q_bias, float q_eps, const void* k_weight, const void* k_bias,
                                    float k_eps, void* dq_weight, void* dq_bias, void* dk_weight, void* dk_bias,
                                    float* q_partial, float* k_partial, cudaStream_t stream);
// Packed sequences (varlen): qkv [total, 3, heads, head_dim] with token stride stride_t (rows 16-byte
// aligned), cu_seqlens [num_seqs + 1] int32 on the device (0, ..., total, strictly increasing), max_seqlen
// >= every length (the grid covers max_seqlen rows per sequence; the callers check it); each token attends
// to its own sequence only. out, dout: [total, heads * head_dim], dqkv [total, 3 * heads * head_dim]
// contiguous; lse, delta: [heads, total] fp32. QK-norm arguments as above, all null for the plain path; the
// workspaces hold vk_attention_norm_partial_rows(num_seqs, max_seqlen, heads) * 2 * head_dim floats.
cudaError_t vk_attention_varlen_fwd(int dtype, const void* qkv, int64_t stride_t, void* out, float* lse,
                                    const int* cu_seqlens, int num_seqs, int total, int max_seqlen, int heads,
                                    int head_dim, float scale, const void* q_weight, const void* q_bias, float q_eps,
                                    const void* k_weight, const void* k_bias, float k_eps, cudaStream_t stream);
cudaError_t vk_attention_varlen_bwd(int dtype, const void* qkv, int64_t stride_t, const void* dout, const float* lse,
                                    float* delta, void* dqkv, const int* cu_seqlens, int num_seqs, int total,
                                    int max_seqlen, int heads, int head_dim, float scale, const void* q_weight,
                                    const void* q_bias, float q_eps, const void* k_weight, const void* k_bias,
                                    float k_eps, void* dq_weight, void* dq_bias, void* dk_weight, void* dk_bias,
                                    float* q_partial, float* k_partial, cudaStream_t stream);

// ---- Patch embedding (patch_embed.cu). x: [batch, chans, H, W] contiguous; patches:
// [batch * gh * gw, chans * ph * pw]; tokens: [batch, gh * gw, dim]; out: [batch, n_prefix + gh * gw, dim].
cudaError_t vk_patchify(int dtype, const void* x, void* patches, int batch, int chans, int height, int width, int ph,
                        int pw, cudaStream_t stream);
cudaError_t vk_unpatchify(int dtype, const void* patches, void* x, int batch, int chans, int height, int width,
                          int ph, int pw, cudaStream_t stream);
// out[b, t] = (t < n_prefix ? prefix[t] : tokens[b, t - n_prefix]) + pos[t], with prefix [n_prefix, dim] (the
// class, distillation and register tokens; nullable when n_prefix = 0) and pos [n_prefix + num_patches, dim]
// (nullable); with no_embed_class, pos is [num_patches, dim] and added to the patch rows only (pos[t - n_prefix]).
cudaError_t vk_patch_embed_epilogue(int dtype, const void* tokens, const void* prefix, const void* pos, void* out,
                                    int batch, int n_prefix, int num_patches, int dim, bool no_embed_class,
                                    cudaStream_t stream);
