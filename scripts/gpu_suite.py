#!/usr/bin/env python3
"""The GPU suite, fitted to a 15-minute GPU window: two prepared runs (and a tuning sweep), each
one command, each returning its data even when cut short.

    python3 scripts/gpu_suite.py --run 1 [--out DIR]     # `make gpu`:      at most 330 s
    python3 scripts/gpu_suite.py --run 2 [--out DIR]     # `make gpu-more`: at most 240 s
    python3 scripts/gpu_suite.py --run sweep --budget-s S [--out DIR]   # `make gpu-sweep`
    python3 scripts/gpu_suite.py --run 1 --dry-run       # the plan, its counted compiles, `total <s> s`
    python3 scripts/gpu_suite.py --run 1 --quick --out DIR   # a CPU smoke run of the suite itself

Runs with the GPU machine's system python3 (torch, triton, timm, transformers, pytest, pytest-xdist,
pytest-timeout, pytest-benchmark preinstalled; no venv, no installs, no internet; `make` and `git`
may be missing). The commit comes from $VITKERN_COMMIT, else the file .vitkern-commit in the
repository root (`make gpu` writes it; write it yourself before a run without make), else git.

Run 1 (<= 330 s; start-up + run 1 <= about 8.5 min, leaving room for run 2):
    env           15  nvidia-smi, versions, measured bf16 GEMM rate and copy bandwidth
    cuda_build    45  csrc/ just in time for this GPU's arch only; its ptxas table into the record
    correctness  100  pytest -n 8 (per-test timeout, -rfE): the Triton tests (the fp16 ones too), the
                      CUDA op tests, one ViT block at B/16 and L/16 shapes in bf16 and fp16, B/16 vs
                      timm at batch 16 (batch 256's specializations), every autotune config once
    b16_models   110  ViT-B/16 224 batch 256 bf16, inference and training step: timm eager, vitkern
                      triton, vitkern cuda, then timm + torch.compile (default mode; training too only
                      with 60 s of the stage left)
    ops_b256      50  per-op at B/16 batch 256, fwd and fwd+bwd: torch, SDPA flash, triton, cuda
    (record)      10
Run 2 (<= 240 s): env, cuda_build (a cache hit on a warm machine), the odd attention shapes and
    the torch.compile/opcheck tests and the ViT family's option tests and the CUDA-graph checks of
    vitkern.export, the int32-overflow tests serially, B/16 at batch 1 (CUDA
    graphs) and 32, L/16 and H/14 at batch 256, the profile of the fastest vitkern backend, a
    compute-sanitizer probe (memcheck of the CUDA ops only if a tiny probe works), and timm +
    torch.compile(max-autotune) only with 120 s left.
Sweep (`--budget-s`, default 240): env, then every config of every Triton kernel timed at the ViT
    shapes (B/16 and L/16 at batch 256 in bf16 first), each result written into the device's
    tuning table (OUT/<device>.json, e.g. nvidia_h200.json) as it comes: a cut sweep leaves a
    valid partial table. Commit it as vitkern/kernels/triton/configs/<device>.json.

A stage's limit is its budget plus what earlier stages left unused, minus the budgets of the
stages after it; `--budget-s` scales every stage. A stage past its limit gets SIGTERM (pytest
then still writes its junit XML: tests/conftest.py), then SIGKILL. After every stage the record
(JSON), a markdown summary and the suite log are rewritten in OUT (7 files at most: those three,
junit XML, the tuning table, the profile trace), one line is printed per stage, and the run ends
with a short table (stage status; B/16 img/s per provider and ratio to timm eager; failures by op).
A SIGTERM to the suite itself stops the stage in flight and still writes all of that.

Honest timing: the Triton autotune disk cache is off (TRITON_CACHE_AUTOTUNING=0) and the tuned
kernels keep one autotuner per M bucket, so no tuning moves from the tests' shapes to batch 256;
TRITON_PRINT_AUTOTUNING=1, and every autotune result (kernel, key, bucket, each config's time)
joins the record. vitkern-auto is not timed: per op it is one backend, and for the whole model it
is timed only when the dispatch order mixes backends.

The dry run counts, per stage, the Triton compiles and autotune configs its workloads trigger (the
launchers run on meta tensors under `_common.counting`, as they would pick configs on the GPU:
table entries of the assumed device, else every candidate), and estimates the stage's seconds as
its fixed work + (compiles x 0.6 s + autotune configs x 0.15 s) / its parallel processes.
benchmarks/results/README.md explains every record field.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "vitkern.gpu_suite/2"
PY = sys.executable or "python3"
RECORD_RESERVE_S = 10
COMPILE_S = 0.6  # one Triton compile for sm_90 under triton 3.6 (0.56 s measured on average)
AUTOTUNE_CONFIG_S = 0.15  # one config timed by the autotuner (25 ms warm-up + 100 ms of timing + launches)
DEFAULT_DEVICE = "NVIDIA H200"  # whose tuning table the dry run assumes
TOTALS = {"1": 330.0, "2": 240.0, "sweep": 240.0}
# Seconds between a stage's SIGTERM and SIGKILL: pytest writes its junit XML, the model stages have
# written every finished case; SIGTERM is sent this long before the stage's limit.
STOP_GRACE_S = 8.0
MAX_OUT_FILES = 7
MAX_OUT_BYTES = 15 * 2**20
B16 = "vit_base_patch16_224"


def sanitize(text: str) -> str:
    """Letters, digits, '.', '_' and '-' only (what the device tool brings back)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def log(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# The plans


@dataclass(frozen=True)
class Workload:
    """What a stage launches, for the dry run's count: a model (or one block of it: depth 1) on
    the Triton backend, or the every-config test's cases."""

    kind: str  # "model", "block" or "every_config"
    model: str = B16
    batch: int = 1
    dtype: str = "bf16"
    train: bool = True
    img: Optional[int] = None

    def label(self) -> str:
        if self.kind == "every_config":
            return f"every config ({self.dtype})"
        short = self.model.replace("vit_", "").replace("_patch", "/").replace("_", "@")
        return f"{self.kind} {short} b{self.batch} {self.dtype}{' fwd+bwd' if self.train else ' fwd'}"


@dataclass(frozen=True)
class Stage:
    name: str
    budget: float
    what: str
    fixed_s: float  # estimated seconds of everything but Triton compiles and autotuning
    parallel: int = 1  # processes sharing the compiles (pytest-xdist workers)
    workloads: Tuple[Workload, ...] = ()
    only_if_left_s: float = 0.0  # > 0: runs only with this much of the run left (budget 0: outside the plan)


def _w(kind: str, model: str = B16, batch: int = 1, dtypes: Sequence[str] = ("bf16",), train: bool = True) -> List[Workload]:
    return [Workload(kind, model, batch, d, train) for d in dtypes]


L16, H14 = "vit_large_patch16_224", "vit_huge_patch14_224"
TEST_WORKLOADS = tuple(
    _w("every_config", dtypes=("bf16", "fp32"))
    + _w("block", B16, 2, ("bf16", "fp16")) + _w("block", L16, 2, ("bf16", "fp16"))
    + _w("model", B16, 16) + _w("block", "vit_tiny_patch16_224", 3, ("fp16", "fp32", "bf16"))
)
PLANS: Dict[str, List[Stage]] = {
    "1": [
        Stage("env", 15, "nvidia-smi, versions, bf16 GEMM rate and copy bandwidth", 8),
        Stage("cuda_build", 45, "csrc/ for this GPU's arch only (nvcc), ptxas table into the record", 40),
        Stage("correctness", 100, "pytest -n 8 --timeout -rfE: Triton + CUDA op tests, B/16 and L/16 shapes "
              "(bf16, fp16), B/16 vs timm at batch 16, every autotune config", 45, parallel=8,
              workloads=TEST_WORKLOADS),
        Stage("b16_models", 110, "B/16 224 b256 bf16 infer + train: timm eager, vitkern triton, vitkern cuda, "
              "timm + torch.compile (default; train with 60 s left)", 75,
              workloads=tuple(_w("model", B16, 256, train=False) + _w("model", B16, 256))),
        Stage("ops_b256", 50, "per-op at B/16 b256 bf16, fwd and fwd+bwd: torch, SDPA flash, triton, cuda", 30,
              workloads=tuple(_w("model", B16, 256))),
    ],
    "2": [
        Stage("env", 10, "versions, bf16 GEMM rate and copy bandwidth", 8),
        # Run 2 follows run 1 on the same warm machine: the build is a cache hit (a cold build may not
        # finish here; the cuda cases then say so, and the other stages run).
        Stage("cuda_build", 24, "csrc/ for this GPU's arch (a cache hit on the machine run 1 warmed)", 20),
        # fixed 30 -> 36 s: the CUDA-graph checks of tests/test_export.py (a tiny model captured by hand and under
        # torch.compile(mode="reduce-overhead"), one config per kernel there) are estimated, not yet measured.
        Stage("tests_more", 50, "pytest -n 8: odd attention shapes, torch.compile and opcheck tests, the ViT family's "
              "options (QK-norm, LayerScale, activations, prefix tokens, PatchDropout), attention numerics, and "
              "CUDA graphs (manual capture, reduce-overhead)", 36, parallel=8,
              workloads=tuple(_w("block", "vit_tiny_patch16_224", 1, ("fp16", "fp32")))),
        Stage("tests_int32", 35, "int32-overflow tests, serially (batch 4096 shapes)", 15,
              workloads=tuple(_w("block", B16, 4096, train=False))),
        Stage("models_more", 75, "B/16 b1 (CUDA graphs) and b32, L/16 and H/14 b256 inference: timm eager, "
              "vitkern triton, vitkern cuda", 40,
              workloads=tuple(_w("model", B16, 1, train=False) + _w("model", B16, 32, train=False)
                              + _w("model", L16, 256, train=False) + _w("model", H14, 256, train=False))),
        Stage("profile", 21, "vitkern.profile of the fastest vitkern backend, B/16 b256", 15,
              workloads=tuple(_w("model", B16, 256, train=False))),
        Stage("sanitizer", 15, "compute-sanitizer probe, then memcheck of small CUDA ops if it works", 15),
        Stage("max_autotune", 0, "timm + torch.compile(max-autotune), B/16 b256 inference", 90, only_if_left_s=120),
    ],
    "sweep": [
        Stage("env", 10, "versions", 8),
        Stage("sweep", 220, "every config of every Triton kernel at B/16, L/16 b256 bf16, then more shapes; "
              "the table written as it goes", 20,
              workloads=tuple(_w("model", B16, 256) + _w("model", L16, 256))),
    ],
}
# The sweep's shapes, in order (each: every tuned kernel of a forward + backward at this shape).
SWEEP_SHAPES = [(B16, 256, "bf16"), (L16, 256, "bf16"), (B16, 256, "fp16"), (H14, 256, "bf16"),
                (B16, 32, "bf16"), (L16, 32, "bf16"), ("vit_base_patch16_384", 64, "bf16"), (B16, 1, "bf16")]


def scaled_plan(run: str, budget_s: Optional[float]) -> Tuple[List[Stage], float]:
    """The stages of `run` with every budget scaled to `budget_s` (the plan's total by default)."""
    stages, total = list(PLANS[run]), TOTALS[run]
    if budget_s is None or budget_s == total:
        return stages, total
    if budget_s <= RECORD_RESERVE_S:
        raise ValueError(f"--budget-s must exceed the record's reserve of {RECORD_RESERVE_S} s, got {budget_s}")
    scale = (budget_s - RECORD_RESERVE_S) / (total - RECORD_RESERVE_S)
    return [Stage(s.name, s.budget * scale, s.what, s.fixed_s, s.parallel, s.workloads,
                  s.only_if_left_s * scale) for s in stages], budget_s


# --------------------------------------------------------------------------------------------
# The dry run: count what each stage's workloads would compile and tune


def _run_workload(w: Workload) -> None:
    import torch

    import vitkern
    from vitkern import cost

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[w.dtype]
    if w.kind == "every_config":
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import test_autotune_configs as every

        for case in every.CASES:
            every.run_every_config(case, "meta", dtype, lambda i, outs: None)
        return
    overrides: Dict[str, Any] = {"backend": "triton"}
    if w.kind == "block":
        overrides["depth"] = 1
    with torch.device("meta"):
        model = vitkern.create_model(w.model, **overrides)
    model = model.to(dtype=dtype)
    img = w.img or cost.arch_of(w.model).img_size[0]
    x = torch.empty(w.batch, 3, img, img, device="meta", dtype=dtype)
    if w.train:
        model(x).float().sum().backward()
    else:
        with torch.no_grad():
            model(x)


def dry_run(run: str, stages: List[Stage], total: float, device_name: str) -> int:
    """Print the plan with each stage's counted compiles and autotune configs; `total <s> s` last.
    Returns 1 when a stage's estimate exceeds its budget, the plan its total, or a workload could
    not run (then its launches are missing from the count), else 0."""
    os.environ["TRITON_INTERPRET"] = "1"  # meta tensors only: nothing is compiled or launched
    os.environ.setdefault("VITKERN_POISON_OUTPUTS", "0")
    sys.path.insert(0, REPO)
    from vitkern.kernels.triton import _common

    counter = _common.LaunchCounter(device_name)
    rows, over, errors = [], [], []
    print(f"GPU suite run {run}: plan for {device_name} (tuning table: "
          f"{'yes' if _common.table_for_device(device_name) else 'none, every tuned kernel autotunes'})")
    print(f"{'stage':<13}{'budget s':>9}{'compiles':>9}{'autotune':>9}{'est s':>7}  what")
    for stage in stages:
        counter.new_process()  # each stage is a new process: in-memory autotune results are gone
        with _common.counting(counter=counter):
            for w in stage.workloads:
                try:
                    _run_workload(w)
                except Exception as exc:  # a workload that cannot run cannot be counted: the plan is unchecked
                    errors.append(f"{stage.name}: {w.label()}: {type(exc).__name__}: {str(exc).strip()[:300]}")
        c = counter.reset_stage()
        est = stage.fixed_s + (c["compiles"] * COMPILE_S + c["autotune_configs"] * AUTOTUNE_CONFIG_S) / stage.parallel
        fits = stage.budget == 0 or est <= stage.budget
        if not fits:
            over.append(stage.name)
        rows.append({"stage": stage.name, "budget_s": stage.budget, **c, "estimate_s": round(est, 1),
                     "parallel": stage.parallel, "fits": fits})
        cond = f" [only with {stage.only_if_left_s:.0f} s left]" if stage.only_if_left_s else ""
        print(f"{stage.name:<13}{stage.budget:>9.0f}{c['compiles']:>9}{c['autotune_configs']:>9}{est:>7.0f}  "
              f"{stage.what}{cond}{'' if fits else '  <-- OVER BUDGET'}")
        for w in stage.workloads:
            print(f"{'':<13}  counted: {w.label()}")
    planned = sum(s.budget for s in stages) + RECORD_RESERVE_S
    print(f"(record) {RECORD_RESERVE_S:>13.0f}")
    print(f"estimates: fixed work + (compiles x {COMPILE_S} s + autotune configs x {AUTOTUNE_CONFIG_S} s) / parallel "
          "processes; compiles are distinct (Triton's disk cache spans the run), autotuning restarts per stage")
    for e in errors:
        print(f"NOT COUNTED: {e}")
    print(json.dumps({"run": run, "device": device_name, "stages": rows, "total_s": planned, "errors": errors}))
    print(f"total {planned:.0f} s")
    if planned > total + 1e-6:
        over.append(f"total {planned:.0f} > {total:.0f}")
    return 1 if over or errors else 0


# --------------------------------------------------------------------------------------------
# Stage scripts (run as `python3 -c SCRIPT args`, so a stage never shares a process with another)

ENV_SCRIPT = r"""
import json, subprocess, sys
sys.path.insert(0, sys.argv[2])
import torch
from vitkern import _timing
try:
    info = {"nvidia_smi": subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout}
except OSError as exc:  # no driver tools (a CPU machine, or a broken image): record why, go on
    info = {"nvidia_smi": f"nvidia-smi not runnable: {exc}"}
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
info.update(_timing.environment(dev))
from importlib import metadata
for dist in ("pytest", "pytest-xdist", "pytest-timeout", "pytest-benchmark", "ninja", "numpy"):
    try:
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[dist] = None
json.dump(info, open(sys.argv[1], "w"), indent=1, default=str)  # written before the slower measurement
if dev.type == "cuda" and sys.argv[3] == "measure":
    info["measured"] = _timing.measure_ceilings(dev, torch.bfloat16)
print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1, default=str))
json.dump(info, open(sys.argv[1], "w"), indent=1, default=str)
"""

CUDA_SCRIPT = r"""
import json, os, re, sys, time
sys.path.insert(0, sys.argv[2])
import torch
import vitkern.kernels.cuda as c
t = time.monotonic()
err = c.load_error()
info = {"load_error": err, "seconds": round(time.monotonic() - t, 1), "loaded_from": c.loaded_from(), "ptxas": []}
if err is None and torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()  # the archs load_error builds for (this GPU's)
    own = f"{major}{minor}" + ("a" if major == 9 else "")
    archs = c.cuda_archs() if "VITKERN_CUDA_ARCHS" in os.environ else [own]
    if not any(a.rstrip("a") == f"{major}{minor}" for a in archs):
        archs = archs + [own]
    jit = str(c.loaded_from() or "").startswith(str(c.cache_dir(archs)))
    info["archs"] = archs if jit else "installed extension (vitkern._C): no ptxas reports"
if err is None and torch.cuda.is_available() and jit:
    res = c.build(archs)  # the build load_error just made or found: cached, returns its ptxas reports
    for source in c.KERNEL_SOURCES:
        kernels = c.parse_ptxas(res.ptxas_logs[source])
        for name, k in zip(c.demangle([k.function for k in kernels]), kernels):
            info["ptxas"].append({"file": source, "kernel": re.sub(r"\(.*$", "", name)[-120:], "arch": k.arch,
                                  "registers": k.registers, "smem_bytes": k.smem_bytes, "stack_bytes": k.stack_bytes,
                                  "spill_store_bytes": k.spill_store_bytes, "spill_load_bytes": k.spill_load_bytes})
    print(c.ptxas_markdown(res))
json.dump(info, open(sys.argv[1], "w"), indent=1, default=str)
print("load_error:", err)
# No GPU (the --quick smoke run): nothing to build, the stage itself worked.
sys.exit(0 if err is None or not torch.cuda.is_available() else 1)
"""

# argv: out.json repo cases.json budget_s. Each case: [model, batch, mode, provider, min_left_s].
MODELS_SCRIPT = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from vitkern import bench, cost, dispatch, _timing
t0 = time.monotonic()
cases, budget = json.load(open(sys.argv[3])), float(sys.argv[4])
quick = os.environ.get("VITKERN_SUITE_QUICK") == "1"
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
settings = bench.default_settings(dev, quick=quick)
settings.target_ms = float(os.environ.get("VITKERN_BENCH_TARGET_MS", "200")) if dev.type == "cuda" else 0.0
rec = {"schema": bench.SCHEMA, "environment": _timing.environment(dev), "settings": settings.to_dict(),
       "results": [], "notes": []}
stop = []
def on_term(signum, frame):
    stop.append("stopped by SIGTERM (the stage's limit)")
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, on_term)
# vitkern-auto is timed only when the dispatch order mixes backends (else it is one of them)
firsts = {dispatch.auto_order(op, dev)[0] for op in dispatch.OPS}
auto_note = (f"vitkern-auto not timed: on {dev.type} its order puts {firsts.pop()} first for every op"
             if len(firsts) == 1 else None)
