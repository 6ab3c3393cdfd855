"""The public functional ops. Each validates its input, asks `vitkern.dispatch` for an
implementation (eager, Triton or CUDA) and runs it; gradients flow through every backend.

    patch_embed(x, weight, bias, cls_token=None, pos_embed=None, *, backend="auto") -> [B, T, D]
    layer_norm(x, weight, bias, eps=1e-6, *, backend="auto")
    ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-6, activation=None, backend="auto")
    attention(qkv, num_heads, *, scale=None, backend="auto")            qkv [B, T, 3D] -> [B, T, D]
    linear(x, weight, bias=None, *, activation=None, residual=None, backend="auto")
    attention_stats(qkv, lse, num_heads, *, scale=None, num_prefix_tokens=1, grid=None, patch_size=1,
                    full=False, backend="auto")  -> AttentionStats (prefix rows, mean distance, full)
    attention_with_stats(qkv, num_heads, *, ...)  -> (out, AttentionStats): forward + statistics
"""

from vitkern.ops.attention import attention
from vitkern.ops.layer_norm import layer_norm
from vitkern.ops.linear import linear
from vitkern.ops.ln_linear import ln_linear
from vitkern.ops.patch_embed import patch_embed
from vitkern.ops import _cuda  # noqa: E402,F401  registers the CUDA implementations (cheap; builds nothing)
from vitkern.ops.attention_stats import AttentionStats, attention_stats, attention_with_stats  # noqa: E402

# The model's five ops; the inspection ops above (forward only, for vitkern.inspect) are importable
# from here too but kept out of the five (dispatch.INSPECTION_OPS).
__all__ = ["patch_embed", "layer_norm", "ln_linear", "attention", "linear"]

# torch.fx leaf functions: a symbolic trace (torchvision's create_feature_extractor) records each op
# as one call node instead of tracing its validation and dispatch, which branch on concrete shapes;
# the checks run when the traced module runs. (Patches the names of this namespace: `ops.linear`.)
import torch.fx as _fx  # noqa: E402

for _name in __all__:
    _fx.wrap(_name)
