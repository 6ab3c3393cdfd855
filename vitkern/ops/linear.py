"""Linear op with fused epilogues: bias, optional GELU, optional residual add.

Used by the attention projection (+bias +residual) and fc2 (+bias +residual).
validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.linear`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.ops._checks import check_activation, check_same_device, check_shape, check_tensor


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """act(x @ weight^T + bias) + residual.

    x: [..., in_features]; weight: [out_features, in_features]; bias: [out_features] or None;
    activation: None or "gelu"; residual: [..., out_features] or None (added after the activation).
    Returns [..., out_features] in x's dtype.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dim must be weight's in_features {in_features} (weight {tuple(weight.shape)}), got {x.shape[-1]}")
    check_shape("bias", bias, (out_features,), "weight's out_features")
    check_shape("residual", residual, tuple(x.shape[:-1]) + (out_features,), "x's leading dims + out_features")
    check_activation(activation)
    call = dict(x=x, weight=weight, bias=bias, activation=activation, residual=residual)
    check_same_device(call)
    impl = dispatch.select("linear", backend, x.device, call)
    return impl.fn(**call)


dispatch.register("linear", "eager", reference.linear)