if auto_note:
    rec["notes"].append(auto_note)
baselines = {}
def write():
    rec["elapsed_s"] = round(time.monotonic() - t0, 1)
    json.dump(rec, open(sys.argv[1] + ".tmp", "w"), indent=1, default=str)
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
for model, batch, mode, provider, min_left in cases:
    if provider == "vitkern-auto" and auto_note:
        continue
    img = bench.QUICK_IMG if quick else cost.arch_of(model).img_size[0]
    case = bench.Case(model, img, batch, mode, provider)
    left = budget - (time.monotonic() - t0)
    skip = stop[0] if stop else (f"{left:.0f} s of the stage left, this case starts only with {min_left:.0f} s"
                                 if left < min_left else None)
    if skip is None:
        try:
            res = bench.run_case(case, settings, baselines=baselines)
        except KeyboardInterrupt:
            skip = stop[0] if stop else "interrupted"
    if skip is not None:
        res = {**case.__dict__, "status": "skipped", "reason": skip, "ms": None, "img_per_s": None}
    rec["results"].append(res)
    print(f"{case.label}: {res['status']} {res.get('img_per_s') or ''} {res.get('reason') or ''}", flush=True)
    write()
write()
"""

SANITIZER_SCRIPT = r"""
import json, shutil, subprocess, sys
out, repo = sys.argv[1], sys.argv[2]
info = {"tool": shutil.which("compute-sanitizer")}
def run(code, limit):
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", code]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=repo)
        return {"rc": p.returncode, "tail": (p.stdout + p.stderr)[-1500:]}
    except subprocess.TimeoutExpired:
        return {"rc": None, "tail": f"timed out after {limit} s"}
