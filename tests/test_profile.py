"""`python -m vitkern.profile --quick` runs on the CPU and writes its tables, trace and PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vitkern import bench, cost, profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "vitkern.profile", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, proc.stderr


def test_quick_writes_tables_trace_png(quick_run):
    out, stdout, _ = quick_run
    assert "## Op families: measured vs. floor" in stdout and "| name | family | calls/step |" in stdout
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["traceEvents"]) > 100
    png = (out / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rec = json.loads((out / "profile.json").read_text())
    assert rec["schema"] == profile.SCHEMA and rec["config"]["provider"] == "vitkern-eager"
    fams = {r["family"]: r for r in rec["families"]}
    # the eager path's time is mostly matrix products (with a floor) and elementwise work (none: in the
    # fused design it lives in the GEMM epilogues, so its time is what fusion removes; not a ratio to 0)
    assert fams["gemm"]["ms"] > 0 and fams["gemm"]["floor_ms"] > 0 and fams["gemm"]["tflops"] > 0
    assert fams["attention"]["ms"] > 0
    assert fams["elementwise"]["ms"] > 0 and fams["elementwise"]["floor_ms"] is None
    assert fams["elementwise"]["measured_over_floor"] is None
    # the floors are this CPU's, measured (not a GPU's datasheet)
    assert rec["peak"]["source"] == "measured" and rec["peak"]["name"].startswith("cpu")
    # the matrix-product table holds matrix products only (the profiler also gives aten::add FLOPs)
    assert rec["gemms"] and all(cost.is_matrix_product(g["name"]) for g in rec["gemms"]), [g["name"] for g in rec["gemms"]]
    # every model FLOP is accounted for in some family (patch embedding folded into gemm here)
    total = sum(r["flops"] for r in rec["families"])
    assert total == pytest.approx(2 * cost.model_flops(bench.QUICK_MODEL, bench.QUICK_IMG))
    assert sum(k["pct"] for k in rec["kernels"]) == pytest.approx(100.0)
    assert all(k["family"] in profile.FAMILIES for k in rec["kernels"])
    # matrix products by shape: the fc1 GEMM of the eager path, [B*T, D] x [D, 4D], with its own floor
    a = cost.arch_of(bench.QUICK_MODEL).with_img_size(bench.QUICK_IMG)
    rows = bench.QUICK_BATCH * a.tokens
    fc1 = [g for g in rec["gemms"] if g["shapes"][-2:] == [[rows, a.embed_dim], [a.embed_dim, a.mlp_dim]]]
    assert fc1, rec["gemms"]
    assert fc1[0]["gflop_per_call"] == pytest.approx(2 * rows * a.embed_dim * a.mlp_dim / 1e9)
    assert fc1[0]["bytes_per_call"] == 4 * (rows * a.embed_dim + a.embed_dim * a.mlp_dim + rows * a.mlp_dim)
    assert fc1[0]["tflops"] > 0 and fc1[0]["pct_of_floor"] > 0


def test_quick_on_a_cpu_prints_no_profiler_error(quick_run):
    # Kineto's GPU probe for the trace's device properties logged "ERROR ... gpuGetDeviceCount failed"
    # on machines without a GPU, though the CPU trace was fine.
    _, _, stderr = quick_run
    if not torch.cuda.is_available():
        assert "gpuGetDeviceCount" not in stderr and "ERROR:" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("name,family", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("_linear_fwd_kernel", "gemm"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("_attention_fwd_kernel", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void cudnn::detail::implicit_convolve_sgemm", "patch_embed"),
    ("aten::view", "framework"),
    ("some_unknown_kernel", "other"),
])
def test_family_patterns(name, family):
    assert profile.family_of(name) == family


def test_bad_arguments_name_the_flag():
    with pytest.raises(SystemExit, match="--model"):
        profile.main(["--quick", "--model", "vit_gigantic"])
    with pytest.raises(SystemExit, match="--provider vitkern-triton"):
        profile.main(["--quick", "--provider", "vitkern-triton"])


@pytest.mark.parametrize("name,is_gemm", [
    ("aten::mm", True), ("aten::addmm", True), ("aten::bmm", True), ("aten::baddbmm", True), ("aten::conv2d", True),
    ("aten::add", False), ("aten::mul", False), ("aten::add_", False), ("aten::addcmul", False), ("aten::matmul", False),
    ("aten::_softmax", False), ("aten::mean", False),
])
def test_matrix_products_are_classified(name, is_gemm):
    # aten::matmul and aten::linear call aten::mm, which the table counts: listing both would count twice
    assert cost.is_matrix_product(name) is is_gemm


def test_families_without_a_floor_show_none_not_a_ratio_to_zero():
    kernels = [{"name": "aten::mm", "family": "gemm", "calls": 1, "ms": 2.0},
               {"name": "aten::add", "family": "elementwise", "calls": 5, "ms": 1.0},
               {"name": "aten::view", "family": "framework", "calls": 9, "ms": 0.1}]
    costs = profile.family_costs(bench.QUICK_MODEL, bench.QUICK_IMG, 2, torch.float32, False)
    peak = cost.measured_device("cpu (test)", {"fp32": 1e13}, 1e12)
    notes = []
    rows = {r["family"]: r for r in profile.family_rows(kernels, costs, peak, torch.float32, notes)}
    assert rows["gemm"]["floor_ms"] > 0 and rows["gemm"]["measured_over_floor"] > 0
    for fam in ("elementwise", "framework"):
        assert rows[fam]["floor_ms"] is None and rows[fam]["measured_over_floor"] is None
    assert "norm" not in rows  # no norm kernel ran: no row of 0 ms against the final LayerNorm's floor
    assert any("'elementwise' has no floor" in n for n in notes)
    gemms = [{"pct_of_floor": 150.0}]
    assert "faster than their floor" in profile.floor_notes(list(rows.values()), gemms)[0]
    assert profile.floor_notes(list(rows.values()), [{"pct_of_floor": 40.0}]) == []
