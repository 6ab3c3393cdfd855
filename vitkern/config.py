"""Model configuration: the `ViTConfig` dataclass and the table of named variants.

The variants are every plain patch ViT timm names: the paper's Table 1 (Base, Large, Huge), the
smaller Tiny and Small that DeiT and timm made common, the larger Giant and Gigantic, and the
DeiT, EVA, SigLIP-GAP, ... checkpoints with the same architecture. Names follow timm exactly
(``vit_base_patch16_224``, with pretrained tags as in ``vit_base_patch16_224.augreg2_in21k_ft_in1k``)
so that a user can swap ``timm.create_model(name)`` for ``vitkern.create_model(name)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

BACKENDS = ("auto", "eager", "triton", "cuda", "torch")
GLOBAL_POOLS = ("token", "avg", "map", "")
ACT_LAYERS = ("gelu", "gelu_tanh", "quick_gelu")  # timm's act_layer names vitkern fuses


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

    The ViT family's options, timm's names and defaults: `qk_norm` (LayerNorm of q and k per
    head), `init_values` (LayerScale, None = off), `no_embed_class` (pos_embed covers the patch
    tokens only), `reg_tokens` (register tokens after the class token), `pre_norm` (a LayerNorm
    `norm_pre` before the blocks; the patch embedding then has no bias), `act_layer` (None or
    "gelu", "gelu_tanh", "quick_gelu"), `patch_drop_rate` (PatchDropout in training),
    global_pool="map" (attention-pool head). `distilled` (not a timm argument: timm has the class
    `VisionTransformerDistilled`) adds DeiT's distillation token and `head_dist`.
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
    qk_norm: bool = False
    init_values: Optional[float] = None
    no_embed_class: bool = False
    reg_tokens: int = 0
    pre_norm: bool = False
    act_layer: Optional[str] = None
    patch_drop_rate: float = 0.0
    distilled: bool = False

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
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "patch_drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError(f"representation_size must be a positive int or None, got {self.representation_size!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("qk_norm", "no_embed_class", "pre_norm", "distilled"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        if self.init_values is not None and (isinstance(self.init_values, bool) or not isinstance(self.init_values, (int, float))):
            raise TypeError(f"init_values must be a float or None (no LayerScale), got {self.init_values!r}")
        if self.act_layer is not None and self.act_layer not in ACT_LAYERS:
            raise ValueError(f"act_layer must be None or one of {ACT_LAYERS}, got {self.act_layer!r}")
        if self.distilled:
            # timm's VisionTransformerDistilled: the heads read tokens 0 (class) and 1 (distillation).
            if not self.class_token or self.global_pool not in ("token", ""):
                raise ValueError("distilled=True needs class_token=True and global_pool='token' (the heads read the "
                                 f"class and distillation tokens), got class_token={self.class_token}, "
                                 f"global_pool={self.global_pool!r}")
            if self.reg_tokens:
                raise ValueError(f"distilled=True takes no register tokens (timm's VisionTransformerDistilled has none), "
                                 f"got reg_tokens={self.reg_tokens}")
            if self.representation_size is not None:
                raise ValueError("distilled=True has no pre-logits layer; leave representation_size=None")

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
        """Class token, distillation token, register tokens: the rows before the patch tokens."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def pos_embed_prefix_tokens(self) -> int:
        """The prefix tokens pos_embed has rows for: none with no_embed_class."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

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


# --------------------------------------------------------------------------------------------
# timm's names and pretrained tags, as data (vitkern needs no timm at run time)
#
# Every model timm registers (modules vision_transformer and deit) that is a plain patch ViT
# vitkern builds exactly: `vitkern.weights.timm_config` accepts it and it has no hybrid backbone.
# Derived from timm 1.0.31's registry by building each of those models on the meta device and
# keeping the ones timm_config accepts (tests/test_backbone_api.py checks names, parameter counts
# and pretrained cfgs against the installed timm). TIMM_ARCHS holds each name's ViTConfig fields
# that differ from the defaults, except num_classes and img_size, which come from the
# pretrained tag as in timm. TIMM_TAGS holds, per name, its pretrained tags in timm's order (the
# first is the default) and each tag's pretrained cfg as the fields that differ from _TIMM_CFG_BASE
# (_ABSENT: the tag has no such field). The ViT family's names at the end of both tables (DINOv2,
# CLIP, SigLIP, DeiT distilled, DeiT III: issue 13) were derived the same way from the same registry;
# timm has more names with those options, which `from_timm` converts.

INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ZERO_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
_ABSENT = object()

_TIMM_CFG_BASE: Dict[str, Any] = dict(
    url="", hf_hub_id=None, architecture=None, tag=None, custom_load=False, input_size=(3, 224, 224),
    fixed_input_size=True, interpolation="bicubic", crop_pct=0.9, crop_mode="center", mean=INCEPTION_MEAN,
    std=INCEPTION_STD, num_classes=1000, pool_size=None, first_conv="patch_embed.proj", classifier="head",
    license="apache-2.0",
)

TIMM_ARCHS: Dict[str, Dict[str, Any]] = {
    'deit_base_patch16_224': dict(),
    'deit_base_patch16_384': dict(),
    'deit_small_patch16_224': dict(embed_dim=384, num_heads=6),
    'deit_tiny_patch16_224': dict(embed_dim=192, num_heads=3),
    'eva_large_patch14_196': dict(patch_size=14, global_pool='avg', embed_dim=1024, depth=24, num_heads=16),
    'eva_large_patch14_336': dict(patch_size=14, global_pool='avg', embed_dim=1024, depth=24, num_heads=16),
    'test_vit': dict(embed_dim=64, depth=6, num_heads=2, mlp_ratio=3.0, dynamic_img_size=True),
    'vit_base_patch16_224': dict(),
    'vit_base_patch16_224_miil': dict(qkv_bias=False),
    'vit_base_patch16_384': dict(),
    'vit_base_patch16_gap_224': dict(global_pool='avg', num_heads=16, class_token=False, fc_norm=False),
    'vit_base_patch16_siglip_gap_224': dict(global_pool='avg', class_token=False, fc_norm=False),
    'vit_base_patch16_siglip_gap_256': dict(global_pool='avg', class_token=False, fc_norm=False),
    'vit_base_patch16_siglip_gap_384': dict(global_pool='avg', class_token=False, fc_norm=False),
    'vit_base_patch16_siglip_gap_512': dict(global_pool='avg', class_token=False, fc_norm=False),
    'vit_base_patch32_224': dict(patch_size=32),
    'vit_base_patch32_384': dict(patch_size=32),
    'vit_base_patch8_224': dict(patch_size=8),
    'vit_giant_patch14_224': dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=4.363636363636363),
    'vit_giant_patch16_gap_224': dict(global_pool='avg', embed_dim=1408, depth=40, num_heads=16, mlp_ratio=4.363636363636363, class_token=False, fc_norm=False),
    'vit_gigantic_patch14_224': dict(patch_size=14, embed_dim=1664, depth=48, num_heads=16, mlp_ratio=4.923076923076923),
    'vit_huge_patch14_224': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    'vit_huge_patch14_gap_224': dict(patch_size=14, global_pool='avg', embed_dim=1280, depth=32, num_heads=16, class_token=False, fc_norm=False),
    'vit_huge_patch16_gap_448': dict(global_pool='avg', embed_dim=1280, depth=32, num_heads=16, class_token=False, fc_norm=False),
    'vit_large_patch14_224': dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    'vit_large_patch16_224': dict(embed_dim=1024, depth=24, num_heads=16),
    'vit_large_patch16_384': dict(embed_dim=1024, depth=24, num_heads=16),
    'vit_large_patch16_siglip_gap_256': dict(global_pool='avg', embed_dim=1024, depth=24, num_heads=16, class_token=False, fc_norm=False),
    'vit_large_patch16_siglip_gap_384': dict(global_pool='avg', embed_dim=1024, depth=24, num_heads=16, class_token=False, fc_norm=False),
    'vit_large_patch32_224': dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16),
    'vit_large_patch32_384': dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16),
    'vit_small_patch16_224': dict(embed_dim=384, num_heads=6),
    'vit_small_patch16_384': dict(embed_dim=384, num_heads=6),
    'vit_small_patch32_224': dict(patch_size=32, embed_dim=384, num_heads=6),
    'vit_small_patch32_384': dict(patch_size=32, embed_dim=384, num_heads=6),
    'vit_small_patch8_224': dict(patch_size=8, embed_dim=384, num_heads=6),
    'vit_so400m_patch14_siglip_gap_224': dict(patch_size=14, global_pool='avg', embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.736111111111111, class_token=False, fc_norm=False),
    'vit_so400m_patch14_siglip_gap_378': dict(patch_size=14, global_pool='avg', embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.736111111111111, class_token=False, fc_norm=False),
    'vit_so400m_patch14_siglip_gap_384': dict(patch_size=14, global_pool='avg', embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.736111111111111, class_token=False, fc_norm=False),
    'vit_so400m_patch14_siglip_gap_448': dict(patch_size=14, global_pool='avg', embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.736111111111111, class_token=False, fc_norm=False),
    'vit_so400m_patch14_siglip_gap_896': dict(patch_size=14, global_pool='avg', embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.736111111111111, class_token=False, fc_norm=False),
    'vit_tiny_patch16_224': dict(embed_dim=192, num_heads=3),
    'vit_tiny_patch16_384': dict(embed_dim=192, num_heads=3),
    # The ViT family (issue 13): the common checkpoints of each option, by timm's names.
    'vit_small_patch14_dinov2': dict(patch_size=14, embed_dim=384, num_heads=6, init_values=1e-5),
    'vit_small_patch14_reg4_dinov2': dict(patch_size=14, embed_dim=384, num_heads=6, init_values=1e-5, reg_tokens=4,
                                          no_embed_class=True),
    'vit_base_patch16_clip_224': dict(pre_norm=True, norm_eps=1e-5),
    'vit_base_patch16_siglip_224': dict(global_pool='map', class_token=False),
    'deit_small_distilled_patch16_224': dict(embed_dim=384, num_heads=6, distilled=True),
    'deit3_small_patch16_224': dict(embed_dim=384, num_heads=6, no_embed_class=True, init_values=1e-6),
}

TIMM_TAGS: Dict[str, Dict[str, Dict[str, Any]]] = {
    'deit_base_patch16_224': {
        'fb_in1k': dict(url='https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD),
    },
    'deit_base_patch16_384': {
        'fb_in1k': dict(url='https://dl.fbaipublicfiles.com/deit/deit_base_patch16_384-8de9b5d1.pth', input_size=(3, 384, 384), crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    },
    'deit_small_patch16_224': {
        'fb_in1k': dict(url='https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD),
    },
    'deit_tiny_patch16_224': {
        'fb_in1k': dict(url='https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD),
    },
    'eva_large_patch14_196': {
        'in22k_ft_in22k_in1k': dict(input_size=(3, 196, 196), crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, license='mit'),
        'in22k_ft_in1k': dict(input_size=(3, 196, 196), crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, license='mit'),
    },
    'eva_large_patch14_336': {
        'in22k_ft_in22k_in1k': dict(input_size=(3, 336, 336), crop_pct=1.0, crop_mode='squash', mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, license='mit'),
        'in22k_ft_in1k': dict(input_size=(3, 336, 336), crop_pct=1.0, crop_mode='squash', mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, license='mit'),
    },
    'test_vit': {
        'r160_in1k': dict(input_size=(3, 160, 160), crop_pct=0.95),
    },
    'vit_base_patch16_224': {
        'augreg2_in21k_ft_in1k': dict(),
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
        'orig_in21k_ft_in1k': dict(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/jx_vit_base_p16_224-80ecf9dd.pth'),
        'augreg_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
        'orig_in21k': dict(num_classes=0),
        'augreg_in21k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
        'sam_in1k': dict(url='https://storage.googleapis.com/vit_models/sam/ViT-B_16.npz', custom_load=True),
        'bamboo': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=115217, origin_url='https://github.com/ZhangYuanhan-AI/Bamboo', paper_ids='arXiv:2203.07845', license=_ABSENT),
        'dino': dict(url='https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0),
        'mae': dict(url='https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0, license='cc-by-nc-4.0'),
    },
    'vit_base_patch16_224_miil': {
        'in21k': dict(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-tresnet/vit_base_patch16_224_in21k_miil-887286df.pth', interpolation='bilinear', crop_pct=0.875, mean=ZERO_MEAN, std=UNIT_STD, num_classes=11221),
        'in21k_ft_in1k': dict(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-tresnet/vit_base_patch16_224_1k_miil_84_4-2deb18e3.pth', interpolation='bilinear', crop_pct=0.875, mean=ZERO_MEAN, std=UNIT_STD),
    },
    'vit_base_patch16_384': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
        'orig_in21k_ft_in1k': dict(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/jx_vit_base_p16_384-83fb41ba.pth', input_size=(3, 384, 384), crop_pct=1.0),
        'augreg_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    },
    'vit_base_patch16_gap_224': {
        'untrained': dict(hf_hub_id=_ABSENT),
    },
    'vit_base_patch16_siglip_gap_224': {
        'v2_webli': dict(num_classes=0),
        'webli': dict(num_classes=0),
    },
    'vit_base_patch16_siglip_gap_256': {
        'v2_webli': dict(input_size=(3, 256, 256), num_classes=0),
        'webli': dict(input_size=(3, 256, 256), num_classes=0),
        'webli_i18n': dict(input_size=(3, 256, 256), num_classes=0),
    },
    'vit_base_patch16_siglip_gap_384': {
        'v2_webli': dict(input_size=(3, 384, 384), num_classes=0),
        'webli': dict(input_size=(3, 384, 384), num_classes=0),
    },
    'vit_base_patch16_siglip_gap_512': {
        'v2_webli': dict(input_size=(3, 512, 512), num_classes=0),
        'webli': dict(input_size=(3, 512, 512), num_classes=0),
    },
    'vit_base_patch32_224': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
        'augreg_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
        'orig_in21k': dict(num_classes=0),
        'augreg_in21k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
        'sam_in1k': dict(url='https://storage.googleapis.com/vit_models/sam/ViT-B_32.npz', custom_load=True),
    },
    'vit_base_patch32_384': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
        'augreg_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    },
    'vit_base_patch8_224': {
        'augreg2_in21k_ft_in1k': dict(),
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
        'augreg_in21k': dict(url='https://storage.googleapis.com/vit_models/augreg/B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
        'dino': dict(url='https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0),
    },
    'vit_giant_patch14_224': {
        'untrained': dict(hf_hub_id=_ABSENT),
    },
    'vit_giant_patch16_gap_224': {
        'in22k_ijepa': dict(hf_hub_id=_ABSENT, url='https://dl.fbaipublicfiles.com/ijepa/IN22K-vit.g.16-600e.pth.tar', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0, license='cc-by-nc-4.0'),
    },
    'vit_gigantic_patch14_224': {
        'untrained': dict(hf_hub_id=_ABSENT),
    },
    'vit_huge_patch14_224': {
        'orig_in21k': dict(num_classes=0),
        'untrained': dict(hf_hub_id=_ABSENT),
        'mae': dict(url='https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0, license='cc-by-nc-4.0'),
    },
    'vit_huge_patch14_gap_224': {
        'in1k_ijepa': dict(hf_hub_id=_ABSENT, url='https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0, license='cc-by-nc-4.0'),
        'in22k_ijepa': dict(hf_hub_id=_ABSENT, url='https://dl.fbaipublicfiles.com/ijepa/IN22K-vit.h.14-900e.pth.tar', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0, license='cc-by-nc-4.0'),
    },
    'vit_huge_patch16_gap_448': {
        'in1k_ijepa': dict(hf_hub_id=_ABSENT, url='https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.16-448px-300e.pth.tar', input_size=(3, 448, 448), crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0, license='cc-by-nc-4.0'),
    },
    'vit_large_patch14_224': {
        'untrained': dict(hf_hub_id=_ABSENT),
    },
    'vit_large_patch16_224': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
        'orig_in21k': dict(num_classes=0),
        'augreg_in21k': dict(url='https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz', custom_load=True, num_classes=21843),
        'mae': dict(url='https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0, license='cc-by-nc-4.0'),
    },
    'vit_large_patch16_384': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    },
    'vit_large_patch16_siglip_gap_256': {
        'v2_webli': dict(input_size=(3, 256, 256), num_classes=0),
        'webli': dict(input_size=(3, 256, 256), num_classes=0),
    },
    'vit_large_patch16_siglip_gap_384': {
        'v2_webli': dict(input_size=(3, 384, 384), num_classes=0),
        'webli': dict(input_size=(3, 384, 384), num_classes=0),
    },
    'vit_large_patch32_224': {
        'orig_in21k': dict(num_classes=0),
    },
    'vit_large_patch32_384': {
        'orig_in21k_ft_in1k': dict(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/jx_vit_large_p32_384-9b920ba8.pth', input_size=(3, 384, 384), crop_pct=1.0),
    },
    'vit_small_patch16_224': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
        'augreg_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
        'augreg_in21k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
        'dino': dict(url='https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0),
    },
    'vit_small_patch16_384': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
        'augreg_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    },
    'vit_small_patch32_224': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
        'augreg_in21k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    },
    'vit_small_patch32_384': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    },
    'vit_small_patch8_224': {
        'dino': dict(url='https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0),
    },
    'vit_so400m_patch14_siglip_gap_224': {
        'v2_webli': dict(num_classes=0),
        'webli': dict(num_classes=0),
        'pali_mix': dict(num_classes=0),
        'pali_pt': dict(num_classes=0),
        'pali2_3b_pt': dict(num_classes=0),
        'pali2_10b_pt': dict(num_classes=0),
    },
    'vit_so400m_patch14_siglip_gap_378': {
        'v2_webli': dict(input_size=(3, 378, 378), num_classes=0),
        'webli': dict(input_size=(3, 378, 378), crop_pct=1.0, num_classes=0),
        'webli_ft_in1k': dict(input_size=(3, 378, 378), crop_pct=1.0, crop_mode='squash'),
    },
    'vit_so400m_patch14_siglip_gap_384': {
        'webli': dict(input_size=(3, 384, 384), crop_pct=1.0, num_classes=0),
    },
    'vit_so400m_patch14_siglip_gap_448': {
        'pali_mix': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
        'pali_pt': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
        'pali_refcoco_seg': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
        'pali_ocrvqa': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
        'pali2_3b_pt': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
        'pali2_10b_pt': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
        'pali2_3b_docci': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
        'pali2_10b_docci': dict(input_size=(3, 448, 448), crop_pct=1.0, num_classes=0),
    },
    'vit_so400m_patch14_siglip_gap_896': {
        'pali_pt': dict(input_size=(3, 896, 896), crop_pct=1.0, num_classes=0),
        'pali_refcoco_seg': dict(input_size=(3, 896, 896), crop_pct=1.0, num_classes=0),
        'pali_ocrvqa': dict(input_size=(3, 896, 896), crop_pct=1.0, num_classes=0),
        'pali2_3b_pt': dict(input_size=(3, 896, 896), crop_pct=1.0, num_classes=0),
        'pali2_10b_pt': dict(input_size=(3, 896, 896), crop_pct=1.0, num_classes=0),
    },
    'vit_tiny_patch16_224': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
        'augreg_in21k': dict(url='https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    },
    'vit_tiny_patch16_384': {
        'augreg_in21k_ft_in1k': dict(url='https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    },
    'vit_small_patch14_dinov2': {
        'lvd142m': dict(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0),
    },
    'vit_small_patch14_reg4_dinov2': {
        'lvd142m': dict(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=0),
    },
    'vit_base_patch16_clip_224': {
        'laion2b_ft_in12k_in1k': dict(crop_pct=0.95, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
        'openai_ft_in12k_in1k': dict(crop_pct=0.95, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
        'laion2b_ft_in1k': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
        'openai_ft_in1k': dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
        'laion2b_ft_in12k': dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=11821),
        'openai_ft_in12k': dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=11821),
        'laion2b': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=512),
        'laion400m_e32': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=512, license='mit'),
        'datacompxl': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=512),
        'dfn2b': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=512, license='apple-ascl'),
        'metaclip_2pt5b': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=512, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
        'metaclip_400m': dict(crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=512, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
        'openai': dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, num_classes=512, notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    },
    'vit_base_patch16_siglip_224': {
        'v2_webli': dict(num_classes=0),
        'webli': dict(num_classes=0),
    },
    'deit_small_distilled_patch16_224': {
        'fb_in1k': dict(url='https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier=('head', 'head_dist')),
    },
    'deit3_small_patch16_224': {
        'fb_in1k': dict(url='https://dl.fbaipublicfiles.com/deit/deit_3_small_224_1k.pth', mean=IMAGENET_MEAN, std=IMAGENET_STD),
        'fb_in22k_ft_in1k': dict(url='https://dl.fbaipublicfiles.com/deit/deit_3_small_224_21k.pth', crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    },
}


def unknown_name(what: str, name: str, known: Iterable[str]) -> str:
    """"unknown model name 'vit_bse_patch16_224'; did you mean vit_base_patch16_224? (49 known:
    vitkern.list_models())": the close matches (difflib) instead of every known name."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    where = " vitkern.list_models()" if what == "model" else ": " + ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    return f"unknown {what} name {name!r}{hint} ({len(known)} known:{where})"


