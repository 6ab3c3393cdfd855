"""Multi-head self-attention op on the packed QKV projection.

qkv [batch, tokens, 3 * dim] (timm's order: 3, heads, head_dim) -> out [batch, tokens, dim], ready
for the output projection: no split, permute or transpose outside the op.
validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.attention`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.ops._checks import check_tensor


def attention(qkv: Tensor, num_heads: int, *, scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """softmax(q k^T * scale) v per head, from the packed projection.

    qkv: [batch, tokens, 3 * dim]; num_heads divides dim; scale defaults to head_dim ** -0.5.
    Returns [batch, tokens, dim] in qkv's dtype (softmax statistics in fp32).
    """
    check_tensor("qkv", qkv, ndim=3)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    three_dim = qkv.shape[-1]
    if three_dim % 3 != 0:
        raise ValueError(f"qkv's last dim must be 3 * dim (packed q, k, v), got {three_dim}, not a multiple of 3")
    dim = three_dim // 3
    if dim % num_heads != 0:
        raise ValueError(f"dim = qkv.shape[-1] / 3 = {dim} must be divisible by num_heads = {num_heads}")
    if qkv.shape[1] == 0 or qkv.shape[0] == 0:
        raise ValueError(f"qkv must have at least one batch element and one token, got shape {tuple(qkv.shape)}")
    if scale is not None:
        scale = float(scale)
    call = dict(qkv=qkv, num_heads=num_heads, scale=scale)
    impl = dispatch.select("attention", backend, qkv.device, call)
    return impl.fn(**call)


dispatch.register("attention", "eager", reference.attention)
