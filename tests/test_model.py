"""vitkern.ViT as a drop-in for timm's VisionTransformer: parity, state-dict layout, hybrid
backbones, training features (dropout, stochastic depth, gradient checkpointing), the head API,
and the errors promised for bad input (issue 2, point 8). All on CPU in fp32.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn

import vitkern
from conftest import assert_max_diff
from vitkern import BackendUnavailableError, dispatch, reference

timm = pytest.importorskip("timm")
from timm.layers import HybridEmbed, resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _pair(name: str, **kwargs):
    """(timm model, vitkern model) of one name with timm's weights loaded into vitkern, in eval mode."""
    tm = timm.create_model(name, pretrained=False, **kwargs).eval()
    vk = getattr(vitkern, name)(**kwargs).eval()
    vk.load_state_dict(tm.state_dict())
    return tm, vk


# --------------------------------------------------------------------------------------------
# Parity with timm


@pytest.mark.parametrize(
    "name, global_pool, num_classes",
    [
        ("vit_tiny_patch16_224", "token", 1000),
        ("vit_tiny_patch16_224", "avg", 0),
        ("vit_small_patch16_224", "token", 0),
        ("vit_small_patch16_224", "avg", 1000),
        ("vit_base_patch32_224", "token", 1000),
        ("vit_base_patch32_224", "avg", 0),
        ("vit_base_patch16_384", "token", 1000),
    ],
)
def test_named_variant_matches_timm(name, global_pool, num_classes):
    tm, vk = _pair(name, global_pool=global_pool, num_classes=num_classes)
    batch = 1 if "384" in name else 2
    x = torch.randn(batch, 3, *tm.patch_embed.img_size)
    with torch.no_grad():
        ours, theirs = vk(x), tm(x)
    width = num_classes or tm.embed_dim
    assert sum(p.numel() for p in vk.parameters()) == sum(p.numel() for p in tm.parameters())
    assert ours.shape == theirs.shape == (batch, width)
    assert_max_diff(ours, theirs, 1e-5)


def test_forward_features_and_head_match_timm():
    tm, vk = _pair("vit_tiny_patch16_224", global_pool="avg")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = vk.forward_features(x)
        assert feats.shape == (2, 197, 192)
        assert_max_diff(feats, tm.forward_features(x), 1e-5)
        assert_max_diff(vk.forward_head(feats, pre_logits=True), tm.forward_head(feats, pre_logits=True), 1e-5)
        assert_max_diff(vk.forward_head(feats), tm.forward_head(feats), 1e-5)


def test_dynamic_img_size_non_square_matches_timm():
    tm, vk = _pair("vit_tiny_patch16_224", dynamic_img_size=True)
    x = torch.randn(1, 3, 224, 288)
    with torch.no_grad():
        assert_max_diff(vk(x), tm(x), 1e-5)
        # The resampled position embedding itself equals timm's resample_abs_pos_embed.
        pos = vk._pos_embed_for((14, 18))
        assert_max_diff(pos, resample_abs_pos_embed(tm.pos_embed, [14, 18], [14, 14], num_prefix_tokens=1), 1e-6)
        # The built size still takes the stored embedding as is.
        x = torch.randn(1, 3, 224, 224)
        assert_max_diff(vk(x), tm(x), 1e-5)


def test_dynamic_img_pad_pads_like_timm():
    kwargs = dict(TINY, dynamic_img_size=True, dynamic_img_pad=True)
    tm = VisionTransformer(**kwargs).eval()
    vk = vitkern.ViT(**kwargs).eval()
    vk.load_state_dict(tm.state_dict())
    x = torch.randn(2, 3, 30, 38)  # neither side a multiple of 8: padded to 32 x 40
    with torch.no_grad():
        assert_max_diff(vk(x), tm(x), 1e-5)


