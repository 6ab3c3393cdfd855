"""Multi-head self-attention op on the packed QKV projection.

qkv [batch, tokens, 3 * dim] (timm's order: 3, heads, head_dim) -> out [batch, tokens, dim], ready
for the output projection: no split, permute or transpose outside the op.
validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.attention`.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.kernels import aten
from vitkern.ops import _autocast
from vitkern.ops._checks import check_cu_seqlens, check_norm_args, check_tensor

NormArgs = Tuple[Optional[Tensor], Optional[Tensor], float]


def attention(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Optional[float] = None,
    q_norm: Optional[NormArgs] = None,
    k_norm: Optional[NormArgs] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """softmax(q k^T * scale) v per head, from the packed projection.

    qkv: [batch, tokens, 3 * dim]; num_heads divides dim; scale defaults to head_dim ** -0.5.
    q_norm, k_norm: QK-norm (timm's qk_norm=True), each None or (weight [head_dim] or None,
    bias [head_dim] or None, eps): LayerNorm over head_dim of each head's q (k), applied as they
    are loaded, statistics in fp32; weights in qkv's dtype.
    Packed sequences (NaViT/NaFlex, FlashAttention's varlen convention): with cu_seqlens, an int32
    tensor [num_seqs + 1] of offsets on qkv's device (0, len_0, len_0 + len_1, ..., total_tokens),
    qkv is [total_tokens, 3 * dim] without padding and each token attends only to the tokens of its
    own sequence (block-diagonal); returns [total_tokens, dim]. max_seqlen: the longest sequence
    (None: read from cu_seqlens; give it under torch.compile). cu_seqlens may also be a
    `vitkern.packing.SeqLens` (validated once when made: no host read here, as a packed model's
    layers use it); a plain tensor is validated with one host read per call.
    Returns [batch, tokens, dim] in qkv's dtype (softmax statistics in fp32). Under torch.autocast
    qkv and the QK-norm parameters are cast to the autocast dtype (as SDPA's inputs are), and so is
    the result.
    """
    amp = _autocast.amp_dtype(qkv)
    if amp is not None:
        cast = _autocast.cast
        norms = [None if n is None or not isinstance(n, (tuple, list)) or len(n) != 3
                 else (cast(n[0], amp), cast(n[1], amp), n[2]) for n in (q_norm, k_norm)]
        with _autocast.disabled(qkv):
            return attention(cast(qkv, amp), num_heads, scale=scale, q_norm=norms[0] or q_norm,
                             k_norm=norms[1] or k_norm, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                             backend=backend)
    if cu_seqlens is not None or max_seqlen is not None:
        return _attention_varlen(qkv, num_heads, scale, q_norm, k_norm, cu_seqlens, max_seqlen, backend)
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


def _check_heads(qkv: Tensor, num_heads: object) -> int:
    """head_dim of a packed projection qkv [..., 3 * dim]; raises naming the argument otherwise."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    three_dim = qkv.shape[-1]
    if three_dim % 3 != 0:
        raise ValueError(f"qkv's last dim must be 3 * dim (packed q, k, v), got {three_dim}, not a multiple of 3")
    if (three_dim // 3) % num_heads != 0:
        raise ValueError(f"dim = qkv.shape[-1] / 3 = {three_dim // 3} must be divisible by num_heads = {num_heads}")
    return three_dim // 3 // num_heads


def _attention_varlen(qkv, num_heads, scale, q_norm, k_norm, cu_seqlens, max_seqlen, backend) -> Tensor:
    """`attention` on packed sequences: qkv [total_tokens, 3 * dim], block-diagonal per cu_seqlens."""
    check_tensor("qkv", qkv)
    if qkv.dim() != 2:
        raise ValueError(f"with cu_seqlens, qkv must be packed [total_tokens, 3 * dim] (2 dims), got shape {tuple(qkv.shape)}")
    if cu_seqlens is None:
        raise ValueError("max_seqlen was given without cu_seqlens; packed attention needs both (cu_seqlens: int32 offsets)")
    head_dim = _check_heads(qkv, num_heads)
    cu_seqlens, max_seqlen = _trusted_or_checked(cu_seqlens, max_seqlen, qkv)
    if scale is not None:
        scale = float(scale)
    q_norm = check_norm_args("q_norm", q_norm, head_dim, qkv)
    k_norm = check_norm_args("k_norm", k_norm, head_dim, qkv)
    options = {name: v for name, v in (("q_norm", q_norm), ("k_norm", k_norm)) if v is not None}
    call = dict(qkv=qkv, num_heads=num_heads, scale=scale, **options, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    impl = dispatch.select("attention", backend, qkv.device, call)
    return impl.fn(**call)


def _trusted_or_checked(cu_seqlens, max_seqlen, qkv: Tensor) -> Tuple[Tensor, int]:
    """(cu_seqlens tensor, max_seqlen): a `vitkern.packing.SeqLens` was validated when it was made,
    so only its host-side total and device are compared (no device read, no GPU sync: a packed
    model passes one to every layer); a plain tensor is validated with one host read."""
    from vitkern.packing import SeqLens

    if not isinstance(cu_seqlens, SeqLens):
        return check_cu_seqlens(cu_seqlens, max_seqlen, qkv.shape[0], qkv.device)
    if cu_seqlens.total != qkv.shape[0]:
        raise ValueError(f"cu_seqlens covers {cu_seqlens.total} packed tokens but qkv has {qkv.shape[0]} rows "
                         "(qkv: [total_tokens, 3 * dim])")
    if cu_seqlens.cu_seqlens.device != qkv.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.cu_seqlens.device} but qkv is on {qkv.device}; both must share a device")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                   or max_seqlen < cu_seqlens.max_seqlen):
        raise ValueError(f"max_seqlen must be None or an int >= the longest sequence {cu_seqlens.max_seqlen}, got {max_seqlen!r}")
    return cu_seqlens.cu_seqlens, cu_seqlens.max_seqlen


dispatch.register("attention", "eager", reference.attention)
dispatch.register("attention", "torch", aten.attention)


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

    # Packed sequences (cu_seqlens): the varlen kernels (kernels/triton/attention_varlen.py) under
    # their own two ops, with the same flattened QK-norm schema.
    from vitkern.kernels.triton import attention_varlen as _triton_varlen

    @_common.library_op("vitkern::attention_varlen_fwd")
    def attention_varlen_fwd(
        qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int, scale: float,
        q_norm: bool = False, q_weight: Optional[Tensor] = None, q_bias: Optional[Tensor] = None, q_eps: float = 0.0,
        k_norm: bool = False, k_weight: Optional[Tensor] = None, k_bias: Optional[Tensor] = None, k_eps: float = 0.0,
    ) -> Tuple[Tensor, Tensor]:
        """qkv: [total, 3 * dim] (stride(-1) == 1); cu_seqlens: [num_seqs + 1] int32 -> (out
        [total, dim] in qkv's dtype, lse [heads, total] fp32)."""
        return _triton_varlen.attention_varlen_fwd(
            qkv, cu_seqlens, max_seqlen, num_heads, scale,
            _norm(q_norm, q_weight, q_bias, q_eps), _norm(k_norm, k_weight, k_bias, k_eps),
        )  # fmt: skip

    @_common.library_op("vitkern::attention_varlen_bwd")
    def attention_varlen_bwd(
        dout: Tensor, qkv: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int, scale: float,
        q_norm: bool = False, q_weight: Optional[Tensor] = None, q_bias: Optional[Tensor] = None, q_eps: float = 0.0,
        k_norm: bool = False, k_weight: Optional[Tensor] = None, k_bias: Optional[Tensor] = None, k_eps: float = 0.0,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """dout: [total, dim]; qkv: [total, 3 * dim]; lse: [heads, total] fp32 -> (dqkv
        [total, 3 * dim], dq_norm, dk_norm) as `attention_bwd` ([0, head_dim] without a norm)."""
        dqkv, dq_norm, dk_norm = _triton_varlen.attention_varlen_bwd(
            dout, qkv, lse, cu_seqlens, max_seqlen, num_heads, scale,
            _norm(q_norm, q_weight, q_bias, q_eps), _norm(k_norm, k_weight, k_bias, k_eps),
        )  # fmt: skip
        head_dim = qkv.shape[-1] // 3 // num_heads
        empty = lambda t: t if t is not None else qkv.new_empty((0, head_dim), dtype=torch.float32)  # noqa: E731
        return dqkv, empty(dq_norm), empty(dk_norm)

    class AttentionVarlenFn(torch.autograd.Function):
        """AttentionFn on packed sequences: saves qkv, cu_seqlens and the fp32 lse [heads, total]."""

        @staticmethod
        def forward(
            ctx, qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int, scale: float,
            q_norm: bool, q_weight: Optional[Tensor], q_bias: Optional[Tensor], q_eps: float,
            k_norm: bool, k_weight: Optional[Tensor], k_bias: Optional[Tensor], k_eps: float,
        ) -> Tensor:
            norms = (q_norm, q_weight, q_bias, q_eps, k_norm, k_weight, k_bias, k_eps)
            out, lse = torch.ops.vitkern.attention_varlen_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale, *norms)
            ctx.save_for_backward(qkv, cu_seqlens, lse, q_weight, q_bias, k_weight, k_bias)
            ctx.args = (max_seqlen, num_heads, scale)
            ctx.flags = (q_norm, q_eps, k_norm, k_eps)
            return out

        @staticmethod
        def backward(ctx, dout: Tensor):
            qkv, cu_seqlens, lse, q_weight, q_bias, k_weight, k_bias = ctx.saved_tensors
            q_norm, q_eps, k_norm, k_eps = ctx.flags
            if dout.stride(-1) != 1:
                dout = dout.contiguous()  # the kernels read dout's rows with a unit feature stride
            dqkv, dq_norm, dk_norm = torch.ops.vitkern.attention_varlen_bwd(
                dout, qkv, lse, cu_seqlens, *ctx.args, q_norm, q_weight, q_bias, q_eps, k_norm, k_weight, k_bias, k_eps,
            )  # fmt: skip
            needs = ctx.needs_input_grad
            dq_w = dq_norm[0].to(q_weight.dtype) if q_weight is not None and needs[6] else None
            dq_b = dq_norm[1].to(q_bias.dtype) if q_bias is not None and needs[7] else None
            dk_w = dk_norm[0].to(k_weight.dtype) if k_weight is not None and needs[10] else None
            dk_b = dk_norm[1].to(k_bias.dtype) if k_bias is not None and needs[11] else None
            return dqkv, None, None, None, None, None, dq_w, dq_b, None, None, dk_w, dk_b, None

    def _sample_fits_int32(t: Tensor) -> bool:
        """Offsets inside one sample, (tokens - 1) * stride(1) + width, fit in int32 (the kernels
        add only the batch offset in int64)."""
        return (t.shape[1] - 1) * abs(t.stride(1)) + t.shape[2] < 2**31

    def _attention_triton(
        qkv: Tensor, num_heads: int, scale: Optional[float] = None,
        q_norm: Optional[NormArgs] = None, k_norm: Optional[NormArgs] = None,
        cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
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
        if cu_seqlens is not None:
            return AttentionVarlenFn.apply(
                qkv, cu_seqlens, max_seqlen, num_heads, scale,
                q_norm is not None, q_weight, q_bias, q_eps, k_norm is not None, k_weight, k_bias, k_eps,
            )  # fmt: skip
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
        ) + option_reasons(call, "triton", qk_norm=True, varlen=True)
        qkv, num_heads = call["qkv"], call["num_heads"]
        head_dim = qkv.shape[-1] // 3 // num_heads
        if not TRITON_MIN_HEAD_DIM <= head_dim <= TRITON_MAX_HEAD_DIM:
            reasons.append(
                f"head_dim = qkv.shape[-1] / 3 / num_heads = {head_dim}; the triton attention supports "
                f"{TRITON_MIN_HEAD_DIM} <= head_dim <= {TRITON_MAX_HEAD_DIM}"
            )
        if call.get("cu_seqlens") is not None:
            # Packed rows: the sequence's first row is added in int64, offsets inside one sequence are int32.
            span = (call["max_seqlen"] - 1) * abs(qkv.stride(0)) + qkv.shape[-1]
            if span >= 2**31:
                reasons.append(f"one packed sequence of qkv spans (max_seqlen - 1) * stride(0) + 3 * dim = {span} "
                               "elements; the triton attention indexes inside a sequence in int32 (< 2**31)")
            return reasons
        if not _sample_fits_int32(qkv):
            reasons.append(
                f"one sample of qkv spans (tokens - 1) * stride(1) + 3 * dim = "
                f"{(qkv.shape[1] - 1) * qkv.stride(1) + qkv.shape[2]} elements; the triton attention "
                "indexes inside a sample in int32 (< 2**31)"
            )
        return reasons

    dispatch.register("attention", "triton", _attention_triton, supports=_attention_triton_reasons)
