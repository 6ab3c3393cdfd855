"""LayerNorm + Linear (+ GELU) op: LN1 + QKV and LN2 + fc1 of every block.

validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.ln_linear`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.kernels import aten
from vitkern.ops import _autocast
from vitkern.ops._checks import check_activation, check_same_device, check_same_dtype, check_shape, check_tensor


def ln_linear(
    x: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    eps: float = 1e-6,
    activation: Optional[str] = None,
    backend: str = "auto",
) -> Tensor:
    """act(LayerNorm(x) @ weight^T + bias), LayerNorm statistics in fp32.

    x: [..., dim]; ln_weight, ln_bias: [dim] or None (a LayerNorm without scale / shift);
    weight: [out_features, dim]; bias: [out_features] or None; all in x's dtype; activation: None,
    "gelu" (exact erf form), "gelu_tanh" or "quick_gelu". Returns [..., out_features] in x's dtype.
    Under torch.autocast every input is cast to the autocast dtype (the op is matmul-like: one
    fused LN + GEMM in that dtype, LayerNorm statistics in fp32) and so is the result.
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
    amp = _autocast.amp_dtype(x)
    if amp is not None:
        cast = _autocast.cast
        with _autocast.disabled(x):
            return ln_linear(cast(x, amp), cast(ln_weight, amp), cast(ln_bias, amp), cast(weight, amp),
                             cast(bias, amp), eps=eps, activation=activation, backend=backend)
    check_same_dtype(call)
    impl = dispatch.select("ln_linear", backend, x.device, call)
    return impl.fn(**call)


dispatch.register("ln_linear", "eager", reference.ln_linear)
dispatch.register("ln_linear", "torch", aten.ln_linear)


if dispatch.triton_importable():
    from typing import List, Tuple

    import torch

    from vitkern.kernels.triton import layer_norm as _triton_layer_norm
    from vitkern.kernels.triton import ln_linear as _triton_ln_linear
    from vitkern.kernels.triton import _common
    from vitkern.ops._checks import fused_backend_reasons, option_reasons
    from vitkern.ops._autograd import first_order, refuse_functorch

    # The fc1 epilogue computes all three GELUs and their derivatives (kernels/triton/linear.py).
    TRITON_ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu")

    @_common.library_op("vitkern::ln_linear_fwd")
    def ln_linear_fwd(
        x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Optional[Tensor],
        eps: float, activation: Optional[str], save_dact: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: [M, D] (unit column stride); ln_weight, ln_bias: [D]; weight: [N, D]; bias: [N] or
        None; one dtype. Returns (y [M, N] = act(LayerNorm(x) @ weight^T + bias) in x's dtype,
        mean [M] fp32, rstd [M] fp32, dact): pre is the pre-activation [M, N] kept for the backward
        when there is an activation and save_dact, else an empty [0] tensor (inference skips that
        [M, N] write). VITKERN_LN_LINEAR_DESIGN=fold selects the folded-LayerNorm forward
        (design (b) of docs/perf/ln_linear.md) instead of the normalize-on-load one."""
        return _triton_ln_linear.ln_linear_forward(x, ln_weight, ln_bias, weight, bias, eps, activation, save_dact)

    @_common.library_op("vitkern::ln_linear_bwd")
    def ln_linear_bwd(
        dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
        dact: Tensor, activation: Optional[str], has_bias: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """dy: [M, N] (contiguous with an activation); x, ln_weight, ln_bias, weight as in
        ln_linear_fwd; mean, rstd, dact from it. Returns (dx [M, D], dln_weight [D], dln_bias [D],
        dweight [N, D], dbias [N], or an empty [0] tensor when not has_bias), in x's dtype."""
        return _triton_ln_linear.ln_linear_bwd(dy, x, ln_weight, ln_bias, weight, mean, rstd, dact, activation, has_bias)

    class LnLinearFn(torch.autograd.Function):
        """act(LayerNorm(x) @ weight^T + bias) on [M, D] rows. Saves x, the fp32 mean/rstd (8 bytes
        a row) and, with GELU, dact = GELU'(pre-activation); the normalized x is recomputed in the
        backward."""

        @staticmethod
        def forward(ctx, x2d, ln_weight, ln_bias, weight, bias, eps, activation, save_dact):
            y, mean, rstd, dact = torch.ops.vitkern.ln_linear_fwd(
                x2d, ln_weight, ln_bias, weight, bias, eps, activation, save_dact
            )
            ctx.save_for_backward(x2d, ln_weight, ln_bias, weight, mean, rstd, dact)
            ctx.activation = activation
            ctx.has_bias = bias is not None
            return y

        @staticmethod
        @first_order("triton", "ln_linear")
        def backward(ctx, dy):
            x2d, ln_weight, ln_bias, weight, mean, rstd, dact = ctx.saved_tensors
            need = ctx.needs_input_grad
            if ctx.activation is not None and not dy.is_contiguous():
                # dy' = dy * dact is formed on load with one set of offsets for both, and dact is
                # contiguous; without GELU the GEMMs read dy through any strides.
                dy = dy.contiguous()
            dx, dgamma, dbeta, dw, db = torch.ops.vitkern.ln_linear_bwd(
                dy, x2d, ln_weight, ln_bias, weight, mean, rstd, dact, ctx.activation, ctx.has_bias and need[4]
            )
            grads = (dx, dgamma, dbeta, dw, db)
            return tuple(g if n else None for g, n in zip(grads, need[:5])) + (None, None, None)

    def _ln_linear_triton(
        x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], weight: Tensor,
        bias: Optional[Tensor] = None, *, eps: float = 1e-6, activation: Optional[str] = None,
    ) -> Tensor:
        lead = x.shape[:-1]
        n, d = weight.shape
        x2d = x.reshape(-1, d)
        if x2d.stride(1) != 1:
            # The LayerNorm kernels read rows with a unit feature stride; any row stride is fine.
            x2d = x2d.contiguous()
        # A LayerNorm without affine parameters is the one with gamma = 1, beta = 0 (constants:
        # no gradient is asked of them).
        if ln_weight is None:
            ln_weight = torch.ones(d, dtype=x.dtype, device=x.device)
        if ln_bias is None:
            ln_bias = torch.zeros(d, dtype=x.dtype, device=x.device)
        tensors = (x, ln_weight, ln_bias, weight, bias)
        save_dact = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        refuse_functorch("triton", "ln_linear")
        y = LnLinearFn.apply(x2d, ln_weight, ln_bias, weight, bias, float(eps), activation, save_dact)
        return y.reshape(*lead, n)

    def _ln_linear_triton_reasons(call) -> List[str]:
        reasons = fused_backend_reasons(
            call, dtypes=(torch.float16, torch.bfloat16, torch.float32),
            allow_cpu=dispatch.triton_interpret(), backend="triton",
        ) + option_reasons(call, "triton", activations=TRITON_ACTIVATIONS)
        dim = call["x"].shape[-1]
        if dim > _triton_layer_norm.MAX_N:
            reasons.append(
                f"x's last dim is {dim}; the triton LayerNorm statistics/backward keep a whole row in "
                f"registers and take at most {_triton_layer_norm.MAX_N}"
            )
        return reasons

    dispatch.register("ln_linear", "triton", _ln_linear_triton, supports=_ln_linear_triton_reasons)
