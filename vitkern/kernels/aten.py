"""The "torch" backend: every vitkern op as torch's own fused library ops (ATen), no vitkern kernel.

What `auto` runs where no vitkern kernel runs: on the CPU always, and on a GPU for a call the fused
backends decline (float64, an option they lack). It calls the ops timm's modules call, so it is
never slower than timm's eager model:

* linear: on the CPU oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op torch.compile's
  CPU backend emits), whose fp32 GEMM beats the BLAS behind addmm on the CPUs measured
  (docs/perf/cpu.md); for inference with GEMM + bias + GELU, or GEMM + bias + skip connection, in
  one pass instead of two; in training through `_OneDNNLinearFn` (addmm's gradient formulas).
  Elsewhere `F.linear` (addmm: the bias rides in the GEMM's C operand). Then the activation, and
  LayerScale + skip connection as one `torch.addcmul` (timm: a multiply, then an add);
* layer_norm / ln_linear: `F.layer_norm` (fp32 statistics for every input dtype), then `F.linear`;
* attention: `F.scaled_dot_product_attention` on strided views of the packed qkv (on the CPU its
  flash kernel: fp32 softmax statistics, no [tokens, tokens] matrix), QK-norm by `F.layer_norm`;
  16-bit inputs on the CPU take torch's fastest kernel for their dtype (`_sdpa`: fp16 on fp32
  copies, bf16 training with the bf16 forward and the fp32 backward);
* patch_embed: the strided `F.conv2d` (oneDNN on the CPU), then prefix tokens and position
  embedding exactly as `vitkern.reference.patch_embed` adds them.

Numerics are torch's (and timm's): a low-precision GEMM output is rounded before its activation and
again before the residual add, where the fused kernels and `vitkern.reference` round once. Float64
is exact, so the float64 oracle tests hold for it as for every backend.

Shapes, dtypes and defaults are those of the public ops in `vitkern.ops` (validated there).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor

from vitkern import reference

NormArgs = Tuple[Optional[Tensor], Optional[Tensor], float]


def activate(y: Tensor, activation: Optional[str]) -> Tensor:
    """y through the fc1 epilogue's activation with torch's kernels (timm's modules' formulas)."""
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")


# oneDNN's fused linear: an epilogue it computes, per activation ("gelu" post-op and its algorithm).
_ONEDNN_GELU = {"gelu": "none", "gelu_tanh": "tanh"}


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()


def _onednn_applies(x: Tensor, weight: Tensor) -> bool:
    """oneDNN's linear can run this call: a plain eager CPU call in fp32 or bf16. Traced calls
    (torch.compile, torch.export, fake tensors) and functorch transforms (torch.func.grad, vmap)
    take the plain ops, which inductor fuses itself and functorch knows how to transform."""
    if not _ONEDNN or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if weight.dtype != x.dtype or not weight.is_contiguous():
        return False
    return _eager_call(x)


def _eager_call(x: Tensor) -> bool:
    """Not traced (torch.compile, torch.export, fake tensors) and not under a functorch transform."""
    if torch.compiler.is_compiling() or _is_exporting() or isinstance(x, _FakeTensor):
        return False
    return torch._C._functorch.peek_interpreter_stack() is None


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


class _OneDNNLinearFn(torch.autograd.Function):
    """x W^T + b (+ residual) with oneDNN's GEMM in the forward, torch's (addmm's) gradient formulas
    in the backward: on CPUs where oneDNN's fp32 GEMM beats the BLAS behind addmm (measured on an
    AMD EPYC: 25-50% at ViT-S shapes, 5-15% at ViT-B's, docs/perf/cpu.md), training gains the
    forward's share. x2d [M, K], weight [N, K], bias [N] or None, residual2d [M, N] or None."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, residual2d):
        if residual2d is not None:
            y = torch.ops.mkldnn._linear_pointwise.binary(x2d, residual2d, weight, bias, "add")
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")
        ctx.save_for_backward(x2d, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad
        return (dy.mm(weight) if need_x else None, dy.t().mm(x2d) if need_w else None,
                dy.sum(0) if need_b else None, dy if need_r else None)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                   residual: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """`linear` with oneDNN's GEMM (see `_onednn_applies` for when). Inference fuses the epilogue
    into it where oneDNN can (GEMM + bias + exact or tanh GELU; GEMM + bias + skip connection);
    training takes the GEMM (+ skip connection) from `_OneDNNLinearFn` and the rest from torch."""
    n = weight.shape[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    fuse_residual = residual is not None and activation is None and scale is None and residual.dtype == x.dtype
    res2d = residual.reshape(-1, n).contiguous() if fuse_residual else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual, scale))
    if needs_grad:
        y = activate(_OneDNNLinearFn.apply(x2d, weight, bias, res2d), activation)
    elif fuse_residual:
        y = torch.ops.mkldnn._linear_pointwise.binary(x2d, res2d, weight, bias, "add")
    elif activation in _ONEDNN_GELU:
        y = torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "gelu", [], _ONEDNN_GELU[activation])
    else:
        y = activate(torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], ""), activation)
    y = y.reshape(*lead, n)
    return y if fuse_residual else _epilogue(y, residual, scale)