def test_dynamic_img_pad_state_dict_shapes_match_timm_for_indivisible_img_size():
    # timm sizes pos_embed by the whole patches of img_size (3 x 3 here), padding only the input.
    kwargs = dict(TINY, img_size=30, dynamic_img_size=True, dynamic_img_pad=True)
    tm = VisionTransformer(**kwargs).eval()
    vk = vitkern.ViT(**kwargs).eval()
    assert {k: v.shape for k, v in vk.state_dict().items()} == {k: v.shape for k, v in tm.state_dict().items()}
    vk.load_state_dict(tm.state_dict())
    x = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        assert_max_diff(vk(x), tm(x), 1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(global_pool="avg"), dict(global_pool="avg", class_token=False), dict(num_classes=0),
     dict(global_pool="avg", fc_norm=False), dict(qkv_bias=False)],
    ids=["token", "avg", "avg-nocls", "headless", "avg-nofcnorm", "noqkvbias"],
)
def test_state_dict_keys_equal_timm(kwargs):
    tm = VisionTransformer(**dict(TINY, **kwargs))
    vk = vitkern.ViT(**dict(TINY, **kwargs))
    assert list(vk.state_dict()) == list(tm.state_dict())
    assert {k: v.shape for k, v in vk.state_dict().items()} == {k: v.shape for k, v in tm.state_dict().items()}
    vk.load_state_dict(tm.state_dict())  # strict: no conversion needed


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_model_matches_reference_forward_in_float64(global_pool):
    vk = vitkern.ViT(**dict(TINY, global_pool=global_pool, representation_size=24)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = dict(vk.state_dict())
    with torch.no_grad():
        expected = reference.vit_forward(x, params, num_heads=2, global_pool=global_pool)
        assert_max_diff(vk(x), expected, 1e-12)


def test_init_follows_timm_defaults():
    vk = vitkern.vit_small_patch16_224()
    tm = timm.create_model("vit_small_patch16_224", pretrained=False)
    for name in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc1.weight", "head.weight", "pos_embed"):
        ours, theirs = vk.get_parameter(name), tm.get_parameter(name)
        assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.1), name
        assert ours.mean().abs().item() < 0.002, name
    for name in ("blocks.0.attn.qkv.bias", "blocks.3.mlp.fc2.bias", "head.bias"):
        assert torch.count_nonzero(vk.get_parameter(name)) == 0, name
    assert vk.cls_token.std().item() < 1e-5
    assert torch.equal(vk.blocks[0].norm1.weight, torch.ones(384))


# --------------------------------------------------------------------------------------------
# Hybrid backbones


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))


def test_hybrid_trains_one_step():
    model = vitkern.ViT(img_size=32, hybrid_backbone=_small_cnn(), patch_size=2, embed_dim=32, depth=2, num_heads=2,
                        num_classes=4)
    assert model.patch_embed.feature_size == (8, 8) and model.patch_embed.grid_size == (4, 4)
    assert model.pos_embed.shape == (1, 17, 32)
    assert model.patch_embed.proj.in_channels == 16
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    assert out.shape == (3, 4)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    before = model.patch_embed.backbone[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.patch_embed.backbone[0].weight)
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(x), y) < loss


def test_hybrid_small_cnn_matches_timm_hybrid_embed():
    cnn = _small_cnn()
    kwargs = dict(img_size=32, patch_size=1, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    tm = VisionTransformer(embed_layer=functools.partial(HybridEmbed, backbone=cnn), **kwargs).eval()
    vk = vitkern.ViT(hybrid_backbone=cnn, **kwargs).eval()
    assert list(vk.state_dict()) == list(tm.state_dict())
    vk.load_state_dict(tm.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_max_diff(vk(x), tm(x), 1e-5)


def test_hybrid_matches_timm_r26_s32():
    # timm's ResNet-26 hybrid at 64 px (feature map 2 x 2) and two blocks: the same backbone module.
    tm = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=64, depth=2).eval()
    vk = vitkern.ViT(img_size=64, hybrid_backbone=tm.patch_embed.backbone, embed_dim=384, depth=2, num_heads=6).eval()
    keys = list(vk.state_dict())
    assert keys == list(tm.state_dict())
    assert any(k.startswith("patch_embed.backbone.") for k in keys) and "patch_embed.proj.weight" in keys
    vk.load_state_dict(tm.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_max_diff(vk(x), tm(x), 1e-5)


# --------------------------------------------------------------------------------------------
# Training features


REG = dict(drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)


def test_train_step_with_dropout_and_drop_path():
    model = vitkern.ViT(**TINY, **REG)
    assert [b.drop_path1.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.2])  # linear decay rule
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    model.train()
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    with torch.no_grad():
        again = model(x)
    assert torch.equal(out, again)  # the randomness comes from torch's generator only
    assert _max_diff(out, evaluated) > 1e-4  # and it is applied in training
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.blocks[1].mlp.fc2.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.blocks[1].mlp.fc2.weight)


def test_train_mode_without_regularizers_equals_eval():
    model = vitkern.ViT(**TINY)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))


def test_grad_checkpointing_gives_same_gradients():
    model = vitkern.ViT(**TINY)
    x = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


