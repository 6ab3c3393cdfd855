"""vitkern's ops in Hugging Face transformers' vision transformers, and the "vitkern" attention entry.

Supported (transformers 5): ViT (`ViTModel`, `ViTForImageClassification`, ...), DeiT, DINOv2, DINOv2
with registers, CLIP (`CLIPVisionModel`, `CLIPVisionModelWithProjection`, the vision tower of
`CLIPModel`) and SigLIP (`SiglipVisionModel`, the vision tower of `SiglipModel`). Per instance:

* the embeddings module: patch projection + class (+ distillation) token + position embedding
  (interpolated by the model's own `interpolate_pos_encoding` when it would be) as one
  `ops.patch_embed`. DINOv2's registers sit after the class token without a position: the op gets
  prefix = [class + its position, registers] and the patch positions (`no_embed_class`), the same sums.
  `bool_masked_pos` (masked image modeling) runs the model's own code.
* each encoder layer: LN1 + Q, K, V as one `ln_linear`, the attention, the output projection +
  LayerScale (DINOv2) + residual in one `linear` epilogue; LN2 + fc1 + activation (GELU, tanh GELU
  for SigLIP, QuickGELU for OpenAI CLIP) as `ln_linear`, fc2 + LayerScale + residual as `linear`.
* the attention and MLP modules, and every LayerNorm and Linear (final norms, pooler, classifier,
  projections, SigLIP's pooling-head norm and MLP), get their own fused forwards.

Q, K and V are three Linears in these models; the fused projection needs them as one [3 dim, dim]
weight. It is built per call as `torch.cat` of the three Parameters (not a stored copy: the model
keeps exactly its parameters, and autograd sends each slice's gradient back to q/k/v). The cost is
one copy of 3 * dim^2 weights per layer and call (and its split in the backward), against the
activations' B * T * 3 * dim: at ViT-B (dim 768) 1.8 M elements vs 29 M for batch 64 x 197 tokens,
about 6% of the GEMM's output bytes and no FLOPs next to its 45 GFLOP; under autocast the weights
are cast per call anyway. The alternative, LayerNorm then three linears, writes the normalized
tokens (B * T * dim) once and reads them three times, and then copies q, k and v into the packed
layout the attention kernel reads ([batch, tokens, 3, heads, head_dim]), a copy of the activations.
Measured on the CPU ("torch" backend, ViT-S shapes: batch 8, 197 tokens, dim 384, 6 heads; best of
7 on a shared 2-core machine) for LN + QKV + attention: forward 104 ms concatenated vs 99 ms as
LN + three linears (within noise), forward + backward 292 ms vs 362 ms; the weight concatenation
itself 0.1 ms. On a GPU the fused LN + QKV also saves the normalized tokens' round trip.

Per call, a half falls back to the model's own code (its sub-modules called as modules, their hooks
firing; the leaves still on vitkern's ops) when: an attention mask is given (padding, or a
non-`None` mask from the attention implementation, e.g. flex attention's BlockMask), attentions are
being recorded (`output_attentions=True`: the attention module runs as transformers wrote it, with the
model's `attn_implementation`, so `attentions` are exactly the unpatched model's), attention dropout
is active in training, a sub-module has a hook other than transformers' own output-recording hooks
while they are idle, or was swapped (PEFT LoRA on q/k/v: LayerNorm fused, the LoRA layers called).
`output_hidden_states=True` needs no fallback: transformers records the layers' outputs with hooks on
the layers themselves, which keep running.

`register_hf_attention()` adds "vitkern" to `AttentionInterface` (and the mask entry, the boolean
masks of "sdpa", to `AttentionMaskInterface`), so `from_pretrained(..., attn_implementation="vitkern")`
runs `ops.attention` in any model routing through the interface. See `attention_forward`.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from vitkern import fusion, ops
from vitkern.apply._core import (
    FOREIGN, ApplyReport, Patcher, activation_name, backend_of, dtype_ok, fused_forward, inactive_dropout,
    layer_norm_forward, linear_call, linear_forward, original, own_forward, plain, plain_identity, plain_layer_norm,
    plain_linear, qualified, run_linear,
)

LIBRARY = "transformers"

# transformers' output-recording hook: a closure named so in this module. (Matched by __name__ and
# __module__: torch.compile traces those; a __qualname__ comparison reads False under dynamo.)
_CAPTURE_HOOK = ("output_capturing_hook", "transformers.utils.output_capturing")


class Family(NamedTuple):
    """One model family's classes and the attribute names its layers use."""

    name: str
    embeddings: type
    patch_embeddings: Optional[type]  # ViT/DeiT/DINOv2's wrapper of the projection, None for CLIP/SigLIP
    layer: type
    attention: type
    mlp: type
    style: str  # "vit" (layernorm_before/after, dropout), "dinov2" (norm1/2, LayerScale, drop_path), "clip"
    layer_scale: Optional[type] = None
    drop_path: Optional[type] = None


