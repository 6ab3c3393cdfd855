"""`python -m vitkern.bench --quick` runs on the CPU and writes its table, JSON and PNG; the
pytest-benchmark suites write the documented extra_info; the GPU suite's record logic (targets,
junit, the OUT copy) is right on synthetic inputs."""

from __future__ import annotations

import gzip
import json
import os
import re
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


def test_quick_is_labelled_a_smoke_run_and_reports_the_spread(quick_run):
    # Two timed calls after one warm-up gave ratios from 0.04x to 1.08x between reruns: a quick run
    # now times more calls, reports min-max and an interval per ratio, and says it is a smoke run.
    out, stdout = quick_run
    assert "SMOKE RUN" in stdout and "not a measurement" in stdout
    assert "ms min-max (calls)" in stdout and "[IQR interval]" in stdout
    rec = json.loads((out / "bench.json").read_text())
    assert rec["settings"]["smoke_run"] is True
    ok = [r for r in rec["results"] if r["status"] == "ok"]
    assert ok
    for r in ok:
        t = r["timing"]
        assert t["iters"] >= 5 and t["min_ms"] <= t["median_ms"] <= t["max_ms"]
        assert t["quartiles_ms"][0] <= t["median_ms"] <= t["quartiles_ms"][1]
        lo, hi = r["speedup_interval_vs_timm_eager"]
        assert lo <= r["speedup_vs_timm_eager"] <= hi
        if r["provider"] != "timm-eager":
            assert f"{r['speedup_vs_timm_eager']:.2f}x [{lo:.2f}, {hi:.2f}]" in stdout


def test_ratio_interval_brackets_the_ratio_of_medians():
    from vitkern import _timing

    base = _timing.Timing([10.0, 11.0, 12.0, 13.0, 30.0], 1, "perf_counter")
    other = _timing.Timing([5.0, 5.5, 6.0, 6.5, 7.0], 1, "perf_counter")
    lo, hi = _timing.ratio_interval(base, other)
    assert lo <= base.median_ms / other.median_ms <= hi
    q1b, q3b = base.quartiles_ms
    q1o, q3o = other.quartiles_ms
    assert (lo, hi) == (q1b / q3o, q3b / q1o)


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


# --------------------------------------------------------------------------------------------
# scripts/gpu_suite.py: the record of a GPU run must be right the first time, so its pure parts
# (target evaluation, junit reading, the OUT copy) are checked here on synthetic inputs.


