"""The packed NaFlex model (issue #23 step 4): `vitkern.from_timm(naflexvit)` against timm's
NaFlexVit on its padded path (patch_valid mask), per image, outputs and gradients; per-image
pooling; NaViT token dropping; one validation of cu_seqlens per batch; refusals by option name."""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern import dispatch, ops
from vitkern.naflex import PackedLayout, drop_patch_tokens, pool_packed, to_padded
from vitkern.packing import SeqLens

from conftest import TRITON_DEVICE

timm_nf = pytest.importorskip("timm.models.naflexvit")

# Grids 4x5 (the position table's own size), 2x7, 3x1, 1x1 at patch 8: every resampling path.
SIZES = [(32, 40), (16, 56), (24, 8), (8, 8)]

CONFIGS = {
    "map-learned": dict(global_pool="map"),
    "token-reg-factorized-qknorm-ls": dict(global_pool="token", class_token=True, reg_tokens=1,
                                           pos_embed="factorized", qk_norm=True, init_values=0.1),
    "avg-prenorm-ar-tanh": dict(global_pool="avg", pre_norm=True, pos_embed_ar_preserving=True,
                                act_layer="gelu_tanh"),
}


def _timm(seed=0, depth=2, **kw):
    torch.manual_seed(seed)
    cfg = timm_nf.NaFlexVitCfg(embed_dim=64, depth=depth, num_heads=2, patch_size=8, pos_embed_grid_size=(4, 5), **kw)
    tm = timm_nf.NaFlexVit(cfg, num_classes=5)
    with torch.no_grad():  # timm's init leaves biases at zero and the tables tiny: perturb every parameter
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tm


