"""scripts/gpu_suite.py: its two runs fit the 15-minute GPU window (the dry run's counted compiles
inside each stage's budget), a run killed half-way leaves a valid record, `--budget-s` scales every
stage, and the record's pieces (commit, short table) are right without a GPU.

The `test_gpu_*` tests are the suite's own GPU checks (run by its correctness stage): one ViT
block at B/16 and L/16 shapes in bf16 and fp16, and ViT-B/16 against timm at batch 16, whose
16-divisible row count shares batch 256's compiled specializations.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import INTERPRETING, assert_ratio

import vitkern

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # its dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _dry_run(suite, run: str, capsys) -> tuple:
    if INTERPRETING:  # in this process (torch and vitkern already imported): the launchers count on meta tensors
        stages, total = suite.scaled_plan(run, None)
        rc = suite.dry_run(run, stages, total, suite.DEFAULT_DEVICE)
        out = capsys.readouterr().out
    else:  # a GPU test process: the count needs the interpreter's CPU dispatch, in a child
        proc = subprocess.run([sys.executable, str(SCRIPT), "--run", run, "--dry-run"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
        rc, out = proc.returncode, proc.stdout + proc.stderr[-3000:]
    lines = out.strip().splitlines()
    plan = json.loads(next(line for line in lines if line.startswith("{")))
    return rc, plan, lines[-1]


@pytest.mark.parametrize("run,total", [("1", 330), ("2", 240)])
def test_suite_dry_run_fits_its_window(suite, run, total, capsys):
    rc, plan, last = _dry_run(suite, run, capsys)
    assert plan["errors"] == []  # every workload ran on meta tensors, so every launch was counted
    assert last == f"total {plan['total_s']:.0f} s" and plan["total_s"] <= total
    for s in plan["stages"]:
        counted = (s["compiles"] * suite.COMPILE_S + s["autotune_configs"] * suite.AUTOTUNE_CONFIG_S) / s["parallel"]
        if s["budget_s"]:  # a conditional stage (budget 0) runs only with its time left over
            assert counted <= s["budget_s"] and s["estimate_s"] <= s["budget_s"], s
    assert rc == 0
    stages = {s["stage"]: s for s in plan["stages"]}
    if run == "1":
        assert list(stages) == ["env", "cuda_build", "correctness", "b16_models", "ops_b256"]
        # the every-config test alone compiles each config of every tuned kernel (bf16 and fp32 lists)
        assert stages["correctness"]["compiles"] >= 60 and stages["correctness"]["autotune_configs"] > 0
        # batch 256 shares the test stage's compiles but tunes its own M bucket
        assert stages["b16_models"]["compiles"] < 10 and stages["b16_models"]["autotune_configs"] > 0
    else:
        assert stages["max_autotune"]["budget_s"] == 0 and stages["models_more"]["compiles"] > 0


def test_budget_s_scales_every_stage(suite):
    full, total = suite.scaled_plan("1", None)
    half, half_total = suite.scaled_plan("1", 170)
    assert total == 330 and half_total == 170
    scale = (170 - suite.RECORD_RESERVE_S) / (330 - suite.RECORD_RESERVE_S)
    assert [s.budget for s in half] == pytest.approx([s.budget * scale for s in full])
    assert sum(s.budget for s in half) + suite.RECORD_RESERVE_S == pytest.approx(170)
    with pytest.raises(ValueError, match="budget"):
        suite.scaled_plan("2", 5)


def test_commit_comes_from_env_then_file(suite, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "REPO", str(tmp_path))
    (tmp_path / ".vitkern-commit").write_text("abc1234567+dirty\n")
    monkeypatch.delenv("VITKERN_COMMIT", raising=False)
    assert suite.commit_of_checkout() == "abc1234567+dirty"
    monkeypatch.setenv("VITKERN_COMMIT", "fedcba9876")
    assert suite.commit_of_checkout() == "fedcba9876"
    monkeypatch.delenv("VITKERN_COMMIT")
    (tmp_path / ".vitkern-commit").unlink()
    assert suite.commit_of_checkout() == "unknown"  # no file, and tmp_path is no git checkout


def test_short_table_fits_the_output_tail(suite):
    stages = [{"name": f"stage{i}", "status": "failed", "seconds": 12.0, "limit_s": 40.0, "reason": "x" * 300} for i in range(12)]
    results = [{"model": suite.B16, "batch": 256, "mode": m, "provider": p, "status": "ok", "img_per_s": ips, "ms": 1.0}
               for m in ("infer", "train") for p, ips in (("timm-eager", 1000.0), ("vitkern-triton", 1500.0), ("vitkern-cuda", 1200.0))]
    failed = [{"test": f"tests/test_triton_attention.py::test_{i}", "kind": "failure", "message": "boom " * 100} for i in range(500)]
    rec = {"run": "1", "gpu": "NVIDIA H200", "commit": "abc", "budget_s": 330, "total_seconds": 300.0, "date_utc": "now",
           "stages": stages, "models": {"results": results}, "notes": [],
           "tests": {"passed": 10, "failures": 500, "errors": 0, "skipped": 1, "failed": failed,
                     "failures_by_op": {"attention": 500}}}
    table = suite.short_table(rec)
    assert len(table) < 6100
    assert "vitkern-triton" in table and "1.50" in table and "attention 500" in table
    assert len(suite.render_summary(rec)) > len(table)


def _wait_for(path_glob, predicate, proc, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for path in Path(path_glob[0]).glob(path_glob[1]):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if predicate(rec):
                return rec
        time.sleep(0.5)
    return None


def test_suite_quick_run_killed_half_way_leaves_a_valid_record(tmp_path):
    """A CPU --quick run of run 1, SIGTERMed once two stages finished: the record and summary in
    the out folder hold the finished stages, the cut one and those never started."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--run", "1", "--quick", "--out", str(out)], cwd=ROOT,
                            env=_env(VITKERN_COMMIT="test-commit"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        two_done = _wait_for((out, "*-run1.json"), lambda r: len(r.get("stages", [])) >= 2, proc, 240)
        assert two_done is not None, proc.stdout.read() if proc.poll() is not None else "no record with two stages"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-3000:]
    records = list(out.glob("*-run1.json"))
    assert len(records) == 1 and records[0].name.startswith("no-gpu-") and "test-commit" in records[0].name
    rec = json.loads(records[0].read_text())
    names = [s["name"] for s in rec["stages"]]
    assert names == ["env", "cuda_build", "correctness", "b16_models", "ops_b256"]
    statuses = [s["status"] for s in rec["stages"]]
    assert statuses[:2] == ["ok", "ok"], rec["stages"][:2]
    assert "not run" in statuses and set(statuses[2:]) <= {"ok", "failed", "cut", "not run"}
    assert rec["commit"] == "test-commit" and any("SIGTERM" in n for n in rec["notes"])
    summary = records[0].with_suffix(".md").read_text()
    assert "GPU suite run 1" in summary and "not run" in summary
    assert (out / "suite-log.txt").exists()
    assert len(list(out.iterdir())) <= 7
    assert "env" in output.splitlines()[-6] or "stage" in output  # the short table is printed last


