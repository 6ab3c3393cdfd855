"""The eager oracle of every vitkern op: plain PyTorch, readable, no tricks.

Each function computes in the dtype of its inputs, except where fp32 is what keeps low-precision
inputs finite and what every fused kernel does too (LayerNorm statistics, the softmax, and the
linear layers' fp32-accumulated GEMM and epilogue, rounded once), so that

* called on float64 tensors it is the exact oracle the kernel tests compare against, and
* called on bf16/fp16 tensors it is "eager PyTorch in the same low dtype", the yardstick of the
  ratio test (a kernel's error may be at most 2x the error of this function in that dtype).

Autograd flows through everything, so the gradients of these functions are the gradient oracle too.
Parameter names in `vit_forward` are timm's `VisionTransformer` state-dict keys.
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Tuple

import torch
from torch import Tensor

# The fc1 epilogues: exact GELU (the paper's and timm's default), tanh GELU (SigLIP, timm's
# "gelu_tanh") and QuickGELU (OpenAI CLIP, timm's "quick_gelu").
ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu")


def _stats_dtype(x: Tensor) -> torch.dtype:
    """fp64 stays fp64; every other float dtype keeps its statistics in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gelu(x: Tensor) -> Tensor:
    """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (the paper's and timm's default)."""
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: Tensor) -> Tensor:
    """tanh GELU, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (torch's approximate="tanh")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def quick_gelu(x: Tensor) -> Tensor:
    """QuickGELU, x * sigmoid(1.702 x) (OpenAI CLIP's activation)."""
    return x * torch.sigmoid(1.702 * x)


def activate(x: Tensor, activation: Optional[str]) -> Tensor:
    """x through the named epilogue activation (None: unchanged)."""
    _check_activation(activation)
    if activation is None:
        return x
    return {"gelu": gelu, "gelu_tanh": gelu_tanh, "quick_gelu": quick_gelu}[activation](x)


def patchify(x: Tensor, patch_size: Tuple[int, int]) -> Tensor:
    """Image [batch, chans, H, W] -> patches [batch, (H/ph)*(W/pw), chans*ph*pw].

    Patches are in row-major grid order and each patch is flattened as (chans, ph, pw), the same
    order as a Conv2d weight [dim, chans, ph, pw] flattened, so `patchify(x) @ w.flatten(1).T` is the
    strided convolution. H and W must be multiples of the patch size.
    """
    b, c, h, w = x.shape
    ph, pw = patch_size
    x = x.reshape(b, c, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [b, gh, gw, c, ph, pw]
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    cls_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    *,
    no_embed_class: bool = False,
    keep: Optional[Tensor] = None,
) -> Tensor:
    """Patch embedding, eq. (1) of the paper: [prefix; patches(x) E + b] + E_pos.

    x: [batch, chans, H, W]; weight: [dim, chans, ph, pw] (the Conv2d weight); bias: [dim];
    cls_token: the prefix tokens [1, prefix, dim] (class, distillation and register tokens, in
    that order) prepended as tokens 0 .. prefix - 1; pos_embed: [1, prefix + patches, dim] added to
    every token (timm's default), or with `no_embed_class` [1, patches, dim] added to the patch
    tokens only (timm's no_embed_class: DeiT III, DINOv2 with registers). keep: PatchDropout's
    kept patches [batch, kept] (int64 indices into each image's patches), or None: the result's
    patch tokens are then tokens[:, prefix:].gather(1, keep), after the position embedding.
    Returns [batch, tokens, dim] in x's dtype, tokens = prefix + (kept or patches).
    """
    dim, _, ph, pw = weight.shape
    tokens = patchify(x, (ph, pw)) @ weight.reshape(dim, -1).t()
    if bias is not None:
        tokens = tokens + bias
    return add_prefix_and_position(tokens, cls_token, pos_embed, no_embed_class=no_embed_class, keep=keep)


def patch_embed_packed(
    patches: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    grids: List[Tuple[int, int]],
    cls_token: Optional[Tensor] = None,
    pos_embed=None,
    *,
    ar_preserving: bool = False,
) -> Tensor:
    """Patch embedding of a packed (NaFlex) batch: pre-extracted patches [total_patches, features]
    of images with per-image grids (row-major, back to back) -> tokens [total_tokens, dim], each
    image's [prefix; patches @ weight^T + bias + its resampled position embedding].

    weight: [dim, features] in the patches' layout; cls_token: [1, prefix, dim] or None (prefix
    tokens get no position embedding, as in timm's NaFlexEmbeds); pos_embed: None, a learned table
    [1, h, w, dim] or factorized (pos_embed_y [1, h, dim], pos_embed_x [1, w, dim]), resampled per
    grid by `vitkern.pos_embed.naflex_pos_embed`. total_tokens = sum(prefix + grid_h * grid_w).
    """
    tokens = patches @ weight.t()
    if bias is not None:
        tokens = tokens + bias
    return packed_epilogue(tokens, grids, cls_token, pos_embed, ar_preserving=ar_preserving)


def packed_epilogue(tokens: Tensor, grids: List[Tuple[int, int]], cls_token: Optional[Tensor], pos_embed,
                    *, ar_preserving: bool = False) -> Tensor:
    """The packed patch embedding's epilogue: projected patches [total_patches, dim] -> tokens
    [total_tokens, dim], per image its resampled position embedding, then its prefix tokens in front
    (arguments as in `patch_embed_packed`)."""
    from vitkern.pos_embed import naflex_pos_embed

    out, start, cache = [], 0, {}
    for gh, gw in grids:
        n = gh * gw
        x = tokens[start:start + n]
        start += n
        if pos_embed is not None:
            if (gh, gw) not in cache:  # images of one size share one resampling
                cache[(gh, gw)] = naflex_pos_embed(pos_embed, (gh, gw), ar_preserving=ar_preserving)
            x = x + cache[(gh, gw)].to(x.dtype)
        if cls_token is not None:
            x = torch.cat([cls_token[0].to(x.dtype), x])
        out.append(x)
    return torch.cat(out)


def add_prefix_and_position(
    tokens: Tensor,
    cls_token: Optional[Tensor],
    pos_embed: Optional[Tensor],
    *,
    no_embed_class: bool = False,
    keep: Optional[Tensor] = None,
) -> Tensor:
    """The patch embedding's epilogue (timm's `_pos_embed`, then PatchDropout's gather): embedded
    patches [batch, patches, dim] -> [batch, prefix + (kept or patches), dim], the arguments as in
    `patch_embed`. The prefix tokens are cast to the tokens' dtype; the position embedding is added
    with torch's type promotion (an fp32 pos_embed on bf16 tokens, as under torch.autocast, gives
    fp32 tokens, as in timm)."""
    if no_embed_class and pos_embed is not None:
        tokens = tokens + pos_embed
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    if not no_embed_class and pos_embed is not None:
        tokens = tokens + pos_embed
    if keep is not None:
        tokens = keep_patch_tokens(tokens, keep, cls_token.shape[1] if cls_token is not None else 0)
    return tokens


def keep_patch_tokens(tokens: Tensor, keep: Tensor, num_prefix_tokens: int) -> Tensor:
    """PatchDropout's gather (timm's): tokens [batch, prefix + patches, dim] -> [batch, prefix +
    kept, dim], the prefix rows, then patch row keep[b, j] of each image b (keep: [batch, kept] int64)."""
    patches = tokens[:, num_prefix_tokens:].gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :num_prefix_tokens], patches], dim=1) if num_prefix_tokens else patches


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim: (x - mean) * rstd * weight + bias, statistics in fp32 (fp64 for fp64)."""
    xf = x.to(_stats_dtype(x))
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def layer_norm_stats(x: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """Per-row (mean, rstd) of x [..., dim] in fp32 (fp64 for fp64): what fused kernels save for backward."""
    xf = x.to(_stats_dtype(x))
    mean = xf.mean(dim=-1)
    var = (xf - mean.unsqueeze(-1)).square().mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def _check_activation(activation: Optional[str]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
) -> Tensor:
    """y = residual + scale * act(x @ weight.T + bias).

    x: [..., in_features]; weight: [out_features, in_features]; bias: [out_features];
    activation: one of ACTIVATIONS; scale: [out_features], the per-channel LayerScale gamma
    multiplying the branch before the skip connection; residual: [..., out_features] (the block's
    skip connection); all in one dtype. Returns [..., out_features] in x's dtype.

    fp16/bf16 operands are multiplied and the epilogue (bias, GELU, residual) is computed in fp32,
    rounding once at the end, as the fused kernels do: a pre-activation past fp16's range (65504)
    cancelled by the residual, or a huge negative one that GELU takes to 0, stays finite instead of
    becoming inf or NaN in an fp16 intermediate. (The products of fp16/bf16 values are exact in
    fp32, so the upcast GEMM is the fp32-accumulated one.)
    """
    _check_activation(activation)
    acc_dtype = _stats_dtype(x)
    y = x.to(acc_dtype) @ weight.to(acc_dtype).t()
    if bias is not None:
        y = y + bias.to(acc_dtype)
    y = activate(y, activation)
    if scale is not None:
        y = y * scale.to(acc_dtype)
    if residual is not None:
        y = y + residual.to(acc_dtype)
    return y.to(x.dtype)


def ln_linear(
    x: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    eps: float = 1e-6,
    activation: Optional[str] = None,
) -> Tensor:
    """LayerNorm then Linear (then an activation of ACTIVATIONS): LN1 + QKV and LN2 + fc1 of a block.

    x: [..., dim]; ln_weight, ln_bias: [dim]; weight: [out_features, dim]; bias: [out_features].
    """
    return linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, activation=activation)


def attention(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Optional[float] = None,
    return_probs: bool = False,
    q_norm: Optional[Tuple[Optional[Tensor], Optional[Tensor], float]] = None,
    k_norm: Optional[Tuple[Optional[Tensor], Optional[Tensor], float]] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    """Multi-head self-attention from the packed QKV projection, with an explicit softmax.

    qkv: [batch, tokens, 3 * dim] in timm's order (3, heads, head_dim) along the last dim.
    q_norm, k_norm: QK-norm (timm's qk_norm=True), each None or (weight [head_dim] or None,
    bias [head_dim] or None, eps): a LayerNorm over head_dim of every head's q (k) row, shared by
    the heads, applied before the scores (statistics in fp32, result in qkv's dtype, as timm's
    LayerNorm on [batch, heads, tokens, head_dim]).
    Returns out [batch, tokens, dim] (heads concatenated, ready for the output projection), and
    with `return_probs` also the probabilities [batch, heads, tokens, tokens] in fp32 (fp64 for fp64).
    Packed sequences (NaViT/NaFlex): with cu_seqlens (int32 [num_seqs + 1] offsets) qkv is
    [total_tokens, 3 * dim] and each sequence attends only to itself; returns [total_tokens, dim]
    (with `return_probs`, also a list of [heads, len_i, len_i] per sequence). max_seqlen is not
    needed here (the kernels size their grid with it).

    For fp16/bf16 inputs the scores q k^T and the softmax are computed in fp32 (as
    F.scaled_dot_product_attention does): scores rounded to 16 bits would carry an absolute error
    of |logit| * 2^-8 (bf16) into the exponent, and fp16 scores overflow past 65504. Only the
    probabilities are rounded to the input dtype for the P v product, like the fused kernels do,
    and that product accumulates in fp32 and rounds once; its backward, dP = dO v^T and
    dv = P^T dO, runs in fp32 as the kernels' does (an fp16 dP overflowed to inf once
    |dO| |v| sqrt(head_dim) passed 65504, though dS = P (dP - rowsum(P dP)) is small there).
    """
    if cu_seqlens is not None:
        # Packed sequences: each one is its own batch of one (block-diagonal attention, no padding).
        outs = [attention(qkv[s:e].unsqueeze(0), num_heads, scale=scale, return_probs=return_probs,
                          q_norm=q_norm, k_norm=k_norm) for s, e in _bounds(cu_seqlens)]
        if not return_probs:
            return torch.cat([o[0] for o in outs], dim=0)
        return torch.cat([o[0][0] for o in outs], dim=0), [o[1][0] for o in outs]
    b, t, three_dim = qkv.shape
    dim = three_dim // 3
    head_dim = dim // num_heads
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = qkv.reshape(b, t, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [b, h, t, d]
    if q_norm is not None:
        q = layer_norm(q, *q_norm)
    if k_norm is not None:
        k = layer_norm(k, *k_norm)
    stats = _stats_dtype(qkv)
    scores = (q.to(stats) @ k.to(stats).transpose(-2, -1)) * scale
    probs = scores.softmax(dim=-1)
    out = (_rounded_to(probs, qkv.dtype) @ v.to(stats)).to(qkv.dtype)  # [b, h, t, d]
    out = out.transpose(1, 2).reshape(b, t, dim)
    return (out, probs) if return_probs else out


def _bounds(cu_seqlens: Tensor) -> List[Tuple[int, int]]:
    """[(start, end)] of each packed sequence from its int32 offsets [num_seqs + 1]."""
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def _rounded_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x's values rounded to `dtype` (kept in x's dtype), with the gradient of the identity: the
    rounding is what the kernels feed their P v dot, while the gradient stays in x's precision
    (the fp32 dP the kernels compute). The correction is exact: x and its rounding are within a
    factor of two of each other (or the rounding is 0), so their difference is an fp32 number."""
    if dtype == x.dtype:
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def latent_attention(q: Tensor, kv: Tensor, num_heads: int, *, scale: Optional[float] = None) -> Tensor:
    """Attention of a few latent queries over tokens (the attention-pool head, global_pool='map').

    q: [batch, queries, dim] (the projected latents); kv: [batch, tokens, 2 * dim] in timm's order
    (2, heads, head_dim) along the last dim. Scores, softmax and the P v product's accumulation and
    backward in fp32 (fp64 for fp64) as in `attention`. Returns [batch, queries, dim], heads concatenated.
    """
    b, n, dim = q.shape
    t = kv.shape[1]
    head_dim = dim // num_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qh = q.reshape(b, n, num_heads, head_dim).transpose(1, 2)  # [b, h, n, d]
    k, v = kv.reshape(b, t, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [b, h, t, d]
    stats = _stats_dtype(q)
    probs = ((qh.to(stats) @ k.to(stats).transpose(-2, -1)) * scale).softmax(dim=-1)
    out = (_rounded_to(probs, q.dtype) @ v.to(stats)).to(q.dtype)
    return out.transpose(1, 2).reshape(b, n, dim)


def block(
    x: Tensor,
    params: Mapping[str, Tensor],
    num_heads: int,
    *,
    eps: float = 1e-6,
    prefix: str = "",
    activation: str = "gelu",
) -> Tensor:
    """One pre-norm transformer block, eqs. (2)-(3): z' = z + ls1 * proj(MSA(LN1 z)); z = z' + ls2 * MLP(LN2 z').

    x: [batch, tokens, dim]; params: timm's names under `prefix` (e.g. "blocks.0."), with the
    optional LayerScale `ls1.gamma`, `ls2.gamma` and QK-norm `attn.q_norm.*`, `attn.k_norm.*`;
    activation: the MLP's (one of ACTIVATIONS).
    """
    p = lambda name: params.get(prefix + name)  # noqa: E731
    qkv = ln_linear(x, p("norm1.weight"), p("norm1.bias"), p("attn.qkv.weight"), p("attn.qkv.bias"), eps=eps)
    qn = (p("attn.q_norm.weight"), p("attn.q_norm.bias"), eps) if p("attn.q_norm.weight") is not None else None
    kn = (p("attn.k_norm.weight"), p("attn.k_norm.bias"), eps) if p("attn.k_norm.weight") is not None else None
    a = attention(qkv, num_heads, q_norm=qn, k_norm=kn)
    x = linear(a, p("attn.proj.weight"), p("attn.proj.bias"), residual=x, scale=p("ls1.gamma"))
    h = ln_linear(x, p("norm2.weight"), p("norm2.bias"), p("mlp.fc1.weight"), p("mlp.fc1.bias"), eps=eps,
                  activation=activation)
    return linear(h, p("mlp.fc2.weight"), p("mlp.fc2.bias"), residual=x, scale=p("ls2.gamma"))


def vit_forward(
    x: Tensor,
    params: Mapping[str, Tensor],
    *,
    num_heads: int,
    eps: float = 1e-6,
    global_pool: str = "token",
    pre_logits: bool = False,
) -> Tensor:
    """The whole ViT forward (eval mode, eq. 1-4) from a timm-style state dict.

    x: [batch, chans, H, W] at the checkpoint's resolution; params: timm's `VisionTransformer`
    state-dict keys (`patch_embed.proj.*`, `cls_token`, `pos_embed`, `blocks.N.*`, `norm.*` or
    `fc_norm.*`, optional `pre_logits.fc.*` (Linear+tanh) and `head.*`).
    Returns logits [batch, num_classes] (or the pooled features with `pre_logits=True`;
    with global_pool='' the normalized tokens [batch, tokens, dim]).
    """
    z = patch_embed(x, params["patch_embed.proj.weight"], params.get("patch_embed.proj.bias"),
                    params.get("cls_token"), params.get("pos_embed"))
    depth = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("blocks."))
    for i in range(depth):
        z = block(z, params, num_heads, eps=eps, prefix=f"blocks.{i}.")
    if "norm.weight" in params:
        z = layer_norm(z, params["norm.weight"], params["norm.bias"], eps)
    num_prefix = 1 if "cls_token" in params else 0
    if global_pool == "token":
        y = z[:, 0]
    elif global_pool == "avg":
        y = z[:, num_prefix:].mean(dim=1)
    else:
        y = z
    if "fc_norm.weight" in params:
        y = layer_norm(y, params["fc_norm.weight"], params["fc_norm.bias"], eps)
    if "pre_logits.fc.weight" in params:
        y = torch.tanh(linear(y, params["pre_logits.fc.weight"], params["pre_logits.fc.bias"]))
    if pre_logits or "head.weight" not in params:
        return y
    return linear(y, params["head.weight"], params.get("head.bias"))
