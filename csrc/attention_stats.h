// Host entry points of attention_stats.cu (the inspection pass; see vitkern/ops/attention_stats.py).
// Declared apart from vitkern_kernels.h so the inspection op stays in its own files; the same
// conventions: raw pointers, sizes, element strides, a stream, a cudaError_t.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

// Query rows per CTA of the statistics kernels: the distance partial sums are [batch, heads,
// vk_attention_stats_tiles(tokens)].
int vk_attention_stats_tiles(int tokens);
// Largest head_dim the kernels stage in shared memory.
int vk_attention_stats_max_head_dim();

// qkv: [batch, tokens, 3, heads, head_dim] (element strides stride_b, stride_t for the first two
// dims, the rest contiguous), fp16 (dtype 0) or bf16 (1); lse: [batch, heads, tokens] fp32, the
// forward's natural-log log-sum-exp. p_ij = exp(scale q_i.k_j - lse_i). Writes, each only when its
// pointer is non-null:
//   rows [batch, heads, prefix, tokens] fp32     p of the prefix query rows;
//   dist [batch, heads, vk_attention_stats_tiles(tokens)] fp32: per tile of query rows, the sum over
//        its patch queries i and patch keys j of p_ij * ||pos_i - pos_j||, pos of patch token
//        i >= prefix = ((i - prefix) / grid_w * patch_h, (i - prefix) % grid_w * patch_w);
//   full [batch, tokens, tokens] fp32            p fused over heads: fusion 1 mean, 2 max, 3 min.
cudaError_t vk_attention_stats(int dtype, const void* qkv, int64_t stride_b, int64_t stride_t, const float* lse,
                               float* rows, float* dist, float* full, int batch, int tokens, int heads, int head_dim,
                               int prefix, int grid_w, float patch_h, float patch_w, float scale, int fusion,
                               cudaStream_t stream);
