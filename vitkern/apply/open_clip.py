"""vitkern's ops in open_clip's `VisionTransformer` (`model.visual` of its ViT CLIP models: ViT-B-32,
ViT-B-16, ViT-L-14, ...).

What is patched, per instance:

* the model's `_embeds` (conv1 + class embedding + positional embedding, then patch dropout and
  ln_pre): the first three as one `ops.patch_embed`; `forward`, `forward_intermediates` and
  `encode_image` all go through `_embeds`, so all of them use it. PatchDropout and ln_pre are then
  called as modules (ln_pre on `ops.layer_norm`).
* each `ResidualAttentionBlock`: ln_1 + the packed in-projection of its `nn.MultiheadAttention`
  (in_proj_weight is already [3 dim, dim] in q, k, v order, heads contiguous: the layout the attention
  op reads, no copy) as `ln_linear`, the attention, out_proj + LayerScale + residual as one `linear`
  epilogue; ln_2 + c_fc + GELU/QuickGELU as `ln_linear`, c_proj + LayerScale + residual as `linear`.
* the MLP (`nn.Sequential(c_fc, gelu, c_proj)`), every LayerNorm (ln_pre, ln_post, the blocks') and
  Linear get their own fused forwards. The final `pooled @ proj` is a bare Parameter product in
  open_clip's code and stays there.

Per call, a block half falls back to open_clip's code (its sub-modules called as modules) when it gets
an attn_mask, separate k_x/v_x (cross attention), attention dropout is active in training, or a
sub-module is not plain (a hook, a swap, PEFT's LoRA MultiheadAttention).

Left alone, and named in the report: `CustomResidualAttentionBlock` (open_clip's qk_norm,
scaled_cosine_attn, scale_heads, scale_attn, scale_fc options: cosine attention with a learned
logit scale and the extra norms are not vitkern's attention), attentional poolers (CoCa), and
batch_first=False transformers.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from vitkern import fusion, ops
from vitkern.apply._core import (
    FOREIGN, ApplyReport, Patcher, activation_name, backend_of, dtype_ok, fused_forward, inactive_dropout,
    layer_norm_forward, linear_call, linear_forward, original, own_forward, plain, plain_identity, plain_layer_norm,
    plain_linear, qualified,
)

LIBRARY = "open_clip"


_CLASSES: dict = {}  # filled eagerly by find(); read under torch.compile (which cannot build namespaces)


def _oc() -> Optional[SimpleNamespace]:
    ns = _CLASSES.get("open_clip")
    if ns is not None:
        return ns
    m = sys.modules.get("open_clip.transformer")
    if m is None:
        return None
    ns = _CLASSES["open_clip"] = SimpleNamespace(
        VisionTransformer=m.VisionTransformer, ResidualAttentionBlock=m.ResidualAttentionBlock, LayerScale=m.LayerScale,
        CustomResidualAttentionBlock=m.CustomResidualAttentionBlock, Attention=m.Attention)
    return ns


def find(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    oc = _oc()
    if oc is None:
        return []
    found: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(f == "" or name.startswith(f + ".") for f, _ in found):
            continue
        if isinstance(module, oc.VisionTransformer):
            found.append((name, module))
    return found


def _gamma(ls: nn.Module, oc) -> Tuple[bool, Optional[Tensor]]:
    if plain_identity(ls):
        return True, None
    if plain(ls, (oc.LayerScale,)):
        return True, ls.gamma
    return False, None


def _mha_plan(attn: nn.Module):
    """(in-proj call, out_proj call, q_norm, k_norm, scale) of a plain self-attention
    nn.MultiheadAttention, or None."""
    if not (plain(attn, (nn.MultiheadAttention,)) and attn._qkv_same_embed_dim and attn.batch_first
            and attn.in_proj_weight is not None and attn.bias_k is None and attn.bias_v is None
            and not attn.add_zero_attn and (attn.dropout == 0.0 or not attn.training)):
        return None
    out = linear_call(attn.out_proj)
    if out is None:
        return None
    return fusion.LinearCall(attn.in_proj_weight, attn.in_proj_bias, ()), out, None, None, None


def _qk_norm(norm: nn.Module):
    if plain_identity(norm):
        return True, None
    if plain_layer_norm(norm):
        return True, (norm.weight, norm.bias, norm.eps)
    return False, None


def _custom_attention_plan(attn: nn.Module, oc):
    """The same for open_clip's own Attention (CustomResidualAttentionBlock) without scaled-cosine
    attention or per-head scales: QK-norm LayerNorms ride in the attention op."""
    if not plain(attn, (oc.Attention,)) or attn.logit_scale is not None or attn.head_scale is not None:
        return None
    if not (inactive_dropout(attn.attn_drop, attn.training) and inactive_dropout(attn.out_drop, attn.training)):
        return None
    if not (plain_identity(attn.ln_inner) or plain_layer_norm(attn.ln_inner)):
        return None
    q_ok, q_norm = _qk_norm(attn.ln_q)
    k_ok, k_norm = _qk_norm(attn.ln_k)
    out = linear_call(attn.out_proj)
    if not (q_ok and k_ok) or out is None:
        return None
    scale = attn.scale if not attn.use_fsdpa else attn.head_dim ** -0.5
    return fusion.LinearCall(attn.in_proj_weight, attn.in_proj_bias, ()), out, q_norm, k_norm, scale


def _mlp_plan(mlp: nn.Module):
    """(c_fc call, activation, c_proj call, inner norm or None) of a plain Sequential(c_fc, gelu,
    [ln,] c_proj), or None."""
    if not plain(mlp, (nn.Sequential,)) or len(mlp) not in (3, 4):
        return None
    c_fc, act, c_proj = getattr(mlp, "c_fc", None), getattr(mlp, "gelu", None), getattr(mlp, "c_proj", None)
    norm = getattr(mlp, "ln", None)
    if len(mlp) == 4 and not (plain_identity(norm) or plain_layer_norm(norm)):
        return None
    fc1, fc2, name = linear_call(c_fc), linear_call(c_proj), activation_name(act)
    if fc1 is None or fc2 is None or name is None:
        return None
    return fc1, name, fc2, None if plain_identity(norm) else norm


@fused_forward
def block_forward(self: nn.Module, q_x: Tensor, *args: Optional[Tensor], **kwargs: Optional[Tensor]) -> Tensor:
    """ResidualAttentionBlock(q_x, k_x=None, v_x=None, attn_mask=None) and CustomResidualAttentionBlock(x,
    attn_mask=None): x + ls_1(attn(ln_1(x))), x + ls_2(mlp(ln_2(x))) as fused ops."""
    oc = _oc()
    custom = type(self) is oc.CustomResidualAttentionBlock
    if any(a is not None for a in args) or any(v is not None for v in kwargs.values()) or hasattr(self, "ln_1_kv"):
        return original(self)(q_x, *args, **kwargs)  # cross attention or a mask: open_clip's code
    backend = backend_of(self)
    global_hooks = fusion.global_hooks_registered()
    x = q_x
    # Attention half.
    plan = None
    if not global_hooks and plain_layer_norm(self.ln_1):
        plan = _custom_attention_plan(self.attn, oc) if custom else _mha_plan(self.attn)
    ln_attn = getattr(self, "ln_attn", None)
    ok, gamma = _gamma(self.ls_1, oc)
    if plan is not None and dtype_ok(x, self.ln_1.weight, plan[0].weight):
        in_proj, out_proj, q_norm, k_norm, scale = plan
        qkv = fusion.run_ln_linear(self.ln_1, in_proj, x, backend=backend)
        a = ops.attention(qkv, self.attn.num_heads, scale=scale, q_norm=q_norm, k_norm=k_norm, backend=backend)
        if custom and not plain_identity(self.attn.ln_inner):
            a = self.attn.ln_inner(a)
        if ok and plain_identity(ln_attn):
            x = fusion.run_linear(out_proj, a, residual=x, scale=gamma, backend=backend)
        else:
            y = fusion.run_linear(out_proj, a, backend=backend)
            x = x + self.ls_1(y if plain_identity(ln_attn) else ln_attn(y))
    elif custom:
        x = x + self.ls_1(self.ln_attn(self.attn(self.ln_1(x))))
    else:
        x = x + self.ls_1(self.attention(q_x=self.ln_1(x)))
    # MLP half.
    plan = None if global_hooks or not plain_layer_norm(self.ln_2) else _mlp_plan(self.mlp)
    ok, gamma = _gamma(self.ls_2, oc)
    if plan is not None and dtype_ok(x, self.ln_2.weight, plan[0].weight):
        fc1, act, fc2, norm = plan
        h = fusion.run_ln_linear(self.ln_2, fc1, x, activation=act, backend=backend)
        if norm is not None:
            h = norm(h)
        if ok:
            return fusion.run_linear(fc2, h, residual=x, scale=gamma, backend=backend)
        return x + self.ls_2(fusion.run_linear(fc2, h, backend=backend))
    return x + self.ls_2(self.mlp(self.ln_2(x)))


@fused_forward
def mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    """open_clip's MLP Sequential(c_fc, gelu, [ln,] c_proj): c_fc + activation as one `linear`, then c_proj."""
    plan = None if fusion.global_hooks_registered() else _mlp_plan(self)
    if plan is None or not dtype_ok(x, plan[0].weight):
        return original(self)(x)
    fc1, act, fc2, norm = plan
    backend = backend_of(self)
    h = fusion.run_linear(fc1, x, activation=act, backend=backend)
    return fusion.run_linear(fc2, h if norm is None else norm(h), backend=backend)


