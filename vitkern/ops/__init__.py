"""The public functional ops. Each validates its input, asks `vitkern.dispatch` for an
implementation (eager, Triton or CUDA) and runs it; gradients flow through every backend.

    patch_embed(x, weight, bias, cls_token=None, pos_embed=None, *, backend="auto") -> [B, T, D]
    layer_norm(x, weight, bias, eps=1e-6, *, backend="auto")
    ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-6, activation=None, backend="auto")
    attention(qkv, num_heads, *, scale=None, backend="auto")            qkv [B, T, 3D] -> [B, T, D]
    linear(x, weight, bias=None, *, activation=None, residual=None, backend="auto")
"""

from vitkern.ops.attention import attention
from vitkern.ops.layer_norm import layer_norm
from vitkern.ops.linear import linear
from vitkern.ops.ln_linear import ln_linear
from vitkern.ops.patch_embed import patch_embed
from vitkern.ops import _cuda  # noqa: E402,F401  registers the CUDA implementations (cheap; builds nothing)

__all__ = ["patch_embed", "layer_norm", "ln_linear", "attention", "linear"]
