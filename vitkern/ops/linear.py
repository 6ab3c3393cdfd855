"""Linear op with fused epilogues: bias, optional GELU, optional residual add.

Used by the attention projection (+bias +residual) and fc2 (+bias +residual).
validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.linear`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.kernels import aten
from vitkern.ops import _autocast
from vitkern.ops._checks import check_activation, check_same_device, check_same_dtype, check_shape, check_tensor


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """residual + scale * act(x @ weight^T + bias).

    x: [..., in_features]; weight: [out_features, in_features]; bias: [out_features] or None;
    activation: None, "gelu" (exact), "gelu_tanh" or "quick_gelu"; scale: [out_features] or None
    (LayerScale's gamma, per output channel); residual: [..., out_features] or None (added last).
    Returns [..., out_features] in x's dtype; under torch.autocast see `_linear_autocast`.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dim must be weight's in_features {in_features} (weight {tuple(weight.shape)}), got {x.shape[-1]}")
    check_shape("bias", bias, (out_features,), "weight's out_features")
    check_shape("residual", residual, tuple(x.shape[:-1]) + (out_features,), "x's leading dims + out_features")
    check_shape("scale", scale, (out_features,), "weight's out_features")
    check_activation(activation)
    call = dict(x=x, weight=weight, bias=bias, activation=activation, residual=residual)
    if scale is not None:
        # Family options ride in the call only when set: every backend's reasons see them, and an
        # implementation without them is never handed one.
        call["scale"] = scale
    check_same_device(call)
    amp = _autocast.amp_dtype(x)
    if amp is not None:
        return _linear_autocast(amp, x, weight, bias, activation, residual, scale, backend)
    check_same_dtype(call)
    impl = dispatch.select("linear", backend, x.device, call)
    return impl.fn(**call)


def _linear_autocast(amp, x, weight, bias, activation, residual, scale, backend) -> Tensor:
    """Under torch.autocast (see vitkern.ops._autocast): the GEMM and its activation in the autocast
    dtype `amp`; a skip connection or LayerScale gamma of a wider dtype (timm's fp32 residual
    stream) is applied as timm applies it, `residual + branch * gamma` in the promoted dtype, which
    is then the result's dtype. When everything is in `amp` the epilogue stays fused."""
    cast = _autocast.cast
    out_dtype = _autocast.promoted(amp, residual, scale)
    with _autocast.disabled(x):
        if out_dtype == amp:
            return linear(cast(x, amp), cast(weight, amp), cast(bias, amp), activation=activation,
                          residual=cast(residual, amp), scale=cast(scale, amp), backend=backend)
        branch = linear(cast(x, amp), cast(weight, amp), cast(bias, amp), activation=activation, backend=backend)
        if scale is not None:
            branch = branch * scale
        return branch if residual is None else residual + branch


dispatch.register("linear", "eager", reference.linear)
dispatch.register("linear", "torch", aten.linear)


if dispatch.triton_importable():
    from typing import List, Tuple

    import torch

    from vitkern.kernels.triton import linear as _triton_linear
    from vitkern.kernels.triton import _common
    from vitkern.ops._checks import fused_backend_reasons, option_reasons
    from vitkern.ops._autograd import first_order, refuse_functorch

    # The fc1 epilogue computes all three GELUs and their derivatives (kernels/triton/linear.py).
    TRITON_ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu")

    @_common.library_op("vitkern::linear_fwd")
    def linear_fwd(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: Optional[str],
        save_dact: bool, scale: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """x: [M, K]; weight: [N, K]; bias: [N] or None; residual: [M, N] or None; scale: LayerScale's
        gamma [N] or None (not with an activation); one dtype. Returns (y [M, N], dact):
        y = residual + scale * act(x @ weight^T + bias), and, kept for the backward when save_dact
        (else an empty [0] tensor: inference skips that [M, N] write), dact = act'(the
        pre-activation) [M, N] with an activation, the unscaled branch [M, N] with a scale."""
        return _triton_linear.linear_fwd(x, weight, bias, residual, activation, save_dact, scale)

    @_common.library_op("vitkern::linear_bwd")
    def linear_bwd(
        dy: Tensor, x: Tensor, weight: Tensor, dact: Tensor, activation: Optional[str],
        has_bias: bool, need_dx: bool, need_dw: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """dy: [M, N] (contiguous with an activation); x: [M, K]; weight: [N, K]; dact: from
        linear_fwd. Returns (dx [M, K], dweight [N, K], dbias [N]) in dy's dtype; a gradient not
        asked for (need_dx, need_dw, has_bias) is an empty [0] tensor."""
        return _triton_linear.linear_bwd(dy, x, weight, dact, activation, has_bias, need_dx, need_dw)

    class LinearFn(torch.autograd.Function):
        """residual + scale * act(x @ weight^T + bias) on [M, K] rows. Saves x, weight and, with an
        activation, dact = act'(pre-activation), with LayerScale the unscaled branch (one extra
        [M, N] write instead of recomputing a GEMM in the backward)."""

        @staticmethod
        def forward(ctx, x2d, weight, bias, residual2d, activation, save_dact, scale=None):
            y, dact = torch.ops.vitkern.linear_fwd(x2d, weight, bias, residual2d, activation, save_dact, scale)
            ctx.save_for_backward(x2d, weight, dact, scale)
            ctx.activation = activation
            ctx.has_bias = bias is not None
            return y

        @staticmethod
        @first_order("triton", "linear")
        def backward(ctx, dy):
            x2d, weight, dact, scale = ctx.saved_tensors
            need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
            dscale = None
            if scale is not None:
                # LayerScale: the branch's gradient is dy * gamma per column (one [M, N] elementwise
                # pass, rounded once), and dgamma = sum_rows(dy * branch) with the branch the forward
                # stored in dact's place; fp32 sums.
                if ctx.needs_input_grad[6]:
                    dscale = (dy.float() * dact.float()).sum(0).to(scale.dtype)
                dy_res = dy
                dy = (dy.float() * scale.float()).to(dy.dtype)
                dact = dact[:0]
            else:
                dy_res = dy
            if ctx.activation is not None and not dy.is_contiguous():
                # dy' = dy * dact is formed on load with one set of offsets for both, and dact is
                # contiguous; without GELU the GEMMs read dy through any strides.
                dy = dy.contiguous()
            dx = dw = db = None
            if need_x or need_w or need_b:
                dx, dw, db = torch.ops.vitkern.linear_bwd(
                    dy, x2d, weight, dact, ctx.activation, ctx.has_bias and need_b, need_x, need_w
                )
            return (
                dx if need_x else None,
                dw if need_w else None,
                db if need_b else None,
                dy_res if need_res else None,
                None,
                None,
                dscale,
            )

    def _linear_triton(
        x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
        activation: Optional[str] = None, residual: Optional[Tensor] = None, scale: Optional[Tensor] = None,
    ) -> Tensor:
        lead = x.shape[:-1]
        n, k = weight.shape
        x2d = x.reshape(-1, k)
        residual2d = residual.reshape(-1, n) if residual is not None else None
        tensors = (x, weight, bias, residual, scale)
        save_dact = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        refuse_functorch("triton", "linear")
        return LinearFn.apply(x2d, weight, bias, residual2d, activation, save_dact, scale).reshape(*lead, n)

    def _linear_triton_reasons(call) -> List[str]:
        return fused_backend_reasons(
            call, dtypes=(torch.float16, torch.bfloat16, torch.float32),
            allow_cpu=dispatch.triton_interpret(), backend="triton",
        ) + option_reasons(call, "triton", activations=TRITON_ACTIVATIONS, scale=True) + (
            ["scale (LayerScale) together with an activation is not in the triton linear epilogue"]
            if call.get("scale") is not None and call.get("activation") is not None else [])

    dispatch.register("linear", "triton", _linear_triton, supports=_linear_triton_reasons)