# Layer attribute names per style: (ln1, attention, ln2, mlp)
_LAYER_NAMES = {
    "vit": ("layernorm_before", "attention", "layernorm_after", "mlp"),
    "dinov2": ("norm1", "attention", "norm2", "mlp"),
    "clip": ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
}
# Vision models and wrappers: their heads and norms (LayerNorm / Linear leaves) to patch by name.
_HEADS = {
    "ViTModel": ("layernorm", "pooler.dense"), "ViTForImageClassification": ("classifier",),
    "DeiTModel": ("layernorm", "pooler.dense"), "DeiTForImageClassification": ("classifier",),
    "DeiTForImageClassificationWithTeacher": ("cls_classifier", "distillation_classifier"),
    "Dinov2Model": ("layernorm",), "Dinov2ForImageClassification": ("classifier",),
    "Dinov2WithRegistersModel": ("layernorm",), "Dinov2WithRegistersForImageClassification": ("classifier",),
    "CLIPVisionModel": ("pre_layrnorm", "post_layernorm"), "CLIPVisionModelWithProjection": ("visual_projection",),
    "CLIPModel": ("visual_projection",), "CLIPForImageClassification": ("classifier",),
    "SiglipVisionModel": ("post_layernorm", "head.layernorm"), "SiglipModel": (),
    "SiglipForImageClassification": ("classifier",),
}
# Sub-trees that are not vision transformers (reported, never patched).
_TEXT_TOWERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTextTransformer", "SiglipTextModel",
                "SiglipTextTransformer")


_FAMILIES: Dict[type, Family] = {}


def _families() -> Dict[type, Family]:
    """{class: Family} for the families whose modeling module is imported (a model of the family
    cannot exist otherwise; nothing is imported here). Built by `find` (eagerly, at apply time); the
    fused forwards read the built table (torch.compile traces a dict lookup, not the building)."""
    return _FAMILIES


def _build_families() -> Dict[type, Family]:
    out = _FAMILIES

    def add(modname: str, fam: str, prefix: str, style: str, patch: bool, ls: bool) -> None:
        m = sys.modules.get(f"transformers.models.{modname}.modeling_{modname}")
        if m is None:
            return
        emb = getattr(m, f"{prefix}VisionEmbeddings", None) or getattr(m, f"{prefix}Embeddings")
        f = Family(
            fam, emb, getattr(m, f"{prefix}PatchEmbeddings", None) if patch else None,
            getattr(m, f"{prefix}EncoderLayer", None) or getattr(m, f"{prefix}Layer"),
            getattr(m, f"{prefix}Attention"), getattr(m, f"{prefix}MLP"), style,
            getattr(m, f"{prefix}LayerScale", None) if ls else None,
            getattr(m, f"{prefix}DropPath", None) if ls else None,
        )
        for cls in (f.embeddings, f.layer, f.attention, f.mlp):
            out[cls] = f

    add("vit", "vit", "ViT", "vit", True, False)
    add("deit", "deit", "DeiT", "vit", True, False)
    add("dinov2", "dinov2", "Dinov2", "dinov2", True, True)
    add("dinov2_with_registers", "dinov2_with_registers", "Dinov2WithRegisters", "dinov2", True, True)
    add("clip", "clip", "CLIP", "clip", False, False)
    add("siglip", "siglip", "Siglip", "clip", False, False)
    return out


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.models.")