if info["tool"]:
    info["probe"] = run("import torch; x = torch.ones(1024, device='cuda'); print((x + 1).sum().item())", 60)
    works = info["probe"]["rc"] == 0 and "not supported" not in info["probe"]["tail"].lower()
    info["works"] = works
    if works:
        info["memcheck"] = run(
            "import sys; sys.path.insert(0, '.'); import torch; from vitkern import ops\n"
            "x = torch.randn(2, 197, 192, device='cuda', dtype=torch.bfloat16)\n"
            "w = torch.ones(192, device='cuda', dtype=torch.bfloat16); b = torch.zeros_like(w)\n"
            "ops.layer_norm(x, w, b, 1e-6, backend='cuda'); ops.attention(torch.randn(2, 197, 576, device='cuda', "
            "dtype=torch.bfloat16), 3, backend='cuda'); torch.cuda.synchronize(); print('memcheck ops ran')", 120)
json.dump(info, open(out, "w"), indent=1)
print(json.dumps(info, indent=1))
sys.exit(0 if not info["tool"] or not info.get("works") or info.get("memcheck", {}).get("rc") == 0 else 1)
"""

# argv: table.json repo shapes.json budget_s. VITKERN_TUNING_TABLES=0 and VITKERN_TUNING_SWEEP_TABLE set.
SWEEP_SCRIPT = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[2])
import torch
import vitkern
from vitkern import cost
from vitkern.kernels.triton import _common
t0, shapes, budget = time.monotonic(), json.load(open(sys.argv[3])), float(sys.argv[4])
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))  # every finished result is already in the table
dev = torch.device("cuda")
for model, batch, dtype in shapes:
    if time.monotonic() - t0 > budget:
        print(f"budget spent before {model} b{batch} {dtype}", flush=True)
        break
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    net = vitkern.create_model(model, backend="triton").to(dev, dt)
    img = cost.arch_of(model).img_size[0]
    x = torch.randn(batch, 3, img, img, device=dev, dtype=dt)
    before = len(_common.AUTOTUNE_RESULTS)
    with torch.no_grad():  # inference keys (no GELU' saved) differ from training's
        net.eval()(x)
    net.train()(x).float().sum().backward()  # every tuned kernel of a training step times its whole list
    torch.cuda.synchronize()
    print(f"{model} b{batch} {dtype}: {len(_common.AUTOTUNE_RESULTS) - before} kernels tuned "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    del net, x
    torch.cuda.empty_cache()
"""


