"""`python -m vitkern.bench --quick` runs on the CPU and writes its table, JSON and PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vitkern import bench, cost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # two providers keep the CI run short; the others must still appear as skipped with reasons
    cmd = [sys.executable, "-m", "vitkern.bench", "--quick", "--out", str(out), "--no-progress",
           "--providers", "timm-eager,vitkern-auto,vitkern-triton,vitkern-cuda,timm-compile"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_writes_table_json_png(quick_run):
    out, stdout = quick_run
    assert "| model | img | batch | mode | provider | img/s |" in stdout
    assert "TPUv3-core-day" in stdout
    for name in ("bench.json", "bench.md"):
        assert (out / name).stat().st_size > 0
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_quick_json_fields(quick_run):
    out, _ = quick_run
    rec = json.loads((out / "bench.json").read_text())
    assert rec["schema"] == bench.SCHEMA
    for key in ("device", "torch", "triton", "cuda", "git_commit", "date_utc"):
        assert key in rec["environment"]
    assert rec["measured_ceilings"]["gemm_flops"] > 0
    by_provider = {(r["provider"], r["mode"]): r for r in rec["results"]}
    assert {m for _, m in by_provider} == {"infer", "train"}
    for mode in ("infer", "train"):
        base = by_provider[("timm-eager", mode)]
        vk = by_provider[("vitkern-auto", mode)]
        for r in (base, vk):
            assert r["status"] == "ok", r
            assert r["img_per_s"] == pytest.approx(r["batch"] / (r["ms"] * 1e-3))
            assert 0 < r["mfu"] and r["peak_mem_bytes"] is None and "CPU" in r["peak_mem_note"]
            assert r["flops_per_img"] == cost.model_flops(bench.QUICK_MODEL, bench.QUICK_IMG, training=mode == "train")
            assert r["timing"]["iters"] >= 2
        assert base["speedup_vs_timm_eager"] == pytest.approx(1.0)
        assert vk["speedup_vs_timm_eager"] == pytest.approx(base["ms"] / vk["ms"])
        # unavailable providers are present, skipped, with a reason
        for p in ("vitkern-triton", "vitkern-cuda", "timm-compile"):
            r = by_provider[(p, mode)]
            assert r["status"] == "skipped" and len(r["reason"]) > 20, r
    assert len(rec["tpu_table"]) == 3
    assert all(row["vitkern_tpu_core_days_equivalent"] > 0 for row in rec["tpu_table"])


def test_plan_puts_the_baseline_first_and_largest_batch_first():
    cases = bench.plan(["vit_base_patch16_224"], [1, 256], ["infer"], ["vitkern-auto", "hf-sdpa", "timm-eager"])
    assert [(c.batch, c.provider) for c in cases] == [
        (256, "timm-eager"), (256, "vitkern-auto"), (256, "hf-sdpa"),
        (1, "timm-eager"), (1, "vitkern-auto"), (1, "hf-sdpa")]
    assert cases[0].img_size == 224


def test_bad_arguments_name_the_flag():
    with pytest.raises(SystemExit, match="--providers"):
        bench.main(["--quick", "--providers", "nope", "--out", "/nonexistent"])
    with pytest.raises(SystemExit, match="--models"):
        bench.main(["--quick", "--models", "vit_gigantic", "--out", "/nonexistent"])
    with pytest.raises(ValueError, match="provider"):
        bench.provider_skip_reason("nope", torch.device("cpu"))


def test_error_in_a_provider_is_recorded_not_raised(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(bench, "build_model", boom)
    settings = bench.Settings(torch.device("cpu"), torch.float32, cost.measured_device("cpu", {"fp32": 1e10}, 1e10))
    r = bench.run_case(bench.Case("vit_tiny_patch16_224", 32, 1, "infer", "timm-eager"), settings)
    assert r["status"] == "error" and "planted failure" in r["reason"] and r["img_per_s"] is None


def test_pytest_benchmarks_write_extra_info(tmp_path):
    """`pytest benchmarks/ --benchmark-only --benchmark-json` on a CPU: every entry carries the
    extra_info fields benchmarks/results/README.md documents (a small subset of cases)."""
    out = tmp_path / "bench.json"
    skips = tmp_path / "skips.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VITKERN_BENCH_SKIPS_JSON=str(skips))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", f"--benchmark-json={out}", "-q",
         "-p", "no:cacheprovider", "-k", "(infer and (timm-eager or vitkern-auto or vitkern-cuda)) or layer_norm-fwd-"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    entries = json.loads(out.read_text())["benchmarks"]
    models = [b["extra_info"] for b in entries if b["name"].startswith("test_model_throughput")]
    op_rows = [b["extra_info"] for b in entries if b["name"].startswith("test_op")]
    assert {m["provider"] for m in models} == {"timm-eager", "vitkern-auto"}
    assert {o["provider"] for o in op_rows} >= {"torch", "vitkern-eager"}
    common = ("device", "torch", "triton", "cuda", "git_commit", "mfu", "peak_mem_bytes", "peak_mem_note", "ms_median")
    for m in models:
        for key in common + ("img_per_s", "speedup_vs_timm_eager", "flops_per_img", "timing_method"):
            assert key in m, key
        assert m["img_per_s"] > 0 and m["mfu"] > 0 and m["speedup_vs_timm_eager"] > 0
    for o in op_rows:
        for key in common + ("tflops", "gbps", "floor_ms", "pct_of_floor", "speedup_vs_torch", "bytes_min"):
            assert key in o, key
        assert o["gbps"] > 0 and 0 < o["pct_of_floor"]
    # the CUDA provider was skipped, with its reason, and the skip list says so
    reasons = json.loads(skips.read_text())
    assert any("vitkern-cuda" in s["test"] and "cuda" in s["reason"].lower() for s in reasons)
