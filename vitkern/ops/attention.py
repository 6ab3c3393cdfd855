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
# autograd Function. The op schemas are shared with the CUDA extension's cuda_attention_fwd/_bwd.

if dispatch.triton_importable():
    from typing import List, Tuple

    import torch

    from vitkern.kernels.triton import attention as _triton_attention
    from vitkern.kernels.triton import _common
    from vitkern.ops._checks import fused_backend_reasons, option_reasons

    TRITON_MIN_HEAD_DIM = 16  # tl.dot's smallest K
    TRITON_MAX_HEAD_DIM = 128  # q, k, v and the accumulators of one head stay in registers/shared memory

    @_common.library_op("vitkern::attention_fwd")
    def attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> Tuple[Tensor, Tensor]:
        """qkv: [batch, tokens, 3 * dim] (stride(-1) == 1) -> (out [batch, tokens, dim] in qkv's
        dtype, lse [batch, heads, tokens] fp32 natural-log log-sum-exp of each softmax row)."""
        return _triton_attention.attention_fwd(qkv, num_heads, scale)

    @_common.library_op("vitkern::attention_bwd")
    def attention_bwd(dout: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, scale: float) -> Tensor:
        """dout: [batch, tokens, dim]; qkv: [batch, tokens, 3 * dim]; lse: [batch, heads, tokens]
        fp32 from attention_fwd -> dqkv [batch, tokens, 3 * dim] in qkv's packed layout and dtype.
        The output itself is not needed: delta = rowsum(P * dP) is recomputed from P and dP."""
        return _triton_attention.attention_bwd(dout, qkv, lse, num_heads, scale)

    class AttentionFn(torch.autograd.Function):
        """out = attention(qkv); saves qkv and the fp32 lse, and recomputes the probabilities in the
        backward (no [tokens, tokens] matrix is ever stored)."""

        @staticmethod
        def forward(ctx, qkv: Tensor, num_heads: int, scale: float) -> Tensor:
            out, lse = torch.ops.vitkern.attention_fwd(qkv, num_heads, scale)
            ctx.save_for_backward(qkv, lse)
            ctx.num_heads = num_heads
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, dout: Tensor):
            qkv, lse = ctx.saved_tensors
            if dout.stride(-1) != 1 or not _sample_fits_int32(dout):
                # The kernels read rows of dout with a unit feature stride (autograd hands an
                # expanded zero-stride gradient for out.sum()) and index inside one sample in
                # int32; any other batch and token strides are read as they are.
                dout = dout.contiguous()
            dqkv = torch.ops.vitkern.attention_bwd(dout, qkv, lse, ctx.num_heads, ctx.scale)
            return dqkv, None, None

    def _sample_fits_int32(t: Tensor) -> bool:
        """Offsets inside one sample, (tokens - 1) * stride(1) + width, fit in int32 (the kernels
        add only the batch offset in int64)."""
        return (t.shape[1] - 1) * abs(t.stride(1)) + t.shape[2] < 2**31

    def _attention_triton(qkv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
        head_dim = qkv.shape[-1] // 3 // num_heads
        scale = head_dim ** -0.5 if scale is None else float(scale)
        if qkv.stride(-1) != 1:
            # Only a feature-strided qkv is copied (never produced by the projection); batch and
            # token strides are read as they are.
            qkv = qkv.contiguous()
        return AttentionFn.apply(qkv, num_heads, scale)

    def _attention_triton_reasons(call) -> List[str]:
        reasons = fused_backend_reasons(
            call,
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
            allow_cpu=dispatch.triton_interpret(),
            backend="triton",
        ) + option_reasons(call, "triton")
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
