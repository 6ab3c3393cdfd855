"""vitkern.config: the ViTConfig dataclass, its validation, the VARIANTS table (paper Table 1 + Ti/S)
and the named constructors, `create_model` and `list_models`, checked against timm's own models.
"""

from __future__ import annotations

import re

import pytest
import torch

import vitkern
from vitkern.config import FAMILIES, VARIANTS, ViTConfig, get_config, to_2tuple

# Issue 2, point 3: (depth, embed_dim, mlp_dim, heads) per family.
TABLE_1 = {"tiny": (12, 192, 768, 3), "small": (12, 384, 1536, 6), "base": (12, 768, 3072, 12),
           "large": (24, 1024, 4096, 16), "huge": (32, 1280, 5120, 16)}

NAMED = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_224",
         "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch16_384", "vit_huge_patch14_224"]

# The paper's family names among the variants: vit_<family>_patch<P>_<img> with a Table 1 family.
PAPER_NAMES = sorted(n for n in VARIANTS if re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch\d+_\d+", n))


def test_families_are_table_1():
    assert FAMILIES == TABLE_1


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_variant_config(name):
    # timm's heads and sizes per name are compared with timm in tests/test_backbone_api.py (every name).
    family, patch, img = name.split("_")[1], int(name.split("patch")[1].split("_")[0]), int(name.split("_")[-1])
    depth, dim, mlp, heads = TABLE_1[family]
    cfg = VARIANTS[name]
    assert (cfg.depth, cfg.embed_dim, cfg.mlp_hidden_dim, cfg.num_heads) == (depth, dim, mlp, heads)
    assert (cfg.patch_size, cfg.img_size) == (patch, img)
    assert (cfg.global_pool, cfg.class_token, cfg.qkv_bias, cfg.norm_eps) == ("token", True, True, 1e-6)


def _param_count(cfg: ViTConfig) -> int:
    """Parameters of a ViT from its config, counted by hand (patch conv, tokens, blocks, norm, head)."""
    d, m, (ph, pw) = cfg.embed_dim, cfg.mlp_hidden_dim, to_2tuple(cfg.patch_size, "patch_size")
    patch = d * cfg.in_chans * ph * pw + d
    tokens = d * cfg.class_token + cfg.num_tokens() * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    return patch + tokens + cfg.depth * block + 2 * d + (d * cfg.num_classes + cfg.num_classes)


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_paper_variant_parameter_count_by_hand(name):
    # An oracle independent of timm; the count against timm's is in tests/test_backbone_api.py.
    with torch.device("meta"):
        model = vitkern.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == _param_count(model.config)


def test_base_parameter_count_is_86_6m():
    # The built model's count is compared with timm's in tests/test_model.py (parity tests).
    assert _param_count(get_config("vit_base_patch16_224")) == 86_567_656


@pytest.mark.parametrize("name", NAMED)
def test_named_constructors_exist(name):
    constructor = getattr(vitkern, name)
    assert constructor.__name__ == name and name in vitkern.__all__
    assert name in vitkern.list_models()


def test_named_constructor_builds_the_variant_with_overrides():
    model = vitkern.vit_tiny_patch16_224(num_classes=10, img_size=96, backend="eager", depth=2)
    cfg = model.config
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.num_classes, cfg.img_size) == (192, 3, 2, 10, 96)
    assert model.backend == "eager" and model.pos_embed.shape == (1, 1 + 36, 192)
    assert model.head.weight.shape == (10, 192)


def test_create_model_and_list_models():
    names = vitkern.list_models()
    assert names == sorted(VARIANTS) and set(NAMED) <= set(names)
    model = vitkern.create_model("vit_small_patch16_224", num_classes=0, global_pool="avg", depth=1)
    assert model.config == get_config("vit_small_patch16_224", num_classes=0, global_pool="avg", depth=1)
    assert isinstance(model.fc_norm, torch.nn.LayerNorm) and isinstance(model.norm, torch.nn.Identity)
    with pytest.raises(ValueError, match=r"unknown model name 'vit_colossal_patch14_224'"):
        vitkern.create_model("vit_colossal_patch14_224")
    with pytest.raises(TypeError, match=r"unknown ViTConfig fields: \['embed_size'\]"):
        vitkern.create_model("vit_tiny_patch16_224", embed_size=10)


def test_get_config_returns_a_copy():
    cfg = get_config("vit_base_patch16_224")
    cfg.num_classes = 3
    assert VARIANTS["vit_base_patch16_224"].num_classes == 1000


