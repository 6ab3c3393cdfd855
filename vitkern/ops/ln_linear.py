"""LayerNorm + Linear (+ GELU) op: LN1 + QKV and LN2 + fc1 of every block.

validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.ln_linear`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.ops._checks import check_activation, check_same_device, check_shape, check_tensor


def ln_linear(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    eps: float = 1e-6,
    activation: Optional[str] = None,
    backend: str = "auto",
) -> Tensor:
    """act(LayerNorm(x) @ weight^T + bias), LayerNorm statistics in fp32.

    x: [..., dim]; ln_weight, ln_bias: [dim]; weight: [out_features, dim]; bias: [out_features]
    or None; activation: None or "gelu" (exact erf form). Returns [..., out_features] in x's dtype.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    dim = x.shape[-1]
    out_features, in_features = weight.shape
    if in_features != dim:
        raise ValueError(f"weight must have shape (out_features, {dim}) to match x's last dim, got {tuple(weight.shape)}")
    check_shape("ln_weight", ln_weight, (dim,), "the last dim of x")
    check_shape("ln_bias", ln_bias, (dim,), "the last dim of x")
    check_shape("bias", bias, (out_features,), "weight's out_features")
    check_activation(activation)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    call = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias, eps=float(eps), activation=activation)
    check_same_device(call)
    impl = dispatch.select("ln_linear", backend, x.device, call)
    return impl.fn(**call)


dispatch.register("ln_linear", "eager", reference.ln_linear)
