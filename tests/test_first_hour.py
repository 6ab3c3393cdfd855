"""What a new user meets in the first hour: every command's --help, the thread count each command
picks (and says), one-line errors (an unknown model name, weights that cannot be fetched), the
audit's progress and summary, the bench chart's title, the Makefile's help and .gitignore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkern import _threads, audit

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Threads: one policy (vitkern/_threads.py), printed by every command


@pytest.fixture
def no_thread_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", _threads.ENV, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_threads, "available_cores", lambda: 8)
    return monkeypatch


def test_threads_policy_order(no_thread_env):
    mp = no_thread_env
    mp.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert _threads.choose() == (8, "8 cores")  # an idle machine: every core
    mp.setattr(os, "getloadavg", lambda: (5.4, 5.0, 4.0))
    assert _threads.choose() == (3, "8 cores, load average 5.4")  # others keep 5 busy
    mp.setattr(os, "getloadavg", lambda: (12.0, 12.0, 12.0))
    assert _threads.choose()[0] == 1  # never below one
    mp.setenv("LOCAL_WORLD_SIZE", "4")
    mp.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert _threads.choose() == (2, "8 cores / 4 local ranks")  # torchrun ranks share the cores
    mp.setenv("OMP_NUM_THREADS", "3")
    assert _threads.choose() == (3, "OMP_NUM_THREADS=3")  # the environment is respected
    mp.setenv(_threads.ENV, "5")
    assert _threads.choose() == (5, "VITKERN_THREADS=5")
    assert _threads.choose(2) == (2, "as requested (--threads)")  # and a flag wins
    with pytest.raises(ValueError, match="threads must be a positive int"):
        _threads.choose(0)


def test_threads_configure_sets_and_says(no_thread_env, capsys):
    no_thread_env.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    before = torch.get_num_threads()
    try:
        assert _threads.configure(who="vitkern.x") == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    line = capsys.readouterr().err.strip()
    assert line == "vitkern.x: 1 CPU thread (8 cores, load average 7.0; --threads N or VITKERN_THREADS=N to choose)"


def test_available_cores_respects_affinity():
    cores = _threads.available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------------
# Every command answers --help with its usage and exit status 0


def _mains():
    from vitkern import bench, cost, demo, inspect, profile
    from vitkern.train import cli

    return {"bench": bench.main, "profile": profile.main, "audit": audit.main, "inspect": inspect.main,
            "demo": demo.main, "cost": cost.main, "train": cli.main}


@pytest.mark.parametrize("command", ["bench", "profile", "audit", "inspect", "demo", "cost", "train"])
def test_every_cli_help_exits_0_with_usage(command, capsys):
    with pytest.raises(SystemExit) as exc:
        _mains()[command](["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m vitkern.{command}"), out[:200]
    if command in ("bench", "profile", "inspect", "demo", "train"):
        assert "--threads" in out


def test_cost_help_through_python_m():
    # `python -m vitkern.cost --help` printed the cost table instead of its usage.
    proc = subprocess.run([sys.executable, "-m", "vitkern.cost", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m vitkern.cost"), proc.stdout[:300]
    assert "| model |" not in proc.stdout


def test_gpu_suite_help():
    proc = subprocess.run([sys.executable, "scripts/gpu_suite.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-500:]


# --------------------------------------------------------------------------------------------
# One-line errors


def test_unknown_model_name_suggests_close_matches():
    import vitkern
    from vitkern import cost, profile

    with pytest.raises(ValueError) as exc:
        vitkern.create_model("vit_bse_patch16_224")
    message = str(exc.value)
    assert "did you mean vit_base_patch16_224" in message and "vitkern.list_models()" in message
    assert "vit_huge" not in message  # not the whole list
    with pytest.raises(ValueError, match="did you mean vit_small_patch16_224"):
        cost.arch_of("vit_smal_patch16_224")
    with pytest.raises(SystemExit, match="did you mean vit_tiny_patch16_224"):
        profile.main(["--quick", "--model", "vit_tiny_patch16_22"])


def test_inspect_without_network_fails_fast_in_one_line(monkeypatch, tmp_path):
    """No network: one line saying the weights could not be fetched and how to pass a file, within
    seconds (timm's hub loader retried for 55 s, then a 55-line traceback)."""
    pytest.importorskip("timm")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    from vitkern import inspect

    monkeypatch.setattr(inspect, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored afterwards: the CLI sets it
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exc:
            inspect.main(["--timm", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "--out", str(tmp_path / "o"),
                          "--threads", str(before)])
    finally:
        torch.set_num_threads(before)
    message = str(exc.value.code)
    assert "\n" not in message
    assert "could not fetch the weights of --timm vit_tiny_patch16_224.augreg_in21k_ft_in1k" in message
    assert "--model vit_tiny_patch16_224 --checkpoint FILE" in message


# --------------------------------------------------------------------------------------------
# The audit: progress, failing rows only, the failing configs named last, a retry of a flaky compile


def _row(**kw):
    base = dict(module="m", kernel="k", config="c", dtype="bf16", arch=90, gemm_like=True, shared=1024, registers=100,
                spill_stores=0, spill_loads=0, mma="wgmma")
    base.update(kw)
    row = audit.Row(**base)
    row.problems = audit.problems(row)
    return row


def test_audit_prints_failing_rows_and_names_them_last(monkeypatch, capsys, tmp_path):
    rows = [_row(kernel=f"ok{i}") for i in range(50)] + [_row(kernel="bad", config="BLOCK=64 w8", arch=80,
                                                             mma="mma.sync", spill_stores=8, spill_loads=8)]
    monkeypatch.setattr(audit, "_interpreting", lambda: False)
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: (rows, [], []))
    out_json = tmp_path / "a.json"
    assert audit.main(["--json", str(out_json)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert "ok7" not in captured.out  # passing rows only with --all
    assert lines[-2].startswith("51 compiled kernel configs, 1 failing")
    assert lines[-1] == "FAIL m.bad [BLOCK=64 w8] bf16 sm_80: spills 8 B stores / 8 B loads"
    assert "compile processes" in captured.err or "process" in captured.err
    assert len(json.loads(out_json.read_text())["rows"]) == 51  # the JSON has every row
    assert audit.main(["--all"]) == 1
    assert "ok7" in capsys.readouterr().out


def test_audit_progress_and_transient_failure_retried(monkeypatch):
    calls = []

    def worker(job):
        calls.append(job)
        first = calls.count(job) == 1
        if job[0] == "flaky" and first:
            return _row(module="flaky", error="CalledProcessError: ptxas died with <Signals.SIGKILL: 9>")
        if job[0] == "broken":
            return _row(module="broken", error="CompilationError: boom")
        return _row(module=job[0])

    spec = type("Spec", (), {"not_on": ()})()
    monkeypatch.setattr(audit, "_interpreting", lambda: False)
    monkeypatch.setattr(audit, "_worker", worker)
    monkeypatch.setattr(audit, "load_specs", lambda modules: ([(m, 0, spec) for m in ("a", "flaky", "broken")], [], []))
    seen = []
    rows, _, _ = audit.run_audit(None, (90,), jobs=1, progress=lambda done, total, row: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    by_module = {r.module: r for r in rows}
    assert by_module["flaky"].ok and "retry passed" in by_module["flaky"].note  # the machine's, not the kernel's
    assert not by_module["broken"].ok and by_module["broken"].error == "CompilationError: boom"  # repeats: the kernel's
    assert calls.count(("broken", 0, 90)) == 2 and calls.count(("a", 0, 90)) == 1


def test_audit_row_of_a_dead_worker_names_the_config():
    from vitkern.kernels.triton import layer_norm

    row = audit._job_row(("layer_norm", 0, 80), RuntimeError("A process in the process pool was terminated abruptly"))
    assert row.config == layer_norm.AUDIT_SPECS[0].label and not row.ok
    assert "worker failed" in audit.failure_line(row)


# --------------------------------------------------------------------------------------------
# The bench chart's title fits the figure (it lost "SMOKE RUN" at the left edge)


def test_bench_chart_title_fits(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from vitkern import bench

    results = [{"status": "ok", "mode": mode, "provider": p, "model": "vit_tiny_patch16_224", "img_size": 64,
                "batch": 2, "img_per_s": 100.0 * (i + 1), "speedup_vs_timm_eager": 1.0 + i}
               for mode in ("infer", "train") for i, p in enumerate(("timm-eager", "vitkern-auto"))]
    record = {"results": results, "settings": {"smoke_run": True, "dtype": "fp32"},
              "environment": {"device": "cpu (x86_64 AMD EPYC 9654 96-Core Processor, 1 threads)",
                              "torch": "2.14.1+cu130", "git_commit": "ddbafc9fd1+dirty"}}
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert bench.plot(record, str(tmp_path / "b.png")) is None
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [fig._suptitle] + [ax.title for ax in fig.axes]
    assert fig._suptitle.get_text().startswith("SMOKE RUN, not a measurement\n")
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, (text.get_text(), extent, box)
    plt.close("all")


# --------------------------------------------------------------------------------------------
# Makefile and .gitignore


def test_gitignore_has_the_default_output_folders():
    entries = (ROOT / ".gitignore").read_text().split()
    for folder in ("runs", "inspect_out", "bench-out", "profile-out"):
        assert f"/{folder}/" in entries or f"{folder}/" in entries, folder


def test_make_help_lists_every_target():
    if not __import__("shutil").which("make"):
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert {"demo", "test", "bench", "audit", "train", "gpu", "gpu-more", "gpu-sweep", "gpu-plan", "help"} <= listed
    # `make` alone is `make help`, not an install
    proc = subprocess.run(["make", "-n"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "pip install" not in proc.stdout