def _epilogue(y: Tensor, residual: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """residual + scale * y (each optional): LayerScale and the skip connection in one addcmul."""
    if residual is None:
        return y if scale is None else y * scale
    return torch.addcmul(residual, y, scale) if scale is not None else residual + y


def linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
    residual: Optional[Tensor] = None, scale: Optional[Tensor] = None,
) -> Tensor:
    """residual + scale * act(x @ weight^T + bias); x [..., in], weight [out, in] -> [..., out]."""
    if _onednn_applies(x, weight) and (bias is None or bias.dtype == x.dtype):
        return _onednn_linear(x, weight, bias, activation, residual, scale)
    return _epilogue(activate(F.linear(x, weight, bias), activation), residual, scale)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim of x [..., dim]; weight, bias [dim] or None."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def ln_linear(
    x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], weight: Tensor,
    bias: Optional[Tensor] = None, *, eps: float = 1e-6, activation: Optional[str] = None,
) -> Tensor:
    """act(LayerNorm(x) @ weight^T + bias); x [..., dim] -> [..., out]."""
    return linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, activation=activation)


def attention(
    qkv: Tensor, num_heads: int, *, scale: Optional[float] = None,
    q_norm: Optional[NormArgs] = None, k_norm: Optional[NormArgs] = None,
    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
) -> Tensor:
    """qkv [batch, tokens, 3 * dim] (timm's order) -> [batch, tokens, dim], heads concatenated.

    Packed sequences (cu_seqlens int32 [num_seqs + 1]): qkv [total_tokens, 3 * dim] ->
    [total_tokens, dim], one SDPA call per sequence on a view of its rows. Not a block-diagonal
    mask over the whole pack: a mask makes SDPA take its math path (the [total, total] scores, most
    of them masked), and CPU SDPA has no varlen kernel; per sequence each call is the flash kernel
    on exactly that image's tokens, and the loop costs one call per image.
    """
    if cu_seqlens is not None:
        offsets = cu_seqlens.tolist()
        outs = [attention(qkv[s:e].unsqueeze(0), num_heads, scale=scale, q_norm=q_norm, k_norm=k_norm)[0]
                for s, e in zip(offsets[:-1], offsets[1:])]
        return torch.cat(outs, dim=0)
    b, t, three_dim = qkv.shape
    dim = three_dim // 3
    head_dim = dim // num_heads
    q, k, v = qkv.reshape(b, t, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [b, h, t, d] views
    if q_norm is not None:
        q = F.layer_norm(q, (head_dim,), *q_norm)
    if k_norm is not None:
        k = F.layer_norm(k, (head_dim,), *k_norm)
    out = _sdpa(q, k, v, scale)
    return out.transpose(1, 2).reshape(b, t, dim)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """SDPA of q, k, v [batch, heads, tokens, head_dim] with the fastest of torch's CPU kernels for
    their dtype (measured at ViT-S/B shapes, docs/perf/cpu.md). torch's CPU flash kernel is 2-5x
    slower in fp16 than in fp32, forward and backward: fp16 runs on fp32 copies. In bf16 its forward
    is the fastest but its backward 10-25% slower than fp32's: training runs the bf16 forward and
    the backward on fp32 copies (`_Bf16FlashFp32Backward`). The inputs' values are unchanged
    (16-bit values are exact in fp32); the fp32 kernels keep P in fp32 where the 16-bit ones round
    it, and each result is rounded to the inputs' dtype once. Traced calls take plain SDPA."""
    if q.device.type != "cpu" or q.dtype not in (torch.float16, torch.bfloat16) or not _eager_call(q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if q.dtype == torch.float16:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale).to(q.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _Bf16FlashFp32Backward.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class _Bf16FlashFp32Backward(torch.autograd.Function):
    """CPU SDPA of bf16 q, k, v [batch, heads, tokens, head_dim]: torch's bf16 flash forward (out
    and the fp32 log-sum-exp of each row), torch's fp32 flash backward on fp32 copies of q, k, v, out
    and dout with that log-sum-exp; the gradients are rounded to bf16, as SDPA's are. With
    create_graph the backward is fp32 math SDPA differentiated by autograd, so it can be
    differentiated again (plain SDPA on the CPU cannot: its flash backward has no derivative)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
            with sdpa_kernel(SDPBackend.MATH):  # composite ops (the flash backward has no derivative)
                out32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=ctx.scale)
            grads = torch.autograd.grad(out32, (q, k, v), dout.float(), create_graph=True)
        else:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, False, scale=ctx.scale)
        return (*(g.to(q.dtype) for g in grads), None)


def patch_embed(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, cls_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None, *, no_embed_class: bool = False, keep: Optional[Tensor] = None,
) -> Tensor:
    """Image [batch, chans, H, W] -> [prefix; patches @ W^T + b] + pos_embed [batch, tokens, dim]."""
    tokens = F.conv2d(x, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)
    return reference.add_prefix_and_position(tokens, cls_token, pos_embed, no_embed_class=no_embed_class, keep=keep)