@fused_forward(method="_embeds")
def embeds_forward(self: nn.Module, x: Tensor) -> Tensor:
    """VisionTransformer._embeds: conv1 + class embedding + positional embedding as `ops.patch_embed`,
    then patch dropout and ln_pre as open_clip calls them."""
    conv = self.conv1
    if not (fusion.is_plain_patch_conv(conv) and own_forward(conv) and x.dim() == 4 and x.shape[1] == conv.in_channels
            and dtype_ok(x, conv.weight) and not fusion.global_hooks_registered()):
        return original(self, "_embeds")(x)
    # open_clip casts the class and positional embeddings to the patch tokens' dtype: the weight's, or
    # autocast's (conv2d is on autocast's low-precision list).
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else conv.weight.dtype
    cls = self.class_embedding.view(1, 1, -1).to(dtype)
    pos = self.positional_embedding.unsqueeze(0).to(dtype)
    tokens = ops.patch_embed(x, conv.weight, conv.bias, cls, pos, backend=backend_of(self))
    tokens = self.patch_dropout(tokens)
    return self.ln_pre(tokens)


def _block_why(block: nn.Module, oc) -> Tuple[List[str], List[str]]:
    """Why the attention half / MLP half of a block cannot fuse (empty lists: they can)."""
    attn_why, mlp_why = [], []
    attn = block.attn
    if type(block) is oc.CustomResidualAttentionBlock:
        if getattr(attn, "logit_scale", None) is not None:
            attn_why.append("scaled_cosine_attn (cosine attention with a learned logit scale): not vitkern's attention")
        if getattr(attn, "head_scale", None) is not None:
            attn_why.append("scale_heads (per-head output scales): not in vitkern's attention")
        for name in ("ln_q", "ln_k", "ln_inner"):
            norm = getattr(attn, name, None)
            if norm is not None and not isinstance(norm, nn.Identity) and not plain_layer_norm(norm):
                attn_why.append(f"attn.{name} is {type(norm).__name__}, not a LayerNorm")
    elif not isinstance(attn, nn.MultiheadAttention):
        attn_why.append(f"attn is {type(attn).__name__}, not torch.nn.MultiheadAttention")
    elif not attn.batch_first:
        attn_why.append("batch_first=False (sequence-first layout)")
    mlp = block.mlp
    if not isinstance(mlp, nn.Sequential) or getattr(mlp, "c_fc", None) is None or getattr(mlp, "c_proj", None) is None:
        mlp_why.append(f"mlp is {type(mlp).__name__}, not Sequential(c_fc, gelu, c_proj)")
    elif activation_name(getattr(mlp, "gelu", None)) is None:
        act = type(getattr(mlp, "gelu", None)).__name__
        mlp_why.append(f"activation {act}: vitkern fuses GELU, tanh GELU and QuickGELU")
    for name, why in (("ln_1", attn_why), ("ln_2", mlp_why)):
        if not plain_layer_norm(getattr(block, name)):
            why.append(f"{name} is {type(getattr(block, name)).__name__}, not LayerNorm")
    return attn_why, mlp_why


