"""vitkern: the Vision Transformer of Dosovitskiy et al. (2020) on fused Triton and CUDA kernels.

    import vitkern
    model = vitkern.vit_base_patch16_224(num_classes=1000)       # timm's state_dict keys
    model.load_state_dict(timm_model.state_dict())
    logits = model(images)                                        # backend="auto" picks kernels

The public API is exactly what this module exports.
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
from torch import nn

from vitkern import ops
from vitkern.apply import ApplyReport, apply, register_hf_attention, revert
from vitkern.config import TIMM_TAGS, VARIANTS, ViTConfig, get_config, pretrained_cfg, split_model_name
from vitkern.dispatch import BackendUnavailableError, auto_backends, available_backends
from vitkern.features import FeatureBackbone, FeatureInfo
from vitkern.model import ViT
from vitkern.naflex import NaFlexViT
from vitkern.packing import Packed, SeqLens, pack, unpack
from vitkern.pos_embed import resample_pos_embed
from vitkern.weights import from_timm, load_hf, load_jax_npz

__version__ = "0.1.0"

# ViT arguments only vitkern has, which a timm checkpoint cannot come with.
_NOT_IN_TIMM = ("representation_size", "hybrid_backbone")


def create_model(
    name: str,
    pretrained: bool = False,
    *,
    features_only: bool = False,
    out_indices: Optional[Union[int, List[int]]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    **overrides: Any,
) -> nn.Module:
    """Build the named variant as timm's `create_model` does.

    name: a timm name (see `list_models()`), optionally with a pretrained tag
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", see `list_pretrained()`); the tag's checkpoint
    sets num_classes and the image size (unless overridden) and `model.pretrained_cfg` (the
    default tag's without one). overrides: any `ViT` argument (num_classes=10, img_size=384,
    backend="triton", ...). device / dtype: build straight there (device="meta" sizes a huge model
    without memory). features_only: return a `FeatureBackbone` (the outputs of the blocks in
    `out_indices`, default the last 3, as [batch, embed_dim, grid_h, grid_w] maps), as timm's.

    pretrained=True loads the tag's weights through timm's hub loader (`timm` installed and the
    network reachable) and converts them with `from_timm`; otherwise it raises RuntimeError saying
    how to load a local checkpoint file instead.
    """
    arch, tag = split_model_name(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the blocks of a features_only=True model; pass features_only=True")
    if pretrained:
        model = _load_pretrained(name, device=device, dtype=dtype, **overrides)
    else:
        hybrid_backbone = overrides.pop("hybrid_backbone", None)
        cfg = get_config(name, **overrides)
        model = ViT(hybrid_backbone=hybrid_backbone, device=device, dtype=dtype, **vars(cfg))
        model.pretrained_cfg = pretrained_cfg(name)
    if features_only:
        return FeatureBackbone(model, 3 if out_indices is None else out_indices)
    return model


def _load_pretrained(name: str, *, device: Any, dtype: Any, **overrides: Any) -> ViT:
    """timm builds the model and loads the checkpoint (its hub cache, its filters); vitkern converts."""
    local = (
        "To load a local file instead, build the model with pretrained=False and then: "
        "vitkern.load_jax_npz(path, model) for an original .npz; "
        "model.load_state_dict(torch.load(path)) (or safetensors.torch.load_file(path)) for a timm "
        "checkpoint; or vitkern.from_timm(timm.create_model(name, pretrained=True, "
        "pretrained_cfg_overlay=dict(file=path)))."
    )
    refused = [k for k in _NOT_IN_TIMM if overrides.get(k) is not None]
    if refused:
        raise ValueError(f"pretrained=True loads timm's checkpoint, which has no {refused}; build with "
                         f"pretrained=False to use them")
    try:
        import timm
    except ImportError as error:
        raise RuntimeError(f"pretrained=True downloads {name!r} through timm's hub loader, but timm is not "
                           f"installed (pip install timm). {local}") from error
    backend = overrides.pop("backend", None)
    try:
        timm_model = timm.create_model(name, pretrained=True, **overrides)
    except Exception as error:  # no network, no such file on the hub, ...: every cause is reported
        raise RuntimeError(f"pretrained=True could not load {name!r} through timm's hub loader: "
                           f"{type(error).__name__}: {str(error).rstrip('.')}. {local}") from error
    model = from_timm(timm_model, **({} if backend is None else {"backend": backend}))
    model.pretrained_cfg = dict(timm_model.pretrained_cfg)
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


def list_models() -> List[str]:
    """Names accepted by `create_model` (timm's plain-ViT names), sorted."""
    return sorted(VARIANTS)


def list_pretrained() -> List[str]:
    """Every "name.tag" with a pretrained cfg, timm's `list_pretrained()` for these models."""
    return [f"{arch}.{tag}" for arch in sorted(TIMM_TAGS) for tag in TIMM_TAGS[arch]]


def _named(name: str):
    def constructor(pretrained: bool = False, **overrides: Any) -> nn.Module:
        return create_model(name, pretrained=pretrained, **overrides)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__test__ = False  # timm's `test_vit` is a model, not a test pytest should collect
    constructor.__doc__ = (f"`{name}` with timm's config and default pretrained cfg; keyword arguments as "
                           "`vitkern.create_model` (any ViT argument, device, dtype, features_only).")
    return constructor


# One constructor per name, as timm's `timm.models.<name>` (vitkern.vit_base_patch16_224(...)).
for _name in VARIANTS:
    globals()[_name] = _named(_name)
del _name

__all__ = [
    "ViT", "ViTConfig", "VARIANTS", "create_model", "list_models", "list_pretrained", "pretrained_cfg",
    "available_backends", "auto_backends", "BackendUnavailableError", "ops", "from_timm", "load_hf", "load_jax_npz",
    "resample_pos_embed", "FeatureBackbone", "FeatureInfo", "Packed", "SeqLens", "pack", "unpack", "NaFlexViT",
    "apply", "revert", "register_hf_attention", "ApplyReport", *sorted(VARIANTS),
]
