"""Packed NaFlex batches (issue #23): `vitkern.pack` / `unpack` and `ops.patch_embed` on
pre-extracted patches with per-image grids, against timm's NaFlexEmbeds and a float64 oracle."""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern import ops, reference
from vitkern.packing import size_for_budget


def _images(sizes, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, h, w, generator=g, dtype=dtype) for h, w in sizes]


def test_pack_round_trip_and_layout():
    images = _images([(32, 48), (16, 16), (20, 37)])  # the last one is padded to 32 x 48
    packed = vitkern.pack(images, 16)
    assert packed.grids.tolist() == [[2, 3], [1, 1], [2, 3]]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 6, 7, 13]
    assert packed.max_seqlen == 6 and packed.patches.shape == (13, 16 * 16 * 3)
    assert packed.coords[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    for a, b in zip(vitkern.unpack(packed), images):
        assert torch.equal(a, b)
    # Patch (1, 2) of image 0, channels last: pixel (py, px, c) at index (py * 16 + px) * 3 + c.
    p = packed.patches[5].reshape(16, 16, 3)
    assert torch.equal(p.permute(2, 0, 1), images[0][:, 16:32, 32:48])
    # timm's NaFlex patchify gives the same rows.
    timm_nf = pytest.importorskip("timm.models.naflexvit")
    ref, grid = timm_nf.batch_patchify(images[0][None], (16, 16))
    assert grid == (2, 3) and torch.equal(ref[0], packed.patches[:6])
    cu, longest = packed.token_cu_seqlens(1)
    assert cu.tolist() == [0, 7, 9, 16] and longest == 7


def test_pack_budget_resizes_keeping_aspect():
    assert size_for_budget((480, 640), 16, 256) == (224, 288)  # 14 x 18 = 252 <= 256 < 15 x 19
    transforms = pytest.importorskip("timm.data.naflex_transforms")
    for hw in [(480, 640), (100, 1000), (17, 17), (1024, 64)]:
        for budget in (16, 64, 256):
            h, w = size_for_budget(hw, 16, budget)
            assert h % 16 == 0 and w % 16 == 0 and (h // 16) * (w // 16) <= budget
            # timm's NaFlex transforms pick the same size (their bisection on the same rule).
            assert (h, w) == tuple(transforms.get_image_size_for_seq(hw, 16, budget)[1])
    images = _images([(480, 640), (8, 8)], dtype=torch.float32)
    packed = vitkern.pack(images, 16, max_patches=64)
    assert all(gh * gw <= 64 for gh, gw in packed.grids.tolist())
    assert [tuple(i.shape[1:]) for i in vitkern.unpack(packed)] == packed.sizes


def test_pack_errors():
    with pytest.raises(ValueError, match=r"images\[1\] is 8x20, smaller than one patch 16x16"):
        vitkern.pack(_images([(16, 16), (8, 20)]), 16)
    with pytest.raises(ValueError, match=r"images\[1\] has 1 channels but images\[0\] has 3"):
        vitkern.pack([torch.randn(3, 16, 16), torch.randn(1, 16, 16)], 16)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        vitkern.pack(_images([(16, 16)]), 0)
    with pytest.raises(ValueError, match="max_patches must be None or a positive int"):
        vitkern.pack(_images([(16, 16)]), 16, max_patches=0)


def _timm_embeds(pos_embed, dim=32, reg_tokens=1, ar=False):
    timm_nf = pytest.importorskip("timm.models.naflexvit")
    torch.manual_seed(0)
    m = timm_nf.NaFlexEmbeds(patch_size=8, in_chans=3, embed_dim=dim, proj_type="linear", class_token=True,
                             reg_tokens=reg_tokens, pos_embed=pos_embed, pos_embed_grid_size=(4, 5),
                             pos_embed_ar_preserving=ar).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


@pytest.mark.parametrize("pos_type, ar", [("learned", False), ("learned", True), ("factorized", False), ("factorized", True)])
def test_packed_patch_embed_matches_timm_naflex_embeds(pos_type, ar):
    m = _timm_embeds(pos_type, ar=ar)
    images = _images([(32, 40), (16, 56), (24, 8)])  # grids 4x5 (the table's own), 2x7, 3x1
    packed = vitkern.pack(images, 8)
    pos = m.pos_embed if pos_type == "learned" else (m.pos_embed_y, m.pos_embed_x)
    prefix = torch.cat([m.cls_token, m.reg_token], dim=1)
    tokens = ops.patch_embed(packed.patches, m.proj.weight, m.proj.bias, prefix, pos, grids=packed.grids,
                             pos_embed_ar_preserving=ar)
    cu, _ = packed.token_cu_seqlens(2)
    assert tokens.shape == (cu[-1].item(), 32)
    for i, image in enumerate(images):
        one = vitkern.pack([image], 8)
        ref, _ = m(one.patches[None], patch_coord=one.coords[None])
        # timm resamples the table in fp32 even for a float64 model (vitkern in float64): fp32 agreement
        # where it resamples, exact where the grid is the table's own (image 0).
        tight = 1e-10 if i == 0 and not ar else 2e-6
        torch.testing.assert_close(tokens[cu[i]:cu[i + 1]], ref[0], atol=tight, rtol=tight)


def test_packed_patch_embed_conv_weight_and_grad():
    # A Conv2d weight [dim, C, ph, pw] reads the channels-last patches as the conv reads the image.
    images = _images([(16, 24), (8, 8)])
    packed = vitkern.pack(images, 8)
    w = torch.randn(16, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64)
    pos = torch.randn(1, 2, 2, 16, dtype=torch.float64, requires_grad=True)
    tokens = ops.patch_embed(packed.patches, w, b, None, pos, grids=packed.grids.tolist(), backend="eager")
    dense = reference.patch_embed(images[0][None], w, b)[0]
    from vitkern.pos_embed import naflex_pos_embed
    torch.testing.assert_close(tokens[:6], dense + naflex_pos_embed(pos, (2, 3)))
    tokens.sum().backward()
    assert w.grad is not None and pos.grad is not None and torch.isfinite(pos.grad).all()


def test_packed_patch_embed_errors():
    packed = vitkern.pack(_images([(16, 16)]), 8)
    w = torch.randn(16, 192, dtype=torch.float64)
    with pytest.raises(ValueError, match="grids cover 1 patches but x has 4 rows"):
        ops.patch_embed(packed.patches, w, None, grids=[(1, 1)])
    with pytest.raises(ValueError, match=r"weight must be \[dim, 192\]"):
        ops.patch_embed(packed.patches, w[:, :10], None, grids=packed.grids)
    with pytest.raises(ValueError, match="learned 2-D table"):
        ops.patch_embed(packed.patches, w, None, None, torch.randn(1, 5, 16, dtype=torch.float64), grids=packed.grids)