def split_model_name(name: str) -> Tuple[str, Optional[str]]:
    """A model name split into (architecture, pretrained tag or None), as timm splits
    "vit_base_patch16_224.augreg2_in21k_ft_in1k". Raises ValueError for an unknown name or tag."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    arch, _, tag = name.partition(".")
    if arch not in TIMM_ARCHS:
        raise ValueError(unknown_name("model", arch, TIMM_ARCHS))
    if tag and tag not in TIMM_TAGS[arch]:
        raise ValueError(f"unknown pretrained tag {tag!r} of {arch}; known: {list(TIMM_TAGS[arch])}")
    return arch, (tag or None)


def pretrained_cfg(name: str) -> Dict[str, Any]:
    """timm's pretrained cfg (a new dict) of `name` ("arch" for its default tag, or "arch.tag"): the
    checkpoint's url / hf_hub_id, input_size, interpolation, crop_pct, mean, std, num_classes, ..."""
    arch, tag = split_model_name(name)
    tag = tag or next(iter(TIMM_TAGS[arch]))
    cfg = dict(_TIMM_CFG_BASE, hf_hub_id=f"timm/{arch}.{tag}", architecture=arch, tag=tag)
    cfg.update(TIMM_TAGS[arch][tag])
    return {k: v for k, v in cfg.items() if v is not _ABSENT}


def _tag_defaults(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ViT arguments a pretrained cfg sets unless the caller gives them (timm's rule): its
    num_classes, its input channels and, for a fixed-size checkpoint, its image size."""
    out: Dict[str, Any] = {}
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        out["num_classes"] = cfg["num_classes"]
    if cfg.get("global_pool") is not None:
        out["global_pool"] = cfg["global_pool"]
    size = cfg.get("input_size")
    if size is not None:
        out["in_chans"] = size[0]
        if cfg.get("fixed_input_size", False):
            out["img_size"] = size[1] if size[1] == size[2] else (size[1], size[2])
    return out


def _named_config(name: str) -> ViTConfig:
    arch, _ = split_model_name(name)
    return ViTConfig(**dict(TIMM_ARCHS[arch], **_tag_defaults(pretrained_cfg(name))))


# The named variants, keyed by timm's model names (each with its default tag's head and size).
VARIANTS = {name: _named_config(name) for name in TIMM_ARCHS}


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The config of variant `name` ("arch" or "arch.tag": a tag sets its checkpoint's
    num_classes and image size, as in timm) with `overrides` applied."""
    cfg = _named_config(name)
    return cfg.replace(**overrides) if overrides else cfg
