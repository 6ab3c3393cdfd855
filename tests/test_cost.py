"""vitkern.cost reproduces the published FLOP counts and the TPUv3-core-day arithmetic."""

from __future__ import annotations

import re

import pytest

import vitkern
from vitkern import cost


@pytest.mark.parametrize("name,gmacs", sorted(cost.TIMM_GMACS.items()))
def test_model_flops_match_timm_published_gmacs(name, gmacs):
    assert cost.model_flops(name) / 2 / 1e9 == pytest.approx(gmacs, rel=0.01)


@pytest.mark.parametrize("name,gflops", [("vit_base_patch16_224", 35.1), ("vit_large_patch16_224", 123.1),
                                         ("vit_huge_patch14_224", 334.8)])
def test_model_flops_match_design_doc(name, gflops):
    assert cost.model_flops(name) / 1e9 == pytest.approx(gflops, rel=0.01)


@pytest.mark.parametrize("key,exaflops", sorted(cost.PAPER_TABLE6_EXAFLOPS.items()))
def test_pretraining_flops_match_paper_table6(key, exaflops):
    name, epochs = key
    assert cost.pretraining_flops(name, epochs) / 1e18 == pytest.approx(exaflops, rel=0.01)


def test_hand_count_of_one_block():
    # ViT-B/16 at 224 without head: 196 patches x 768 x 768 for the embedding, then per block
    # T*D*(3D + D + 4D + 4D) + 2*T*T*D multiply-adds, T = 197.
    T, D, L = 197, 768, 12
    macs = 196 * 768 * 768 + L * (T * D * 12 * D + 2 * T * T * D)
    assert cost.model_flops("vit_base_patch16_224", include_head=False) == 2 * macs
    assert cost.model_flops("vit_base_patch16_224") == 2 * macs + 2 * 768 * 1000
    assert cost.model_flops("vit_base_patch16_224", training=True) == 3 * (2 * macs + 2 * 768 * 1000)


def test_img_size_and_every_input_kind_agree():
    timm = pytest.importorskip("timm")
    name = "vit_tiny_patch16_224"
    ref = cost.model_flops(name, 384)
    assert ref == cost.model_flops("vit_tiny_patch16_384")
    cfg = vitkern.config.get_config(name, img_size=384)
    assert cost.model_flops(cfg) == ref
    assert cost.model_flops(vitkern.create_model(name, img_size=384)) == ref
    assert cost.model_flops(timm.create_model(name, img_size=384)) == ref
    # a non-square image: 12 x 20 patches
    assert cost.arch_of(name).with_img_size((192, 320)).tokens == 1 + 12 * 20


def test_param_count_matches_timm():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_small_patch16_224")
    assert cost.count_params("vit_small_patch16_224") == sum(p.numel() for p in m.parameters())


def test_tpu_core_days_worked_example_from_docstring():
    doc = cost.tpu_core_days_equivalent.__doc__
    m = re.search(r"= ([\d.]+) TPUv3-core-day equivalents", doc)
    assert m, "the docstring must carry the worked example"
    assert cost.tpu_core_days_equivalent(783e18, 0.59) == pytest.approx(float(m.group(1)), abs=0.05)
    # the definition, by hand
    assert cost.tpu_core_days_equivalent(61.5e12 * 86400, 1.0) == pytest.approx(1.0)
    assert cost.tpu_core_days_equivalent(61.5e12 * 86400, 0.5) == pytest.approx(2.0)


def test_paper_table2_implied_mfu():
    runs = {r.label: r for r in cost.PAPER_TABLE2}
    assert runs["ViT-L/16 (JFT)"].implied_mfu == pytest.approx(0.22, abs=0.01)
    assert runs["ViT-H/14 (JFT)"].implied_mfu == pytest.approx(0.32, abs=0.01)
    assert 0 < runs["ViT-L/16 (I21k)"].implied_mfu < 1
    # at the paper's own MFU the equivalent is the paper's cost
    for r in cost.PAPER_TABLE2:
        assert cost.tpu_core_days_equivalent(r.train_flops, r.implied_mfu) == pytest.approx(r.tpu_core_days)
    rows = cost.tpu_table(0.59)
    assert rows[1]["tpu_core_days_equivalent"] == pytest.approx(249.8, rel=0.01)
    assert cost.tpu_table(None)[0]["tpu_core_days_equivalent"] is None


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="mfu"):
        cost.tpu_core_days_equivalent(1e18, 0.0)
    with pytest.raises(ValueError, match="model_or_name"):
        cost.model_flops("vit_gigantic")
    with pytest.raises(TypeError, match="model_or_name"):
        cost.model_flops(3.5)
    with pytest.raises(ValueError, match="batch"):
        cost.op_costs("vit_base_patch16_224", 0)
    with pytest.raises(ValueError, match="epochs"):
        cost.pretraining_flops("vit_base_patch16_224", 0)


def test_bytes_and_floors():
    name = "vit_base_patch16_224"
    ops = {op.name: op for op in cost.op_costs(name, 256)}
    # attention fused: read the packed qkv, write the output (bf16) per layer
    assert ops["attention"].bytes_fused == 12 * 2 * 256 * 197 * (3 * 768 + 768)
    # the unfused path moves the T x T probabilities three times
    assert ops["attention"].bytes_unfused - ops["attention"].bytes_fused >= 12 * 3 * 2 * 256 * 12 * 197 * 197
    for op in ops.values():
        assert op.bytes_unfused >= op.bytes_fused > 0
    assert cost.model_bytes(name, 256, dtype="fp32") == pytest.approx(2 * cost.model_bytes(name, 256), rel=1e-9)
    h100 = cost.DEVICES["H100 SXM"]
    fl = cost.floor_time(name, 256, h100)
    assert fl >= 256 * cost.model_flops(name) / 989e12
    assert fl < cost.floor_time(name, 256, h100, fused=False)
    assert cost.floor_time(name, 256, "H200") <= fl <= cost.floor_time(name, 256, "A100 SXM")
    assert cost.floor_time(name, 256, h100, training=True) > 2.9 * fl
    # a GEMM-bound op's floor is its FLOPs over the peak
    assert ops["ln1_qkv"].floor_s(h100, "bf16") == pytest.approx(ops["ln1_qkv"].flops / 989e12)


def test_device_lookup_and_mfu():
    assert cost.lookup_device("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert cost.lookup_device("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert cost.lookup_device("NVIDIA H200").bandwidth == 4.8e12
    assert cost.lookup_device("NVIDIA A100-SXM4-80GB").peak("bf16") == 312e12
    assert cost.lookup_device("cpu") is None
    assert cost.mfu(35.13e9, 10_000, "H100 SXM") == pytest.approx(35.13e9 * 1e4 / 989e12)
    meas = cost.measured_device("H100 measured", {"bf16": 795e12}, 3.0e12)
    assert meas.source == "measured" and meas.peak("bfloat16") == 795e12
    with pytest.raises(ValueError, match="dtype"):
        meas.peak("fp16")
