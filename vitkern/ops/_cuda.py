"""The CUDA backend of every op family: autograd Functions over `torch.ops.vitkern.cuda_<family>_fwd/_bwd`
(csrc/bindings.cpp), registered with `vitkern.dispatch` as backend "cuda".

Importing this module is cheap and never touches the extension: it registers the implementations,
and the extension is found or built (`vitkern.kernels.cuda.load_error`) the first time the
dispatcher considers the CUDA backend for a call on a GPU. Fake (meta) implementations of the C++
ops are registered as soon as the extension is loaded, so `torch.compile` traces through them.

Each function takes the same keyword arguments as the eager implementation of its op (the `call`
built in `vitkern/ops/<family>.py`) and returns the same result.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

import torch
from torch import Tensor

from vitkern import dispatch, reference
from vitkern.kernels import cuda as cuda_kernels
from vitkern.ops._autograd import first_order, refuse_functorch
from vitkern.ops._checks import fused_backend_reasons, option_reasons

DTYPES = (torch.float16, torch.bfloat16)
LAYER_NORM_MAX_DIM = 1280  # csrc/layernorm.cu: one warp holds a row in registers
ATTENTION_HEAD_DIMS = (64, 80, 128)  # csrc/attention.cu instantiations
ATTENTION_MAX_TOKENS = 65535 * 64  # grid.y limit of 64-row tiles
# The `int act` of the linear ops: VkActivation in csrc/vitkern_kernels.h, by the ops' activation names.
ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}
ACTIVATIONS = tuple(ACTIVATION_CODES)
# The patch_embed epilogue writes any number of prefix rows; the token count is a 32-bit int there.
PATCH_EMBED_MAX_PREFIX = 2**31 - 1

_READY = False

# The library whose ops the autograd Functions call, and whether CPU tensors are accepted. Only the
# tests change them: their CPU emulator of csrc/ (tests/cuda_emu) registers the same ops as
# torch.ops.vitkern_emu.cuda_* for CPU tensors.
OPS_NAMESPACE = "vitkern"
ACCEPTS_CPU = False


def _ensure_loaded() -> None:
    """Loads (or builds) the extension and registers the fake implementations, once."""
    global _READY
    if _READY:
        return
    error = cuda_kernels.load_error()
    if error:
        raise RuntimeError(f"the vitkern CUDA extension is unavailable: {error}")
    _register_fakes()
    _READY = True


def _ops():
    return getattr(torch.ops, OPS_NAMESPACE)


def _flat(t: Tensor) -> Tensor:
    """[..., n] -> contiguous [rows, n] (a view when t is already contiguous)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


# --------------------------------------------------------------------------------------------
# Autograd Functions


def _affine(weight: Optional[Tensor], bias: Optional[Tensor], like: Tensor, dim: Optional[int] = None):
    """(weight, bias) of a LayerNorm over `dim` (default like's last dim) in like's dtype, contiguous; a
    missing one (elementwise_affine=False) is the identity's: gamma = 1, beta = 0. The C++ ops take
    both; no gradient is returned for a missing one."""
    dim = like.shape[-1] if dim is None else dim
    gamma = weight.contiguous() if weight is not None else torch.ones(dim, dtype=like.dtype, device=like.device)
    beta = bias.contiguous() if bias is not None else torch.zeros(dim, dtype=like.dtype, device=like.device)
    return gamma, beta


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
        x2 = _flat(x)
        w, b = _affine(weight, bias, x)
        y, mean, rstd = _ops().cuda_layer_norm_fwd(x2, w, b, eps)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.shape = x.shape
        ctx.affine = (weight is not None, bias is not None)
        return y.view(x.shape)

    @staticmethod
    @first_order("cuda", "layer_norm")
    def backward(ctx, dy: Tensor):
        x2, w, mean, rstd = ctx.saved_tensors
        dx, dw, db = _ops().cuda_layer_norm_bwd(_flat(dy), x2, w, mean, rstd)
        has_w, has_b = ctx.affine
        return dx.view(ctx.shape), dw if has_w else None, db if has_b else None, None


