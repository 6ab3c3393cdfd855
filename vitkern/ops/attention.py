"""Multi-head self-attention op on the packed QKV projection.

qkv [batch, tokens, 3 * dim] (timm's order: 3, heads, head_dim) -> out [batch, tokens, dim], ready
for the output projection: no split, permute or transpose outside the op.
validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.attention`.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.ops._checks import check_norm_args, check_tensor

NormArgs = Tuple[Optional[Tensor], Optional[Tensor], float]


def attention(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Optional[float] = None,
    q_norm: Optional[NormArgs] = None,
    k_norm: Optional[NormArgs] = None,
    backend: str = "auto",
) -> Tensor:
    """softmax(q k^T * scale) v per head, from the packed projection.

    qkv: [batch, tokens, 3 * dim]; num_heads divides dim; scale defaults to head_dim ** -0.5.
    q_norm, k_norm: QK-norm (timm's qk_norm=True), each None or (weight [head_dim] or None,
    bias [head_dim] or None, eps): LayerNorm over head_dim of each head's q (k), applied as they
    are loaded, statistics in fp32; weights in qkv's dtype.
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
    if qkv.shape[1] == 0:
        raise ValueError(f"qkv must have at least one token, got shape {tuple(qkv.shape)}")
    if scale is not None:
        scale = float(scale)
    q_norm = check_norm_args("q_norm", q_norm, dim // num_heads, qkv)
    k_norm = check_norm_args("k_norm", k_norm, dim // num_heads, qkv)
    # Family options ride in the call only when set: every backend's reasons see them, and an
    # implementation without them is never handed one.
    options = {name: v for name, v in (("q_norm", q_norm), ("k_norm", k_norm)) if v is not None}
    call = dict(qkv=qkv, num_heads=num_heads, scale=scale, **options)
    impl = dispatch.select("attention", backend, qkv.device, call)
    return impl.fn(**call)


dispatch.register("attention", "eager", reference.attention)


# --------------------------------------------------------------------------------------------
# Triton: two torch.library ops (forward, backward) around the launchers, tied together by an
# autograd Function. QK-norm rides in the ops' schemas flattened (a bool, the weight and bias as
# optional tensors, eps) and is applied inside the kernels.

if dispatch.triton_importable():
    from typing import List, Tuple

    import torch

    from vitkern.kernels.triton import attention as _triton_attention
    from vitkern.kernels.triton import _common
    from vitkern.ops._checks import fused_backend_reasons, option_reasons
    from vitkern.ops._autograd import first_order, refuse_functorch

    TRITON_MIN_HEAD_DIM = 16  # tl.dot's smallest K
    TRITON_MAX_HEAD_DIM = 128  # q, k, v and the accumulators of one head stay in registers/shared memory

    @_common.library_op("vitkern::attention_fwd")
    def attention_fwd(
        qkv: Tensor, num_heads: int, scale: float,
        q_norm: bool = False, q_weight: Optional[Tensor] = None, q_bias: Optional[Tensor] = None, q_eps: float = 0.0,
        k_norm: bool = False, k_weight: Optional[Tensor] = None, k_bias: Optional[Tensor] = None, k_eps: float = 0.0,
    ) -> Tuple[Tensor, Tensor]:
        """qkv: [batch, tokens, 3 * dim] (stride(-1) == 1) -> (out [batch, tokens, dim] in qkv's
        dtype, lse [batch, heads, tokens] fp32 natural-log log-sum-exp of each softmax row).
        With q_norm (k_norm): QK-norm of q (k) inside the kernel, weight and bias [head_dim] in
        qkv's dtype or None (1 and 0)."""
        return _triton_attention.attention_fwd(
            qkv, num_heads, scale, _norm(q_norm, q_weight, q_bias, q_eps), _norm(k_norm, k_weight, k_bias, k_eps)
        )

    @_common.library_op("vitkern::attention_bwd")
    def attention_bwd(
        dout: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, scale: float,
        q_norm: bool = False, q_weight: Optional[Tensor] = None, q_bias: Optional[Tensor] = None, q_eps: float = 0.0,
        k_norm: bool = False, k_weight: Optional[Tensor] = None, k_bias: Optional[Tensor] = None, k_eps: float = 0.0,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """dout: [batch, tokens, dim]; qkv: [batch, tokens, 3 * dim]; lse: [batch, heads, tokens]
        fp32 from attention_fwd with the same norm arguments -> (dqkv [batch, tokens, 3 * dim] in
        qkv's packed layout and dtype, dq_norm, dk_norm): the gradients of q_norm's (k_norm's)
        weight and bias as [2, head_dim] fp32 (rows: weight, bias), [0, head_dim] without the norm.
        The output itself is not needed: delta = rowsum(P * dP) is recomputed from P and dP."""
        dqkv, dq_norm, dk_norm = _triton_attention.attention_bwd(
            dout, qkv, lse, num_heads, scale,
            _norm(q_norm, q_weight, q_bias, q_eps), _norm(k_norm, k_weight, k_bias, k_eps),
        )  # fmt: skip
        head_dim = qkv.shape[-1] // 3 // num_heads

        def or_empty(t: Optional[Tensor]) -> Tensor:
            return t if t is not None else qkv.new_empty((0, head_dim), dtype=torch.float32)

        return dqkv, or_empty(dq_norm), or_empty(dk_norm)

    def _norm(on: bool, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        """The launchers' QK-norm argument from the ops' flattened schema: None when off."""
        return (weight, bias, eps) if on else None

    class AttentionFn(torch.autograd.Function):
        """out = attention(qkv) (with QK-norm inside the kernels); saves qkv, the fp32 lse and the
        norms' weights and biases, and recomputes the normalized q and k and the probabilities in
        the backward (no normalized copy of q/k and no [tokens, tokens] matrix is ever stored)."""

        @staticmethod
        def forward(
            ctx, qkv: Tensor, num_heads: int, scale: float,
            q_norm: bool, q_weight: Optional[Tensor], q_bias: Optional[Tensor], q_eps: float,
            k_norm: bool, k_weight: Optional[Tensor], k_bias: Optional[Tensor], k_eps: float,
        ) -> Tensor:
            norms = (q_norm, q_weight, q_bias, q_eps, k_norm, k_weight, k_bias, k_eps)
            out, lse = torch.ops.vitkern.attention_fwd(qkv, num_heads, scale, *norms)
            ctx.save_for_backward(qkv, lse, q_weight, q_bias, k_weight, k_bias)
            ctx.num_heads = num_heads
            ctx.scale = scale
            ctx.flags = (q_norm, q_eps, k_norm, k_eps)
            return out

        @staticmethod
        @first_order("triton", "attention")
        def backward(ctx, dout: Tensor):
            qkv, lse, q_weight, q_bias, k_weight, k_bias = ctx.saved_tensors
            q_norm, q_eps, k_norm, k_eps = ctx.flags
            if dout.stride(-1) != 1 or not _sample_fits_int32(dout):
                # The kernels read rows of dout with a unit feature stride (autograd hands an
                # expanded zero-stride gradient for out.sum()) and index inside one sample in
                # int32; any other batch and token strides are read as they are.
                dout = dout.contiguous()
            dqkv, dq_norm, dk_norm = torch.ops.vitkern.attention_bwd(
                dout, qkv, lse, ctx.num_heads, ctx.scale,
                q_norm, q_weight, q_bias, q_eps, k_norm, k_weight, k_bias, k_eps,
            )  # fmt: skip
            # Row 0 of a norm's gradient is its weight's, row 1 its bias's; an absent (None)
            # weight or bias, or one that needs no gradient, gets None.
            needs = ctx.needs_input_grad
            dq_w = dq_norm[0].to(q_weight.dtype) if q_weight is not None and needs[4] else None
            dq_b = dq_norm[1].to(q_bias.dtype) if q_bias is not None and needs[5] else None
            dk_w = dk_norm[0].to(k_weight.dtype) if k_weight is not None and needs[8] else None
            dk_b = dk_norm[1].to(k_bias.dtype) if k_bias is not None and needs[9] else None
            return dqkv, None, None, None, dq_w, dq_b, None, None, dk_w, dk_b, None

    def _sample_fits_int32(t: Tensor) -> bool:
        """Offsets inside one sample, (tokens - 1) * stride(1) + width, fit in int32 (the kernels
        add only the batch offset in int64)."""
        return (t.shape[1] - 1) * abs(t.stride(1)) + t.shape[2] < 2**31

    def _attention_triton(
        qkv: Tensor, num_heads: int, scale: Optional[float] = None,
        q_norm: Optional[NormArgs] = None, k_norm: Optional[NormArgs] = None,
    ) -> Tensor:
        head_dim = qkv.shape[-1] // 3 // num_heads
        scale = head_dim ** -0.5 if scale is None else float(scale)
        if qkv.stride(-1) != 1:
            # Only a feature-strided qkv is copied (never produced by the projection); batch and
            # token strides are read as they are.
            qkv = qkv.contiguous()
        q_weight, q_bias, q_eps = q_norm if q_norm is not None else (None, None, 0.0)
        k_weight, k_bias, k_eps = k_norm if k_norm is not None else (None, None, 0.0)
        refuse_functorch("triton", "attention")
        return AttentionFn.apply(
            qkv, num_heads, scale,
            q_norm is not None, q_weight, q_bias, q_eps, k_norm is not None, k_weight, k_bias, k_eps,
        )  # fmt: skip

    def _attention_triton_reasons(call) -> List[str]:
        reasons = fused_backend_reasons(
            call,
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
            allow_cpu=dispatch.triton_interpret(),
            backend="triton",
        ) + option_reasons(call, "triton", qk_norm=True)
        qkv, num_heads = call["qkv"], call["num_heads"]
        head_dim = qkv.shape[-1] // 3 // num_heads
        if not TRITON_MIN_HEAD_DIM <= head_dim <= TRITON_MAX_HEAD_DIM:
            reasons.append(
                f"head_dim = qkv.shape[-1] / 3 / num_heads = {head_dim}; the triton attention supports "
                f"{TRITON_MIN_HEAD_DIM} <= head_dim <= {TRITON_MAX_HEAD_DIM}"
            )
        if not _sample_fits_int32(qkv):
            reasons.append(
                f"one sample of qkv spans (tokens - 1) * stride(1) + 3 * dim = "
                f"{(qkv.shape[1] - 1) * qkv.stride(1) + qkv.shape[2]} elements; the triton attention "
                "indexes inside a sample in int32 (< 2**31)"
            )
        return reasons

    dispatch.register("attention", "triton", _attention_triton, supports=_attention_triton_reasons)