def _images(sizes=SIZES, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g, dtype=dtype) for h, w in sizes]


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_timm_matches_timm_padded_path(name, backend):
    tm = _timm(**CONFIGS[name]).train()  # train mode (all dropout rates 0): the same as eval, with grads
    model = vitkern.from_timm(tm, backend=backend)
    assert isinstance(model, vitkern.NaFlexViT) and model.state_dict().keys() == tm.state_dict().keys()
    packed = vitkern.pack(_images(), 8)
    packed.patches.requires_grad_(True)
    out = model(packed)
    padded = to_padded(packed)
    patches = padded["patches"].detach().requires_grad_(True)
    ref = tm(dict(padded, patches=patches))
    assert out.shape == ref.shape == (len(SIZES), 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    params = dict(model.named_parameters())
    for key, p in tm.named_parameters():
        torch.testing.assert_close(params[key].grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    valid = padded["patch_valid"]
    torch.testing.assert_close(packed.patches.grad, patches.grad[valid], atol=1e-5, rtol=1e-4)


def test_features_and_pooling_per_image():
    tm = _timm(global_pool="avg", class_token=True).eval()
    model = vitkern.from_timm(tm, backend="torch", global_pool="")
    packed = vitkern.pack(_images(), 8)
    with torch.no_grad():
        tokens = model(packed)  # [total_tokens, dim]: every image's class token, then its patches
        ref = tm.forward_features(**to_padded(packed))["patches"]
    cu, _ = packed.token_cu_seqlens(1)
    assert tokens.shape == (int(cu[-1]), 64)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(tokens[s:e], ref[i, :e - s], atol=1e-5, rtol=0)
    layout = PackedLayout(packed.token_seqlens(1).lengths, 1, tokens.device)
    torch.testing.assert_close(pool_packed(tokens, layout, "token"), tokens[cu[:-1].long()])
    avg = torch.stack([tokens[s + 1:e].mean(0) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(pool_packed(tokens, layout, "avg"), avg)


def test_cu_seqlens_validated_once_per_batch(monkeypatch):
    """The layers trust the batch's SeqLens: no host read of cu_seqlens (a GPU sync) per layer."""
    import sys

    import vitkern.ops._checks as checks

    attention_mod = sys.modules["vitkern.ops.attention"]  # the module (vitkern.ops.attention is the function)

    calls = []
    real = checks.check_cu_seqlens
    monkeypatch.setattr(attention_mod, "check_cu_seqlens", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = vitkern.from_timm(_timm(global_pool="map").eval(), backend="torch")
    with torch.no_grad():
        model(vitkern.pack(_images(), 8))
    assert calls == []
    # A plain tensor is still validated on each direct call, and a SeqLens must fit qkv.
    qkv = torch.randn(7, 3 * 32)
    seq = SeqLens.from_lengths([3, 4])
    torch.testing.assert_close(ops.attention(qkv, 2, cu_seqlens=seq), ops.attention(qkv, 2, cu_seqlens=seq.cu_seqlens))
    assert calls == [1]
    with pytest.raises(ValueError, match="cu_seqlens covers 7 packed tokens but qkv has 6 rows"):
        ops.attention(qkv[:6], 2, cu_seqlens=seq)
    with pytest.raises(ValueError, match="lengths must be a non-empty sequence of positive ints"):
        SeqLens.from_lengths([3, 0])
    assert SeqLens.validated(seq.cu_seqlens) == SeqLens(seq.cu_seqlens, (3, 4), 4, 7)


def test_token_dropping_per_image():
    tm = _timm(global_pool="avg", class_token=True, reg_tokens=1)
    model = vitkern.from_timm(tm, backend="torch", patch_drop_rate=0.5).train()
    packed = vitkern.pack(_images(), 8)
    torch.manual_seed(3)
    x, layout = model.forward_features(packed)
    # Each image keeps its 2 prefix tokens and max(1, int(n * 0.5)) of its n = 20, 14, 3, 1 patches.
    assert layout.seqlens.lengths == (12, 9, 3, 3) and x.shape == (27, 64)
    assert layout.seqlens.cu_seqlens.tolist() == [0, 12, 21, 24, 27]
    model(packed).sum().backward()
    assert model.embeds.proj.weight.grad.abs().sum() > 0
    # The kept tokens are the embedding's rows: dropping then running the blocks is the model.
    full = PackedLayout(packed.token_seqlens(2).lengths, 2, "cpu")
    emb = model.embeds(packed, backend="torch")
    g = torch.Generator().manual_seed(5)
    kept, small = drop_patch_tokens(emb, full, 0.5, generator=g)
    g = torch.Generator().manual_seed(5)
    again, _ = drop_patch_tokens(emb, full, 0.5, generator=g)
    assert torch.equal(kept, again) and small.seqlens.lengths == (12, 9, 3, 3)
    assert torch.equal(kept[:2], emb[:2])  # image 0's class and register tokens stay first
    model.eval()
    assert model(packed).shape == (4, 5)  # eval drops nothing


def test_refuses_unsupported_timm_options_by_name():
    cases = [
        (dict(rope_type="axial"), "rope_type"),
        (dict(embed_proj_type="conv"), "embed_proj_type='conv'"),
        (dict(global_pool="avgmax"), "global_pool='avgmax'"),
        (dict(pos_embed_use_grid_sample=True), "pos_embed_use_grid_sample=True"),
        (dict(swiglu_mlp=True), "swiglu_mlp"),
        (dict(scale_mlp_norm=True), "scale_mlp_norm=True"),
        (dict(pool_include_prefix=True), "pool_include_prefix=True"),
    ]
    for kw, needle in cases:
        cfg = timm_nf.NaFlexVitCfg(embed_dim=32, depth=1, num_heads=2, patch_size=8, pos_embed_grid_size=(2, 2), **kw)
        with pytest.raises(NotImplementedError, match="vitkern cannot convert") as info:
            vitkern.from_timm(timm_nf.NaFlexVit(cfg, num_classes=3))
        assert needle in str(info.value), (needle, str(info.value))
    with pytest.raises(ValueError, match=r"cannot override \['img_size'\]"):
        vitkern.from_timm(_timm(), img_size=64)
    model = vitkern.NaFlexViT(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=r"packed.patch_size must be the model's \(8, 8\), got \(16, 16\)"):
        model(vitkern.pack(_images([(16, 16)]), 16))
    with pytest.raises(TypeError, match="packed must be a vitkern.Packed batch"):
        model(torch.randn(1, 3, 16, 16))


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton not importable")
def test_triton_packed_model_matches_timm():
    """One small case on the Triton kernels (the interpreter on a CPU): varlen attention, fused
    LayerNorm + linear, linear + residual, fp32."""
    tm = _timm(global_pool="token", class_token=True, depth=1).to(TRITON_DEVICE).eval()
    model = vitkern.from_timm(tm, backend="triton")
    packed = vitkern.pack(_images([(16, 24), (8, 16)]), 8).to(TRITON_DEVICE)
    with torch.no_grad():
        out = model(packed)
        ref = tm(to_padded(packed))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