def test_reset_classifier_and_no_weight_decay():
    tm = VisionTransformer(**TINY)
    vk = vitkern.ViT(**TINY)
    # timm also names tokens its model may have (dist_token, reg_token); vitkern has only these two.
    timm_params = dict(tm.named_parameters())
    assert vk.no_weight_decay() == {n for n in tm.no_weight_decay() if n in timm_params} == {"pos_embed", "cls_token"}
    x = torch.randn(2, 3, 32, 32)
    vk.reset_classifier(10)
    assert isinstance(vk.head, nn.Linear) and vk.head.weight.shape == (10, 32) and vk.num_classes == 10
    assert torch.count_nonzero(vk.head.bias) == 0
    assert vk(x).shape == (2, 10)
    vk.reset_classifier(0)
    assert isinstance(vk.head, nn.Identity) and vk(x).shape == (2, 32)
    vk.reset_classifier(3, global_pool="avg")
    tm.reset_classifier(3, global_pool="avg")
    assert vk.global_pool == "avg"
    vk.load_state_dict(tm.state_dict())
    with torch.no_grad():
        assert_max_diff(vk.eval()(x), tm.eval()(x), 1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        vk.reset_classifier(-1)


# --------------------------------------------------------------------------------------------
# Bad input (issue 2, point 8): the promised error, naming the argument, expected and actual


@pytest.fixture(scope="module")
def tiny():
    return vitkern.ViT(**TINY).eval()


def test_wrong_channel_count(tiny):
    with pytest.raises(ValueError, match=r"in_chans=3 channels, got 4"):
        tiny(torch.randn(1, 4, 32, 32))


def test_wrong_rank(tiny):
    with pytest.raises(ValueError, match=r"x must be an image batch \[batch, chans, height, width\], got shape \(3, 32, 32\)"):
        tiny(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tiny([[1.0]])


def test_size_different_from_img_size(tiny):
    with pytest.raises(ValueError, match=r"img_size=\(32, 32\), got \(40, 32\).*dynamic_img_size=True"):
        tiny(torch.randn(1, 3, 40, 32))


def test_size_not_divisible_by_patch_and_dynamic_img_pad_pads():
    strict = vitkern.ViT(**dict(TINY, dynamic_img_size=True)).eval()
    with pytest.raises(ValueError, match=r"\(30, 32\) must be multiples of patch_size=\(8, 8\).*dynamic_img_pad=True"):
        strict(torch.randn(1, 3, 30, 32))
    padded = vitkern.ViT(**dict(TINY, dynamic_img_size=True, dynamic_img_pad=True)).eval()
    padded.load_state_dict(strict.state_dict())
    x = torch.randn(1, 3, 30, 32)
    with torch.no_grad():
        # Padding with zeros to whole patches is exactly what the padded model does.
        assert torch.equal(padded(x), strict(nn.functional.pad(x, (0, 0, 0, 2))))


def test_embed_dim_not_divisible_by_num_heads():
    with pytest.raises(ValueError, match=r"embed_dim must be divisible by num_heads: embed_dim=32, num_heads=3"):
        vitkern.ViT(**dict(TINY, num_heads=3))


def _triton_registered_for_all_ops() -> bool:
    return all("triton" in dispatch.implementations(op) for op in dispatch.OPS)


def test_input_dtype_differs_from_weights_on_fused_backend():
    if dispatch.backend_unavailable_reasons("triton"):
        with pytest.raises(BackendUnavailableError, match="backend='triton'"):
            vitkern.ViT(**dict(TINY, backend="triton"))
        return
    model = vitkern.ViT(**dict(TINY, backend="triton")).eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float16)
    with pytest.raises((BackendUnavailableError, TypeError)) as info:
        with torch.no_grad():
            model(x)
    message = str(info.value)
    if _triton_registered_for_all_ops():
        # Once every op has a Triton implementation the only reason left is the dtype mismatch.
        assert "torch.float16" in message and "torch.float32" in message, message
        assert "x" in message
    else:
        assert "no triton implementation" in message or ("torch.float16" in message and "torch.float32" in message), message


def test_cpu_input_on_cuda_backend():
    # Raised when the model is built (no CUDA backend on this machine) or when it runs (CPU tensors).
    with pytest.raises(BackendUnavailableError) as info:
        model = vitkern.ViT(**dict(TINY, backend="cuda")).eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    message = str(info.value)
    assert "backend='cuda'" in message
    assert any(r in message for r in ("no CUDA device is visible", "needs CUDA tensors", "no cuda implementation")), message


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="global_pool must be one of"):
        vitkern.ViT(**dict(TINY, global_pool="max"))
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True"):
        vitkern.ViT(**dict(TINY, class_token=False))
    with pytest.raises(ValueError, match="backend must be one of"):
        vitkern.ViT(**dict(TINY, backend="tpu"))
    with pytest.raises(TypeError, match="hybrid_backbone must be an nn.Module"):
        vitkern.ViT(**dict(TINY, hybrid_backbone=lambda x: x))
    with pytest.raises(ValueError, match=r"patch_size \(64, 64\) is larger than the image \(32, 32\)"):
        vitkern.ViT(**dict(TINY, patch_size=64))
    assert math.isclose(vitkern.ViT(**TINY).config.mlp_ratio, 4.0)