def find(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The outermost supported transformers models (or wrappers) in `model`."""
    if "transformers" not in sys.modules:
        return []
    families = _build_families()
    if not families:
        return []
    found: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(f == "" or name == f or name.startswith(f + ".") for f, _ in found):
            continue
        if _is_hf(module) and (type(module).__name__ in _HEADS or type(module) in families):
            found.append((name, module))
    return found


# --------------------------------------------------------------------------------------------
# transformers' output-recording hooks


def collecting(key: str) -> bool:
    """True while transformers' `capture_outputs` records `key` ("attentions", "hidden_states")."""
    oc = sys.modules.get("transformers.utils.output_capturing")
    if oc is None:
        return False
    collected = oc._active_collector.get()
    return collected is not None and key in collected


def idle_capture_hooks_only(module: nn.Module) -> bool:
    """The module has no hook but transformers' output-recording ones (installed on the first
    `output_attentions=True` call and kept), and those are idle now (not recording attentions)."""
    if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    hooks = module._forward_hooks
    if not hooks:
        return True
    for hook in hooks.values():
        if getattr(hook, "__name__", "") != _CAPTURE_HOOK[0] or getattr(hook, "__module__", "") != _CAPTURE_HOOK[1]:
            return False
    return not collecting("attentions")


def _plain_attention(attn: nn.Module, fam: Family) -> bool:
    return type(attn) is fam.attention and own_forward(attn) and idle_capture_hooks_only(attn) \
        and not getattr(attn, "is_causal", False)


def _heads(attn: nn.Module) -> int:
    return attn.num_attention_heads if hasattr(attn, "num_attention_heads") else attn.num_heads


def _scale(attn: nn.Module) -> float:
    return attn.scaling if hasattr(attn, "scaling") else attn.scale


def _attn_dropout(attn: nn.Module) -> float:
    return attn.attention_dropout if hasattr(attn, "attention_dropout") else attn.dropout


def _out_proj(attn: nn.Module) -> nn.Module:
    return attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj


def _qkv_weights(attn: nn.Module) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """The packed [3 * heads * head_dim, dim] weight (and bias) of plain q/k/v Linears, concatenated
    per call (see the module docstring), or None when one of them is not a plain Linear."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    if not (plain_linear(q) and plain_linear(k) and plain_linear(v)):
        return None
    weight = torch.cat((q.weight, k.weight, v.weight))
    biases = (q.bias, k.bias, v.bias)
    if all(b is None for b in biases):
        return weight, None
    if any(b is None for b in biases):
        return None
    return weight, torch.cat(biases)


def _attention_usable(attn: nn.Module, fam: Family, kwargs: Dict[str, Any]) -> bool:
    return (_plain_attention(attn, fam) and not kwargs.get("output_attentions")
            and (_attn_dropout(attn) == 0.0 or not attn.training))


# --------------------------------------------------------------------------------------------
# Encoder layers


def _ls(module: Optional[nn.Module], fam: Family) -> Tuple[bool, Optional[Tensor]]:
    """(fusable, gamma) of DINOv2's LayerScale slot (None in the other styles)."""
    if module is None:
        return True, None
    if fam.layer_scale is not None and plain(module, (fam.layer_scale,)):
        return True, module.lambda1
    return False, None


def _drop_path_inactive(module: Optional[nn.Module], fam: Family) -> bool:
    if module is None or plain_identity(module):
        return True
    return (fam.drop_path is not None and plain(module, (fam.drop_path,))
            and (module.drop_prob == 0.0 or not module.training))


def _branch_parts(layer: nn.Module, fam: Family, half: int):
    """(dropout, layer scale, drop path) on a half's branch: ViT's shared dropout, DINOv2's LayerScale
    and shared drop_path, nothing for CLIP/SigLIP."""
    if fam.style == "vit":
        return layer.dropout, None, None
    if fam.style == "dinov2":
        return None, layer.layer_scale1 if half == 1 else layer.layer_scale2, layer.drop_path
    return None, None, None


def _finish(layer: nn.Module, fam: Family, half: int, x: Tensor, h: Tensor, out_call: Optional[fusion.LinearCall],
            out_module: nn.Module, backend: str) -> Tensor:
    """x + branch(out(h)): residual (and LayerScale) in the output GEMM's epilogue when the branch's
    dropout / drop path are the identity in this call; else the GEMM fused and the rest as modules."""
    dropout, ls, drop_path = _branch_parts(layer, fam, half)
    ok, gamma = _ls(ls, fam)
    identity_branch = inactive_dropout(dropout, layer.training) and _drop_path_inactive(drop_path, fam)
    if out_call is not None and ok and identity_branch:
        return fusion.run_linear(out_call, h, residual=x, scale=gamma, backend=backend)
    y = fusion.run_linear(out_call, h, backend=backend) if out_call is not None else out_module(h)
    if fam.style == "vit":
        return dropout(y) + x
    if fam.style == "dinov2":
        return drop_path(ls(y)) + x
    return x + y


def _attention_half(layer: nn.Module, fam: Family, x: Tensor, mask: Optional[Tensor], kwargs: Dict[str, Any],
                    backend: str, global_hooks: bool) -> Tensor:
    ln_name, attn_name, _, _ = _LAYER_NAMES[fam.style]
    norm, attn = getattr(layer, ln_name), getattr(layer, attn_name)
    if mask is None and not global_hooks and plain_layer_norm(norm) and _attention_usable(attn, fam, kwargs):
        packed = _qkv_weights(attn)
        out = _out_proj(attn)
        out_call = linear_call(out)
        if packed is not None and dtype_ok(x, norm.weight, packed[0]):
            qkv = ops.ln_linear(x, norm.weight, norm.bias, packed[0], packed[1], eps=norm.eps, backend=backend)
            a = ops.attention(qkv, _heads(attn), scale=_scale(attn), backend=backend)
            return _finish(layer, fam, 1, x, a, out_call, out, backend)
    # The model's own code for this half (the sub-modules' fused forwards still run inside).
    h = norm(x)
    if fam.style == "vit":
        return layer.dropout(attn(h, mask, **kwargs)[0]) + x
    if fam.style == "dinov2":
        return layer.drop_path(layer.layer_scale1(attn(h, attention_mask=mask, **kwargs)[0])) + x
    return x + attn(hidden_states=h, attention_mask=mask, **kwargs)[0]


def _mlp_plan(mlp: nn.Module, fam: Family):
    if not plain(mlp, (fam.mlp,)):
        return None
    act = activation_name(mlp.activation_fn)
    fc1, fc2 = linear_call(mlp.fc1), linear_call(mlp.fc2)
    if act is None or fc1 is None or fc2 is None:
        return None
    return fc1, act, fc2


def _mlp_half(layer: nn.Module, fam: Family, x: Tensor, backend: str, global_hooks: bool) -> Tensor:
    _, _, ln_name, mlp_name = _LAYER_NAMES[fam.style]
    norm, mlp = getattr(layer, ln_name), getattr(layer, mlp_name)
    plan = None if global_hooks or not plain_layer_norm(norm) else _mlp_plan(mlp, fam)
    if plan is not None and dtype_ok(x, norm.weight, plan[0].weight):
        fc1, act, fc2 = plan
        h = fusion.run_ln_linear(norm, fc1, x, activation=act, backend=backend)
        return _finish(layer, fam, 2, x, h, fc2, mlp.fc2, backend)
    h = mlp(norm(x))
    if fam.style == "vit":
        return layer.dropout(h) + x
    if fam.style == "dinov2":
        return layer.drop_path(layer.layer_scale2(h)) + x
    return x + h


@fused_forward
def layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                  **kwargs: Any) -> Tensor:
    """An encoder layer (ViTLayer, DeiTLayer, Dinov2Layer, CLIPEncoderLayer, SiglipEncoderLayer) on the
    fused ops: see the module docstring."""
    fam = _families()[type(self)]
    backend = backend_of(self)
    global_hooks = fusion.global_hooks_registered()
    x = _attention_half(self, fam, hidden_states, attention_mask, kwargs, backend, global_hooks)
    return _mlp_half(self, fam, x, backend, global_hooks)


