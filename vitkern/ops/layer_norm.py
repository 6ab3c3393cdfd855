"""LayerNorm op over the last dim (the final norm, and the backward of the fused ops).

validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.layer_norm`.
"""

from __future__ import annotations

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.ops._checks import check_same_device, check_shape, check_tensor


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """(x - mean) * rstd * weight + bias over the last dim, statistics in fp32.

    x: [..., dim]; weight, bias: [dim]; eps: added to the variance (timm's ViT uses 1e-6).
    Returns x's shape and dtype.
    """
    check_tensor("x", x, min_ndim=1)
    dim = x.shape[-1]
    check_shape("weight", weight, (dim,), "the last dim of x")
    check_shape("bias", bias, (dim,), "the last dim of x")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    call = dict(x=x, weight=weight, bias=bias, eps=float(eps))
    check_same_device(call)
    impl = dispatch.select("layer_norm", backend, x.device, call)
    return impl.fn(**call)


dispatch.register("layer_norm", "eager", reference.layer_norm)