def test_derived_properties():
    cfg = ViTConfig()
    assert (cfg.mlp_hidden_dim, cfg.head_dim, cfg.num_prefix_tokens) == (3072, 64, 1)
    assert cfg.grid_size() == (14, 14) and cfg.num_tokens() == 197
    assert cfg.num_tokens(384) == 577 and cfg.num_tokens((224, 288)) == 1 + 14 * 18
    assert get_config("vit_base_patch32_224").num_tokens() == 50
    # timm's rule: fc_norm=None normalizes after pooling exactly when pooling is 'avg'.
    assert not cfg.use_fc_norm and ViTConfig(global_pool="avg").use_fc_norm
    assert not ViTConfig(global_pool="avg", fc_norm=False).use_fc_norm and ViTConfig(fc_norm=True).use_fc_norm
    assert ViTConfig(class_token=False, global_pool="avg").num_tokens() == 196
    assert ViTConfig(img_size=32, patch_size=8, dynamic_img_pad=True).grid_size((30, 38)) == (4, 5)
    assert cfg.replace(depth=2).depth == 2 and cfg.depth == 12


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(embed_dim=100, num_heads=12), ValueError, r"embed_dim must be divisible by num_heads: embed_dim=100, num_heads=12"),
        (dict(global_pool="max"), ValueError, r"global_pool must be one of .* got 'max'"),
        (dict(class_token=False), ValueError, r"global_pool='token' needs class_token=True"),
        (dict(depth=0), ValueError, r"depth must be a positive int, got 0"),
        (dict(in_chans=2.5), ValueError, r"in_chans must be a positive int, got 2.5"),
        (dict(num_classes=-1), ValueError, r"num_classes must be an int >= 0, got -1"),
        (dict(mlp_ratio=0), ValueError, r"mlp_ratio must be positive, got 0"),
        (dict(drop_path_rate=1.0), ValueError, r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(attn_drop_rate=-0.1), ValueError, r"attn_drop_rate must be in \[0, 1\), got -0.1"),
        (dict(norm_eps=0.0), ValueError, r"norm_eps must be positive, got 0.0"),
        (dict(representation_size=0), ValueError, r"representation_size must be a positive int or None, got 0"),
        (dict(backend="gpu"), ValueError, r"backend must be one of .* got 'gpu'"),
        (dict(img_size=(224, 224, 3)), TypeError, r"img_size must be an int or a pair of ints, got \(224, 224, 3\)"),
        (dict(img_size=True), TypeError, r"img_size must be an int or a pair of ints, got bool True"),
        (dict(patch_size=0), ValueError, r"patch_size must be positive, got 0"),
    ],
)
def test_config_validation_names_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        ViTConfig(**kwargs)
    # The model validates through the same config.
    with pytest.raises(error, match=message):
        vitkern.ViT(**dict(dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2), **kwargs))


def test_to_2tuple():
    assert to_2tuple(16, "p") == (16, 16) and to_2tuple([8, 4], "p") == (8, 4)
    with pytest.raises(TypeError, match=r"p must be an int or a pair of ints, got '16'"):
        to_2tuple("16", "p")


def test_model_builds_on_meta_device():
    # Large models are built on meta and materialized later (FSDP, checkpoint loading).
    with torch.device("meta"):
        model = vitkern.vit_large_patch16_224()
    assert model.pos_embed.device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == _param_count(model.config)


def test_mlp_width_from_a_ratio_is_exact():
    # A width read from weights travels as the ratio width / embed_dim: every such width comes back
    # (int() alone lost one for about a quarter of these pairs, e.g. 112 -> 488 gave 487).
    for dim in range(8, 1281, 8):
        for hidden in range(dim, 4 * dim + 1, 7):
            assert ViTConfig(embed_dim=dim, num_heads=1, mlp_ratio=hidden / dim).mlp_hidden_dim == hidden, (dim, hidden)
    # Otherwise timm's int(): 112 * 4.36 = 488.32 -> 488, and 768 * 4.0 = 3072.
    assert ViTConfig(embed_dim=112, num_heads=2, mlp_ratio=4.36).mlp_hidden_dim == 488
    assert ViTConfig(embed_dim=112, num_heads=2, mlp_ratio=4.3699).mlp_hidden_dim == 489
    assert ViTConfig().mlp_hidden_dim == 3072
