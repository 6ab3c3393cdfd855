"""vitkern's ops in timm's own `VisionTransformer` (and `VisionTransformerDistilled`) instances.

What is patched (per instance, see vitkern.apply._core), from the top:

* `patch_embed` (timm's PatchEmbed with a patch-cutting Conv2d): the projection runs on `ops.patch_embed`
  (padding, size checks, NHWC output for dynamic_img_size, and its norm stay timm's). The class,
  distillation and register tokens and the position embedding are added by timm's own `_pos_embed`,
  which timm calls separately from `patch_embed` (`forward_features`, `forward_intermediates`, and
  code outside the model), and vitkern patches modules, not timm's model methods: that costs one
  extra read and write of the [batch, tokens, dim] tokens (a cat and an add) against the fully
  fused op of vitkern's own ViT, about 1% of one block's memory traffic.
* each `Block`: LN1 + QKV as `ln_linear`, the attention (QK-norm inside the op), proj + LayerScale +
  residual as one `linear` epilogue; LN2 + fc1 + activation (GELU, tanh GELU, QuickGELU) as
  `ln_linear`, fc2 + LayerScale + residual as `linear`. `attn.norm` (scale_attn_norm) and `mlp.norm`
  (scale_mlp_norm) run as `layer_norm` between them. PEFT LoRA linears stay fused (vitkern.fusion).
* `Attention`, `Mlp`, every LayerNorm and Linear inside: their own fused forwards, so a half that
  cannot fuse across modules (a hook on norm1, say) still runs its pieces on vitkern's ops.
* `norm_pre`, `norm`, `fc_norm`, `head`, `head_dist`, and `attn_pool`'s linears, norm and MLP
  (its single-query attention stays timm's).

Per call, a half falls back to timm's module calls (`x + drop_path(ls(attn(norm1(x))))`), each
sub-module called as a module (hooks fire, wrappers see their inputs), whenever one of its sub-modules
is not plain (a hook, a swap, a parametrization), a global module hook is set, the block gets an
`attn_mask` or `is_causal`, or attention dropout is active in training. Proj/path dropout and an
active DropPath keep the GEMMs fused and run as timm's modules on the branch.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import fusion, ops
from vitkern.apply._core import (
    FOREIGN, ApplyReport, Patcher, activation_name, backend_of, dtype_ok, fused_forward, inactive_dropout,
    layer_norm_forward, linear_call, linear_forward, ln_args, original, own_forward, plain, plain_identity,
    plain_layer_norm, plain_linear, qualified,
)

LIBRARY = "timm"

# timm model classes that are vision transformers vitkern does not run, with why.
UNSUPPORTED = {
    "Eva": "rotary position embeddings (RoPE) and SwiGLU MLPs (timm's Eva): vitkern has neither",
    "Beit": "relative position bias in every attention (timm's Beit): vitkern's attention has no bias",
    "VisionTransformerRelPos": "relative position bias (timm's VisionTransformerRelPos)",
    "VisionTransformerSAM": "windowed attention with relative positions (timm's VisionTransformerSAM)",
    "NaFlexVit": "NaFlex variable-resolution embedding and masks (timm's NaFlexVit)",
    "Xcit": "cross-covariance attention (timm's Xcit)",
    "Cait": "talking-heads attention and class-attention blocks (timm's Cait)",
}


_CLASSES: dict = {}  # filled eagerly by find(); read under torch.compile (which cannot build namespaces)


def _timm() -> Optional[SimpleNamespace]:
    ns = _CLASSES.get("timm")
    if ns is not None:
        return ns
    vt = sys.modules.get("timm.models.vision_transformer")
    if vt is None:
        return None
    from timm.layers.attention import Attention
    from timm.layers.drop import DropPath
    from timm.layers.layer_scale import LayerScale
    from timm.layers.mlp import Mlp
    from timm.layers.patch_embed import PatchEmbed

    attention_pool = sys.modules.get("timm.layers.attention_pool")
    ns = _CLASSES["timm"] = SimpleNamespace(
        VisionTransformer=vt.VisionTransformer, Block=vt.Block, Attention=Attention, Mlp=Mlp, LayerScale=LayerScale,
        DropPath=DropPath, PatchEmbed=PatchEmbed,
        AttentionPoolLatent=getattr(attention_pool, "AttentionPoolLatent", None),
    )
    return ns


def find(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """timm VisionTransformers (and the known unsupported ViTs) in `model`, outermost first."""
    t = _timm()
    if t is None:
        return []
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") or f == "" for f, _ in found):
            continue
        if isinstance(module, t.VisionTransformer) or (type(module).__module__.startswith("timm.")
                                                        and type(module).__name__ in UNSUPPORTED):
            found.append((name, module))
    return found


# --------------------------------------------------------------------------------------------
# Per-call plain checks


def _gamma(ls: nn.Module, t: SimpleNamespace) -> Tuple[bool, Optional[Tensor]]:
    """(fusable, gamma): a plain Identity (no scale) or timm LayerScale (its gamma)."""
    if plain_identity(ls):
        return True, None
    if plain(ls, (t.LayerScale,)):
        return True, ls.gamma
    return False, None


def _drop_path_inactive(module: nn.Module, t: SimpleNamespace) -> bool:
    if plain_identity(module):
        return True
    return plain(module, (t.DropPath,)) and (module.drop_prob == 0.0 or not module.training)


def _qk_norm_arg(norm: nn.Module):
    """(ok, ops.attention's norm argument) for a plain Identity (None) or LayerNorm."""
    if plain_identity(norm):
        return True, None
    if plain_layer_norm(norm):
        return True, ln_args(norm)
    return False, None


def _attention_plan(attn: nn.Module, t: SimpleNamespace):
    """The fused call of a timm Attention, or None: (qkv call, proj call, scale, q_norm, k_norm)."""
    if not plain(attn, (t.Attention,)) or getattr(attn, "gate", None) is not None:
        return None
    if not inactive_dropout(attn.attn_drop, attn.training):
        return None
    if not (plain_identity(attn.norm) or plain_layer_norm(attn.norm)):
        return None
    q_ok, q_norm = _qk_norm_arg(attn.q_norm)
    k_ok, k_norm = _qk_norm_arg(attn.k_norm)
    qkv, proj = linear_call(attn.qkv), linear_call(attn.proj)
    if not (q_ok and k_ok) or qkv is None or proj is None:
        return None
    # SDPA (fused_attn) uses head_dim ** -0.5 whatever attn.scale says; the manual path uses attn.scale.
    scale = attn.head_dim ** -0.5 if getattr(attn, "fused_attn", False) else attn.scale
    return qkv, proj, scale, q_norm, k_norm


def _attention_core(attn: nn.Module, qkv: Tensor, plan, backend: str) -> Tensor:
    _, _, scale, q_norm, k_norm = plan
    a = ops.attention(qkv, attn.num_heads, scale=scale, q_norm=q_norm, k_norm=k_norm, backend=backend)
    if not plain_identity(attn.norm):
        a = attn.norm(a)  # scale_attn_norm: a LayerNorm (its own fused forward)
    return a


def _mlp_plan(mlp: nn.Module, t: SimpleNamespace):
    """(fc1 call, activation, fc2 call) of a plain timm Mlp, or None."""
    if not plain(mlp, (t.Mlp,)):
        return None
    act = activation_name(mlp.act)
    fc1, fc2 = linear_call(mlp.fc1), linear_call(mlp.fc2)
    if act is None or fc1 is None or fc2 is None:
        return None
    if not (plain_identity(mlp.norm) or plain_layer_norm(mlp.norm)):
        return None
    return fc1, act, fc2


# --------------------------------------------------------------------------------------------
# Fused forwards


@fused_forward
def block_forward(self: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """timm Block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each half as fused ops."""
    if attn_mask is not None or is_causal:
        return original(self)(x, attn_mask=attn_mask, is_causal=is_causal)
    t = _timm()
    backend = backend_of(self)
    global_hooks = fusion.global_hooks_registered()
    x = _attention_half(self, x, t, backend, global_hooks)
    return _mlp_half(self, x, t, backend, global_hooks)


def _branch(x: Tensor, h: Tensor, call, dropout: nn.Module, ls: nn.Module, drop_path: nn.Module, t,
            backend: str) -> Tensor:
    """x + drop_path(ls(dropout(linear(h)))): the residual, LayerScale and linear in one epilogue when
    the dropouts are the identity in this call, else the GEMM fused and the rest as timm's modules."""
    ok, gamma = _gamma(ls, t)
    if ok and inactive_dropout(dropout, dropout.training) and _drop_path_inactive(drop_path, t):
        return fusion.run_linear(call, h, residual=x, scale=gamma, backend=backend)
    return x + drop_path(ls(dropout(fusion.run_linear(call, h, backend=backend))))


def _attention_half(block: nn.Module, x: Tensor, t, backend: str, global_hooks: bool) -> Tensor:
    attn, norm = block.attn, block.norm1
    plan = None if global_hooks or not plain_layer_norm(norm) else _attention_plan(attn, t)
    if plan is not None and dtype_ok(x, norm.weight, plan[0].weight):
        qkv_call, proj_call = plan[0], plan[1]
        qkv = fusion.run_ln_linear(norm, qkv_call, x, backend=backend)
        a = _attention_core(attn, qkv, plan, backend)
        return _branch(x, a, proj_call, attn.proj_drop, block.ls1, block.drop_path1, t, backend)
    return x + block.drop_path1(block.ls1(attn(norm(x))))


def _mlp_half(block: nn.Module, x: Tensor, t, backend: str, global_hooks: bool) -> Tensor:
    mlp, norm = block.mlp, block.norm2
    plan = None if global_hooks or not plain_layer_norm(norm) else _mlp_plan(mlp, t)
    if plan is not None and dtype_ok(x, norm.weight, plan[0].weight):
        fc1, act, fc2 = plan
        h = fusion.run_ln_linear(norm, fc1, x, activation=act, backend=backend)
        if not inactive_dropout(mlp.drop1, mlp.training):
            h = mlp.drop1(h)
        if not plain_identity(mlp.norm):
            h = mlp.norm(h)
        return _branch(x, h, fc2, mlp.drop2, block.ls2, block.drop_path2, t, backend)
    return x + block.drop_path2(block.ls2(mlp(norm(x))))


@fused_forward
def attention_forward(self: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False) -> Tensor:
    """timm Attention: qkv -> attention (QK-norm inside) -> norm -> proj -> proj_drop on the ops."""
    plan = None
    if attn_mask is None and not is_causal and not fusion.global_hooks_registered():
        plan = _attention_plan(self, _timm())
    if plan is None or not dtype_ok(x, plan[0].weight):
        if attn_mask is None and not is_causal:
            return original(self)(x)
        return original(self)(x, attn_mask=attn_mask, is_causal=is_causal)
    backend = backend_of(self)
    qkv = fusion.run_linear(plan[0], x, backend=backend)
    a = _attention_core(self, qkv, plan, backend)
    return self.proj_drop(fusion.run_linear(plan[1], a, backend=backend))


@fused_forward
def mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    """timm Mlp: fc1 + activation as one `linear`, then fc2."""
    plan = None if fusion.global_hooks_registered() else _mlp_plan(self, _timm())
    if plan is None or not dtype_ok(x, plan[0].weight):
        return original(self)(x)
    backend = backend_of(self)
    fc1, act, fc2 = plan
    h = self.drop1(fusion.run_linear(fc1, x, activation=act, backend=backend))
    if not plain_identity(self.norm):
        h = self.norm(h)
    return self.drop2(fusion.run_linear(fc2, h, backend=backend))


def _patch_conv(proj: nn.Module) -> bool:
    return fusion.is_plain_patch_conv(proj) and own_forward(proj) and proj.padding_mode == "zeros"


@fused_forward
def patch_embed_forward(self: nn.Module, x: Tensor) -> Tensor:
    """timm PatchEmbed: the projection as `ops.patch_embed` ([batch, patches, dim]), then timm's
    output format and norm."""
    proj = self.proj
    if (x.dim() != 4 or not _patch_conv(proj) or x.shape[1] != proj.in_channels
            or not dtype_ok(x, proj.weight, proj.bias)):
        return original(self)(x)
    _, _, h, w = x.shape
    ph, pw = self.patch_size
    if self.img_size is not None and self.strict_img_size and (h, w) != tuple(self.img_size):
        return original(self)(x)  # timm's own error
    if self.dynamic_img_pad:
        x = F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        h, w = x.shape[2], x.shape[3]
    elif h % ph or w % pw:
        return original(self)(x)
    fmt = getattr(self, "output_fmt", "NCHW")
    if not self.flatten and fmt not in ("NCHW", "NHWC", "NLC"):
        return original(self)(x)
    tokens = ops.patch_embed(x, proj.weight, proj.bias, backend=backend_of(self))  # [batch, patches, dim]
    if not self.flatten:
        b, gh, gw = x.shape[0], h // ph, w // pw
        if fmt == "NHWC":
            tokens = tokens.reshape(b, gh, gw, tokens.shape[-1])
        elif fmt == "NCHW":
            tokens = tokens.transpose(1, 2).reshape(b, tokens.shape[-1], gh, gw)
    if not plain_identity(self.norm):
        tokens = self.norm(tokens)
    return tokens


# --------------------------------------------------------------------------------------------
# Finding what to patch, and the report


def _ls_name(ls: nn.Module, t) -> Optional[str]:
    if isinstance(ls, nn.Identity):
        return None
    return "LayerScale" if type(ls) is t.LayerScale else type(ls).__name__


def _norm_why(norm: nn.Module, what: str) -> Optional[str]:
    if type(norm) not in (nn.Identity,) and not plain_layer_norm(norm):
        extra = " with timm's fast-norm path" if getattr(norm, "_fast_norm", False) else ""
        return f"{what} is {type(norm).__name__}{extra}, not a LayerNorm (vitkern's ops normalize with LayerNorm)"
    return None


def _attention_why(block: nn.Module, t) -> List[str]:
    attn = block.attn
    why = []
    if type(attn) is not t.Attention:
        return [f"attn is {type(attn).__name__}, not timm's Attention (RoPE, relative position or other attention)"]
    if getattr(attn, "gate", None) is not None:
        why.append("gated attention (attn.gate): not in vitkern's attention")
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name)
        if not isinstance(norm, nn.Identity) and not plain_layer_norm(norm):
            why.append(f"QK-norm with {type(norm).__name__} ({name}): vitkern's QK-norm is a LayerNorm")
    n = _norm_why(attn.norm, "attn.norm (scale_attn_norm)")
    if n:
        why.append(n)
    for name in ("qkv", "proj"):
        if not isinstance(getattr(attn, name), nn.Linear) and linear_call(getattr(attn, name)) is None:
            why.append(f"attn.{name} is {type(getattr(attn, name)).__name__}, not a Linear")
    n = _norm_why(block.norm1, "norm1")
    if n:
        why.append(n)
    ls = _ls_name(block.ls1, t)
    if ls not in (None, "LayerScale"):
        why.append(f"ls1 is {ls}: not LayerScale")
    return why


def _mlp_why(block: nn.Module, t) -> List[str]:
    mlp = block.mlp
    if type(mlp) is not t.Mlp:
        is_gated = type(mlp).__name__ in ("SwiGLU", "GluMlp", "SwiGLUPacked")
        gated = " (a gated MLP: vitkern has no SwiGLU/GLU)" if is_gated else ""
        return [f"mlp is {type(mlp).__name__}{gated}, not timm's Mlp"]
    why = []
    if activation_name(mlp.act) is None:
        approx = f"(approximate={mlp.act.approximate!r})" if hasattr(mlp.act, "approximate") else ""
        why.append(f"activation {type(mlp.act).__name__}{approx}: vitkern fuses GELU, tanh GELU and QuickGELU")
    for name in ("fc1", "fc2"):
        if not isinstance(getattr(mlp, name), nn.Linear) and linear_call(getattr(mlp, name)) is None:
            why.append(f"mlp.{name} is {type(getattr(mlp, name)).__name__}, not a Linear (use_conv?)")
    n = _norm_why(mlp.norm, "mlp.norm (scale_mlp_norm)")
    if n:
        why.append(n)
    n = _norm_why(block.norm2, "norm2")
    if n:
        why.append(n)
    ls = _ls_name(block.ls2, t)
    if ls not in (None, "LayerScale"):
        why.append(f"ls2 is {ls}: not LayerScale")
    return why


def _patch_leaves(module: nn.Module, prefix: str, patcher: Patcher) -> List[str]:
    """LayerNorm and Linear leaves below `module` get their fused forwards; returns their names."""
    names = []
    for name, m in module.named_modules(prefix=prefix):
        if plain_layer_norm(m) and patcher.patch(m, layer_norm_forward):
            names.append(name)
        elif plain_linear(m) and patcher.patch(m, linear_forward):
            names.append(name)
    return names


def apply_to(vit: nn.Module, prefix: str, patcher: Patcher, report: ApplyReport) -> None:
    """Patch one timm VisionTransformer (or report an unsupported timm ViT)."""
    t = _timm()
    cls = type(vit).__name__
    if not isinstance(vit, t.VisionTransformer):
        report.leave(prefix, UNSUPPORTED[cls])
        return
    pe = vit.patch_embed
    pe_name = qualified(prefix, "patch_embed")
    if type(pe) is t.PatchEmbed and isinstance(pe.proj, nn.Conv2d) and fusion.is_plain_patch_conv(pe.proj):
        if patcher.patch(pe, patch_embed_forward):
            _patch_leaves(pe.norm, qualified(pe_name, "norm"), patcher)
            report.fuse(pe_name, "patch projection on ops.patch_embed (class/register tokens and pos_embed: "
                                 "timm's _pos_embed)")
        else:
            report.leave(pe_name, FOREIGN)
    else:
        report.leave(pe_name, f"{type(pe).__name__} with {type(getattr(pe, 'proj', None)).__name__} projection: "
                              "not timm's PatchEmbed cutting patches with a Conv2d (hybrid CNN stem?)")
    for name in ("norm_pre", "norm", "fc_norm", "head", "head_dist"):
        m = getattr(vit, name, None)
        if m is None or isinstance(m, nn.Identity):
            continue
        q = qualified(prefix, name)
        if plain_layer_norm(m):
            if patcher.patch(m, layer_norm_forward):
                report.fuse(q, "ops.layer_norm")
        elif plain_linear(m):
            if patcher.patch(m, linear_forward):
                report.fuse(q, "ops.linear")
        else:
            report.leave(q, f"{type(m).__name__}: not a LayerNorm or Linear")
    attn_pool = getattr(vit, "attn_pool", None)
    if attn_pool is not None:
        q = qualified(prefix, "attn_pool")
        leaves = _patch_leaves(attn_pool, q, patcher)
        mlp = getattr(attn_pool, "mlp", None)
        if type(mlp) is t.Mlp and patcher.patch(mlp, mlp_forward):
            leaves.append(qualified(q, "mlp"))
        if leaves:
            report.fuse(q, f"linears, norm and MLP on the ops ({len(leaves)} modules)")
        report.leave(q, f"{type(attn_pool).__name__}'s attention (one latent query per image) runs timm's code")
    for i, block in enumerate(vit.blocks):
        bq = qualified(prefix, f"blocks.{i}")
        if type(block) is not t.Block:
            report.leave(bq, f"{type(block).__name__}: not timm's pre-norm Block (post-norm/parallel blocks are not "
                             "vitkern's block)")
            continue
        if not patcher.patch(block, block_forward):
            report.leave(bq, FOREIGN)
            continue
        attn_why, mlp_why = _attention_why(block, t), _mlp_why(block, t)
        if type(block.attn) is t.Attention:
            patcher.patch(block.attn, attention_forward)
        if type(block.mlp) is t.Mlp:
            patcher.patch(block.mlp, mlp_forward)
        _patch_leaves(block, bq, patcher)
        parts = []
        if not attn_why:
            opts = [o for o, on in (("QK-norm", not isinstance(block.attn.q_norm, nn.Identity)),
                                    ("LayerScale", _ls_name(block.ls1, t) == "LayerScale"),
                                    ("attn.norm", not isinstance(block.attn.norm, nn.Identity))) if on]
            parts.append("LN1+QKV ln_linear, attention" + (f" ({', '.join(opts)})" if opts else "")
                         + ", proj+residual linear")
        else:
            report.leave(qualified(bq, "attn"), "; ".join(attn_why) + " -> the attention half runs timm's code")
        if not mlp_why:
            parts.append(f"LN2+fc1+{activation_name(block.mlp.act)} ln_linear, fc2+residual linear")
        else:
            report.leave(qualified(bq, "mlp"), "; ".join(mlp_why) + " -> the MLP half runs timm's code")
        if parts:
            report.fuse(bq, "; ".join(parts))
