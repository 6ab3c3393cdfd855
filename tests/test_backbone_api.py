"""timm's backbone API on vitkern.ViT (issue 12, part B), checked against timm itself.

forward_intermediates / get_intermediate_layers / prune_intermediate_layers / set_input_size give
timm's results on the same weights; layer-wise lr decay builds timm's parameter groups;
resolve_data_config reads the checkpoint's pretrained cfg; features_only is timm's feature
backbone; construction on the meta device; every timm plain-ViT name with timm's parameter count
and pretrained cfgs (tags included); pretrained=True's error without network; the "jax"
position-embedding resampling against scipy.ndimage.zoom; load_jax_npz's head skip. Tiny
configs, eager backend, fp32: the kernels themselves are tested elsewhere.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.config import TIMM_TAGS, VARIANTS, get_config, to_2tuple
from vitkern.pos_embed import resample_pos_embed

timm = pytest.importorskip("timm")
from timm.models import get_pretrained_cfg  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def _pair(**kwargs):
    """(timm model, vitkern copy of it with the same weights), both in eval mode, fp32."""
    tm = VisionTransformer(**dict(TINY, **kwargs)).eval()
    return tm, vitkern.from_timm(tm, backend="eager").eval()


def _same(ours, theirs, atol=1e-5):
    """Equal structure (lists, tuples) and values within atol."""
    if isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _same(a, b, atol)
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# forward_intermediates / get_intermediate_layers / prune


@pytest.mark.parametrize("model_kwargs", [{}, dict(class_token=False, global_pool="avg")], ids=["cls", "gap"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(indices=2, norm=True),
        dict(indices=[0, -1], output_fmt="NLC", return_prefix_tokens=True),
        dict(indices=[2, 1], stop_early=True),
        dict(indices=(1,), norm=True, intermediates_only=True, return_prefix_tokens=True),
    ],
)
def test_forward_intermediates_matches_timm(model_kwargs, kwargs):
    tm, vk = _pair(**model_kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _same(vk.forward_intermediates(x, **kwargs), tm.forward_intermediates(x, **kwargs))


def test_forward_intermediates_dynamic_img_size_matches_timm():
    tm, vk = _pair(dynamic_img_size=True)
    x = torch.randn(1, 3, 40, 24)  # a 5 x 3 patch grid: pos_embed resampled from 4 x 4
    with torch.no_grad():
        for kwargs in (dict(indices=[1, 3]), dict(indices=2, norm=True, output_fmt="NLC", return_prefix_tokens=True)):
            _same(vk.forward_intermediates(x, **kwargs), tm.forward_intermediates(x, **kwargs))
        out = vk.forward_intermediates(x, indices=1, intermediates_only=True)
    assert out[0].shape == (1, 32, 5, 3)


@pytest.mark.parametrize("kwargs", [dict(), dict(n=2, reshape=True), dict(n=[0, 3], norm=True, return_prefix_tokens=True)])
def test_get_intermediate_layers_matches_timm(kwargs):
    tm, vk = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _same(vk.get_intermediate_layers(x, **kwargs), tm.get_intermediate_layers(x, **kwargs))


def test_intermediate_indices_errors():
    _, vk = _pair()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"indices holds block 4, outside the model's 4 blocks"):
        vk.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match=r"indices=5 asks for the last 5 blocks, but the model has 4"):
        vk.forward_intermediates(x, indices=5)
    with pytest.raises(ValueError, match=r"output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        vk.forward_intermediates(x, output_fmt="NHWC")


def test_hybrid_intermediates_and_set_input_size_match_timm():
    tm = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=64, depth=2).eval()
    vk = vitkern.from_timm(tm, backend="eager").eval()
    assert vk.feature_info == tm.feature_info  # reduction 32: the ResNet's stride times patch 1
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _same(vk.forward_intermediates(x, indices=[0, 1]), tm.forward_intermediates(x, indices=[0, 1]))
        tm.set_input_size(img_size=96)
        vk.set_input_size(img_size=96)  # the backbone's feature map is probed again: a 3 x 3 grid
        x = torch.randn(1, 3, 96, 96)
        _same(vk.get_intermediate_layers(x, reshape=True), tm.get_intermediate_layers(x, reshape=True))


def test_prune_intermediate_layers_matches_timm():
    tm, vk = _pair()
    assert vk.prune_intermediate_layers([1, -3]) == tm.prune_intermediate_layers([1, -3]) == [1, 1]
    assert len(vk.blocks) == len(tm.blocks) == 2 and vk.config.depth == 2
    assert isinstance(vk.head, torch.nn.Identity) and vk.num_classes == tm.num_classes == 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _same(vk.forward_intermediates(x, indices=[0, 1]), tm.forward_intermediates(x, indices=[0, 1]))
        _same(vk(x), tm(x))


# --------------------------------------------------------------------------------------------
# attributes, reset_classifier, set_input_size, group_matcher / layer decay


def test_attributes_timm_tooling_reads():
    tm, vk = _pair(num_classes=7)
    for name in ("in_chans", "num_features", "head_hidden_size", "num_prefix_tokens", "embed_dim", "num_classes"):
        assert getattr(vk, name) == getattr(tm, name), name
    assert vk.feature_info == tm.feature_info
    pre = vitkern.ViT(**TINY, representation_size=24)
    assert (pre.num_features, pre.head_hidden_size, pre.head.in_features) == (32, 24, 24)
    # A bare model has no checkpoint, as timm's VisionTransformer built directly.
    assert pre.pretrained_cfg == {} and pre.default_cfg is pre.pretrained_cfg


def test_reset_classifier_keeps_mode_device_dtype_and_norm_placement():
    vk = vitkern.ViT(**TINY, backend="eager").double().eval()
    vk.reset_classifier(5, global_pool="avg")
    assert not vk.head.training and vk.head.weight.dtype == torch.float64 and vk.head.out_features == 5
    # The final norm stays before pooling (timm's rule): only the pooling changes.
    assert isinstance(vk.fc_norm, torch.nn.Identity) and vk.config.fc_norm is False and not vk.config.use_fc_norm
    vk.train().reset_classifier(3)
    assert vk.head.training
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0, got -1"):
        vk.reset_classifier(-1)


@pytest.mark.parametrize("kwargs", [dict(img_size=48), dict(patch_size=4), dict(img_size=(40, 24), patch_size=(8, 4))])
def test_set_input_size_matches_timm(kwargs):
    tm, vk = _pair()
    tm.set_input_size(**kwargs)
    vk.set_input_size(**kwargs)
    assert tuple(vk.patch_embed.grid_size) == tuple(tm.patch_embed.grid_size)
    assert vk.pos_embed.shape == tm.pos_embed.shape and vk.pos_embed.requires_grad
    torch.testing.assert_close(vk.pos_embed, tm.pos_embed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vk.patch_embed.proj.weight, tm.patch_embed.proj.weight, atol=1e-4, rtol=1e-4)
    x = torch.randn(2, 3, *to_2tuple(kwargs.get("img_size", 32), "img_size"))
    with torch.no_grad():
        torch.testing.assert_close(vk(x), tm(x), atol=1e-4, rtol=1e-4)


def test_layer_decay_param_groups_match_timm():
    from timm.optim import create_optimizer_v2

    tm, vk = _pair(num_classes=5)

    def groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
        return sorted((round(g["lr_scale"], 12), g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"])))
                      for g in opt.param_groups)

    ours, theirs = groups(vk), groups(tm)
    assert ours == theirs
    assert len({scale for scale, _, _ in ours}) == TINY["depth"] + 2  # stem, each block, the head


# --------------------------------------------------------------------------------------------
# pretrained cfg, data config, features_only, meta device


def test_resolve_data_config_equals_timms():
    from timm.data import resolve_data_config

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    tm = timm.create_model(name, pretrained=False, depth=1)
    expected = resolve_data_config(model=tm)
    assert expected["mean"] == (0.5, 0.5, 0.5) and expected["crop_pct"] == 0.9  # not ImageNet's defaults
    assert resolve_data_config(model=vitkern.from_timm(tm)) == expected
    assert resolve_data_config(model=vitkern.create_model(name, depth=1, device="meta")) == expected
    assert vitkern.from_timm(tm).default_cfg == tm.pretrained_cfg


def test_features_only_is_timms_feature_backbone():
    kwargs = dict(depth=4, img_size=64)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, **kwargs).eval()
    ours = vitkern.create_model("vit_tiny_patch16_224", features_only=True, backend="eager", **kwargs).eval()
    # The same pruned module tree under `model.`: timm's weights load unchanged.
    ours.load_state_dict(theirs.state_dict())
    assert len(ours.model.blocks) == 4 and isinstance(ours.model.norm, torch.nn.Identity)
    for what in ("channels", "reduction", "module_name"):
        assert getattr(ours.feature_info, what)() == getattr(theirs.feature_info, what)(), what
    assert ours.pretrained_cfg == theirs.pretrained_cfg and ours.in_chans == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _same(ours(x), theirs(x))
    picked = vitkern.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(0, 2), **kwargs)
    assert picked.feature_info.module_name() == ["blocks.0", "blocks.2"] and len(picked.model.blocks) == 3
    with pytest.raises(ValueError, match="features_only=True"):
        vitkern.create_model("vit_tiny_patch16_224", out_indices=2)


def test_meta_device_and_dtype_construction():
    model = vitkern.create_model("vit_gigantic_patch14_224", device="meta")  # 1.8 G parameters, no memory
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 1.8e9
    half = vitkern.ViT(**TINY, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype, got torch.int8"):
        vitkern.ViT(**TINY, dtype=torch.int8)
    params = inspect.signature(vitkern.ViT).parameters  # help(ViT) shows them
    assert params["device"].kind is params["dtype"].kind is inspect.Parameter.KEYWORD_ONLY


# --------------------------------------------------------------------------------------------
# names, tags, pretrained=True


def test_every_plain_timm_vit_name_is_a_vitkern_model():
    # The plain patch ViTs by name: vit_<size>_patch<P>_<resolution>, every one timm registers.
    plain = re.compile(r"^vit_(tiny|small|base|large|huge|giant|gigantic)_patch\d+_\d+$")
    registered = set(timm.list_models(module=["vision_transformer", "deit"]))
    assert {n for n in registered if plain.match(n)} <= set(VARIANTS)
    assert set(VARIANTS) <= registered
    assert {"vit_large_patch14_224", "vit_small_patch8_224", "vit_large_patch32_384"} <= set(vitkern.list_models())
    for name in VARIANTS:
        assert getattr(vitkern, name).__name__ == name and name in vitkern.__all__


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_named_variant_matches_timm(name):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = timm.create_model(name, pretrained=False)
    cfg = get_config(name)
    assert to_2tuple(cfg.img_size, "img_size") == tuple(tm.patch_embed.img_size)
    assert to_2tuple(cfg.patch_size, "patch_size") == tuple(tm.patch_embed.patch_size)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_classes) == (
        tm.embed_dim, len(tm.blocks), tm.blocks[0].attn.num_heads, tm.num_classes)
    assert (cfg.global_pool, cfg.class_token, cfg.use_fc_norm, cfg.norm_eps, cfg.dynamic_img_size) == (
        tm.global_pool, tm.cls_token is not None, not isinstance(tm.fc_norm, torch.nn.Identity),
        tm.blocks[0].norm1.eps, tm.dynamic_img_size)
    model = getattr(vitkern, name)(device="meta")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tm.parameters())
    assert model.pretrained_cfg == tm.pretrained_cfg


def test_every_pretrained_tag_has_timms_cfg():
    names = vitkern.list_pretrained()
    assert len(names) == sum(len(t) for t in TIMM_TAGS.values()) > len(VARIANTS)
    for full in names:
        assert vitkern.pretrained_cfg(full) == get_pretrained_cfg(full).to_dict(), full


@pytest.mark.parametrize("name", ["vit_base_patch16_224.orig_in21k", "vit_base_patch16_224.augreg_in21k",
                                  "vit_base_patch16_224.augreg2_in21k_ft_in1k"])
def test_tag_builds_the_architecture_with_the_tags_head_and_cfg(name):
    with torch.device("meta"):
        tm = timm.create_model(name, pretrained=False)
    model = vitkern.create_model(name, device="meta")
    assert model.num_classes == tm.num_classes and model.pretrained_cfg == tm.pretrained_cfg
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tm.parameters())
    assert vitkern.create_model(name, num_classes=3, device="meta").num_classes == 3  # the caller wins


def test_unknown_names_and_tags():
    with pytest.raises(ValueError, match=r"unknown model name 'vit_enormous_patch16_224'"):
        vitkern.create_model("vit_enormous_patch16_224")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope' of vit_base_patch16_224; known: \['augreg2"):
        vitkern.create_model("vit_base_patch16_224.nope")


def test_pretrained_without_network_or_timm_says_how_to_load_a_file(monkeypatch):
    import huggingface_hub.constants

    # No network here: offline mode makes the hub fail at once instead of after its retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"could not load 'test_vit.r160_in1k' through timm's hub loader.*load_jax_npz"):
        vitkern.create_model("test_vit.r160_in1k", pretrained=True)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(RuntimeError, match=r"timm is not installed .*load_state_dict"):
        vitkern.vit_tiny_patch16_224(pretrained=True)
    with pytest.raises(ValueError, match=r"no \['representation_size'\]"):
        vitkern.vit_tiny_patch16_224(pretrained=True, representation_size=8)


# --------------------------------------------------------------------------------------------
# position embeddings: the "jax" resampling, the module layering; load_jax_npz's head skip


@pytest.mark.parametrize("old_grid, new_grid", [((3, 3), (5, 5)), ((7, 7), (4, 4)), ((4, 6), (7, 3)), ((2, 5), (1, 5))])
def test_jax_resample_is_scipy_zoom_order_1(old_grid, new_grid):
    ndimage = pytest.importorskip("scipy.ndimage")
    dim = 6
    pos = torch.randn(1, 1 + old_grid[0] * old_grid[1], dim, dtype=torch.float64)
    grid = pos[0, 1:].reshape(*old_grid, dim).numpy()
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    expected = ndimage.zoom(grid, zoom, order=1)  # what google-research/vision_transformer does
    assert expected.shape[:2] == new_grid
    ours = resample_pos_embed(pos, new_grid, old_grid, 1, mode="jax")
    np.testing.assert_allclose(ours[0, 1:].reshape(*new_grid, dim).numpy(), expected, atol=1e-12, rtol=0)
    assert torch.equal(ours[:, :1], pos[:, :1])
    ours32 = resample_pos_embed(pos.float(), new_grid, old_grid, 1, mode="jax")
    np.testing.assert_allclose(ours32[0, 1:].reshape(*new_grid, dim).numpy(), expected, atol=1e-6, rtol=0)


def test_jax_resample_is_not_timms_bilinear():
    pos = torch.randn(1, 1 + 9, 4)
    jax = resample_pos_embed(pos, (5, 5), (3, 3), 1, mode="jax")
    bilinear = resample_pos_embed(pos, (5, 5), (3, 3), 1, mode="bilinear", antialias=False)
    assert (jax - bilinear).abs().max() > 1e-2  # corner-aligned vs half-pixel centres
    # Corner-aligned: the grid's corners are carried exactly.
    assert torch.equal(jax[0, 1], pos[0, 1]) and torch.equal(jax[0, -1], pos[0, -1])


def test_model_does_not_import_weights():
    # The import circle is gone: model.py reads pos_embed.py; weights.py re-exports resample_pos_embed.
    source = (Path(vitkern.__file__).parent / "model.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "vitkern.weights" not in imported and "vitkern.pos_embed" in imported
    from vitkern import weights

    assert weights.resample_pos_embed is resample_pos_embed is vitkern.resample_pos_embed


def _jax_npz(tmp_path, classes: int):
    """A tiny .npz in the original repo's layout (embed 16, 1 block, 2 heads, patch 4, 3 x 3 grid)."""
    rng = np.random.default_rng(0)
    d, h, hd, mlp = 16, 2, 8, 32

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    a = {"embedding/kernel": w(4, 4, 3, d), "embedding/bias": w(d), "cls": w(1, 1, d),
         "Transformer/posembed_input/pos_embedding": w(1, 10, d),
         "Transformer/encoder_norm/scale": w(d), "Transformer/encoder_norm/bias": w(d),
         "head/kernel": w(d, classes), "head/bias": w(classes)}
    b = "Transformer/encoderblock_0/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
        a[b + ln + "/scale"], a[b + ln + "/bias"] = w(d), w(d)
    for n in ("query", "key", "value"):
        a[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = w(d, h, hd)
        a[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = w(h, hd)
    a[b + "MultiHeadDotProductAttention_1/out/kernel"], a[b + "MultiHeadDotProductAttention_1/out/bias"] = w(h, hd, d), w(d)
    a[b + "MlpBlock_3/Dense_0/kernel"], a[b + "MlpBlock_3/Dense_0/bias"] = w(d, mlp), w(mlp)
    a[b + "MlpBlock_3/Dense_1/kernel"], a[b + "MlpBlock_3/Dense_1/bias"] = w(mlp, d), w(d)
    path = tmp_path / "vit.npz"
    np.savez(path, **a)
    return path, a


def test_load_jax_npz_skips_a_head_of_another_shape_with_a_warning(tmp_path):
    path, a = _jax_npz(tmp_path, classes=21)
    kwargs = dict(img_size=20, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
    model = vitkern.ViT(num_classes=10, **kwargs)
    head = model.head.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"skipped the checkpoint's head: head/kernel has shape \(16, 21\) .* needs \(16, 10\)"):
        vitkern.load_jax_npz(path, model, strict=False, resample_mode="jax")
    assert torch.equal(model.head.weight, head)  # the model keeps its own head
    np.testing.assert_array_equal(model.norm.weight.detach().numpy(), a["Transformer/encoder_norm/scale"])
    # The position embedding (3 x 3 in the file, 5 x 5 here) went through the "jax" resampling.
    pos = torch.from_numpy(a["Transformer/posembed_input/pos_embedding"])
    torch.testing.assert_close(model.pos_embed.detach(), resample_pos_embed(pos, (5, 5), (3, 3), 1, mode="jax"))
    with pytest.raises(ValueError, match=r"head/kernel: the checkpoint has shape \(16, 21\) but head.weight"):
        vitkern.load_jax_npz(path, vitkern.ViT(num_classes=10, **kwargs))  # strict: still an error
    same = vitkern.ViT(num_classes=21, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head that fits loads silently
        vitkern.load_jax_npz(path, same, strict=False, resample_mode="jax")
    np.testing.assert_array_equal(same.head.bias.detach().numpy(), a["head/bias"])
    assert F.mse_loss(same.head.weight.detach().t(), torch.from_numpy(a["head/kernel"])) == 0