class _LinearFn(torch.autograd.Function):
    """residual + scale * act(x @ weight^T + bias); act is an ACTIVATION_CODES value. With an activation
    or a scale the forward saves the pre-activation, and the backward's first pass forms dh and dscale."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                scale: Optional[Tensor], act: int) -> Tensor:
        x2 = _flat(x)
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else None
        r = _flat(residual) if residual is not None else None
        g = scale.contiguous() if scale is not None else None
        out, preact = _ops().cuda_linear_fwd(x2, w, b, r, g, act)
        ctx.save_for_backward(x2, w, preact, g)
        ctx.has_bias, ctx.act, ctx.has_residual = bias is not None, act, residual is not None
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @first_order("cuda", "linear")
    def backward(ctx, dout: Tensor):
        x2, w, preact, g = ctx.saved_tensors
        d2 = _flat(dout)
        dx, dw, db, dscale = _ops().cuda_linear_bwd(d2, x2, w, preact, g, ctx.has_bias, ctx.act)
        dres = dout if ctx.has_residual else None
        return dx.view(ctx.shape), dw, db if ctx.has_bias else None, dres, dscale if g is not None else None, None


class _LnLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, weight, bias, eps: float, act: int) -> Tensor:
        x2 = _flat(x)
        lnw, lnb = _affine(ln_weight, ln_bias, x)
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else None
        out, ln_out, mean, rstd, preact = _ops().cuda_ln_linear_fwd(x2, lnw, lnb, w, b, eps, act)
        ctx.save_for_backward(x2, lnw, w, ln_out, mean, rstd, preact)
        ctx.has_bias, ctx.act = bias is not None, act
        ctx.affine = (ln_weight is not None, ln_bias is not None)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @first_order("cuda", "ln_linear")
    def backward(ctx, dout: Tensor):
        x2, lnw, w, ln_out, mean, rstd, preact = ctx.saved_tensors
        dx, dlnw, dlnb, dw, db = _ops().cuda_ln_linear_bwd(_flat(dout), x2, lnw, w, ln_out, mean, rstd, preact, ctx.has_bias, ctx.act)
        has_w, has_b = ctx.affine
        return (dx.view(ctx.shape), dlnw if has_w else None, dlnb if has_b else None, dw, db if ctx.has_bias else None,
                None, None)


def _qk_affine(on: bool, weight: Optional[Tensor], bias: Optional[Tensor], qkv: Tensor, head_dim: int):
    """(weight, bias) [head_dim] of one side's QK-norm for the C++ ops (`_affine`: a missing one as the
    identity's); (None, None) when that side is not normalized."""
    return _affine(weight, bias, qkv, head_dim) if on else (None, None)