# ---------------------------------------------------------------------------------------------
# The suite's GPU checks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", ["vit_base_patch16_224", "vit_large_patch16_224"], ids=["B16", "L16"])
def test_gpu_vit_block_shapes(model, dtype):
    """One block of the model at its real shapes (224 px, T = 197, D 768/1024, head dim 64),
    batch 2, forward and backward on the Triton backend: the ratio test against eager PyTorch in
    the same dtype, with fp64 as the oracle (every op family runs: patch_embed, ln_linear,
    attention, linear, layer_norm)."""
    torch.manual_seed(0)
    eager = vitkern.create_model(model, depth=1, backend="eager").eval()
    oracle = copy.deepcopy(eager).double().cuda()
    low = copy.deepcopy(eager).to("cuda", dtype)
    tri = copy.deepcopy(eager).to("cuda", dtype)
    tri.backend = "triton"
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, device="cuda")

    def run(m, inp):
        inp = inp.clone().requires_grad_(True)
        out = m(inp)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        grads = {n: p.grad.detach().double().cpu() for n, p in m.named_parameters()}
        return out.detach().double().cpu(), grads

    out64, g64 = run(oracle, x)
    out_l, g_l = run(low, x.to(dtype))
    out_t, g_t = run(tri, x.to(dtype))
    assert_ratio(out_t, out_l, out64, name=f"{model} block logits", floor=1e-3)
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                 "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight"):
        assert_ratio(g_t[name], g_l[name], g64[name], name=f"{model} grad {name}", floor=1e-3)


@pytest.mark.gpu
def test_gpu_b16_ratio_vs_timm():
    """vitkern ViT-B/16 (Triton, bf16) against timm's own model: its error to timm in fp64 is at
    most 2x timm's bf16 error, at batch 16 (rows 16 x 197: the 16-divisible specialization batch
    256 runs, so this checks the kernels the benchmark times)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    vk = vitkern.from_timm(ref).to("cuda", torch.bfloat16).eval()
    vk.backend = "triton"
    oracle = copy.deepcopy(ref).double().cuda()
    low = copy.deepcopy(ref).to("cuda", torch.bfloat16)
    x = torch.randn(16, 3, 224, 224, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        assert_ratio(vk(x.bfloat16()).double().cpu(), low(x.bfloat16()).double().cpu(), oracle(x).cpu(),
                     name="B/16 logits vs timm", floor=1e-3)


def test_sigterm_to_pytest_still_writes_its_junit_xml(tmp_path):
    """tests/conftest.py turns SIGTERM into a clean pytest exit: the test in flight is interrupted
    and the junit XML of the finished ones is written (what the suite's test stages return)."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                            "def test_slow():\n    time.sleep(120)\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    junit = tmp_path / "junit.xml"
    env = _env(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "conftest", "-v", "-p", "no:cacheprovider",
                             "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_slow.py"), f"--junitxml={junit}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:  # -v names a test as it starts
            seen.append(line)
            if "test_slow" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, "".join(seen) + rest  # pytest's "interrupted"
    xml = junit.read_text()
    assert 'name="test_fast"' in xml and "KeyboardInterrupt" in "".join(seen) + rest


def test_stage_past_its_limit_is_stopped_inside_it(suite, tmp_path, monkeypatch):
    """A hung stage gets SIGTERM STOP_GRACE_S before its limit (SIGKILL after), is recorded as
    `timeout`, and has ended by its limit, so the run keeps its total."""
    monkeypatch.setattr(suite, "REPO", str(tmp_path))  # the work folder goes under tmp_path
    previous = signal.getsignal(signal.SIGTERM)
    try:
        s = suite.Suite("1", [suite.Stage("hung", 12, "sleeps", 1)], 12 + suite.RECORD_RESERVE_S, None, True)
        t = time.monotonic()
        stage = s.run_stage(0, [sys.executable, "-c", "import time; time.sleep(120)"])
        took = time.monotonic() - t
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stage["status"] == "timeout" and stage["rc"] == -signal.SIGTERM
    assert took <= stage["limit_s"] + 1.0
    with open(os.path.join(s.work, stage["log"])) as f:
        assert "stopped at its limit" in f.read()