# --------------------------------------------------------------------------------------------
# Reading stage outputs

OP_OF_TEST = (("attention", "attention"), ("ln_linear", "ln_linear"), ("layer_norm", "layer_norm"),
              ("patch_embed", "patch_embed"), ("linear", "linear"), ("model", "model"), ("vit", "model"),
              ("block", "model"))


def op_of_test(name: str) -> str:
    """The op family a test belongs to, from its file and name (for 'failures by op')."""
    low = name.lower()
    for needle, op in OP_OF_TEST:
        if needle in low:
            return op
    return "other"


def junit_summary(path: str) -> Optional[Dict[str, Any]]:
    """Counts and the failed tests (name + first lines of the message) from a junit xml."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out: Dict[str, Any] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": [],
                           "skip_reasons": {}, "failures_by_op": {}}
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(s.get(key, 0))
        out["time_s"] += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    msg = (el.get("message") or el.text or "").strip()
                    out["failed"].append({"test": name, "kind": tag, "message": msg[:800]})
                    op = op_of_test(name)
                    out["failures_by_op"][op] = out["failures_by_op"].get(op, 0) + 1
            sk = case.find("skipped")
            if sk is not None:
                reason = (sk.get("message") or "").strip()[:200]
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def load_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def benchmark_rows(bj: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The extra_info of every pytest-benchmark result, with its test name."""
    if not bj:
        return []
    return [dict(b.get("extra_info", {}), name=b.get("name")) for b in bj.get("benchmarks", [])]