def _options(block: nn.Module, oc) -> List[str]:
    opts = []
    if not isinstance(block.ls_1, nn.Identity):
        opts.append("LayerScale")
    attn = block.attn
    if type(block) is oc.CustomResidualAttentionBlock:
        if not isinstance(attn.ln_q, nn.Identity):
            opts.append("QK-norm")
        if not isinstance(attn.ln_inner, nn.Identity):
            opts.append("scale_attn_inner")
        if not isinstance(block.ln_attn, nn.Identity):
            opts.append("scale_attn")
        if not isinstance(getattr(block.mlp, "ln", nn.Identity()), nn.Identity):
            opts.append("scale_fc")
    return opts


def apply_to(vit: nn.Module, prefix: str, patcher: Patcher, report: ApplyReport) -> None:
    oc = _oc()
    if not fusion.is_plain_patch_conv(vit.conv1):
        report.leave(qualified(prefix, "conv1"), "not a patch-cutting Conv2d")
    elif patcher.patch(vit, embeds_forward, "_embeds"):
        report.fuse(qualified(prefix, "_embeds"), "conv1 + class + positional embedding in one ops.patch_embed")
    else:
        report.leave(qualified(prefix, "_embeds"), FOREIGN.replace("forward", "_embeds"))
    for name in ("ln_pre", "ln_post"):
        m = getattr(vit, name)
        if plain_layer_norm(m) and patcher.patch(m, layer_norm_forward):
            report.fuse(qualified(prefix, name), "ops.layer_norm")
    if vit.proj is not None:
        report.leave(qualified(prefix, "proj"), "pooled @ proj, a bare Parameter product in open_clip's forward: "
                                                "left to torch")
    if getattr(vit, "attn_pool", None) is not None:
        report.leave(qualified(prefix, "attn_pool"), "attentional pooler (CoCa): left on open_clip's code")
    transformer = vit.transformer
    if not getattr(transformer, "batch_first", True):
        report.leave(qualified(prefix, "transformer"), "batch_first=False (sequence-first blocks)")
        return
    for i, block in enumerate(transformer.resblocks):
        bq = qualified(prefix, f"transformer.resblocks.{i}")
        if type(block) not in (oc.ResidualAttentionBlock, oc.CustomResidualAttentionBlock):
            report.leave(bq, f"{type(block).__name__}: not open_clip's ResidualAttentionBlock")
            continue
        attn_why, mlp_why = _block_why(block, oc)
        if attn_why:
            report.leave(qualified(bq, "attn"), "; ".join(attn_why) + " -> the attention half runs open_clip's code")
        if mlp_why:
            report.leave(qualified(bq, "mlp"), "; ".join(mlp_why) + " -> the MLP half runs open_clip's code")
        if not patcher.patch(block, block_forward):
            report.leave(bq, FOREIGN)
            continue
        if isinstance(block.mlp, nn.Sequential):
            patcher.patch(block.mlp, mlp_forward)
        for name, m in block.named_modules(prefix=bq):
            if isinstance(m, nn.MultiheadAttention) or ".attn.out_proj" in name:
                continue  # MultiheadAttention reads its out_proj's weight itself
            if plain_layer_norm(m):
                patcher.patch(m, layer_norm_forward)
            elif plain_linear(m):
                patcher.patch(m, linear_forward)
        parts = []
        opts = _options(block, oc)
        if not attn_why:
            parts.append("ln_1+in_proj ln_linear, attention, out_proj+residual linear")
        if not mlp_why:
            parts.append(f"ln_2+c_fc+{activation_name(block.mlp.gelu)} ln_linear, c_proj+residual linear")
        if parts:
            report.fuse(bq, "; ".join(parts) + (f" ({', '.join(opts)})" if opts else ""))