@pytest.fixture(scope="module")
def suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(REPO, "scripts", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # its dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _model_row(provider, batch, mode, ms, mem=None, model="vit_base_patch16_224"):
    mult = 3 if mode == "train" else 1
    ips = batch / (ms * 1e-3)
    return {"model": model, "batch": batch, "mode": mode, "provider": provider, "ms_median": ms, "img_per_s": ips,
            "peak_mem_bytes": mem, "mfu": mult * cost.model_flops(model) * ips / 989e12, "timing_method": "cuda-events"}


def test_suite_evaluates_the_design_targets(suite):
    rows = [
        _model_row("timm-eager", 256, "infer", 20.0), _model_row("vitkern-auto", 256, "infer", 10.0),
        _model_row("vitkern-cuda", 256, "infer", 12.0), _model_row("timm-compile", 256, "infer", 14.0),
        _model_row("vitkern-auto", 1, "infer", 0.3),
        _model_row("timm-eager", 256, "train", 100.0, mem=40e9), _model_row("vitkern-auto", 256, "train", 70.0, mem=20e9),
        {"op": "attention", "mode": "fwdbwd", "provider": "vitkern-auto", "ms_median": 1.0},
        {"op": "attention", "mode": "fwdbwd", "provider": "torch-flash", "ms_median": 1.5},
        {"op": "ln_qkv", "mode": "fwd", "provider": "vitkern-auto", "ms_median": 1.04},
        {"op": "ln_qkv", "mode": "fwd", "provider": "torch-gemm-only", "ms_median": 1.0},
        {"op": "mlp", "mode": "fwd", "provider": "vitkern-auto", "ms_median": 1.1},
        {"op": "mlp", "mode": "fwd", "provider": "torch-gemm-only", "ms_median": 1.0},
    ]
    bench_rec = {"results": [{"status": "ok", "mode": "train", "provider": "vitkern-auto", "model": "vit_large_patch16_224",
                              "batch": 256, "mfu": 0.60, "img_per_s": 1.0, "ms": 1.0}]}
    assert suite.best_vitkern_provider(rows, bench_rec) == "vitkern-auto"
    t = {row["target"]: row for row in suite.evaluate_targets(rows, bench_rec)}
    assert len(t) == 11
    assert t["B/16 infer b256: speedup vs timm eager"]["measured"] == pytest.approx(2.0)
    assert t["B/16 infer b256: speedup vs timm + torch.compile"]["met"] is True
    assert t["B/16 infer b256: img/s"]["measured"] == pytest.approx(25_600)
    assert t["B/16 infer b1: latency ms (CUDA graph)"]["met"] is True
    assert t["B/16 train b256: speedup vs timm eager + AdamW"]["measured"] == pytest.approx(100 / 70)
    assert t["B/16 train b256: speedup vs timm eager + AdamW"]["met"] is False
    assert t["B/16 train b256: peak memory vs timm eager"]["measured"] == pytest.approx(0.5)
    assert t["attention T=197 d=64 fwd+bwd: speedup vs SDPA flash"]["met"] is True
    assert t["LayerNorm+QKV time / bare QKV GEMM time (forward)"]["met"] is True
    assert t["GELU MLP time / its two GEMMs' time (forward)"]["met"] is False
    l16 = t["ViT-L/16 JFT pre-training: TPUv3-core-day equivalent"]
    assert l16["measured"] == pytest.approx(783.35e18 / (0.60 * 61.5e12 * 86400), rel=1e-3) and l16["met"] is True
    # nothing measured: every target says so instead of guessing
    assert all(row["measured"] is None and row["met"] is None for row in suite.evaluate_targets([], None))


def test_suite_reads_junit_and_copies_at_most_8_small_files(suite, tmp_path, monkeypatch):
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
                     '<testcase classname="tests.test_a" name="test_ok"/>'
                     '<testcase classname="tests.test_a" name="test_bad"><failure message="boom">trace</failure></testcase>'
                     '<testcase classname="tests.test_a" name="test_skip"><skipped message="needs a GPU"/></testcase>'
                     '</testsuite></testsuites>')
    s = suite.junit_summary(str(junit))
    assert (s["tests"], s["passed"], s["failures"], s["skipped"]) == (3, 1, 1, 1)
    assert s["failed"][0]["test"] == "tests.test_a::test_bad" and s["skip_reasons"] == {"needs a GPU": 1}

    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"schema": suite.SCHEMA, "benchmarks": {"raw": "x" * 5000}, "targets": []}))
    md, log = tmp_path / "rec.md", tmp_path / "log.txt"
    md.write_text("# summary\n")
    log.write_text("line\n" * 2000)
    trace = tmp_path / "trace.json"
    trace.write_text("{}")
    monkeypatch.setattr(suite, "MAX_OUT_BYTES", 4000)
    out = tmp_path / "out"
    files = [(str(rec), "NVIDIA H100 80GB HBM3+dirty.json"), (str(md), "rec.md"), (str(log), "suite-log.txt"),
             (str(junit), "junit.xml"), (str(trace), "profile-trace.json.gz"), (str(tmp_path / "missing"), "x.txt")]
    files += [(str(md), f"extra{i}.md") for i in range(5)]  # more than the tool brings back
    suite.copy_out(str(out), files)
    names = sorted(os.listdir(out))
    # at most 6 here: the 7th place in OUT stays for the sweep's tuning table
    assert len(names) <= suite.MAX_OUT_FILES - 1 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert "profile-trace.json.gz" in names and "junit.xml" in names and "x.txt" not in names
    with gzip.open(out / "profile-trace.json.gz") as f:
        assert f.read() == b"{}"
    copied = json.loads((out / "NVIDIA-H100-80GB-HBM3-dirty.json").read_text())  # still valid JSON
    assert copied["schema"] == suite.SCHEMA and isinstance(copied["benchmarks"], str)
    assert (out / "suite-log.txt").stat().st_size <= 4000  # the end of a too-long log