@fused_forward
def attention_module_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                             **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """The attention module alone (when its layer could not fuse across it): Q, K, V as one `linear`
    (or the q/k/v modules called, e.g. PEFT LoRA layers, and their outputs packed), `ops.attention`,
    the output projection. Returns (output, None), as the sdpa implementation does; with a mask, or
    while attentions are recorded, the model's own forward runs (and returns its weights)."""
    fam = _families()[type(self)]
    if attention_mask is not None or not _attention_usable(self, fam, kwargs) or fusion.global_hooks_registered():
        return original(self)(hidden_states, attention_mask, **kwargs)
    backend = backend_of(self)
    packed = _qkv_weights(self)
    if packed is not None and dtype_ok(hidden_states, packed[0]):
        qkv = ops.linear(hidden_states, packed[0], packed[1], backend=backend)
    else:
        qkv = torch.cat((self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)), dim=-1)
    a = ops.attention(qkv, _heads(self), scale=_scale(self), backend=backend)
    return run_linear(_out_proj(self), a, backend), None


@fused_forward
def mlp_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """fc1 + activation as one `linear`, then fc2."""
    fam = _families()[type(self)]
    plan = None if fusion.global_hooks_registered() else _mlp_plan(self, fam)
    if plan is None or not dtype_ok(hidden_states, plan[0].weight):
        return original(self)(hidden_states)
    fc1, act, fc2 = plan
    backend = backend_of(self)
    return fusion.run_linear(fc2, fusion.run_linear(fc1, hidden_states, activation=act, backend=backend),
                             backend=backend)


