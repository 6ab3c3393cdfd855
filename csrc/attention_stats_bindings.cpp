// The torch layer of the inspection op cuda_attention_stats (kernels: attention_stats.cu). Kept apart
// from bindings.cpp so the inspection op lives in its own files; it follows bindings.cpp's
// conventions: a functional op with its own schema fragment, TORCH_CHECK messages naming the op
// and the argument, NaN-poisoned outputs under VITKERN_POISON_OUTPUTS=1, and VK_EMULATION for the
// tests' CPU emulator (ops under torch.ops.vitkern_emu for CPU tensors). The fake implementation is
// vitkern/ops/attention_stats.py's.
#include <ATen/core/Tensor.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#ifdef VK_EMULATION
#define VK_STATS_LIBRARY vitkern_emu
#define VK_STATS_DISPATCH_KEY CPU
#define VK_STATS_DEVICE_GUARD(t)
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define VK_STATS_LIBRARY vitkern
#define VK_STATS_DISPATCH_KEY CUDA
#define VK_STATS_DEVICE_GUARD(t) c10::cuda::CUDAGuard guard((t).device())
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

#include "attention_stats.h"

namespace {

using at::Tensor;
constexpr const char* kOp = "vitkern::cuda_attention_stats";

#ifdef VK_EMULATION
bool on_device(const Tensor& t) { return t.is_cpu(); }
constexpr const char* kDeviceKind = "a CPU tensor (the CUDA emulator)";
cudaStream_t current_stream() { return nullptr; }
#else
bool on_device(const Tensor& t) { return t.is_cuda(); }
constexpr const char* kDeviceKind = "a CUDA tensor";
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

Tensor stats_output(at::IntArrayRef shape, const Tensor& like) {
  Tensor t = at::empty(shape, like.options().dtype(at::kFloat));
  static const bool poison = [] {
    const char* v = std::getenv("VITKERN_POISON_OUTPUTS");
    return v != nullptr && std::string(v) != "" && std::string(v) != "0";
  }();
  if (poison && t.numel() > 0) t.fill_(std::nan(""));
  return t;
}

std::tuple<Tensor, Tensor, Tensor> attention_stats(const Tensor& qkv, const Tensor& lse, int64_t num_heads,
                                                   double scale, int64_t num_prefix_tokens, int64_t grid_h,
                                                   int64_t grid_w, double patch_h, double patch_w, int64_t full) {
  TORCH_CHECK(on_device(qkv), kOp, ": qkv must be ", kDeviceKind, ", got device ", qkv.device());
  TORCH_CHECK(qkv.scalar_type() == at::kHalf || qkv.scalar_type() == at::kBFloat16, kOp,
              ": qkv must be float16 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.dim() == 3, kOp, ": qkv must be [batch, tokens, 3 * dim], got shape ", qkv.sizes());
  TORCH_CHECK(num_heads > 0 && qkv.size(2) % (3 * num_heads) == 0, kOp,
              ": qkv's last dim must be 3 * num_heads * head_dim with num_heads = ", num_heads, ", got ", qkv.size(2));
  TORCH_CHECK(qkv.stride(2) == 1, kOp, ": qkv's last dim must be contiguous, got strides ", qkv.strides());
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), head_dim = qkv.size(2) / (3 * num_heads);
  TORCH_CHECK(head_dim <= vk_attention_stats_max_head_dim(), kOp, ": head_dim must be <= ",
              vk_attention_stats_max_head_dim(), ", got ", head_dim);
  TORCH_CHECK(on_device(lse) && lse.device() == qkv.device(), kOp, ": lse must be on ", qkv.device(), ", got ",
              lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), kOp, ": lse must be contiguous float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({batch, num_heads, tokens}), kOp, ": lse must have shape [",
              batch, ", ", num_heads, ", ", tokens, "], got ", lse.sizes());
  TORCH_CHECK(num_prefix_tokens >= 0 && num_prefix_tokens <= tokens, kOp, ": num_prefix_tokens must be in [0, ",
              tokens, "], got ", num_prefix_tokens);
  TORCH_CHECK(grid_h == 0 || (grid_h > 0 && grid_w > 0 && grid_h * grid_w == tokens - num_prefix_tokens), kOp,
              ": grid (", grid_h, ", ", grid_w, ") must cover the ", tokens - num_prefix_tokens, " patch tokens");
  TORCH_CHECK(full >= 0 && full <= 3, kOp, ": full must be 0 (none), 1 (mean), 2 (max) or 3 (min), got ", full);
  TORCH_CHECK(tokens <= 65535 * 16, kOp, ": at most ", 65535 * 16, " tokens, got ", tokens);
  VK_STATS_DEVICE_GUARD(qkv);
  Tensor rows = stats_output({batch, num_heads, num_prefix_tokens, tokens}, qkv);
  const bool want_dist = grid_h > 0;
  const int64_t tiles = vk_attention_stats_tiles(int(tokens));
  Tensor partial = want_dist ? stats_output({batch, num_heads, tiles}, qkv) : stats_output({0}, qkv);
  Tensor mat = full > 0 ? stats_output({batch, tokens, tokens}, qkv) : stats_output({0}, qkv);
  const cudaError_t e = vk_attention_stats(
      qkv.scalar_type() == at::kBFloat16 ? 1 : 0, qkv.data_ptr(), qkv.stride(0), qkv.stride(1),
      lse.data_ptr<float>(), num_prefix_tokens > 0 ? rows.data_ptr<float>() : nullptr,
      want_dist ? partial.data_ptr<float>() : nullptr, full > 0 ? mat.data_ptr<float>() : nullptr, int(batch),
      int(tokens), int(num_heads), int(head_dim), int(num_prefix_tokens), int(want_dist ? grid_w : 1),
      static_cast<float>(patch_h), static_cast<float>(patch_w), static_cast<float>(scale), int(full),
      current_stream());
  TORCH_CHECK(e == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(e));
  // The per-tile partial sums (fp32, tokens / 16 of them) -> the mean over the query patches.
  Tensor dist = want_dist ? partial.sum(-1).div(double(std::max<int64_t>(tokens - num_prefix_tokens, 1))) : partial;
  return {rows, dist, mat};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(VK_STATS_LIBRARY, m) {
  m.def("cuda_attention_stats(Tensor qkv, Tensor lse, int num_heads, float scale, int num_prefix_tokens, int grid_h, "
        "int grid_w, float patch_h, float patch_w, int full) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(VK_STATS_LIBRARY, VK_STATS_DISPATCH_KEY, m) { m.impl("cuda_attention_stats", &attention_stats); }
