"""Checkpoint conversion: timm, Hugging Face transformers and the original JAX .npz files.

A checkpoint made at another resolution has its position embedding resampled in 2-D by
`vitkern.pos_embed.resample_pos_embed` (re-exported here, where it used to live).

    model = vitkern.from_timm(timm_model)                   # or a timm model name
    model = vitkern.load_hf(hf_vit_model)                   # ViTModel / ViTForImageClassification
    vitkern.load_jax_npz("ViT-B_16.npz", model)             # google-research/vision_transformer

Every loader converts to timm's state-dict layout (the layout of `vitkern.ViT`) and loads through
one checked path: a missing or unexpected key, or a shape that does not fit, raises `ValueError`
naming the key and both shapes before any parameter is written.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from vitkern.config import ViTConfig
from vitkern.model import ViT
from vitkern.pos_embed import RESAMPLE_MODES, resample_pos_embed

__all__ = ["resample_pos_embed", "from_timm", "load_hf", "load_jax_npz", "timm_config"]


# --------------------------------------------------------------------------------------------
# The one checked load path


def _shape(value: Any) -> Tuple[int, ...]:
    return tuple(value.shape)


def _load_checked(model: nn.Module, state: Mapping[str, Tensor], *, source: str, strict: bool = True,
                  skip_prefixes: Tuple[str, ...] = ()) -> None:
    """Copy `state` (timm layout) into `model` after checking every key and shape.

    With `strict`, keys the model has but `state` lacks, and keys `state` has but the model
    lacks, are errors; otherwise only the common keys are loaded. Model keys under
    `skip_prefixes` are never required (e.g. a hybrid backbone loaded separately).
    """
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.startswith(skip_prefixes)]
    unexpected = [k for k in state if k not in target]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the {source} weights: {_preview(missing)}")
        if unexpected:
            parts.append(f"not in the vitkern model: {_preview(unexpected)}")
        raise ValueError(f"cannot load the {source} weights: " + "; ".join(parts))
    for key, value in state.items():
        if key in target and _shape(value) != _shape(target[key]):
            raise ValueError(
                f"{key}: the {source} weights have shape {_shape(value)} but the model's parameter has "
                f"shape {_shape(target[key])}"
            )
    common = {k: v for k, v in state.items() if k in target}
    model.load_state_dict(common, strict=False)


def _preview(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _match_source(model: nn.Module, like: Optional[Tensor], training: bool) -> nn.Module:
    """Put the converted model on the source's device and dtype and in its train/eval mode."""
    if like is not None:
        model.to(device=like.device, dtype=like.dtype)
    return model.train(training)


def _build(config: ViTConfig, hybrid_backbone: Optional[nn.Module] = None, device: Optional[str] = None) -> ViT:
    return ViT(hybrid_backbone=hybrid_backbone, device=device, **vars(config))


# --------------------------------------------------------------------------------------------
# timm

# Overrides `from_timm` accepts: they change how the model runs, not the shape of its weights,
# except img_size (pos_embed is resampled) and num_classes (a fresh head).
_TIMM_OVERRIDABLE = (
    "backend", "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
    "dynamic_img_size", "dynamic_img_pad", "img_size", "num_classes", "global_pool", "patch_drop_rate",
)

# timm's activation modules -> vitkern's act_layer names (timm's GELU / nn.GELU are the exact form).
def _act_layer_name(act: nn.Module) -> Optional[str]:
    name = type(act).__name__
    if name == "GELU":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(act, "approximate", "none"))
    return {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}.get(name)


def _other_family_refusals(tm: nn.Module) -> List[str]:
    """What a timm model of another ViT family (EVA, BEiT) uses that vitkern does not implement."""
    why: List[str] = []
    name = type(tm).__name__
    if getattr(tm, "rope", None) is not None:
        why.append(f"rotary position embeddings ({name}'s rope: RoPE)")
    blocks = list(getattr(tm, "blocks", []))
    mlps = {type(getattr(b, "mlp", None)).__name__ for b in blocks}
    if mlps & {"SwiGLU", "GluMlp", "SwiGLUPacked"}:
        why.append(f"a gated MLP ({', '.join(sorted(mlps))}: SwiGLU)")
    if getattr(tm, "rel_pos_bias", None) is not None or any(
            getattr(getattr(b, "attn", None), "relative_position_bias_table", None) is not None for b in blocks):
        why.append(f"relative position bias ({name}'s relative_position_bias_table)")
    if name in ("Eva", "Beit") and not why:
        why.append(f"{name}'s blocks ({type(blocks[0]).__name__ if blocks else 'none'}), not timm's VisionTransformer Block")
    return why


