"""Cost of packed (vitkern) vs padded (timm NaFlex) batches (issue #23 step 6): cost.packed_op_costs,
cost.packed_vs_padded, `python -m vitkern.bench --naflex`."""

from __future__ import annotations

import json
import os

import pytest

from vitkern import bench, cost

B16 = "vit_base_patch16_224"


@pytest.mark.parametrize("training", [False, True])
def test_equal_grids_packed_and_padded_are_the_dense_batch(training):
    dense = cost.op_costs(B16, 8, training=training)
    r = cost.packed_vs_padded(B16, [(14, 14)] * 8, 196, training=training)
    flops = sum(op.total_flops(training) for op in dense)
    assert r["packed_flops"] == pytest.approx(flops, rel=1e-12)
    assert r["padded_flops"] == pytest.approx(flops, rel=1e-12)
    assert r["packed_tokens"] == r["padded_tokens"] == 8 * 197


def test_packed_attention_is_block_diagonal_and_padding_costs_more():
    a = cost.arch_of(B16)
    grids = [(14, 18), (16, 16), (8, 30), (3, 5)]
    t = [gh * gw + 1 for gh, gw in grids]
    r = cost.packed_vs_padded(B16, grids, 256)
    assert r["packed_attention_flops"] == pytest.approx(4.0 * a.embed_dim * a.depth * sum(x * x for x in t))
    assert r["padded_attention_flops"] == pytest.approx(4.0 * a.embed_dim * a.depth * 4 * 257 ** 2)
    gemm = 2 * a.depth * a.embed_dim * (3 * a.embed_dim + a.embed_dim + 2 * a.mlp_dim)
    assert r["packed_flops"] - r["packed_attention_flops"] == pytest.approx(
        gemm * sum(t) + 2 * 768 * 768 * sum(t) - 2 * 768 * 768 * 4 + 2 * 4 * 768 * 1000, rel=1e-9)
    for what in ("flops", "bytes", "floor_s"):
        assert r[f"{what}_ratio"] < 1.0
    with pytest.raises(ValueError, match="padded_patches must be >= the largest image's 256 patches, got 100"):
        cost.packed_vs_padded(B16, grids, 100)


def test_imagenet_like_grids_fit_the_budget():
    grids = cost.imagenet_like_grids(200, 16, 256)
    assert all(gh * gw <= 256 for gh, gw in grids) and any(gw > gh for gh, gw in grids) and any(gh > gw for gh, gw in grids)
    native = cost.imagenet_like_grids(200, 16, 256, native=True)
    assert sum(h * w for h, w in native) < sum(h * w for h, w in grids)


def test_bench_naflex_writes_the_table(tmp_path, capsys):
    record = bench.main(["--naflex", "--out", str(tmp_path)])
    assert len(record["rows"]) == 4 and all(r["floor_s_ratio"] < 1 for r in record["rows"])
    assert "predicted ms packed / padded" in capsys.readouterr().out
    assert json.load(open(os.path.join(tmp_path, "naflex.json")))["max_patches"] == 256
    assert os.path.exists(os.path.join(tmp_path, "naflex.md"))
