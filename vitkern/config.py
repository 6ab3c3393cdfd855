"""Model configuration: the `ViTConfig` dataclass and the table of named variants.

The variants are the paper's Table 1 (Base, Large, Huge) plus the smaller Tiny and Small that
DeiT and timm made common. Names follow timm exactly (``vit_base_patch16_224``) so that a user can
swap ``timm.create_model(name)`` for ``vitkern.create_model(name)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

BACKENDS = ("auto", "eager", "triton", "cuda")
GLOBAL_POOLS = ("token", "avg", "")


def to_2tuple(value: Union[int, Tuple[int, int], list], name: str) -> Tuple[int, int]:
    """`value` as an (height, width) pair of positive ints; `name` is used in the error message."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got bool {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


@dataclass
class ViTConfig:
    """Every hyper-parameter of a `vitkern.ViT`; field names and defaults are timm's.

    `representation_size` adds the paper's pre-training head (Linear + tanh before the
    classifier); `hybrid_backbone` is not a field (it is a module, passed to `ViT` directly).
    """

    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: Union[int, Tuple[int, int]] = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    fc_norm: Optional[bool] = None
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False
    dynamic_img_pad: bool = False
    representation_size: Optional[int] = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first inconsistent field."""
        to_2tuple(self.img_size, "img_size")
        to_2tuple(self.patch_size, "patch_size")
        for name in ("in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads: embed_dim={self.embed_dim}, "
                f"num_heads={self.num_heads} (remainder {self.embed_dim % self.num_heads})"
            )
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' or ''")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError(f"representation_size must be a positive int or None, got {self.representation_size!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def mlp_hidden_dim(self) -> int:
        """The MLP's hidden width: timm's int(embed_dim * mlp_ratio), except that a product a float
        rounding error below an integer is that integer. A width read from weights travels as the
        ratio width / embed_dim, and 112 * (488 / 112) = 487.99999999999994: int() alone gave 487."""
        width = self.embed_dim * self.mlp_ratio
        nearest = round(width)
        return nearest if abs(width - nearest) <= 1e-9 * max(1.0, width) else int(width)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def use_fc_norm(self) -> bool:
        """timm's rule: with fc_norm=None, average pooling normalizes after pooling."""
        return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    def grid_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> Tuple[int, int]:
        """Patch grid (rows, cols) for an input of `img_size`; the default is the grid the position
        embedding is built for (whole patches of the configured size, as in timm). An explicit
        size under dynamic_img_pad counts the padded partial patches too."""
        h, w = to_2tuple(self.img_size if img_size is None else img_size, "img_size")
        ph, pw = to_2tuple(self.patch_size, "patch_size")
        if self.dynamic_img_pad and img_size is not None:
            return (-(-h // ph), -(-w // pw))
        return (h // ph, w // pw)

    def num_tokens(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> int:
        gh, gw = self.grid_size(img_size)
        return self.num_prefix_tokens + gh * gw

    def replace(self, **overrides: Any) -> "ViTConfig":
        """A copy with `overrides` applied (validated)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)


# Width/depth/heads of each family: (depth, embed_dim, mlp_dim, num_heads); the paper's Table 1 + Ti/S.
FAMILIES = {
    "tiny": (12, 192, 768, 3),
    "small": (12, 384, 1536, 6),
    "base": (12, 768, 3072, 12),
    "large": (24, 1024, 4096, 16),
    "huge": (32, 1280, 5120, 16),
}


def _variant(family: str, patch: int, img: int) -> ViTConfig:
    depth, dim, mlp, heads = FAMILIES[family]
    # timm's default heads: these two exist only as ImageNet-21k feature models (no classifier).
    num_classes = 0 if (family, patch, img) in {("huge", 14, 224), ("large", 32, 224)} else 1000
    return ViTConfig(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                     mlp_ratio=mlp / dim, num_classes=num_classes)


# The named variants, keyed by timm's model names.
VARIANTS = {
    f"vit_{family}_patch{patch}_{img}": _variant(family, patch, img)
    for family, patch, img in [
        ("tiny", 16, 224),
        ("tiny", 16, 384),
        ("small", 16, 224),
        ("small", 32, 224),
        ("small", 16, 384),
        ("base", 8, 224),
        ("base", 16, 224),
        ("base", 32, 224),
        ("base", 16, 384),
        ("base", 32, 384),
        ("large", 16, 224),
        ("large", 32, 224),
        ("large", 16, 384),
        ("huge", 14, 224),
    ]
}


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The config of variant `name` with `overrides` applied."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name].replace(**overrides) if overrides else dataclasses.replace(VARIANTS[name])