class _AttentionFn(torch.autograd.Function):
    """out [batch, tokens, dim] = attention(qkv [batch, tokens, 3 * dim]); with QK-norm (q_on / k_on) the
    kernels normalize q / k as they load them: q_weight, q_bias ([head_dim] in qkv's dtype, or None for
    elementwise_affine=False's identity) and q_eps (likewise k). Packed sequences: with cu_seqlens (int32
    [num_seqs + 1]) and max_seqlen, qkv is [total, 3 * dim] and out [total, dim], block-diagonal; the
    softmax statistics saved for the backward are then [heads, total]. Returns a gradient for every given
    tensor."""

    @staticmethod
    def forward(ctx, qkv: Tensor, num_heads: int, scale: float, q_on: bool, q_weight: Optional[Tensor],
                q_bias: Optional[Tensor], q_eps: float, k_on: bool, k_weight: Optional[Tensor],
                k_bias: Optional[Tensor], k_eps: float, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: int = 0) -> Tensor:
        head_dim = qkv.shape[-1] // 3 // num_heads
        qw, qb = _qk_affine(q_on, q_weight, q_bias, qkv, head_dim)
        kw, kb = _qk_affine(k_on, k_weight, k_bias, qkv, head_dim)
        norm = (qw, qb, float(q_eps), kw, kb, float(k_eps))
        # The dense call keeps the schema's defaults for the packed arguments (the stand-ins of
        # tests/test_cuda_build.py take the dense signature).
        packed = (cu_seqlens, int(max_seqlen)) if cu_seqlens is not None else ()
        out, lse = _ops().cuda_attention_fwd(qkv, num_heads, scale, *norm, *packed)
        ctx.save_for_backward(qkv, out, lse, qw, qb, kw, kb, cu_seqlens)
        ctx.num_heads, ctx.scale, ctx.eps = num_heads, scale, (float(q_eps), float(k_eps))
        ctx.max_seqlen = int(max_seqlen)
        ctx.given = (q_weight is not None, q_bias is not None, k_weight is not None, k_bias is not None)
        return out

    @staticmethod
    @first_order("cuda", "attention")
    def backward(ctx, dout: Tensor):
        qkv, out, lse, qw, qb, kw, kb, cu_seqlens = ctx.saved_tensors
        (q_eps, k_eps), (has_qw, has_qb, has_kw, has_kb) = ctx.eps, ctx.given
        packed = (cu_seqlens, ctx.max_seqlen) if cu_seqlens is not None else ()
        dqkv, dqw, dqb, dkw, dkb = _ops().cuda_attention_bwd(
            dout.contiguous(), qkv, out, lse, ctx.num_heads, ctx.scale, qw, qb, q_eps, kw, kb, k_eps, *packed
        )
        return (dqkv, None, None, None, dqw if has_qw else None, dqb if has_qb else None, None, None,
                dkw if has_kw else None, dkb if has_kb else None, None, None, None)


class _PatchEmbedFn(torch.autograd.Function):
    """[prefix tokens; patches @ W^T + b] + pos_embed; cls_token holds the prefix tokens [1, prefix, dim],
    and pos_embed covers every token, or with no_embed_class the patch tokens only."""

    @staticmethod
    def forward(ctx, x, weight, bias, cls_token, pos_embed, no_embed_class: bool) -> Tensor:
        xc = x.contiguous()
        w = weight.contiguous()
        out = _ops().cuda_patch_embed_fwd(
            xc,
            w,
            bias.contiguous() if bias is not None else None,
            cls_token.contiguous() if cls_token is not None else None,
            pos_embed.contiguous() if pos_embed is not None else None,
            no_embed_class,
        )
        ctx.save_for_backward(xc, w)
        ctx.flags = (bias is not None, cls_token is not None, pos_embed is not None)
        ctx.prefix = cls_token.shape[1] if cls_token is not None else 0
        ctx.no_embed_class = no_embed_class
        return out

    @staticmethod
    @first_order("cuda", "patch_embed")
    def backward(ctx, dout: Tensor):
        xc, w = ctx.saved_tensors
        has_bias, has_cls, has_pos = ctx.flags
        dx, dw, db, dcls, dpos = _ops().cuda_patch_embed_bwd(
            dout.contiguous(), xc, w, has_bias, ctx.prefix, has_pos, ctx.no_embed_class, bool(ctx.needs_input_grad[0])
        )
        return (
            dx if ctx.needs_input_grad[0] else None,
            dw,
            db if has_bias else None,
            dcls.view(1, ctx.prefix, w.shape[0]) if has_cls else None,  # [0] when the prefix is empty
            dpos if has_pos else None,
            None,
        )


# --------------------------------------------------------------------------------------------
# The op implementations (same keyword arguments as the eager ones)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    if not _READY:
        _ensure_loaded()
    refuse_functorch("cuda", "layer_norm")
    return _LayerNormFn.apply(x, weight, bias, float(eps))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
           residual: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    if not _READY:
        _ensure_loaded()
    refuse_functorch("cuda", "linear")
    return _LinearFn.apply(x, weight, bias, residual, scale, ACTIVATION_CODES[activation])


def ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps: float = 1e-6, activation: Optional[str] = None) -> Tensor:
    if not _READY:
        _ensure_loaded()
    refuse_functorch("cuda", "ln_linear")
    return _LnLinearFn.apply(x, ln_weight, ln_bias, weight, bias, float(eps), ACTIVATION_CODES[activation])


def attention(qkv: Tensor, num_heads: int, *, scale: Optional[float] = None, q_norm=None, k_norm=None,
              cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
    """q_norm, k_norm: None or (weight [head_dim] or None, bias [head_dim] or None, eps), as checked by
    vitkern.ops.attention: QK-norm inside the kernels. cu_seqlens, max_seqlen: packed sequences, qkv
    [total, 3 * dim], as checked by vitkern.ops.attention (check_cu_seqlens: the kernels trust the offsets
    and that max_seqlen >= every length)."""
    if not _READY:
        _ensure_loaded()
    head_dim = qkv.shape[-1] // 3 // num_heads
    qw, qb, q_eps = q_norm if q_norm is not None else (None, None, 0.0)
    kw, kb, k_eps = k_norm if k_norm is not None else (None, None, 0.0)
    refuse_functorch("cuda", "attention")
    return _AttentionFn.apply(qkv, int(num_heads), float(head_dim ** -0.5 if scale is None else scale),
                              q_norm is not None, qw, qb, float(q_eps), k_norm is not None, kw, kb, float(k_eps),
                              cu_seqlens, int(max_seqlen) if cu_seqlens is not None else 0)


def patch_embed(x, weight, bias=None, cls_token=None, pos_embed=None, no_embed_class: bool = False,
                keep: Optional[Tensor] = None) -> Tensor:
    if not _READY:
        _ensure_loaded()
    refuse_functorch("cuda", "patch_embed")
    tokens = _PatchEmbedFn.apply(x, weight, bias, cls_token, pos_embed, bool(no_embed_class))
    if keep is None:
        return tokens
    # PatchDropout: csrc/ embeds every patch, and the kept rows are gathered after (one read and
    # write of the kept tokens; autograd's scatter is the backward). The Triton kernel embeds only
    # the kept patches instead (docs/perf/patch_embed.md).
    return reference.keep_patch_tokens(tokens, keep, cls_token.shape[1] if cls_token is not None else 0)


# --------------------------------------------------------------------------------------------
# What each implementation supports (beyond dtype and device)


def _common(call: Mapping[str, object], **options) -> List[str]:
    """Dtype and device reasons, and the ViT family's options (LayerScale, activations, QK-norm, prefix
    tokens, no_embed_class) that the op's kernels lack: `options` are `option_reasons`' keywords, saying
    what this op's csrc/ kernels have; a call that uses anything else is declined with its name."""
    return (fused_backend_reasons(call, dtypes=DTYPES, allow_cpu=ACCEPTS_CPU, backend="cuda")
            + option_reasons(call, "cuda", **options))


def _rows_reasons(x: Tensor) -> List[str]:
    return [] if x.numel() > 0 else [f"x has no elements (shape {tuple(x.shape)}); the cuda backend needs at least one row"]


def _layer_norm_supports(call, **options) -> List[str]:
    reasons = _common(call, **options)
    dim = call["x"].shape[-1]
    if dim > LAYER_NORM_MAX_DIM:
        reasons.append(f"x's last dim is {dim}; the cuda LayerNorm holds a row in one warp's registers, dim <= {LAYER_NORM_MAX_DIM}")
    return reasons + _rows_reasons(call["x"])


def _linear_supports(call) -> List[str]:
    return _common(call, activations=ACTIVATIONS, scale=True) + _rows_reasons(call["x"])


def _ln_linear_supports(call) -> List[str]:
    return _layer_norm_supports(call, activations=ACTIVATIONS)


def _address(t: Tensor) -> int:
    """t's data address, or 0 where it has none (fake and meta tensors outside torch.compile)."""
    try:
        return t.data_ptr()
    except Exception:
        return 0


def _attention_supports(call) -> List[str]:
    reasons = _common(call, qk_norm=True, varlen=True)
    qkv = call["qkv"]
    packed = call.get("cu_seqlens") is not None
    heads = call["num_heads"]
    head_dim = qkv.shape[-1] // 3 // heads
    if head_dim not in ATTENTION_HEAD_DIMS:
        reasons.append(f"head_dim is {head_dim}; the cuda attention kernels are built for head_dim in {ATTENTION_HEAD_DIMS}")
    # 16-byte aligned rows. torch.compile cannot trace a tensor's address (data_ptr, storage_offset):
    # while compiling only the strides are checked here, and the op checks the address when it runs
    # (csrc/bindings.cpp, check_qkv: a clear error, never a misaligned access).
    misaligned = not torch.compiler.is_compiling() and _address(qkv) % 16 != 0
    row_strides = qkv.stride()[:-1]  # packed [total, 3 * dim]: the token stride only
    if qkv.stride(-1) != 1 or any(s % 8 for s in row_strides) or misaligned:
        reasons.append(
            f"qkv has strides {tuple(qkv.stride())}; the cuda attention needs a contiguous last dim and 16-byte aligned rows "
            "(strides multiples of 8)"
        )
    if packed:
        # The grid covers max_seqlen rows of every sequence (64-row tiles on grid.y); sizes are 32-bit ints.
        max_seqlen, num_seqs = call["max_seqlen"], call["cu_seqlens"].shape[0] - 1
        if max_seqlen > ATTENTION_MAX_TOKENS:
            reasons.append(f"max_seqlen is {max_seqlen}; the cuda attention takes at most {ATTENTION_MAX_TOKENS} "
                           "tokens per sequence")
        if qkv.shape[0] >= 2**31 or num_seqs * heads >= 2**31:
            reasons.append(f"qkv has {qkv.shape[0]} packed tokens in {num_seqs} sequences of {heads} heads; the cuda "
                           "attention takes the total and num_seqs * num_heads as 32-bit ints")
    elif qkv.shape[1] > ATTENTION_MAX_TOKENS:
        reasons.append(f"qkv has {qkv.shape[1]} tokens; the cuda attention takes at most {ATTENTION_MAX_TOKENS}")
    return reasons


def _patch_embed_supports(call) -> List[str]:
    return (_common(call, max_prefix_tokens=PATCH_EMBED_MAX_PREFIX, no_embed_class=True, keep=True)
            + _rows_reasons(call["x"]))


# --------------------------------------------------------------------------------------------
# Fake implementations (shapes and dtypes exactly as csrc/bindings.cpp allocates them)

_FAKES_DONE: set = set()  # the namespaces whose ops have their fakes


def _register_fakes() -> None:
    """Fake (meta) implementations of the ops of OPS_NAMESPACE, once per namespace."""
    ns = OPS_NAMESPACE
    if ns in _FAKES_DONE:
        return

    def reg(name: str):
        return torch.library.register_fake(f"{ns}::{name}")

    f32 = torch.float32

    def none(t: Tensor) -> Tensor:
        return t.new_empty((0,))

    @reg("cuda_layer_norm_fwd")
    def _(x, weight, bias, eps):
        return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=f32), x.new_empty((x.shape[0],), dtype=f32)

    @reg("cuda_layer_norm_bwd")
    def _(dout, x, weight, mean, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)

    @reg("cuda_linear_fwd")
    def _(x, weight, bias, residual, scale, act):
        out = x.new_empty((x.shape[0], weight.shape[0]))
        return out, (x.new_empty((x.shape[0], weight.shape[0])) if act or scale is not None else none(x))

    @reg("cuda_linear_bwd")
    def _(dout, x, weight, preact, scale, has_bias, act):
        db = x.new_empty((weight.shape[0],)) if has_bias else none(x)
        dscale = x.new_empty((weight.shape[0],)) if scale is not None else none(x)
        return x.new_empty(x.shape), weight.new_empty(weight.shape), db, dscale

    @reg("cuda_ln_linear_fwd")
    def _(x, ln_weight, ln_bias, weight, bias, eps, act):
        m, n = x.shape[0], weight.shape[0]
        preact = x.new_empty((m, n)) if act else none(x)
        return x.new_empty((m, n)), x.new_empty(x.shape), x.new_empty((m,), dtype=f32), x.new_empty((m,), dtype=f32), preact

    @reg("cuda_ln_linear_bwd")
    def _(dout, x, ln_weight, weight, ln_out, mean, rstd, preact, has_bias, act):
        db = x.new_empty((weight.shape[0],)) if has_bias else none(x)
        return (x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape), ln_weight.new_empty(ln_weight.shape),
                weight.new_empty(weight.shape), db)

    @reg("cuda_attention_fwd")
    def _(qkv, num_heads, scale, q_weight=None, q_bias=None, q_eps=0.0, k_weight=None, k_bias=None, k_eps=0.0,
          cu_seqlens=None, max_seqlen=0):
        if cu_seqlens is not None:  # packed: qkv [total, 3 * dim] -> out [total, dim], lse [heads, total]
            total, three_d = qkv.shape
            return qkv.new_empty((total, three_d // 3)), qkv.new_empty((num_heads, total), dtype=f32)
        b, t, three_d = qkv.shape
        return qkv.new_empty((b, t, three_d // 3)), qkv.new_empty((b, num_heads, t), dtype=f32)

    @reg("cuda_attention_bwd")
    def _(dout, qkv, out, lse, num_heads, scale, q_weight=None, q_bias=None, q_eps=0.0, k_weight=None, k_bias=None,
          k_eps=0.0, cu_seqlens=None, max_seqlen=0):
        head_dim = qkv.shape[-1] // 3 // num_heads

        def grad(weight):
            return qkv.new_empty((head_dim,)) if weight is not None else none(qkv)

        return qkv.new_empty(qkv.shape), grad(q_weight), grad(q_weight), grad(k_weight), grad(k_weight)

    @reg("cuda_patch_embed_fwd")
    def _(x, weight, bias, cls_token, pos_embed, no_embed_class):
        dim, _, ph, pw = weight.shape
        tokens = (cls_token.shape[1] if cls_token is not None else 0) + (x.shape[2] // ph) * (x.shape[3] // pw)
        return x.new_empty((x.shape[0], tokens, dim))

    @reg("cuda_patch_embed_bwd")
    def _(dout, x, weight, has_bias, n_prefix, has_pos, no_embed_class, needs_dx):
        dim = weight.shape[0]
        pos_rows = dout.shape[1] - (n_prefix if no_embed_class else 0)
        return (
            x.new_empty(x.shape) if needs_dx else none(x),
            weight.new_empty(weight.shape),
            x.new_empty((dim,)) if has_bias else none(x),
            x.new_empty((1, n_prefix, dim)) if n_prefix > 0 else none(x),
            x.new_empty((1, pos_rows, dim)) if has_pos else none(x),
        )

    _FAKES_DONE.add(ns)


dispatch.register("layer_norm", "cuda", layer_norm, supports=_layer_norm_supports)
dispatch.register("linear", "cuda", linear, supports=_linear_supports)
dispatch.register("ln_linear", "cuda", ln_linear, supports=_ln_linear_supports)
dispatch.register("attention", "cuda", attention, supports=_attention_supports)
dispatch.register("patch_embed", "cuda", patch_embed, supports=_patch_embed_supports)