def _timm_refusals(tm: nn.Module) -> List[str]:
    """Every feature of timm model `tm` that vitkern does not implement (empty when it converts)."""
    from timm.layers import Mlp as TimmMlp
    from timm.layers.attention import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock

    why: List[str] = []

    def is_identity(m: Any) -> bool:
        return m is None or isinstance(m, nn.Identity)

    def is_plain_layer_norm(m: Any) -> bool:
        # timm's LayerNorm subclasses nn.LayerNorm with the same math; LayerNormFp32, RmsNorm, ... differ.
        return (isinstance(m, nn.LayerNorm) and type(m).__name__ == "LayerNorm" and m.elementwise_affine
                and m.bias is not None and len(m.normalized_shape) == 1)

    from timm.models.deit import VisionTransformerDistilled

    distilled = isinstance(tm, VisionTransformerDistilled)
    if distilled and getattr(tm, "reg_token", None) is not None:
        why.append("register tokens in a distilled model (timm's VisionTransformerDistilled does not use reg_token)")
    if getattr(tm, "pos_embed", None) is None:
        why.append("no learned position embedding (pos_embed='none')")
    if not is_identity(getattr(tm, "norm_pre", None)) and not is_plain_layer_norm(tm.norm_pre):
        why.append(f"norm_pre is {type(tm.norm_pre).__name__}, not LayerNorm")
    patch_drop = getattr(tm, "patch_drop", None)
    if not is_identity(patch_drop):
        if type(patch_drop).__name__ != "PatchDropout" or getattr(patch_drop, "ordered", False):
            why.append(f"patch_drop is {type(patch_drop).__name__} (ordered={getattr(patch_drop, 'ordered', None)}), "
                       "not timm's unordered PatchDropout")
        elif patch_drop.num_prefix_tokens != tm.num_prefix_tokens:
            why.append(f"patch dropout that keeps {patch_drop.num_prefix_tokens} prefix token(s) of the model's "
                       f"{tm.num_prefix_tokens} (patch_drop_rate with a distillation token)")
    if tm.global_pool not in ("token", "avg", "map", ""):
        why.append(f"global_pool={tm.global_pool!r} (vitkern has 'token', 'avg', 'map' and '')")
    attn_pool = getattr(tm, "attn_pool", None)
    if attn_pool is not None:
        if type(attn_pool).__name__ != "AttentionPoolLatent":
            why.append(f"attn_pool is {type(attn_pool).__name__}, not AttentionPoolLatent (global_pool='map')")
        else:
            pool_mlp = getattr(attn_pool, "mlp", None)
            block_mlp = getattr(tm.blocks[0], "mlp", None)
            if (attn_pool.latent_len != 1 or attn_pool.pos_embed is not None or attn_pool.pool != "token"
                    or not isinstance(attn_pool.q, nn.Linear) or attn_pool.latent_dim != tm.embed_dim
                    or not is_identity(attn_pool.q_norm) or not is_identity(attn_pool.k_norm)
                    or not is_plain_layer_norm(attn_pool.norm) or pool_mlp is None
                    or getattr(getattr(pool_mlp, "fc1", None), "out_features", None)
                    != getattr(getattr(block_mlp, "fc1", None), "out_features", None)
                    or _act_layer_name(pool_mlp.act) != _act_layer_name(getattr(block_mlp, "act", None) or nn.Identity())):
                why.append("an attention-pool head other than timm's default for global_pool='map' (one latent, "
                           "q projection, no pos_embed or qk_norm, LayerNorm, the blocks' MLP)")
    if getattr(tm, "pool_include_prefix", False):
        why.append("pooling over the prefix tokens (pool_include_prefix=True)")
    norm, fc_norm = getattr(tm, "norm", None), getattr(tm, "fc_norm", None)
    if is_identity(norm) and is_identity(fc_norm):
        why.append("no final norm (final_norm=False)")
    for name, m in (("norm", norm), ("fc_norm", fc_norm)):
        if not is_identity(m) and not is_plain_layer_norm(m):
            why.append(f"{name} is {type(m).__name__}, not LayerNorm")
    if not isinstance(tm.head, (nn.Linear, nn.Identity)):
        why.append(f"head is {type(tm.head).__name__}, not Linear")

    pe = tm.patch_embed
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        why.append(f"patch_embed.proj is {type(proj).__name__}, not Conv2d")
    if not is_identity(getattr(pe, "norm", None)):
        why.append("a norm inside the patch embedding (embed_norm_layer)")
    if type(pe).__name__ not in ("PatchEmbed", "HybridEmbed"):
        why.append(f"patch_embed is {type(pe).__name__} (vitkern has PatchEmbed and HybridEmbed)")

    if isinstance(proj, nn.Conv2d) and (proj.bias is None) != (not is_identity(getattr(tm, "norm_pre", None))):
        why.append("a patch embedding whose bias does not follow timm's pre_norm rule (bias exactly when pre_norm=False)")
    qk_norm_seen: Dict[str, bool] = {}
    eps = {m.eps for m in tm.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        why.append(f"LayerNorms with different eps {sorted(eps)}")
    dims = set()
    # Block-level refusals are reported once with the blocks they occur in, not once per block.
    block_why: Dict[str, List[int]] = {}

    def note(message: str) -> None:
        block_why.setdefault(message, []).append(i)

    for i, blk in enumerate(tm.blocks):
        where = "blocks.*"
        if type(blk) is not TimmBlock:
            note(f"{where} is {type(blk).__name__} (vitkern has the pre-norm Block)")
            continue
        for name in ("norm1", "norm2"):
            if not is_plain_layer_norm(getattr(blk, name)):
                note(f"{where}.{name} is {type(getattr(blk, name)).__name__}, not LayerNorm")
        ls_names = {type(blk.ls1).__name__, type(blk.ls2).__name__}
        if not ls_names <= {"Identity", "LayerScale"} or len(ls_names) != 1:
            note(f"{where}.ls1/ls2 are {sorted(ls_names)}, not both timm's LayerScale or both Identity")
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not TimmAttention:
            note(f"{where}.attn is {type(attn).__name__}, not timm's Attention")
        else:
            qk = {is_identity(attn.q_norm), is_identity(attn.k_norm)}
            if qk == {False} and not (is_plain_layer_norm(attn.q_norm) and is_plain_layer_norm(attn.k_norm)):
                note(f"{where}.attn.q_norm/k_norm are {type(attn.q_norm).__name__}, not LayerNorm")
            elif len(qk) > 1:
                note(f"only one of {where}.attn.q_norm/k_norm")
            if not qk_norm_seen.setdefault("value", qk == {False}) == (qk == {False}):
                note("blocks with and without qk_norm")
            if not is_identity(getattr(attn, "norm", None)):
                note(f"a norm on the attention output ({where}.attn.norm; scale_attn_norm=True)")
            if getattr(attn, "gate", None) is not None:
                note(f"gated attention ({where}.attn.gate)")
            if attn.proj.bias is None:
                note(f"an attention projection without bias ({where}.attn.proj; proj_bias=False)")
            if attn.qkv.out_features != 3 * attn.qkv.in_features or attn.proj.out_features != attn.qkv.in_features:
                note(f"an attention width different from the embedding width ({where}.attn)")
            elif abs(attn.scale - attn.head_dim ** -0.5) > 1e-12:
                note(f"an attention scale other than head_dim ** -0.5 ({where}.attn.scale={attn.scale})")
            dims.add(("heads", attn.num_heads))
            dims.add(("qkv_bias", attn.qkv.bias is not None))
        if type(mlp) is not TimmMlp:
            gated = " (a gated MLP: SwiGLU)" if type(mlp).__name__ in ("GluMlp", "SwiGLU", "SwiGLUPacked") else ""
            note(f"{where}.mlp is {type(mlp).__name__}{gated}, not timm's Mlp")
        else:
            act = mlp.act
            if _act_layer_name(act) is None:
                detail = f"(approximate={act.approximate!r})" if hasattr(act, "approximate") else ""
                note(f"{where}.mlp.act is {type(act).__name__}{detail}, not GELU, tanh GELU or QuickGELU")
            dims.add(("act", _act_layer_name(act)))
            if not is_identity(getattr(mlp, "norm", None)):
                note(f"a norm inside the MLP ({where}.mlp.norm; scale_mlp_norm=True)")
            if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
                note(f"{where}.mlp uses {type(mlp.fc1).__name__} layers, not Linear")
            elif mlp.fc1.bias is None or mlp.fc2.bias is None:
                note(f"MLP layers without bias ({where}.mlp; proj_bias=False)")
            else:
                dims.add(("mlp", mlp.fc1.out_features))
    for message, indices in block_why.items():
        why.append(f"{message} [blocks {_ranges(indices)}]")
    for what in ("heads", "qkv_bias", "mlp", "act"):
        values = {v for k, v in dims if k == what}
        if len(values) > 1:
            why.append(f"blocks with different {what} {sorted(values)}")
    return why


def _ranges(indices: List[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: List[List[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def timm_config(timm_model: nn.Module) -> Tuple[ViTConfig, Optional[nn.Module]]:
    """The `ViTConfig` of a timm `VisionTransformer` and its hybrid backbone (None if not hybrid).

    Raises NotImplementedError listing every feature of the timm model vitkern does not
    implement, and TypeError when `timm_model` is not a timm VisionTransformer.
    """
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(timm_model, VisionTransformer):
        other = _other_family_refusals(timm_model)
        if other:
            raise NotImplementedError(
                f"vitkern cannot convert this timm {type(timm_model).__name__}: it uses\n  - " + "\n  - ".join(other)
            )
        raise TypeError(
            f"timm_model_or_name must be a timm VisionTransformer or a timm model name, got {type(timm_model).__name__}"
        )
    why = _timm_refusals(timm_model)
    if why:
        raise NotImplementedError(
            f"vitkern cannot convert this timm {type(timm_model).__name__}: it uses\n  - " + "\n  - ".join(why)
        )
    tm = timm_model
    pe = tm.patch_embed
    blk = tm.blocks[0]
    embed_dim = tm.embed_dim
    backbone = getattr(pe, "backbone", None)
    drop_path = tm.blocks[-1].drop_path1
    config = ViTConfig(
        img_size=tuple(pe.img_size),
        patch_size=tuple(pe.patch_size),
        in_chans=int(getattr(tm, "in_chans", None) or pe.proj.in_channels),
        num_classes=tm.num_classes,
        global_pool=tm.global_pool,
        embed_dim=embed_dim,
        depth=len(tm.blocks),
        num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None,
        class_token=tm.cls_token is not None,
        fc_norm=isinstance(tm.fc_norm, nn.LayerNorm),
        drop_rate=tm.head_drop.p,
        pos_drop_rate=tm.pos_drop.p,
        proj_drop_rate=blk.attn.proj_drop.p,
        attn_drop_rate=blk.attn.attn_drop.p,
        drop_path_rate=float(getattr(drop_path, "drop_prob", 0.0)),
        norm_eps=blk.norm1.eps,
        dynamic_img_size=bool(tm.dynamic_img_size),
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        qk_norm=not isinstance(blk.attn.q_norm, nn.Identity),
        init_values=float(getattr(blk.ls1, "init_values", 1e-5)) if type(blk.ls1).__name__ == "LayerScale" else None,
        no_embed_class=bool(getattr(tm, "no_embed_class", False)),
        reg_tokens=int(getattr(tm, "num_reg_tokens", 0) or 0),
        pre_norm=not isinstance(getattr(tm, "norm_pre", None) or nn.Identity(), nn.Identity),
        act_layer=None if _act_layer_name(blk.mlp.act) == "gelu" else _act_layer_name(blk.mlp.act),
        patch_drop_rate=float(getattr(tm.patch_drop, "prob", 0.0)) if not isinstance(tm.patch_drop, nn.Identity) else 0.0,
        distilled=isinstance(tm, VisionTransformerDistilled),
    )
    return config, backbone


def from_timm(timm_model_or_name: Union[nn.Module, str], **overrides: Any) -> "ViT":
    """A `vitkern.ViT` with the architecture and the weights of a timm `VisionTransformer`.

    timm_model_or_name: a timm VisionTransformer (plain or hybrid, e.g. `vit_small_r26_s32_224`)
    or a timm model name, built with `timm.create_model(name, pretrained=False)` (random weights:
    vitkern never downloads). overrides: any of img_size (the position embedding is resampled
    bicubically, as timm does), num_classes (a freshly initialized head replaces timm's),
    global_pool, backend, dynamic_img_size, dynamic_img_pad and the dropout rates.

    The returned model has timm's device, dtype, train/eval mode and `pretrained_cfg`; a hybrid
    backbone is deep copied, so the two models share no parameters. Raises NotImplementedError
    listing the timm features vitkern does not implement (RoPE, SwiGLU and relative position bias
    of the EVA / BEiT families, non-LayerNorm norms, activations other than GELU / tanh GELU /
    QuickGELU, ...). The ViT family converts: LayerScale, QK-norm, register tokens, no_embed_class,
    pre_norm, class_token=False, global_pool='map', patch dropout, and timm's
    VisionTransformerDistilled (DeiT's distillation token). A timm NaFlexVit converts to a
    `vitkern.NaFlexViT` (packed batches; see `vitkern.naflex.naflex_from_timm` for its overrides).
    """
    if isinstance(timm_model_or_name, str):
        import timm

        timm_model = timm.create_model(timm_model_or_name, pretrained=False)
    else:
        timm_model = timm_model_or_name
    if type(timm_model).__name__ == "NaFlexVit":  # timm's packed-batch model: vitkern.NaFlexViT
        from vitkern.naflex import naflex_from_timm

        return naflex_from_timm(timm_model, **overrides)
    refused = sorted(set(overrides) - set(_TIMM_OVERRIDABLE))
    if refused:
        raise ValueError(
            f"from_timm cannot override {refused}: they change the architecture the weights were made for; "
            f"overridable: {list(_TIMM_OVERRIDABLE)}"
        )
    config, backbone = timm_config(timm_model)
    old_grid = tuple(timm_model.patch_embed.grid_size)
    config = config.replace(**overrides) if overrides else config
    state = dict(timm_model.state_dict())
    like = next(timm_model.parameters(), None)
    # A timm model on the meta device (built to read its architecture; timm's own tests do) has
    # shapes and no data: the conversion is a meta vitkern model, checked key by key and shape by
    # shape like any other, with nothing to copy.
    on_meta = like is not None and like.is_meta
    model = _build(config, copy.deepcopy(backbone) if backbone is not None else None, "meta" if on_meta else None)
    new_grid = tuple(model.patch_embed.grid_size)
    if new_grid != old_grid:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid, old_grid, model._pos_prefix)
    if config.num_classes != timm_model.num_classes:
        # A new label set: timm's head does not apply; keep the freshly initialized one.
        for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
            state.pop(key, None)
            if key in model.state_dict():
                state[key] = model.state_dict()[key]
    _load_checked(model, state, source="timm")
    model.distilled_training = bool(getattr(timm_model, "distilled_training", False))
    # The checkpoint's preprocessing (mean, std, crop_pct, ...): timm.data.resolve_data_config reads it.
    model.pretrained_cfg = copy.deepcopy(dict(getattr(timm_model, "pretrained_cfg", None) or {}))
    return _match_source(model, like, timm_model.training)


# --------------------------------------------------------------------------------------------
# Hugging Face transformers

# The hub's (pre-v5) names -> the current module names of transformers' ViT; both are accepted.
_HF_LEGACY = [
    (re.compile(r"^encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.attention\.attention\.(query|key|value)\."), lambda m: f".attention.{m.group(1)[0]}_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"^(layers\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
]

_HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}

_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}

# Keys of transformers' ViT that have no counterpart in an image classifier.
_HF_IGNORED = ("embeddings.mask_token",)


def _hf_normalize(key: str) -> str:
    if key.startswith("vit."):
        key = key[len("vit."):]
    for pattern, repl in _HF_LEGACY:
        key = pattern.sub(repl, key)
    return key


def hf_to_timm(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """transformers ViT state dict (current or hub names, with or without the `vit.` prefix)
    -> timm layout. q, k, v [dim, dim] each are stacked into qkv [3 * dim, dim] (timm's order:
    3, heads, head_dim along the rows, which is also how transformers splits heads)."""
    norm = {_hf_normalize(k): v for k, v in state.items() if _hf_normalize(k) not in _HF_IGNORED}
    out: Dict[str, Tensor] = {}
    used = set()
    for src, dst in _HF_TOP.items():
        if src in norm:
            out[dst] = norm[src]
            used.add(src)
    layers = sorted({int(m.group(1)) for k in norm for m in [re.match(r"^layers\.(\d+)\.", k)] if m})
    for i in layers:
        p = f"layers.{i}."
        for src, dst in _HF_BLOCK.items():
            for leaf in ("weight", "bias"):
                if p + f"{src}.{leaf}" in norm:
                    out[f"blocks.{i}.{dst}.{leaf}"] = norm[p + f"{src}.{leaf}"]
                    used.add(p + f"{src}.{leaf}")
        for leaf in ("weight", "bias"):
            parts = [p + f"attention.{n}_proj.{leaf}" for n in "qkv"]
            present = [k in norm for k in parts]
            if all(present):
                shapes = {_shape(norm[k]) for k in parts}
                if len(shapes) != 1:
                    raise ValueError(f"{p}attention.{{q,k,v}}_proj.{leaf} have different shapes {sorted(shapes)}")
                out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([norm[k] for k in parts], dim=0)
                used.update(parts)
            elif any(present):
                missing = [k for k, ok in zip(parts, present) if not ok]
                raise ValueError(f"incomplete attention projection in the HF weights: missing {missing}")
    unknown = [k for k in norm if k not in used]
    if unknown:
        raise ValueError(f"HF weights have keys vitkern does not know: {_preview(unknown)}")
    return out


def _hf_vitkern_config(hf_config: Any, state: Mapping[str, Tensor]) -> ViTConfig:
    """vitkern ViTConfig from a transformers ViTConfig and the converted (timm-layout) weights."""
    act = getattr(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise NotImplementedError(f"hidden_act={act!r}: vitkern's MLP uses the exact GELU (HF's 'gelu') only")
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * heads != hidden:
        raise NotImplementedError(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}")
    representation_size = None
    if "pre_logits.fc.weight" in state:
        pooler_act = getattr(hf_config, "pooler_act", "tanh")
        if pooler_act != "tanh":
            raise NotImplementedError(f"pooler_act={pooler_act!r}: vitkern's pre-logits head is Linear + tanh")
        representation_size = int(state["pre_logits.fc.weight"].shape[0])
    num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    img, patch = hf_config.image_size, hf_config.patch_size
    return ViTConfig(
        img_size=tuple(img) if isinstance(img, (list, tuple)) else img,
        patch_size=tuple(patch) if isinstance(patch, (list, tuple)) else patch,
        in_chans=hf_config.num_channels,
        num_classes=num_classes,
        global_pool="token",
        embed_dim=hidden,
        depth=hf_config.num_hidden_layers,
        num_heads=heads,
        mlp_ratio=hf_config.intermediate_size / hidden,
        qkv_bias=bool(getattr(hf_config, "qkv_bias", True)),
        class_token=True,
        fc_norm=False,
        # HF drops after the attention output and the MLP output; timm also after fc1 (eval unaffected).
        pos_drop_rate=float(hf_config.hidden_dropout_prob),
        proj_drop_rate=float(hf_config.hidden_dropout_prob),
        attn_drop_rate=float(hf_config.attention_probs_dropout_prob),
        norm_eps=float(hf_config.layer_norm_eps),
        representation_size=representation_size,
    )


def _pair(value: Any) -> Tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _hf_grid(hf_config: Any, tokens: int, num_prefix: int) -> Optional[Tuple[int, int]]:
    """The patch grid of an HF checkpoint whose position embedding has `tokens` tokens: from the HF
    config of the checkpoint when it has one that fits, else the square grid; None when neither fits."""
    if hf_config is not None and hasattr(hf_config, "image_size") and hasattr(hf_config, "patch_size"):
        (ih, iw), (ph, pw) = _pair(hf_config.image_size), _pair(hf_config.patch_size)
        if ph > 0 and pw > 0 and num_prefix + (ih // ph) * (iw // pw) == tokens:
            return ih // ph, iw // pw
    side = math.isqrt(max(tokens - num_prefix, 0))
    return (side, side) if side > 0 and num_prefix + side * side == tokens else None


def _fit_hf_pos_embed(state: Dict[str, Tensor], model: nn.Module, hf_config: Any) -> None:
    """Resample the checkpoint's pos_embed (timm layout, in `state`) to the model's patch grid in place.

    Only the token count may differ: another width, or a grid that cannot be told, leaves it as it
    is, and `_load_checked` reports the key with both shapes."""
    pos, target = state.get("pos_embed"), model.state_dict().get("pos_embed")
    if pos is None or target is None or _shape(pos) == _shape(target):
        return
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != target.shape[2]:
        return
    num_prefix = 1 if "cls_token" in state else 0  # transformers' ViT always has the class token
    old_grid = _hf_grid(hf_config, pos.shape[1], num_prefix)
    if old_grid is None:
        return
    state["pos_embed"] = resample_pos_embed(pos, tuple(model.patch_embed.grid_size), old_grid, num_prefix)


def load_hf(hf_model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]], config: Any = None) -> "ViT":
    """A `vitkern.ViT` with the weights of a transformers `ViTModel` or `ViTForImageClassification`.

    hf_model_or_state_dict: the HF model, or its state dict (current names such as
    `layers.N.attention.q_proj.weight` or the hub's `encoder.layer.N.attention.attention.query.weight`,
    with or without the `vit.` prefix). config: a `vitkern.ViTConfig` or a transformers
    `ViTConfig`; required for a bare state dict, else taken from the model.

    The mapping: q, k, v -> one fused `qkv` (timm's order); `layernorm_before/after` -> `norm1/2`
    with HF's `layer_norm_eps` (1e-12 by default) as `norm_eps`; `layernorm` -> `norm`; the
    pooler (dense + tanh on the class token) -> the paper's pre-logits head
    (`representation_size`, `pre_logits.fc`); `classifier` -> `head`. So for a `ViTModel`,
    `model.forward_features(x)` is HF's `last_hidden_state` and `model(x)` its `pooler_output`;
    for a `ViTForImageClassification`, `model(x)` is HF's logits.

    The model may have another resolution than the checkpoint (a config with another `img_size` /
    `image_size`): the position embedding is then resampled with `resample_pos_embed` (bicubic, the
    class token kept, as `from_timm` and `load_jax_npz` do). The checkpoint's grid is its HF config's
    image_size // patch_size, or for a bare state dict the square that its token count makes. Any
    other mismatch (patch size, width, depth) raises ValueError naming the key and both shapes.
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        module = hf_model_or_state_dict
        raw = module.state_dict()
        hf_config = getattr(module, "config", None)
        training = module.training
    elif isinstance(hf_model_or_state_dict, Mapping):
        module, raw, hf_config, training = None, hf_model_or_state_dict, None, True
    else:
        raise TypeError(
            "hf_model_or_state_dict must be a transformers ViT model or its state dict, "
            f"got {type(hf_model_or_state_dict).__name__}"
        )
    state = hf_to_timm(raw)
    if config is None and hf_config is None:
        raise ValueError("config is required when hf_model_or_state_dict is a bare state dict "
                         "(a vitkern.ViTConfig or a transformers ViTConfig)")
    config = config if config is not None else hf_config
    if isinstance(config, ViTConfig):
        vk_config = config
    elif hasattr(config, "hidden_size"):
        vk_config = _hf_vitkern_config(config, state)
    else:
        raise TypeError(f"config must be a vitkern.ViTConfig or a transformers ViTConfig, got {type(config).__name__}")
    model = _build(vk_config)
    _fit_hf_pos_embed(state, model, hf_config)
    _load_checked(model, state, source="HF")
    like = next((v for v in raw.values() if isinstance(v, Tensor) and v.is_floating_point()), None)
    return _match_source(model, like, training)


# --------------------------------------------------------------------------------------------
# The original JAX checkpoints (google-research/vision_transformer .npz)

_JAX_PREFIXES = ("", "opt/target/", "params/")


def _jax_prefix(keys: List[str]) -> str:
    for prefix in _JAX_PREFIXES:
        if prefix + "embedding/kernel" in keys:
            return prefix
    raise ValueError("not a ViT .npz checkpoint: no 'embedding/kernel' key (found e.g. "
                     f"{_preview(sorted(keys), 5)})")


_QKV = ("query", "key", "value")  # the JAX attention's projections, in the order of timm's fused qkv rows


def jax_to_timm(arrays: Mapping[str, Any], model: nn.Module, *, resample_mode: str = "bicubic",
                resample_antialias: bool = True, strict: bool = True) -> Dict[str, Tensor]:
    """The arrays of a JAX ViT checkpoint -> timm-layout tensors shaped for `model`.

    Transposes: the patch kernel HWIO [ph, pw, C, D] -> OIHW [D, C, ph, pw]; Dense kernels
    [in, out] -> Linear weights [out, in]; query/key/value kernels [D, heads, head_dim] -> rows of
    qkv [3 * D, D] (row s * D + h * head_dim + j holds kernel[:, h, j] of q, k or v for s = 0, 1, 2);
    the out kernel [heads, head_dim, D] -> proj [D, D] (column h * head_dim + j). The position
    embedding is resampled in 2-D when its grid differs from the model's (`resample_mode`, see
    `vitkern.pos_embed`: "bicubic" as timm's loader, "bilinear" as timm's bilinear option, "jax"
    as the original JAX repo's `scipy.ndimage.zoom(order=1)`). A shape that does not fit raises
    ValueError naming the checkpoint key, its shape and the expected shape; with `strict=False` a
    head of another shape (another label set) is skipped with a warning, as timm's loader skips it.
    A block with only some of query/key/value (kernel or bias) is refused naming the missing keys;
    with `strict=False` the present ones fill their rows of qkv, the others keep the model's values,
    and one warning names every missing key.
    """
    keys = list(arrays)
    prefix = _jax_prefix(keys)
    target = model.state_dict()
    used = set()
    out: Dict[str, Tensor] = {}

    def take(key: str, expected: Tuple[int, ...], dest: str) -> Optional[Tensor]:
        full = prefix + key
        if full not in arrays:
            return None
        used.add(full)
        value = torch.from_numpy(_to_numpy_float(arrays[full], full))
        if tuple(value.shape) != tuple(expected):
            raise ValueError(f"{full}: the checkpoint has shape {tuple(value.shape)} but {dest} needs {tuple(expected)}")
        return value

    def put(dest: str, value: Optional[Tensor]) -> None:
        if value is not None:
            out[dest] = value

    qkv_missing: List[str] = []

    def put_qkv(dest: str, parts: List[Optional[Tensor]], scope: str, leaf: str) -> None:
        """qkv's weight or bias from the q, k and v parts (rows s * D ... (s + 1) * D for s = 0, 1, 2).
        With only some parts present, strict refuses; strict=False loads them into their rows and
        keeps the model's values in the others (reported once, after every block)."""
        present = [p for p in parts if p is not None]
        if not present:
            return
        if len(present) == len(parts):
            out[dest] = torch.cat(parts, dim=0)
            return
        missing = [prefix + scope + f"{n}/{leaf}" for n, p in zip(_QKV, parts) if p is None]
        if strict:
            raise ValueError(
                f"the .npz has only part of {dest}: {', '.join(missing)} missing (pass strict=False to load the "
                "parts it has and keep the model's values for the others)"
            )
        if dest not in target:  # e.g. q/k/v biases for a model built with qkv_bias=False: nothing to merge into
            return
        merged = target[dest].detach().to(device="cpu", dtype=present[0].dtype).clone()
        rows = merged.shape[0] // len(parts)
        for s, p in enumerate(parts):
            if p is not None:
                merged[s * rows:(s + 1) * rows] = p
        out[dest] = merged
        qkv_missing.extend(missing)

    proj_w = target["patch_embed.proj.weight"]
    dim, chans, ph, pw = proj_w.shape
    w = take("embedding/kernel", (ph, pw, chans, dim), "patch_embed.proj.weight (as HWIO)")
    put("patch_embed.proj.weight", None if w is None else w.permute(3, 2, 0, 1))
    put("patch_embed.proj.bias", take("embedding/bias", (dim,), "patch_embed.proj.bias"))
    put("cls_token", take("cls", (1, 1, dim), "cls_token"))

    pos_key = prefix + "Transformer/posembed_input/pos_embedding"
    if pos_key in arrays:
        used.add(pos_key)
        pos = torch.from_numpy(_to_numpy_float(arrays[pos_key], pos_key))
        num_prefix = getattr(model, "num_prefix_tokens", 1)
        want = tuple(target["pos_embed"].shape)
        if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
            raise ValueError(f"{pos_key}: the checkpoint has shape {tuple(pos.shape)} but pos_embed needs {want}")
        side = math.isqrt(max(pos.shape[1] - num_prefix, 0))
        if side * side != pos.shape[1] - num_prefix or side == 0:
            raise ValueError(
                f"{pos_key}: the checkpoint has shape {tuple(pos.shape)}, which is not {num_prefix} prefix token(s) "
                f"plus a square grid; pos_embed needs {want}"
            )
        grid = tuple(model.patch_embed.grid_size)
        if (side, side) != grid:
            pos = resample_pos_embed(pos, grid, (side, side), num_prefix, mode=resample_mode, antialias=resample_antialias)
        out["pos_embed"] = pos

    depth = len(model.blocks)
    heads = model.blocks[0].attn.num_heads
    head_dim = dim // heads
    hidden = model.blocks[0].mlp.fc1.out_features
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        t = f"blocks.{i}."
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            put(t + f"{name}.weight", take(b + f"{ln}/scale", (dim,), t + f"{name}.weight"))
            put(t + f"{name}.bias", take(b + f"{ln}/bias", (dim,), t + f"{name}.bias"))
        a = b + "MultiHeadDotProductAttention_1/"
        kernels = [take(a + f"{n}/kernel", (dim, heads, head_dim), t + "attn.qkv.weight (per q/k/v)")
                   for n in _QKV]
        # [D_in, heads, head_dim] -> [heads * head_dim, D_in]: the Linear weight of q, k or v.
        put_qkv(t + "attn.qkv.weight", [None if k is None else k.reshape(dim, dim).t() for k in kernels], a, "kernel")
        biases = [take(a + f"{n}/bias", (heads, head_dim), t + "attn.qkv.bias (per q/k/v)") for n in _QKV]
        put_qkv(t + "attn.qkv.bias", [None if v is None else v.reshape(dim) for v in biases], a, "bias")
        o = take(a + "out/kernel", (heads, head_dim, dim), t + "attn.proj.weight")
        put(t + "attn.proj.weight", None if o is None else o.reshape(dim, dim).t())
        put(t + "attn.proj.bias", take(a + "out/bias", (dim,), t + "attn.proj.bias"))
        m = b + "MlpBlock_3/"
        k0 = take(m + "Dense_0/kernel", (dim, hidden), t + "mlp.fc1.weight (as [in, out])")
        put(t + "mlp.fc1.weight", None if k0 is None else k0.t())
        put(t + "mlp.fc1.bias", take(m + "Dense_0/bias", (hidden,), t + "mlp.fc1.bias"))
        k1 = take(m + "Dense_1/kernel", (hidden, dim), t + "mlp.fc2.weight (as [in, out])")
        put(t + "mlp.fc2.weight", None if k1 is None else k1.t())
        put(t + "mlp.fc2.bias", take(m + "Dense_1/bias", (dim,), t + "mlp.fc2.bias"))

    # The JAX encoder norm acts on every token before pooling: timm's `norm`, never `fc_norm`.
    if "norm.weight" not in target and prefix + "Transformer/encoder_norm/scale" in arrays:
        raise ValueError(
            "Transformer/encoder_norm normalizes every token before pooling, but the model normalizes after "
            "pooling (fc_norm); build it with fc_norm=False (e.g. global_pool='avg', fc_norm=False for 'gap' checkpoints)"
        )
    put("norm.weight", take("Transformer/encoder_norm/scale", (dim,), "norm.weight"))
    put("norm.bias", take("Transformer/encoder_norm/bias", (dim,), "norm.bias"))
    if "pre_logits.fc.weight" in target:
        rep = target["pre_logits.fc.weight"].shape[0]
        k = take("pre_logits/kernel", (dim, rep), "pre_logits.fc.weight (as [in, out])")
        put("pre_logits.fc.weight", None if k is None else k.t())
        put("pre_logits.fc.bias", take("pre_logits/bias", (rep,), "pre_logits.fc.bias"))
    if "head.weight" in target:
        classes, features = target["head.weight"].shape
        head_key = prefix + "head/kernel"
        theirs = tuple(arrays[head_key].shape) if head_key in arrays else None
        if not strict and theirs is not None and theirs != (features, classes):
            # Another label set (e.g. an ImageNet-21k checkpoint into a 10-class model): timm's
            # loader keeps the model's head; say so, since the logits then come from fresh weights.
            used.update({head_key, prefix + "head/bias"})
            warnings.warn(
                f"load_jax_npz: skipped the checkpoint's head: {head_key} has shape {theirs} (in, out) but the "
                f"model's head needs {(features, classes)}; the model keeps its own head",
                stacklevel=3,
            )
        else:
            k = take("head/kernel", (features, classes), "head.weight (as [in, out])")
            put("head.weight", None if k is None else k.t())
            put("head.bias", take("head/bias", (classes,), "head.bias"))

    if qkv_missing:
        warnings.warn(
            f"load_jax_npz: the .npz lacks {', '.join(qkv_missing)}; the matching q/k/v slices of attn.qkv keep the "
            "model's values (its initialization, unless loaded before), the other slices were loaded",
            stacklevel=3,
        )
    leftover = [k for k in keys if k not in used]
    if strict and leftover:
        hybrid = [k for k in leftover if k[len(prefix):].startswith(("conv_root", "gn_root", "block"))]
        if hybrid:
            raise NotImplementedError(
                "this .npz holds a ResNet hybrid backbone (e.g. " + _preview(hybrid, 3) + "), which load_jax_npz does "
                "not convert; load the backbone's weights yourself and call load_jax_npz(..., strict=False)"
            )
        raise ValueError(f"the .npz has keys the model has no place for: {_preview(leftover)} "
                         "(pass strict=False to skip them)")
    return out


def _to_numpy_float(value: Any, key: str):
    import numpy as np

    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{key}: expected a floating-point array, got dtype {array.dtype}")
    # float16 checkpoints load as they are; anything else goes through fp32 (torch.from_numpy needs a copy).
    return np.ascontiguousarray(array if array.dtype in (np.float16, np.float32, np.float64) else array.astype(np.float32))


def load_jax_npz(
    path: Union[str, "os.PathLike[str]", Any],
    model: nn.Module,
    *,
    resample_mode: str = "bicubic",
    resample_antialias: bool = True,
    strict: bool = True,
) -> "ViT":
    """Load an original google-research/vision_transformer `.npz` checkpoint into `model` in place.

    path: a file name or file object of the `.npz` (keys `embedding/kernel`, `cls`,
    `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_N/...`,
    `Transformer/encoder_norm`, `pre_logits`, `head`; an `opt/target/` or `params/` prefix is
    accepted). model: a `vitkern.ViT` of the checkpoint's width, depth and heads, at any
    resolution. resample_mode: how the position embedding is resampled to the model's grid:
    "bicubic" (default; timm's loader, antialiased when shrinking), "bilinear" (timm's bilinear,
    half-pixel centres) or "jax" (the original repo's `scipy.ndimage.zoom(order=1)`, corner-aligned:
    the one to use for the JAX code's own fine-tuning numbers). resample_antialias: for "bicubic"
    and "bilinear" only. With `strict=False`, checkpoint keys the model has no place for and model
    parameters the checkpoint lacks are skipped, and a head of another number of classes is
    skipped with a warning (the model keeps its own head), as timm's loader does. Returns `model`.
    """
    import numpy as np

    if resample_mode not in RESAMPLE_MODES:
        raise ValueError(f"resample_mode must be one of {RESAMPLE_MODES}, got {resample_mode!r}")
    if not isinstance(model, nn.Module) or not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        raise TypeError(f"model must be a vitkern.ViT, got {type(model).__name__}")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    state = jax_to_timm(arrays, model, resample_mode=resample_mode, resample_antialias=resample_antialias, strict=strict)
    backbone_keys = ("patch_embed.backbone.",) if getattr(model.patch_embed, "backbone", None) is not None and not strict else ()
    _load_checked(model, state, source=".npz", strict=strict, skip_prefixes=backbone_keys)
    return model