# --------------------------------------------------------------------------------------------
# Embeddings


def _patch_conv(conv: Any) -> bool:
    return (plain(conv, (nn.Conv2d,)) and conv.stride == conv.kernel_size and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1)


def _projection(emb: nn.Module, fam: Family) -> Optional[nn.Module]:
    """The patch Conv2d of the embeddings when it (and ViT/DINOv2's wrapper around it) is plain."""
    if fam.patch_embeddings is None:
        conv = emb.patch_embedding
    else:
        pe = emb.patch_embeddings
        if not plain(pe, (fam.patch_embeddings,)):
            return None
        conv = pe.projection
    return conv if _patch_conv(conv) else None


def _stand_in(like: Tensor, tokens: int) -> Tensor:
    """A [1, tokens, dim] view (no memory) for the models' `interpolate_pos_encoding(embeddings, h, w)`,
    which reads only its shape."""
    return like.reshape(-1)[:1].view(1, 1, 1).expand(1, tokens, like.shape[-1])


def _grid(conv: nn.Module, h: int, w: int) -> int:
    ph, pw = conv.kernel_size
    return (h // ph) * (w // pw)


@fused_forward
def vit_embeddings_forward(self: nn.Module, pixel_values: Tensor, bool_masked_pos: Optional[Tensor] = None,
                           interpolate_pos_encoding: bool = False) -> Tensor:
    """ViT / DeiT embeddings: [class (, distillation); patches] + positions in one `ops.patch_embed`."""
    fam = _families()[type(self)]
    conv = _projection(self, fam)
    ok = (bool_masked_pos is None and conv is not None and pixel_values.dim() == 4
          and pixel_values.shape[1] == self.patch_embeddings.num_channels and dtype_ok(pixel_values, conv.weight))
    if ok:
        _, _, h, w = pixel_values.shape
        prefix = self.cls_token if fam.name == "vit" else torch.cat((self.cls_token, self.distillation_token), dim=1)
        if interpolate_pos_encoding:
            tokens = prefix.shape[1] + _grid(conv, h, w)
            pos = self.interpolate_pos_encoding(_stand_in(self.position_embeddings, tokens), h, w)
        elif (h, w) == tuple(self.image_size):
            pos = self.position_embeddings
        else:
            ok = False  # the model's own size error
    if not ok:
        return original(self)(pixel_values, bool_masked_pos=bool_masked_pos,
                              interpolate_pos_encoding=interpolate_pos_encoding)
    tokens = ops.patch_embed(pixel_values, conv.weight, conv.bias, prefix, pos, backend=backend_of(self))
    return self.dropout(tokens)


@fused_forward
def dinov2_embeddings_forward(self: nn.Module, pixel_values: Tensor,
                              bool_masked_pos: Optional[Tensor] = None) -> Tensor:
    """DINOv2 (with registers) embeddings: positions always through the model's interpolation (the
    stored ones at the trained size), registers as prefix tokens without a position."""
    fam = _families()[type(self)]
    conv = _projection(self, fam)
    if (bool_masked_pos is not None or conv is None or pixel_values.dim() != 4
            or pixel_values.shape[1] != self.patch_embeddings.num_channels):
        return original(self)(pixel_values, bool_masked_pos=bool_masked_pos)
    pixel_values = pixel_values.to(conv.weight.dtype)  # as the model's patch embeddings do
    _, _, h, w = pixel_values.shape
    pos = None
    if self.position_embeddings is not None:
        pos = self.interpolate_pos_encoding(_stand_in(self.position_embeddings, 1 + _grid(conv, h, w)), h, w)
    registers = getattr(self, "register_tokens", None)
    backend = backend_of(self)
    if registers is None:
        tokens = ops.patch_embed(pixel_values, conv.weight, conv.bias, self.cls_token, pos, backend=backend)
    else:
        cls = self.cls_token if pos is None else self.cls_token + pos[:, :1]
        prefix = torch.cat((cls, registers), dim=1)
        tokens = ops.patch_embed(pixel_values, conv.weight, conv.bias, prefix, None if pos is None else pos[:, 1:],
                                 no_embed_class=pos is not None, backend=backend)
    return self.dropout(tokens)


@fused_forward
def clip_embeddings_forward(self: nn.Module, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
    """CLIP / SigLIP vision embeddings: [class;] patches + positions in one `ops.patch_embed`."""
    fam = _families()[type(self)]
    conv = _projection(self, fam)
    if conv is None or pixel_values.dim() != 4 or pixel_values.shape[1] != conv.in_channels:
        return original(self)(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    _, _, h, w = pixel_values.shape
    if not interpolate_pos_encoding and (h != self.image_size or w != self.image_size):
        return original(self)(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)  # its size error
    pixel_values = pixel_values.to(conv.weight.dtype)
    cls = getattr(self, "class_embedding", None)
    prefix = None if cls is None else cls.view(1, 1, -1)
    if interpolate_pos_encoding:
        tokens = (0 if prefix is None else 1) + _grid(conv, h, w)
        pos = self.interpolate_pos_encoding(_stand_in(self.position_embedding.weight, tokens), h, w)
    else:
        pos = self.position_embedding(self.position_ids)
    return ops.patch_embed(pixel_values, conv.weight, conv.bias, prefix, pos, backend=backend_of(self))


# --------------------------------------------------------------------------------------------
# Finding what to patch, and the report


def _embeddings_forward(fam: Family):
    if fam.style == "clip":
        return clip_embeddings_forward
    return dinov2_embeddings_forward if fam.style == "dinov2" else vit_embeddings_forward


def _layer_why(layer: nn.Module, fam: Family) -> Tuple[List[str], List[str]]:
    ln1, attn_name, ln2, mlp_name = _LAYER_NAMES[fam.style]
    attn, mlp = getattr(layer, attn_name), getattr(layer, mlp_name)
    attn_why, mlp_why = [], []
    if type(attn) is not fam.attention:
        attn_why.append(f"{attn_name} is {type(attn).__name__}, not {fam.attention.__name__}")
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            if not isinstance(getattr(attn, name), nn.Linear):
                attn_why.append(f"{attn_name}.{name} is {type(getattr(attn, name)).__name__}: Q, K and V are "
                                "packed from plain Linears (the LayerNorm is still fused; the layers are called)")
        if getattr(attn, "is_causal", False):
            attn_why.append("causal attention (a text tower?)")
    for name, norm in ((ln1, getattr(layer, ln1)), (ln2, getattr(layer, ln2))):
        if not plain_layer_norm(norm):
            (attn_why if name == ln1 else mlp_why).append(f"{name} is {type(norm).__name__}, not LayerNorm")
    if type(mlp) is not fam.mlp:
        gated = " (SwiGLU: vitkern has no gated MLP)" if "SwiGLU" in type(mlp).__name__ else ""
        mlp_why.append(f"{mlp_name} is {type(mlp).__name__}{gated}")
    elif activation_name(mlp.activation_fn) is None:
        mlp_why.append(f"activation {type(mlp.activation_fn).__name__}: vitkern fuses GELU, tanh GELU and QuickGELU")
    return attn_why, mlp_why


def _inside(name: str, prefixes: List[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def apply_to(root: nn.Module, prefix: str, patcher: Patcher, report: ApplyReport) -> None:
    families = _families()
    text: List[str] = []
    patched_units: List[str] = []  # layers and embeddings: their leaves are not listed one by one
    mha: List[str] = []
    for name, module in root.named_modules(prefix=prefix):
        if _inside(name, text) or _inside(name, mha) or name.rpartition(".")[2] == "text_projection":
            continue
        cls = type(module)
        if cls.__name__ in _TEXT_TOWERS and _is_hf(module):
            text.append(name)
            report.leave(name, f"{cls.__name__}: a text transformer (causal, token embeddings): not vitkern's")
            continue
        if isinstance(module, nn.MultiheadAttention):
            mha.append(name)
            report.leave(name, "torch.nn.MultiheadAttention (SigLIP's attention-pooling probe: one query per image): "
                               "left to torch")
            continue
        fam = families.get(cls)
        if fam is not None and cls is fam.embeddings:
            if not patcher.patch(module, _embeddings_forward(fam)):
                report.leave(name, FOREIGN)
            elif _projection(module, fam) is not None:
                patched_units.append(name)
                registers = getattr(module, "register_tokens", None) is not None
                extra = " (registers after the class token)" if registers else ""
                report.fuse(name, "patch projection + prefix tokens + position embedding in one "
                                  f"ops.patch_embed{extra}")
            else:
                report.leave(name, "the patch projection is not a plain patch-cutting Conv2d (hooked, swapped or "
                                   "overlapping): the model's own embedding code runs (checked again per call)")
        elif fam is not None and cls is fam.layer:
            if not patcher.patch(module, layer_forward):
                report.leave(name, FOREIGN)
                continue
            attn_why, mlp_why = _layer_why(module, fam)
            patched_units.append(name)
            parts = []
            if attn_why:
                report.leave(qualified(name, _LAYER_NAMES[fam.style][1]), "; ".join(attn_why))
            else:
                ls = " + LayerScale" if fam.style == "dinov2" else ""
                parts.append("LN1+QKV ln_linear (q/k/v weights concatenated per call), attention, "
                             f"out_proj{ls}+residual linear")
            if mlp_why:
                report.leave(qualified(name, _LAYER_NAMES[fam.style][3]), "; ".join(mlp_why) + " -> the MLP half runs "
                             "transformers' code")
            else:
                ls = " + LayerScale" if fam.style == "dinov2" else ""
                act = activation_name(getattr(module, "mlp").activation_fn)
                parts.append(f"LN2+fc1+{act} ln_linear, fc2{ls}+residual linear")
            if parts:
                report.fuse(name, "; ".join(parts))
        elif fam is not None and cls is fam.attention:
            patcher.patch(module, attention_module_forward)
        elif fam is not None and cls is fam.mlp:
            patcher.patch(module, mlp_forward)
            if not _inside(name, patched_units):
                report.fuse(name, "fc1+activation, fc2 on ops.linear")
                patched_units.append(name)
        elif plain_layer_norm(module):
            if patcher.patch(module, layer_norm_forward) and not _inside(name, patched_units):
                report.fuse(name, "ops.layer_norm")
        elif plain_linear(module):
            if patcher.patch(module, linear_forward) and not _inside(name, patched_units):
                report.fuse(name, "ops.linear")
        elif cls.__name__ == "SiglipMultiheadAttentionPoolingHead":
            pass  # its norm and MLP are patched as leaves; its MultiheadAttention is reported
        elif fam is None and _is_hf(module) and "SwiGLU" in cls.__name__:
            pass  # reported with its layer


# --------------------------------------------------------------------------------------------
# The attention-interface entry

# Keyword arguments transformers passes to attention functions that do not change the attention.
_IGNORED_KWARGS = frozenset({"output_attentions", "output_hidden_states", "return_dict", "use_cache", "position_ids",
                             "cache_position", "past_key_values", "layer_idx"})


def _eager_with_weights(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                        dropout: float, scaling: Optional[float], head_mask: Optional[Tensor],
                        causal: bool) -> Tuple[Tensor, Tensor]:
    """softmax(q k^T * scaling + mask) v with the probabilities returned, as transformers' eager
    attention computes them (fp32 softmax, weights in the query's dtype)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is None and causal and query.shape[2] > 1:
        tq, tk = query.shape[2], key.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    if head_mask is not None:
        weights = weights * head_mask
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      *, backend: str = "auto", **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-function signature on `ops.attention`.

    query: [batch, heads, q_len, head_dim]; key, value: [batch, kv_heads, kv_len, head_dim] (transformers'
    layout); returns (out [batch, q_len, heads, head_dim], weights or None), as "sdpa" does.

    * vitkern's kernels: no mask, not causal, no dropout, q_len == kv_len and as many key heads as
      query heads. q, k and v are packed into [batch, tokens, 3 * heads * head_dim] for the op (one copy:
      the projections arrive as three tensors).
    * `output_attentions` (or transformers recording attentions) or a `head_mask`: the eager
      formula, returning the [batch, heads, q_len, kv_len] probabilities, head_mask multiplied in.
    * anything else vitkern's kernels do not implement (a padding or custom mask, causal attention,
      dropout, grouped heads, cross attention, softcap...): torch's SDPA through transformers' "sdpa"
      function, so the call is honoured, not refused.
    """
    b, heads, tq, d = query.shape
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    head_mask = kwargs.get("head_mask")
    if kwargs.get("output_attentions") or collecting("attentions") or head_mask is not None:
        return _eager_with_weights(module, query, key, value, attention_mask, dropout, scaling, head_mask, causal)
    others = [k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS]
    if (attention_mask is not None or (causal and tq > 1) or dropout > 0.0 or key.shape[1] != heads
            or key.shape[2] != tq or value.shape[-1] != d or others):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    qkv = torch.stack((query, key, value), dim=1).permute(0, 3, 1, 2, 4).reshape(b, tq, 3 * heads * d)
    out = ops.attention(qkv, heads, scale=scaling, backend=backend)
    return out.view(b, tq, heads, d), None


def register_hf_attention(name: str = "vitkern", *, backend: str = "auto") -> str:
    """Register `attention_forward` as `name` in transformers' `AttentionInterface` and its mask entry
    (transformers' "sdpa" boolean masks, None when nothing is masked) in `AttentionMaskInterface`, so
    `from_pretrained(..., attn_implementation=name)`, or `config._attn_implementation = name`, runs
    vitkern's attention in any model that routes through the interface (ViT, DeiT, DINOv2, CLIP,
    SigLIP, ...). Returns `name`. Raises ImportError without transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError("vitkern.register_hf_attention needs transformers (pip install transformers)") from error

    def vitkern_attention(module, query, key, value, attention_mask, **kw):
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kw)

    vitkern_attention.__doc__ = attention_forward.__doc__
    AttentionInterface.register(name, vitkern_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
