"""LayerNorm op over the last dim (the final norm, and the backward of the fused ops).

validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.layer_norm`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.kernels import aten
from vitkern.ops import _autocast
from vitkern.ops._checks import check_same_device, check_same_dtype, check_shape, check_tensor


def layer_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6, *, backend: str = "auto"
) -> Tensor:
    """(x - mean) * rstd * weight + bias over the last dim, statistics in fp32.

    x: [..., dim]; weight, bias: [dim] in x's dtype, or None (no scale / no shift, as
    nn.LayerNorm(elementwise_affine=False)); eps: added to the variance (timm's ViT uses 1e-6).
    Returns x's shape and dtype. Under torch.autocast, torch's rule for F.layer_norm: on CUDA x and
    the parameters are cast to fp32 (and so is the result), elsewhere the parameters to x's dtype.
    """
    check_tensor("x", x, min_ndim=1)
    dim = x.shape[-1]
    check_shape("weight", weight, (dim,), "the last dim of x")
    check_shape("bias", bias, (dim,), "the last dim of x")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    call = dict(x=x, weight=weight, bias=bias, eps=float(eps))
    check_same_device(call)
    if _autocast.amp_dtype(x) is not None:
        dtype = _autocast.layer_norm_dtype(x)
        cast = _autocast.cast
        call = dict(x=cast(x, dtype), weight=cast(weight, dtype), bias=cast(bias, dtype), eps=float(eps))
        with _autocast.disabled(x):
            return layer_norm(**call, backend=_autocast.backend_for("layer_norm", backend, call))
    check_same_dtype(call)
    impl = dispatch.select("layer_norm", backend, x.device, call)
    return impl.fn(**call)


dispatch.register("layer_norm", "eager", reference.layer_norm)
dispatch.register("layer_norm", "torch", aten.layer_norm)


# --------------------------------------------------------------------------------------------
# Triton implementation: torch.library ops (traceable by torch.compile, checkable by opcheck)
# around the launchers of vitkern.kernels.triton.layer_norm, and the autograd Function.

if dispatch.triton_importable():
    from typing import List, Tuple

    import torch

    from vitkern.kernels.triton import layer_norm as _tln
    from vitkern.kernels.triton import _common
    from vitkern.ops._checks import fused_backend_reasons
    from vitkern.ops._autograd import first_order, refuse_functorch

    @_common.library_op("vitkern::layer_norm_fwd")
    def _layer_norm_fwd_op(
        x2d: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x2d: [rows, dim] -> (y [rows, dim] x2d.dtype, mean [rows] fp32, rstd [rows] fp32)."""
        return _tln.layer_norm_fwd(x2d, weight, bias, eps)

    @_common.library_op("vitkern::layer_norm_bwd")
    def _layer_norm_bwd_op(
        dy2d: torch.Tensor, x2d: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dy2d, x2d: [rows, dim]; mean, rstd: [rows] fp32 -> (dx [rows, dim], dweight [dim], dbias [dim])."""
        return _tln.layer_norm_bwd(dy2d, x2d, weight, mean, rstd)

    class LayerNormFn(torch.autograd.Function):
        """LayerNorm over the last dim through the Triton ops; saves x, mean and rstd (fp32)."""

        @staticmethod
        def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
            x2d = x.reshape(-1, x.shape[-1])
            y, mean, rstd = torch.ops.vitkern.layer_norm_fwd(x2d, weight, bias, eps)
            ctx.save_for_backward(x2d, weight, mean, rstd)
            ctx.x_shape = x.shape
            ctx.has_weight = weight is not None
            ctx.has_bias = bias is not None
            return y.view(x.shape)

        @staticmethod
        @first_order("triton", "layer_norm")
        def backward(ctx, dy: Tensor):
            x2d, weight, mean, rstd = ctx.saved_tensors
            dx, dweight, dbias = torch.ops.vitkern.layer_norm_bwd(dy.reshape(x2d.shape), x2d, weight, mean, rstd)
            return (
                dx.view(ctx.x_shape),
                dweight if ctx.has_weight else None,
                dbias if ctx.has_bias else None,
                None,
            )

    def _layer_norm_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
        refuse_functorch("triton", "layer_norm")
        return LayerNormFn.apply(x, weight, bias, eps)

    def _layer_norm_triton_reasons(call) -> List[str]:
        reasons = fused_backend_reasons(
            call,
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
            allow_cpu=dispatch.triton_interpret(),
            backend="triton",
        )
        dim = call["x"].shape[-1]
        if dim == 0:
            reasons.append("x's last dim is 0; the triton LayerNorm needs at least one element per row")
        if dim > _tln.MAX_N:
            reasons.append(f"x's last dim is {dim}; the triton LayerNorm keeps a row in registers and takes at most {_tln.MAX_N}")
        return reasons

    dispatch.register("layer_norm", "triton", _layer_norm_triton, supports=_layer_norm_triton_reasons)