def model_rows(models: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The measured model cases of a models-stage JSON, as rows keyed like the benchmark rows."""
    out = []
    for r in (models or {}).get("results", []):
        if r.get("status") == "ok" and r.get("ms"):
            out.append({**r, "ms_median": r["ms"]})
    return out


def best_vitkern_provider(rows: List[Dict[str, Any]], bench_rec: Optional[Dict[str, Any]] = None) -> str:
    """The fastest vitkern provider on B/16-224 batch 256 inference (vitkern-triton if unknown)."""
    cands = [(r.get("img_per_s"), r.get("provider")) for r in rows
             if r.get("model") == B16 and r.get("batch") == 256 and r.get("mode") == "infer"
             and str(r.get("provider", "")).startswith("vitkern") and r.get("img_per_s")]
    for r in (bench_rec or {}).get("results", []):
        if (r.get("status") == "ok" and r.get("model") == B16 and r.get("batch") == 256 and r.get("mode") == "infer"
                and str(r.get("provider", "")).startswith("vitkern")):
            cands.append((r["img_per_s"], r["provider"]))
    return max(cands)[1] if cands else "vitkern-triton"


def model_result(rows: List[Dict[str, Any]], bench_rec: Optional[Dict[str, Any]], model: str, batch: int, mode: str,
                 provider: str) -> Optional[Dict[str, Any]]:
    for r in rows:
        if (r.get("model"), r.get("batch"), r.get("mode"), r.get("provider")) == (model, batch, mode, provider) \
                and r.get("img_per_s"):
            return r
    for r in (bench_rec or {}).get("results", []):
        if (r.get("model"), r.get("batch"), r.get("mode"), r.get("provider")) == (model, batch, mode, provider) \
                and r.get("status") == "ok":
            return {**r, "ms_median": r["ms"]}
    return None


def op_result(rows: List[Dict[str, Any]], op: str, mode: str, provider: str) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if (r.get("op"), r.get("mode"), r.get("provider")) == (op, mode, provider)), None)


def evaluate_targets(rows: List[Dict[str, Any]], bench_rec: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """DESIGN.md §4, each target with the measured value (None when not measured) and met/unmet."""
    best = best_vitkern_provider(rows, bench_rec)
    out: List[Dict[str, Any]] = []

    def add(target: str, goal: str, value: Optional[float], ok: Optional[bool], detail: str = "") -> None:
        out.append({"target": target, "goal": goal, "measured": value, "met": ok, "detail": detail})

    def ratio(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]], key: str = "ms_median") -> Optional[float]:
        if a and b and a.get(key) and b.get(key):
            return b[key] / a[key]
        return None

    vk = model_result(rows, bench_rec, B16, 256, "infer", best)
    te = model_result(rows, bench_rec, B16, 256, "infer", "timm-eager")
    tc = model_result(rows, bench_rec, B16, 256, "infer", "timm-compile")
    s_e, s_c = ratio(vk, te), ratio(vk, tc)
    add("B/16 infer b256: speedup vs timm eager", ">= 1.6x", s_e, None if s_e is None else s_e >= 1.6, best)
    add("B/16 infer b256: speedup vs timm + torch.compile", ">= 1.3x", s_c, None if s_c is None else s_c >= 1.3, best)
    ips = vk.get("img_per_s") if vk else None
    add("B/16 infer b256: img/s", ">= 18,000", ips, None if ips is None else ips >= 18_000, best)
    v1 = model_result(rows, bench_rec, B16, 1, "infer", best)
    lat = v1.get("ms_median") if v1 else None
    add("B/16 infer b1: latency ms (CUDA graph)", "<= 0.4 ms", lat, None if lat is None else lat <= 0.4,
        f"{best}, {v1.get('timing_method') or (v1.get('timing') or {}).get('method', '') if v1 else ''}")
    vt = model_result(rows, bench_rec, B16, 256, "train", best)
    tt = model_result(rows, bench_rec, B16, 256, "train", "timm-eager")
    st = ratio(vt, tt)
    add("B/16 train b256: speedup vs timm eager + AdamW", ">= 1.5x", st, None if st is None else st >= 1.5, best)
    tips = vt.get("img_per_s") if vt else None
    add("B/16 train b256: img/s", ">= 5,600", tips, None if tips is None else tips >= 5_600, best)
    mem = (vt["peak_mem_bytes"] / tt["peak_mem_bytes"]) if vt and tt and vt.get("peak_mem_bytes") and tt.get("peak_mem_bytes") else None
    add("B/16 train b256: peak memory vs timm eager", "<= 0.6x", mem, None if mem is None else mem <= 0.6, best)
    v = op_result(rows, "attention", "fwdbwd", best) or op_result(rows, "attention", "fwdbwd", "vitkern-triton")
    r = ratio(v, op_result(rows, "attention", "fwdbwd", "torch-flash"))
    add("attention T=197 d=64 fwd+bwd: speedup vs SDPA flash", ">= 1.3x", r, None if r is None else r >= 1.3)
    for op, goal, desc in (("ln_qkv", 1.05, "LayerNorm+QKV time / bare QKV GEMM time"),
                           ("mlp", 1.03, "GELU MLP time / its two GEMMs' time")):
        v = op_result(rows, op, "fwd", best) or op_result(rows, op, "fwd", "vitkern-triton")
        g = op_result(rows, op, "fwd", "torch-gemm-only")
        r = (v["ms_median"] / g["ms_median"]) if v and g else None
        add(desc + " (forward)", f"<= {goal}x", r, None if r is None else r <= goal)
    # L/16 JFT pre-training at the measured L/16 (else B/16) training MFU of the best vitkern backend
    sys.path.insert(0, REPO)
    try:
        from vitkern import cost

        l16 = max((r for r in (bench_rec or {}).get("results", []) if r.get("status") == "ok" and r.get("mode") == "train"
                   and str(r.get("provider", "")).startswith("vitkern") and r.get("model") == L16),
                  key=lambda r: r["mfu"], default=None)
        src = l16 or vt
        run = next(r for r in cost.PAPER_TABLE2 if r.label == "ViT-L/16 (JFT)")
        days = cost.tpu_core_days_equivalent(run.train_flops, src["mfu"]) if src and src.get("mfu") else None
        add("ViT-L/16 JFT pre-training: TPUv3-core-day equivalent", "<= 250 (MFU >= 59%)", days,
            None if days is None else days <= 250,
            f"MFU {src['mfu']:.1%} from {src.get('provider')} {src.get('model')} b{src.get('batch')}" if src and src.get("mfu") else "")
    except Exception as exc:  # the record says why rather than failing
        add("ViT-L/16 JFT pre-training: TPUv3-core-day equivalent", "<= 250", None, None, f"not computed: {exc}")
    return out


def read_autotune_log(path: str) -> List[Dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut by a kill
                    continue
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------------------------
# The suite


def commit_of_checkout() -> str:
    """$VITKERN_COMMIT, else the first line of .vitkern-commit, else git's short commit (+dirty)."""
    env = os.environ.get("VITKERN_COMMIT", "").strip()
    if env:
        return env
    try:
        with open(os.path.join(REPO, ".vitkern-commit")) as f:
            line = f.readline().strip()
            if line:
                return line
    except OSError:
        pass
    try:
        r = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        commit = r.stdout.strip() if r.returncode == 0 else ""
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def gpu_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "no-gpu"


def tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def command_label(cmd: Optional[List[str]]) -> str:
    """The command as the log shows it: an inline `-c` script by its name, not its text."""
    if not cmd:
        return ""
    scripts = {ENV_SCRIPT: "<ENV_SCRIPT>", CUDA_SCRIPT: "<CUDA_SCRIPT>", MODELS_SCRIPT: "<MODELS_SCRIPT>",
               SANITIZER_SCRIPT: "<SANITIZER_SCRIPT>", SWEEP_SCRIPT: "<SWEEP_SCRIPT>"}
    return " ".join(scripts.get(c, c) for c in cmd)


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class SuiteStopped(Exception):
    """The suite itself got SIGTERM: stop the stage in flight, write everything, exit."""


class Suite:
    def __init__(self, run: str, stages: List[Stage], total: float, out: Optional[str], quick: bool) -> None:
        self.run_name, self.plan, self.total, self.out, self.quick = run, stages, total, out, quick
        self.t0 = time.monotonic()
        self.deadline = self.t0 + total - RECORD_RESERVE_S
        self.gpu, self.commit = gpu_name(), commit_of_checkout()
        stamp = dt.datetime.now(dt.timezone.utc)
        self.work = os.path.join(REPO, "build", "gpu-suite", stamp.strftime("%Y%m%dT%H%M%SZ") + f"-run{run}")
        os.makedirs(self.work, exist_ok=True)
        self.base = sanitize(f"{self.gpu.replace('NVIDIA ', '')}-{stamp:%Y-%m-%d}-{self.commit.replace('+', '-')}-run{run}")
        self.autotune_log = os.path.join(self.work, "autotune.jsonl")
        self.junit = os.path.join(self.work, "junit.xml")
        self.table_path = os.path.join(out or self.work, sanitize_table_name(self.gpu))
        self.stages: List[Dict[str, Any]] = []
        self.record: Dict[str, Any] = {
            "schema": SCHEMA, "run": run, "quick": quick, "gpu": self.gpu, "commit": self.commit,
            "date_utc": stamp.isoformat(timespec="seconds"), "budget_s": total,
            "plan": [{"name": s.name, "budget_s": round(s.budget, 1), "what": s.what} for s in stages],
            "stages": self.stages, "notes": [],
        }
        self.env = dict(os.environ)
        self.env.update({
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": REPO + os.pathsep + self.env.get("PYTHONPATH", ""),
            "MAX_JOBS": self.env.get("MAX_JOBS", str(os.cpu_count() or 8)),  # the CUDA JIT build's parallelism
            # No autotune results from disk: each shape (M bucket) is tuned where it runs.
            "TRITON_CACHE_AUTOTUNING": "0",
            "TRITON_PRINT_AUTOTUNING": "1",
            "VITKERN_AUTOTUNE_LOG": self.autotune_log,
            "TORCHINDUCTOR_COMPILE_THREADS": self.env.get("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 8)),
            "VITKERN_BENCH_TARGET_MS": self.env.get("VITKERN_BENCH_TARGET_MS", "200"),
        })
        if quick:
            self.env["VITKERN_SUITE_QUICK"] = "1"
        self._proc: Optional[subprocess.Popen] = None
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        raise SuiteStopped("the suite got SIGTERM")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit_for(self, index: int) -> float:
        """This stage's limit: time left minus the budgets of the (unconditional) stages after it."""
        later = sum(s.budget for s in self.plan[index + 1:] if not s.only_if_left_s)
        return max(5.0, self.left() - later)

    def run_stage(self, index: int, cmd: Optional[List[str]], extra_env: Optional[Dict[str, str]] = None,
                  skip_reason: Optional[str] = None, ok_codes: Sequence[int] = (0,)) -> Dict[str, Any]:
        s = self.plan[index]
        limit = self.limit_for(index)
        stage: Dict[str, Any] = {"name": s.name, "budget_s": round(s.budget, 1), "limit_s": round(limit, 1),
                                 "command": command_label(cmd), "log": f"{index + 1}-{s.name}.log"}
        log_path = os.path.join(self.work, stage["log"])
        self.stages.append(stage)
        if skip_reason or cmd is None:
            stage.update(status="skipped", reason=skip_reason, seconds=0.0, rc=None)
            with open(log_path, "w") as f:
                f.write(f"skipped: {skip_reason}\n")
            return stage
        env = dict(self.env, **(extra_env or {}))
        t = time.monotonic()
        # Until the stage's process ends it counts as cut: a SIGTERM that lands while Popen itself
        # runs (before the handler below is in place) must still leave a stage the record can show.
        stage.update(status="cut", rc=None, seconds=0.0, reason="the suite got SIGTERM as this stage started")
        with open(log_path, "w") as f:
            f.write(f"$ {stage['command']}\n")
            f.flush()
            self._proc = proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
            try:
                try:
                    # SIGTERM comes early enough that the stage's clean exit still ends inside its limit
                    rc = proc.wait(timeout=max(1.0, limit - STOP_GRACE_S))
                    status = "ok" if rc in ok_codes else "failed"
                except subprocess.TimeoutExpired:
                    self._stop(proc)
                    rc, status = proc.returncode, "timeout"
                    f.write(f"\n[gpu_suite] stage {s.name} stopped at its limit of {limit:.0f} s\n")
            except SuiteStopped:
                self._stop(proc)
                stage.update(status="cut", rc=proc.returncode, seconds=round(time.monotonic() - t, 1),
                             reason="the suite got SIGTERM during this stage")
                f.write(f"\n[gpu_suite] stage {s.name} cut: the suite got SIGTERM\n")
                raise
            finally:
                self._proc = None
        stage.update(status=status, rc=rc, seconds=round(time.monotonic() - t, 1))
        stage.pop("reason", None)
        stage["log_tail"] = tail(log_path, 3000)
        return stage

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """SIGTERM to the stage's main process first (pytest/xdist then shut their workers down and
        write their XML, the benchmark scripts their JSON), then SIGKILL to its whole group."""
        for sig, grace, group in ((signal.SIGTERM, STOP_GRACE_S, False), (signal.SIGKILL, 5, True)):
            try:
                if group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
                if not group:  # the main process is gone: clear what it left in its group
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            except subprocess.TimeoutExpired:
                continue

    def stage_line(self, stage: Dict[str, Any]) -> None:
        note = stage.get("reason") or stage.get("note") or ""
        log(f"stage {stage['name']}: {stage['status']} in {stage.get('seconds', 0):.0f} s "
            f"(budget {stage['budget_s']:.0f}, limit {stage['limit_s']:.0f}){': ' + note if note else ''}")

    # -- outputs, rewritten after every stage -------------------------------------------------
    def write_outputs(self) -> None:
        rec = self.record
        rec["total_seconds"] = round(time.monotonic() - self.t0, 1)
        rec["autotune"] = read_autotune_log(self.autotune_log)
        try:
            if rec.get("op_rows") or rec.get("models") or rec.get("models_more"):
                    rec["targets"] = evaluate_targets(rec.get("op_rows", []) + model_rows(rec.get("models")),
                                                  {"results": (rec.get("models_more") or {}).get("results", [])})
        except Exception as exc:  # noqa: BLE001 - the record keeps everything else
            rec["notes"].append(f"target evaluation failed: {type(exc).__name__}: {exc}")
        paths = {"record": os.path.join(self.work, self.base + ".json"), "summary": os.path.join(self.work, self.base + ".md"),
                 "log": os.path.join(self.work, "suite-log.txt")}
        _write_atomic(paths["record"], json.dumps(rec, indent=1, default=str))
        _write_atomic(paths["summary"], render_summary(rec))
        with open(paths["log"] + ".tmp", "w") as out_log:
            for s in self.stages:
                out_log.write(f"\n{'=' * 30} {s['name']}: {s['status']} ({s.get('seconds', 0)} s) {'=' * 30}\n")
                try:
                    with open(os.path.join(self.work, s.get("log", "-")), errors="replace") as f:
                        out_log.write(f.read())
                except OSError:
                    out_log.write((s.get("reason") or "") + "\n")
        os.replace(paths["log"] + ".tmp", paths["log"])
        if not self.quick and self.gpu != "no-gpu":  # GPU records join benchmarks/results/
            results = os.path.join(REPO, "benchmarks", "results")
            os.makedirs(results, exist_ok=True)
            shutil.copyfile(paths["record"], os.path.join(results, self.base + ".json"))
            shutil.copyfile(paths["summary"], os.path.join(results, self.base + ".md"))
        if self.out:
            copy_out(self.out, [(paths["record"], self.base + ".json"), (paths["summary"], self.base + ".md"),
                                (paths["log"], "suite-log.txt"), (self.junit, "junit.xml"),
                                (os.path.join(self.work, "tests_more.xml"), "tests_more.xml"),
                                (os.path.join(self.work, "tests_int32.xml"), "tests_int32.xml"),
                                (os.path.join(self.work, "profile", "trace.json"), "profile-trace.json.gz")])


def sanitize_table_name(device: str) -> str:
    """The tuning table's file name (as vitkern.kernels.triton._common.device_table_name)."""
    return re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") + ".json"


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def copy_out(out: str, files: List[Tuple[str, str]]) -> None:
    """Copy (source, name) pairs into OUT: at most MAX_OUT_FILES files (the sweep's table, written
    there directly, is one of them), each under MAX_OUT_BYTES (the record drops its raw parts, a
    text keeps its end), names of letters, digits, '.', '_' and '-'; '.gz' names are gzipped."""
    os.makedirs(out, exist_ok=True)
    present = [(src, name) for src, name in files if os.path.exists(src)]
    for src, name in present[:MAX_OUT_FILES - 1]:  # one place stays for the tuning table
        dst = os.path.join(out, sanitize(name))
        if name.endswith(".gz") and not src.endswith(".gz"):
            with open(src, "rb") as s, gzip.open(dst + ".tmp", "wb", compresslevel=6) as d:
                shutil.copyfileobj(s, d)
        elif os.path.getsize(src) > MAX_OUT_BYTES and src.endswith(".json"):
            rec = load_json(src) or {}
            for key in ("benchmarks", "autotune", "profile"):
                if key in rec:
                    rec[key] = f"dropped from this copy to stay under {MAX_OUT_BYTES} bytes (full record: {src})"
            with open(dst + ".tmp", "w") as d:
                json.dump(rec, d, indent=1, default=str)
        elif os.path.getsize(src) > MAX_OUT_BYTES:
            with open(src, "rb") as s:
                s.seek(-MAX_OUT_BYTES, os.SEEK_END)
                data = s.read()
            with open(dst + ".tmp", "wb") as d:
                d.write(data)
        else:
            shutil.copyfile(src, dst + ".tmp")
        if os.path.getsize(dst + ".tmp") > MAX_OUT_BYTES:
            os.remove(dst + ".tmp")
            log(f"{name} is over {MAX_OUT_BYTES} bytes: not copied")
            continue
        os.replace(dst + ".tmp", dst)


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def b16_table(rec: Dict[str, Any]) -> List[str]:
    """B/16 224 batch 256: img/s per provider and the ratio to timm eager, inference and training."""
    res = [r for r in (rec.get("models") or {}).get("results", []) if r.get("model") == B16 and r.get("batch") == 256]
    if not res:
        return ["B/16 b256: not measured"]
    base = {m: next((r.get("img_per_s") for r in res if r["provider"] == "timm-eager" and r["mode"] == m and r.get("img_per_s")), None)
            for m in ("infer", "train")}
    lines = [f"{'B/16 b256 bf16':<16}{'infer img/s':>12}{'x eager':>8}{'train img/s':>12}{'x eager':>8}"]
    for p in dict.fromkeys(r["provider"] for r in res):
        cells = []
        for m in ("infer", "train"):
            r = next((r for r in res if r["provider"] == p and r["mode"] == m), None)
            ips = r.get("img_per_s") if r else None
            if ips:
                cells += [f"{ips:>12,.0f}", f"{ips / base[m]:>8.2f}" if base[m] else f"{'-':>8}"]
            else:
                cells += [f"{(r or {}).get('status', '-'):>12}", f"{'-':>8}"]
        lines.append(f"{p:<16}" + "".join(cells))
    return lines


def short_table(rec: Dict[str, Any]) -> str:
    """What the run prints last (well inside the tool's 12,000 characters of output)."""
    lines = [f"GPU suite run {rec['run']}: {rec['gpu']} @ {rec['commit']}, {rec.get('total_seconds', 0):.0f} s of {rec['budget_s']:.0f}"]
    lines.append(f"{'stage':<14}{'status':<9}{'s':>5}{'limit':>7}  note")
    for s in rec["stages"]:
        note = (s.get("reason") or s.get("note") or "")[:70]
        lines.append(f"{s['name']:<14}{s['status']:<9}{s.get('seconds', 0):>5.0f}{s.get('limit_s', 0):>7.0f}  {note}")
    if rec["run"] == "1" or rec.get("models"):
        lines += b16_table(rec)
    for key in ("tests", "tests_more", "tests_int32"):
        t = rec.get(key)
        if t:
            by_op = ", ".join(f"{op} {n}" for op, n in sorted(t["failures_by_op"].items())) or "none"
            lines.append(f"{key}: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped; "
                         f"failures by op: {by_op}")
    if rec.get("tuning_table"):
        lines.append(f"tuning table: {rec['tuning_table']}")
    text = "\n".join(lines)
    return text if len(text) < 6000 else text[:6000] + "\n(cut: the summary file has the rest)"


def render_summary(rec: Dict[str, Any]) -> str:
    env = rec.get("environment") or {}
    lines = [f"# GPU suite run {rec['run']}: {rec['gpu']} at commit {rec['commit']} ({rec['date_utc']})", "",
             f"{rec.get('total_seconds', 0):.0f} s of a {rec['budget_s']:.0f} s budget. torch {env.get('torch')}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}. Fields: "
             "benchmarks/results/README.md.", "", "```", short_table(rec), "```", ""]
    ceil = env.get("measured") or {}
    if ceil:
        lines += [f"Measured ceilings: bf16 GEMM {ceil.get('gemm_flops', 0) / 1e12:.0f} TFLOP/s, device copy "
                  f"{ceil.get('copy_bytes_per_s', 0) / 1e12:.2f} TB/s (read + write).", ""]
    cb = rec.get("cuda_build")
    if cb:
        spills = [r for r in cb.get("ptxas", []) if r.get("spill_store_bytes") or r.get("spill_load_bytes")]
        lines += [f"CUDA extension: {'loaded' if cb.get('load_error') is None else cb['load_error'][:300]}; "
                  f"{len(cb.get('ptxas', []))} kernels in the ptxas table, {len(spills)} spilling.", ""]
    if rec.get("targets"):
        lines += ["## DESIGN.md §4 targets", "", "| target | goal | measured | met | detail |", "|---|---|---|---|---|"]
        for t in rec["targets"]:
            met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {t['goal']} | {fmt(t['measured'], ',.3f')} | {met} | {t['detail']} |")
        lines.append("")
    for key in ("tests", "tests_more", "tests_int32"):
        t = rec.get(key)
        if t and t["failed"]:
            lines += [f"## Failures ({key})", ""]
            lines += [f"- {f['kind']}: `{f['test']}`: {f['message'].splitlines()[0][:200] if f['message'] else ''}"
                      for f in t["failed"][:40]]
            lines.append("")
    ops = rec.get("op_rows") or []
    if ops:
        lines += ["## Ops at B/16 b256", "", "| op | mode | provider | ms | TFLOP/s | % of floor | vs torch |",
                  "|---|---|---|---|---|---|---|"]
        for r in ops:
            lines.append(f"| {r.get('op')} | {r.get('mode')} | {r.get('provider')} | {fmt(r.get('ms_median'), '.4f')} | "
                         f"{fmt(r.get('tflops'), '.3g')} | {fmt(r.get('pct_of_floor'), '.1f')} | {fmt(r.get('speedup_vs_torch'), '.2f')} |")
        lines.append("")
    for key in ("models", "models_more", "max_autotune"):
        res = (rec.get(key) or {}).get("results", [])
        if res:
            lines += [f"## Models ({key})", "", "| model | batch | mode | provider | status | img/s | ms | x timm eager |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in res:
                lines.append(f"| {r.get('model')} | {r.get('batch')} | {r.get('mode')} | {r.get('provider')} | "
                             f"{r.get('status')} | {fmt(r.get('img_per_s'), ',.0f')} | {fmt(r.get('ms'), '.3f')} | "
                             f"{fmt(r.get('speedup_vs_timm_eager'), '.2f')} |")
            lines.append("")
    tunes = rec.get("autotune") or []
    if tunes:
        lines += [f"## Autotuning: {len(tunes)} results (each config's time in the record)", ""]
        lines += [f"- {t['kernel']} {t.get('key')} bucket {t.get('bucket')}: {t.get('best')}" for t in tunes[:60]]
        lines.append("")
    if rec.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in rec["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The stages of each run


PYTEST_BASE = ["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-o", "addopts="]
TRITON_TEST_FILES = ["tests/test_triton_attention.py", "tests/test_triton_layer_norm.py", "tests/test_triton_linear.py",
                     "tests/test_triton_ln_linear.py", "tests/test_triton_patch_embed.py", "tests/test_triton_model.py"]
# tests/test_gpu_suite.py's GPU checks (its other tests check the suite itself, on the CPU).
GPU_SUITE_TESTS = ["tests/test_gpu_suite.py::test_gpu_vit_block_shapes", "tests/test_gpu_suite.py::test_gpu_b16_ratio_vs_timm"]
# Run 2's tests, left out of run 1's correctness stage.
RUN2_K = "matches_fp64_reference or torch_compile or compiles_fullgraph or traces or opcheck"
# The ViT family's options on both fused backends and the attention numerics at large logits: run 2,
# every test of these files on the GPU (-k matches their module names).
FAMILY_TEST_FILES = ["tests/test_vit_family_backends.py", "tests/test_triton_attention_qknorm.py",
                     "tests/test_cuda_attention_qknorm.py", "tests/test_cuda_family_options.py",
                     "tests/test_patch_dropout_fused.py", "tests/test_attention_numerics.py", "tests/test_autocast.py"]
FAMILY_K = ("vit_family_backends or attention_qknorm or family_options or patch_dropout_fused or attention_numerics "
            "or cuda_autocast")
# CUDA graphs (issue 24): vitkern.export.cuda_graph's capture of the triton and cuda backends without host sync,
# the refusal to autotune inside a capture, torch.compile(mode="reduce-overhead"). The AOTInductor package test
# (a minute of compiles) stays out: `pytest -m gpu tests/test_export.py` runs it.
EXPORT_TEST_FILES = ["tests/test_export.py"]
EXPORT_K = "gpu_cuda_graph or gpu_capture_without_warmup or gpu_reduce_overhead"
INT32_K = "int32 or overflow or 4096"


def pytest_cmd(files: List[str], k: str, junit: str, workers: int, timeout_s: int) -> List[str]:
    cmd = [PY] + PYTEST_BASE + files + ["-k", k, f"--junitxml={junit}"]
    if workers > 1 and module_available("xdist"):  # without pytest-xdist the tests run serially
        cmd += ["-n", str(workers)]
    # pytest-timeout kills one hung test; without it the stage's own limit (SIGTERM) still ends the run
    if module_available("pytest_timeout"):
        cmd += [f"--timeout={timeout_s}"]
    return cmd


def models_stage(suite: Suite, index: int, cases: List[List[Any]], key: str, extra_env: Optional[Dict[str, str]] = None) -> None:
    path = os.path.join(suite.work, f"{key}.json")
    cases_path = os.path.join(suite.work, f"{key}-cases.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    limit = suite.limit_for(index)
    suite.run_stage(index, [PY, "-c", MODELS_SCRIPT, path, REPO, cases_path, str(max(5.0, limit - 5))], extra_env)
    suite.record[key] = load_json(path)


def quick_cases(cases: List[List[Any]]) -> List[List[Any]]:
    """The CPU smoke version of a case list: the tiny model, batch 2, eager providers only."""
    return [["vit_tiny_patch16_224", 2, "infer", "timm-eager", 0], ["vit_tiny_patch16_224", 2, "infer", "vitkern-eager", 0]]


def run_plan(suite: Suite) -> None:
    names = [s.name for s in suite.plan]
    w, q = suite.work, suite.quick
    for index, name in enumerate(names):
        stage = suite.plan[index]
        if stage.only_if_left_s and suite.left() < stage.only_if_left_s:
            suite.stages.append({"name": name, "budget_s": round(stage.budget, 1), "limit_s": 0, "status": "skipped",
                                 "seconds": 0.0, "reason": f"{suite.left():.0f} s left; runs only with {stage.only_if_left_s:.0f} s"})
        elif name == "env":
            env_json = os.path.join(w, "env.json")
            suite.run_stage(index, [PY, "-c", ENV_SCRIPT, env_json, REPO, "measure" if suite.run_name != "sweep" else "no"])
            env = load_json(env_json) or {}
            env.pop("nvidia_smi", None)
            suite.record["environment"] = env
        elif name == "cuda_build":
            out = os.path.join(w, "cuda_build.json")
            suite.run_stage(index, [PY, "-c", CUDA_SCRIPT, out, REPO])
            suite.record["cuda_build"] = load_json(out)
            if suite.record["cuda_build"] is None or suite.record["cuda_build"].get("load_error") is not None:
                # a failed or unfinished build must not be retried (for minutes) by every later process
                suite.env["VITKERN_CUDA_JIT"] = "0"
        elif name in ("correctness", "tests_more", "tests_int32"):
            key = "tests" if name == "correctness" else name
            junit = suite.junit if name == "correctness" else os.path.join(w, f"{name}.xml")
            if q:  # the smoke run: one real pytest session, a few fast CPU tests
                cmd = pytest_cmd(["tests/test_tuning_tables.py"], "lookup or bucket", junit, 1, 60)
            elif name == "correctness":
                files = TRITON_TEST_FILES + ["tests/test_cuda_ops.py", "tests/test_autotune_configs.py"] + GPU_SUITE_TESTS
                k = f"not ({RUN2_K}) and not ({INT32_K}) and not emulated and not sanitizer and not interpreter"
                cmd = pytest_cmd(files, k, junit, 8, 60)
            elif name == "tests_more":
                cmd = pytest_cmd(TRITON_TEST_FILES + ["tests/test_cuda_ops.py"] + FAMILY_TEST_FILES + EXPORT_TEST_FILES,
                                 f"(({RUN2_K}) or {FAMILY_K} or {EXPORT_K}) and not emulated", junit, 8, 90)
            else:
                cmd = pytest_cmd(TRITON_TEST_FILES + ["tests/test_cuda_ops.py"], f"({INT32_K}) and not emulated",
                                 junit, 1, 120)
            suite.run_stage(index, cmd, ok_codes=(0, 5))  # 5: nothing selected (recorded by the junit counts)
            suite.record[key] = junit_summary(junit)
        elif name == "b16_models":
            cases = [[B16, 256, "infer", p, 0] for p in ("timm-eager", "vitkern-auto", "vitkern-triton", "vitkern-cuda")]
            cases += [[B16, 256, "train", p, 0] for p in ("timm-eager", "vitkern-auto", "vitkern-triton", "vitkern-cuda")]
            cases += [[B16, 256, "infer", "timm-compile", 30], [B16, 256, "train", "timm-compile", 60]]
            models_stage(suite, index, quick_cases(cases) if q else cases, "models", {"VITKERN_COMPILE_MODE": "default"})
        elif name == "ops_b256":
            bj = os.path.join(w, "ops.json")
            limit = suite.limit_for(index)
            k = "layer_norm-fwd-torch" if q else "not vitkern-auto and not vitkern-eager"
            suite.run_stage(index, [PY] + PYTEST_BASE + ["benchmarks/test_ops.py", "--benchmark-only", "-k", k,
                                                         f"--benchmark-json={bj}"],
                            {"VITKERN_BENCH_BUDGET_S": str(max(5, int(limit - 10))), "VITKERN_BENCH_TARGET_MS": "100"})
            suite.record["op_rows"] = benchmark_rows(load_json(bj))
            write_backend_order(suite)
        elif name == "models_more":
            prov = ("timm-eager", "vitkern-triton", "vitkern-cuda")
            cases = [[B16, 1, "infer", p, 0] for p in prov] + [[B16, 32, "infer", p, 0] for p in prov]
            cases += [[L16, 256, "infer", p, 0] for p in prov] + [[H14, 256, "infer", p, 0] for p in prov]
            models_stage(suite, index, quick_cases(cases) if q else cases, "models_more")
        elif name == "profile":
            best = best_vitkern_provider(model_rows(suite.record.get("models") or run1_models()))
            prof = os.path.join(w, "profile")
            args = ["--quick"] if q else ["--model", B16, "--batch", "256", "--provider", best]
            suite.run_stage(index, [PY, "-m", "vitkern.profile", "--out", prof] + args)
            p = load_json(os.path.join(prof, "profile.json"))
            if isinstance(p, dict):
                p["kernels"] = p.get("kernels", [])[:60]
            suite.record["profile"] = p
        elif name == "sanitizer":
            out = os.path.join(w, "sanitizer.json")
            suite.run_stage(index, [PY, "-c", SANITIZER_SCRIPT, out, REPO],
                            skip_reason="no GPU (smoke run)" if q else None)
            suite.record["sanitizer"] = load_json(out)
        elif name == "max_autotune":
            models_stage(suite, index, [[B16, 256, "infer", "timm-compile", 0]], "max_autotune",
                         {"VITKERN_COMPILE_MODE": "max-autotune"})
        elif name == "sweep":
            shapes_path = os.path.join(w, "sweep-shapes.json")
            with open(shapes_path, "w") as f:
                json.dump(SWEEP_SHAPES, f)
            limit = suite.limit_for(index)
            suite.run_stage(index, [PY, "-c", SWEEP_SCRIPT, suite.table_path, REPO, shapes_path, str(max(5.0, limit - 10))],
                            {"VITKERN_TUNING_TABLES": "0", "VITKERN_TUNING_SWEEP_TABLE": suite.table_path},
                            skip_reason="no GPU: the sweep times compiled kernels" if suite.gpu == "no-gpu" else None)
            if os.path.exists(suite.table_path):
                suite.record["tuning_table"] = suite.table_path
        else:
            raise ValueError(f"no stage named {name!r}")
        stage = suite.stages[-1]
        suite.stage_line(stage)
        suite.write_outputs()


def run1_models() -> Optional[Dict[str, Any]]:
    """The B/16 model results of the newest run-1 record in benchmarks/results/ (run 2 profiles the
    backend run 1 found fastest), or None."""
    paths = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*-run1.json")), key=os.path.getmtime)
    return (load_json(paths[-1]) or {}).get("models") if paths else None


def write_backend_order(suite: Suite) -> None:
    """The per-op backend order measured in this run, into the device's tuning table in OUT (read
    by vitkern.dispatch once the table is committed)."""
    if suite.quick or suite.gpu == "no-gpu" or not suite.record.get("op_rows"):
        return
    sys.path.insert(0, REPO)
    try:
        from vitkern import dispatch

        order = dispatch.measured_order_from_record({"op_rows": suite.record["op_rows"]})
        if order:
            from vitkern.kernels.triton import _common

            _common.write_backend_order(suite.table_path, suite.gpu, {op: list(b) for op, b in order.items()})
            suite.record["backend_order"] = order
            suite.record["tuning_table"] = suite.table_path
    except Exception as exc:  # noqa: BLE001 - recorded; the measurements stay
        suite.record["notes"].append(f"backend order not written: {type(exc).__name__}: {exc}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", choices=sorted(PLANS), default="1", help="which prepared run (default 1)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for the record, summary, log, XML, table")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds; every stage's budget scales with it")
    p.add_argument("--dry-run", action="store_true", help="print the plan with counted compiles and autotune configs")
    p.add_argument("--device-name", default=DEFAULT_DEVICE, help=f"the dry run's device (default {DEFAULT_DEVICE!r})")
    p.add_argument("--quick", action="store_true",
                   help="a CPU smoke run of the suite itself (tiny stages, 1200 s unless --budget-s; its record "
                        "stays out of benchmarks/results/)")
    args = p.parse_args(argv)
    try:
        stages, total = scaled_plan(args.run, args.budget_s if args.budget_s is not None else (1200.0 if args.quick else None))
    except ValueError as exc:
        p.error(str(exc))
    if args.dry_run:
        return dry_run(args.run, stages, total, args.device_name)
    suite = Suite(args.run, stages, total, args.out, args.quick)
    log(f"run {args.run}: {len(stages)} stages, budget {total:.0f} s, work folder {suite.work}, commit {suite.commit}")
    stopped = False
    try:
        run_plan(suite)
    except SuiteStopped:
        stopped = True
        done = {s["name"] for s in suite.stages}
        for s in suite.plan:
            if s.name not in done:
                suite.stages.append({"name": s.name, "budget_s": round(s.budget, 1), "limit_s": 0, "status": "not run",
                                     "seconds": 0.0, "reason": "the suite got SIGTERM before this stage"})
        suite.record["notes"].append("stopped by SIGTERM: the stages after the cut one did not run")
        suite.write_outputs()
    print(short_table(suite.record), flush=True)
    if stopped:
        return 143
    return 0 if all(s["status"] in ("ok", "skipped") for s in suite.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
