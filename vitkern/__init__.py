"""vitkern: the Vision Transformer of Dosovitskiy et al. (2020) on fused Triton and CUDA kernels.

    import vitkern
    model = vitkern.vit_base_patch16_224(num_classes=1000)       # timm's state_dict keys
    model.load_state_dict(timm_model.state_dict())
    logits = model(images)                                        # backend="auto" picks kernels

The public API is exactly what this module exports.
"""

from __future__ import annotations

from typing import Any, List

from vitkern import ops
from vitkern.config import VARIANTS, ViTConfig, get_config
from vitkern.dispatch import BackendUnavailableError, available_backends
from vitkern.model import ViT
from vitkern.weights import from_timm, load_hf, load_jax_npz, resample_pos_embed

__version__ = "0.1.0"


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> ViT:
    """Build the named variant (timm's names, see `list_models()`), with `overrides` of any `ViT`
    argument (e.g. num_classes=10, img_size=384, backend="triton")."""
    if pretrained:
        raise ValueError(
            "pretrained=True would download weights, which vitkern does not do; load a checkpoint "
            "with vitkern.from_timm(timm_model), vitkern.load_hf(...) or vitkern.load_jax_npz(path, model)"
        )
    hybrid_backbone = overrides.pop("hybrid_backbone", None)
    cfg = get_config(name, **overrides)
    return ViT(hybrid_backbone=hybrid_backbone, **vars(cfg))


def list_models() -> List[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(VARIANTS)


def _named(name: str):
    def constructor(pretrained: bool = False, **overrides: Any) -> ViT:
        return create_model(name, pretrained=pretrained, **overrides)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = f"`{name}` (same config as timm's); keyword arguments override any ViT argument."
    return constructor


vit_tiny_patch16_224 = _named("vit_tiny_patch16_224")
vit_small_patch16_224 = _named("vit_small_patch16_224")
vit_base_patch16_224 = _named("vit_base_patch16_224")
vit_base_patch32_224 = _named("vit_base_patch32_224")
vit_base_patch16_384 = _named("vit_base_patch16_384")
vit_large_patch16_224 = _named("vit_large_patch16_224")
vit_large_patch16_384 = _named("vit_large_patch16_384")
vit_huge_patch14_224 = _named("vit_huge_patch14_224")

def __getattr__(name: str) -> Any:
    # `vitkern.inspect` is imported on first use: `python -m vitkern.inspect` then runs it fresh
    # (no runpy warning) and `import vitkern` stays light.
    if name == "inspect":
        import importlib

        return importlib.import_module("vitkern.inspect")
    raise AttributeError(f"module 'vitkern' has no attribute {name!r}")


__all__ = [
    "inspect", "ViT", "ViTConfig", "VARIANTS", "create_model", "list_models", "available_backends",
    "BackendUnavailableError", "ops", "from_timm", "load_hf", "load_jax_npz", "resample_pos_embed",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_224",
    "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch16_384", "vit_huge_patch14_224",
]
