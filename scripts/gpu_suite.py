#!/usr/bin/env python3
"""The one-command GPU suite (`make gpu OUT=dir`): everything measured in one run of at most
9 minutes on an H100, with one self-explanatory record.

Runs with the GPU machine's system python3 (torch, triton, timm, transformers, pytest,
pytest-benchmark, ninja, pybind11 preinstalled; no venv, no installs, no internet). Each stage
is a subprocess with its own time limit; a failing or timed-out stage is recorded and the next
one runs anyway.

Budget (seconds; a stage's limit is its own plus whatever earlier stages left unused, minus
what later stages still need, so the total never exceeds TOTAL_BUDGET_S):

    stage        budget  what
    env              20  nvidia-smi, versions, measured GEMM rate and copy bandwidth
    cuda_build      100  build csrc/ just in time (vitkern.kernels.cuda.load_error(): this GPU's
                         architecture only, MAX_JOBS = CPU cores); if it fails, later stages run
                         with VITKERN_CUDA_JIT=0 so that none of them retries the build
    gpu_tests        90  pytest -m gpu tests (junit xml)
    audit            40  python -m vitkern.audit --json (Triton kernels AOT for sm_80/sm_90)
    benchmarks      160  pytest benchmarks/ --benchmark-only, grid 'suite' (per-op at B/16 b256
                         shapes + B/16-224 models at batch 256, 32, 1; ~200 ms timed per case;
                         timm+torch.compile(max-autotune) last, B/16 batch 256 inference only,
                         and only if 75 s of the stage remain)
    bench            95  python -m vitkern.bench: L/16, H/14, B/16-384 at batch 256 and 1 (timm
                         eager, vitkern auto and cuda, HF), in that order until its budget ends
                         (B/16-224 and batch 32 are measured by the benchmarks stage)
    profile          30  python -m vitkern.profile, B/16-224 batch 256, the fastest vitkern backend
    (record)          5  merge -> benchmarks/results/<gpu>-<date>-<commit>.json and .md
    total           540  (TOTAL_BUDGET_S)

A stage that runs out of time gets SIGTERM: the benchmark stages turn it into a clean stop that
still writes their JSON (cases not reached are recorded as skipped with that reason).

Outputs: benchmarks/results/<gpu>-<date>-<commit>.json (one merged record: stage statuses and
durations, test summary, audit, pytest-benchmark JSON, bench JSON, profile, DESIGN.md §4
targets) and .md (a summary a person reads first); with --out DIR, those two plus the suite
log, junit xml, bench and profile PNGs and the gzipped Chrome trace are copied there (at most 8
files, flat, names of letters, digits, '.', '_' and '-'). benchmarks/results/README.md explains
every field.
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
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 540
RECORD_RESERVE_S = 5
SCHEMA = "vitkern.gpu_suite/1"
PY = sys.executable or "python3"

# (name, budget seconds)
STAGES = [("env", 20), ("cuda_build", 100), ("gpu_tests", 90), ("audit", 40), ("benchmarks", 160),
          ("bench", 95), ("profile", 30)]


def sanitize(text: str) -> str:
    """Letters, digits, '.', '_' and '-' only (what the device tool brings back)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def log(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Suite:
    def __init__(self, out: Optional[str], total_budget: float) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + total_budget - RECORD_RESERVE_S
        self.total_budget = total_budget
        self.out = out
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.work = os.path.join(REPO, "build", "gpu-suite", stamp)
        os.makedirs(self.work, exist_ok=True)
        self.suite_log = os.path.join(self.work, "suite.log")
        self.stages: List[Dict[str, Any]] = []
        self.env = dict(os.environ)
        self.env.update({
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": REPO + os.pathsep + self.env.get("PYTHONPATH", ""),
            "MAX_JOBS": self.env.get("MAX_JOBS", str(os.cpu_count() or 8)),  # the CUDA JIT build's parallelism
            "TRITON_CACHE_AUTOTUNING": "1",  # later stages reuse the autotuning of earlier ones
            "TORCHINDUCTOR_COMPILE_THREADS": self.env.get("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 8)),
            "VITKERN_BENCH_TARGET_MS": self.env.get("VITKERN_BENCH_TARGET_MS", "200"),
        })

    # ----------------------------------------------------------------------------------------
    def timeout_for(self, index: int) -> float:
        """This stage's limit: time left minus the budgets of the stages after it."""
        later = sum(b for _, b in STAGES[index + 1:])
        return max(5.0, self.deadline - time.monotonic() - later)

    def run(self, index: int, cmd: List[str], *, extra_env: Optional[Dict[str, str]] = None,
            skip_reason: Optional[str] = None) -> Dict[str, Any]:
        name, budget = STAGES[index]
        timeout = self.timeout_for(index)
        stage: Dict[str, Any] = {"name": name, "budget_s": budget, "timeout_s": round(timeout, 1), "command": " ".join(cmd)}
        log_path = os.path.join(self.work, f"{index + 1}-{name}.log")
        stage["log"] = os.path.basename(log_path)
        if skip_reason:
            stage.update(status="skipped", reason=skip_reason, seconds=0.0, rc=None)
            with open(log_path, "w") as f:
                f.write(f"skipped: {skip_reason}\n")
            log(f"{name}: skipped ({skip_reason})")
            self.stages.append(stage)
            return stage
        log(f"{name}: start (limit {timeout:.0f} s): {stage['command']}")
        env = dict(self.env, **(extra_env or {}))
        t = time.monotonic()
        with open(log_path, "w") as f:
            f.write(f"$ {stage['command']}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                # the whole process group: pytest workers, nvcc, compile workers
                for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                rc, status = proc.returncode, "timeout"
                f.write(f"\n[gpu_suite] stage {name} stopped at its limit of {timeout:.0f} s\n")
        stage.update(status=status, rc=rc, seconds=round(time.monotonic() - t, 1))
        stage["log_tail"] = tail(log_path, 4000)
        log(f"{name}: {status} (rc {rc}) in {stage['seconds']:.0f} s")
        self.stages.append(stage)
        return stage


def _cmd_out(cmd: List[str]) -> Optional[str]:
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def gpu_name_and_commit() -> Tuple[str, str]:
    """Without torch (the env stage may have failed): nvidia-smi's GPU name and git's commit."""
    name = _cmd_out(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or "unknown-gpu"
    commit = _cmd_out(["git", "rev-parse", "--short=10", "HEAD"]) or "unknown"
    if commit != "unknown" and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                              capture_output=True, text=True).stdout.strip():
        commit += "+dirty"
    return name, commit


def tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def load_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Reading the stage outputs


def junit_summary(path: str) -> Optional[Dict[str, Any]]:
    """Counts and the failed tests (name + first lines of the message) from a junit xml."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": [], "skip_reasons": {}}
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
            sk = case.find("skipped")
            if sk is not None:
                reason = (sk.get("message") or "").strip()[:200]
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def benchmark_rows(bj: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The extra_info of every pytest-benchmark result, with its test name."""
    if not bj:
        return []
    return [dict(b.get("extra_info", {}), name=b.get("name")) for b in bj.get("benchmarks", [])]


def best_vitkern_provider(rows: List[Dict[str, Any]], bench_rec: Optional[Dict[str, Any]]) -> str:
    """The fastest vitkern provider on B/16-224 batch 256 inference (vitkern-auto if unknown)."""
    cands = [(r.get("img_per_s"), r.get("provider")) for r in rows
             if r.get("model") == "vit_base_patch16_224" and r.get("batch") == 256 and r.get("mode") == "infer"
             and str(r.get("provider", "")).startswith("vitkern") and r.get("img_per_s")]
    if bench_rec:
        cands += [(r["img_per_s"], r["provider"]) for r in bench_rec.get("results", [])
                  if r["status"] == "ok" and r["model"] == "vit_base_patch16_224" and r["batch"] == 256
                  and r["mode"] == "infer" and r["provider"].startswith("vitkern")]
    return max(cands)[1] if cands else "vitkern-auto"


def model_result(rows: List[Dict[str, Any]], bench_rec: Optional[Dict[str, Any]], model: str, batch: int, mode: str,
                 provider: str) -> Optional[Dict[str, Any]]:
    for r in rows:
        if (r.get("model"), r.get("batch"), r.get("mode"), r.get("provider")) == (model, batch, mode, provider) \
                and r.get("img_per_s"):
            return r
    if bench_rec:
        for r in bench_rec.get("results", []):
            if (r["model"], r["batch"], r["mode"], r["provider"]) == (model, batch, mode, provider) and r["status"] == "ok":
                return {**r, "ms_median": r["ms"]}
    return None


def op_result(rows: List[Dict[str, Any]], op: str, mode: str, provider: str) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if (r.get("op"), r.get("mode"), r.get("provider")) == (op, mode, provider)), None)


def evaluate_targets(rows: List[Dict[str, Any]], bench_rec: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """DESIGN.md §4, each target with the measured value (None when not measured) and met/unmet."""
    best = best_vitkern_provider(rows, bench_rec)
    b16 = "vit_base_patch16_224"
    out: List[Dict[str, Any]] = []

    def add(target: str, goal: str, value: Optional[float], ok: Optional[bool], detail: str = "") -> None:
        out.append({"target": target, "goal": goal, "measured": value, "met": ok, "detail": detail})

    def ratio(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]], key: str = "ms_median") -> Optional[float]:
        if a and b and a.get(key) and b.get(key):
            return b[key] / a[key]
        return None

    vk = model_result(rows, bench_rec, b16, 256, "infer", best)
    te = model_result(rows, bench_rec, b16, 256, "infer", "timm-eager")
    tc = model_result(rows, bench_rec, b16, 256, "infer", "timm-compile")
    s_e, s_c = ratio(vk, te), ratio(vk, tc)
    add("B/16 infer b256: speedup vs timm eager", ">= 1.6x", s_e, None if s_e is None else s_e >= 1.6, best)
    add("B/16 infer b256: speedup vs timm + torch.compile", ">= 1.3x", s_c, None if s_c is None else s_c >= 1.3, best)
    ips = vk.get("img_per_s") if vk else None
    add("B/16 infer b256: img/s", ">= 18,000", ips, None if ips is None else ips >= 18_000, best)
    v1 = model_result(rows, bench_rec, b16, 1, "infer", best)
    lat = v1.get("ms_median") if v1 else None
    add("B/16 infer b1: latency ms (CUDA graph)", "<= 0.4 ms", lat, None if lat is None else lat <= 0.4,
        f"{best}, {v1.get('timing_method') if v1 else ''}")
    vt = model_result(rows, bench_rec, b16, 256, "train", best)
    tt = model_result(rows, bench_rec, b16, 256, "train", "timm-eager")
    st = ratio(vt, tt)
    add("B/16 train b256: speedup vs timm eager + AdamW", ">= 1.5x", st, None if st is None else st >= 1.5, best)
    tips = vt.get("img_per_s") if vt else None
    add("B/16 train b256: img/s", ">= 5,600", tips, None if tips is None else tips >= 5_600, best)
    mem = (vt["peak_mem_bytes"] / tt["peak_mem_bytes"]) if vt and tt and vt.get("peak_mem_bytes") and tt.get("peak_mem_bytes") else None
    add("B/16 train b256: peak memory vs timm eager", "<= 0.6x", mem, None if mem is None else mem <= 0.6, best)
    for op, mode, base, goal, desc in (
        ("attention", "fwdbwd", "torch-flash", 1.3, "attention T=197 d=64 fwd+bwd: speedup vs SDPA flash"),
    ):
        v = op_result(rows, op, mode, best) or op_result(rows, op, mode, "vitkern-auto")
        b = op_result(rows, op, mode, base)
        r = ratio(v, b)
        add(desc, f">= {goal}x", r, None if r is None else r >= goal)
    for op, goal, desc in (("ln_qkv", 1.05, "LayerNorm+QKV time / bare QKV GEMM time"),
                           ("mlp", 1.03, "GELU MLP time / its two GEMMs' time")):
        v = op_result(rows, op, "fwd", best) or op_result(rows, op, "fwd", "vitkern-auto")
        g = op_result(rows, op, "fwd", "torch-gemm-only")
        r = (v["ms_median"] / g["ms_median"]) if v and g else None
        add(desc + " (forward)", f"<= {goal}x", r, None if r is None else r <= goal)
    # L/16 JFT pre-training at the measured L/16 (else B/16) training MFU of the best vitkern backend
    sys.path.insert(0, REPO)
    try:
        from vitkern import cost

        l16 = max((r for r in (bench_rec or {}).get("results", []) if r["status"] == "ok" and r["mode"] == "train"
                   and r["provider"].startswith("vitkern") and r["model"] == "vit_large_patch16_224"),
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


# --------------------------------------------------------------------------------------------
# The summary


def render_bench_report(bench_rec: Dict[str, Any], bench_dir: str) -> None:
    """bench.md and bench.png from a bench.json that a stopped run left without them."""
    try:
        sys.path.insert(0, REPO)
        from vitkern import bench

        bench_rec.setdefault("notes", []).append("report rendered by the GPU suite from the partial bench.json")
        bench.write_report(bench_rec, bench_dir)
    except Exception as exc:  # the record keeps the JSON either way
        log(f"could not render the bench report: {type(exc).__name__}: {exc}")


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def render_summary(rec: Dict[str, Any], bench_md: Optional[str], profile_md: Optional[str]) -> str:
    env = rec.get("environment") or {}
    lines = [f"# GPU suite: {rec['gpu']} at commit {rec['commit']} ({rec['date_utc']})", "",
             f"Total {rec['total_seconds']:.0f} s of a {rec['budget_s']} s budget. torch {env.get('torch')}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}. "
             "Every field is explained in benchmarks/results/README.md.", "",
             "## Stages", "", "| stage | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    for s in rec["stages"]:
        note = s.get("reason") or ("" if s["status"] == "ok" else f"rc {s.get('rc')}; see {s.get('log')} in the suite log")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | {s['timeout_s']:.0f} | {note} |")
    ceil = env.get("measured") or {}
    if ceil:
        lines += ["", f"Measured ceilings: bf16 GEMM {ceil.get('gemm_flops', 0) / 1e12:.0f} TFLOP/s, "
                      f"device copy {ceil.get('copy_bytes_per_s', 0) / 1e12:.2f} TB/s (read + write)."]
    if rec.get("cuda_extension"):
        lines += ["", f"CUDA extension: {rec['cuda_extension']}"]
    lines += ["", "## DESIGN.md §4 targets", "", "| target | goal | measured | met | detail |", "|---|---|---|---|---|"]
    for t in rec["targets"]:
        met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {fmt(t['measured'], ',.3f')} | {met} | {t['detail']} |")
    tests = rec.get("tests")
    lines += ["", "## GPU tests", ""]
    if tests:
        lines.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped in {tests['time_s']:.0f} s.")
        for f in tests["failed"][:30]:
            lines.append(f"- {f['kind']}: `{f['test']}`: {f['message'].splitlines()[0][:200] if f['message'] else ''}")
    else:
        lines.append("no junit xml (see the gpu_tests stage)")
    audit = rec.get("audit")
    lines += ["", "## Audit", ""]
    arows = audit.get("rows") if isinstance(audit, dict) else audit if isinstance(audit, list) else None
    if isinstance(arows, list):
        bad = [r for r in arows if isinstance(r, dict) and (r.get("ok") is False or r.get("error"))]
        lines.append(f"{len(arows)} kernel x config x arch rows, {len(bad)} failing"
                     + (f"; import errors: {audit.get('import_errors')}" if isinstance(audit, dict) and audit.get("import_errors") else "") + ".")
        for r in bad[:20]:
            lines.append(f"- {r.get('kernel')} {r.get('config')} sm_{r.get('arch')}: {r.get('error') or r.get('problems')}")
    else:
        lines.append("no audit JSON (see the audit stage)")
    ops = [r for r in rec.get("benchmark_rows", []) if r.get("op")]
    if ops:
        lines += ["", "## Ops (pytest-benchmark)", "",
                  "| op | mode | provider | ms | TFLOP/s | GB/s | % of floor | vs torch |", "|---|---|---|---|---|---|---|---|"]
        for r in ops:
            lines.append(f"| {r['op']} | {r['mode']} | {r['provider']} | {fmt(r.get('ms_median'), '.4f')} | "
                         f"{fmt(r.get('tflops'), '.3g')} | {fmt(r.get('gbps'), ',.4g')} | {fmt(r.get('pct_of_floor'), '.1f')} | "
                         f"{fmt(r.get('speedup_vs_torch'), '.2f')} |")
    models = [r for r in rec.get("benchmark_rows", []) if r.get("model") and not r.get("op")]
    if models:
        lines += ["", "## Models (pytest-benchmark)", "",
                  "| model | batch | mode | provider | img/s | ms | peak GiB | MFU | vs timm eager |", "|---|---|---|---|---|---|---|---|---|"]
        for r in models:
            mem = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None
            lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['provider']} | {fmt(r.get('img_per_s'), ',.0f')} | "
                         f"{fmt(r.get('ms_median'), '.3f')} | {fmt(mem, '.2f')} | {fmt(r.get('mfu'), '.1%')} | "
                         f"{fmt(r.get('speedup_vs_timm_eager'), '.2f')} |")
    skips = rec.get("benchmark_skips") or []
    if skips:
        by_reason: Dict[str, int] = {}
        for sk in skips:
            by_reason[sk["reason"][:160]] = by_reason.get(sk["reason"][:160], 0) + 1
        lines += ["", "## Skipped benchmarks (pytest-benchmark)", "", "| reason | cases |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(by_reason.items(), key=lambda kv: -kv[1])]
    def nested(md: str, keep: int) -> str:  # the embedded report's headings one level down
        body = md.split("\n")[1:keep]
        return "\n".join(("#" + ln) if ln.startswith("## ") else ln for ln in body)

    if bench_md:
        lines += ["", "## vitkern.bench", "", nested(bench_md, 10_000)]
    if profile_md:
        lines += ["", "## vitkern.profile", "", nested(profile_md, 60)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------


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
for dist in ("pytest", "pytest-benchmark", "matplotlib", "tqdm", "ninja", "pybind11", "numpy"):
    try:
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[dist] = None
json.dump(info, open(sys.argv[1], "w"), indent=1, default=str)  # written before the slower measurement
if dev.type == "cuda":
    info["measured"] = _timing.measure_ceilings(dev, torch.bfloat16)
print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1, default=str))
print(info["nvidia_smi"])
json.dump(info, open(sys.argv[1], "w"), indent=1, default=str)
"""


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder to copy the record, summary and logs into")
    p.add_argument("--budget-s", type=float, default=None, help=f"total seconds (default {TOTAL_BUDGET_S})")
    p.add_argument("--quick", action="store_true",
                   help="a CPU smoke run of the suite itself: bench/profile --quick, audit of one kernel file, 480 s; "
                        "its record stays in the work folder, out of benchmarks/results/")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 480.0 if args.quick else TOTAL_BUDGET_S
    if args.quick:  # scale the stage budgets to the smaller total
        scale = (args.budget_s - RECORD_RESERVE_S) / sum(b for _, b in STAGES)
        STAGES[:] = [(n, b * scale) for n, b in STAGES]
    suite = Suite(args.out, args.budget_s)
    w = suite.work
    log(f"work folder {w}; budget {args.budget_s:.0f} s")

    # 1. environment
    env_json = os.path.join(w, "env.json")
    suite.run(0, [PY, "-c", ENV_SCRIPT, env_json, REPO])
    env = load_json(env_json) or {}
    env.pop("nvidia_smi", None)

    # 2. CUDA extension, just in time
    sources = glob.glob(os.path.join(REPO, "csrc", "*.cu")) + glob.glob(os.path.join(REPO, "csrc", "*.cpp"))
    cuda_out = os.path.join(w, "cuda_build.txt")
    suite.run(1, [PY, "-c", "import sys; import vitkern.kernels.cuda as c; e = c.load_error(); "
                            f"open({cuda_out!r}, 'w').write(str(e)); print('load_error:', e); sys.exit(1 if e else 0)"],
              skip_reason=None if sources else "csrc/ has no .cu/.cpp sources")
    cuda_status = open(cuda_out).read().strip() if os.path.exists(cuda_out) else None
    cuda_msg = ("loaded" if cuda_status == "None" else f"unavailable: {cuda_status}") if cuda_status else None
    if sources and cuda_status != "None":
        # a failed or unfinished build must not be retried (for minutes) by every later process
        suite.env["VITKERN_CUDA_JIT"] = "0"
        cuda_msg = cuda_msg or "unavailable: the build stage did not finish (see its log)"

    # 3. GPU tests
    junit = os.path.join(w, "gpu-tests.xml")
    suite.run(2, [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={junit}", "-p", "no:cacheprovider",
                  "-o", "addopts=-ra"])

    # 4. audit
    audit_json = os.path.join(w, "audit.json")
    has_audit = os.path.exists(os.path.join(REPO, "vitkern", "audit.py"))
    suite.run(3, [PY, "-m", "vitkern.audit", "--json", audit_json]
              + (["--one-per-kernel", "--module", "layer_norm", "--arch", "90"] if args.quick else []),
              skip_reason=None if has_audit else "vitkern/audit.py is not in this checkout")

    # 5. pytest benchmarks (internal budget a little under the stage limit so pytest-benchmark writes its JSON)
    bj_path = os.path.join(w, "benchmarks.json")
    limit = suite.timeout_for(4)
    suite.run(4, [PY, "-m", "pytest", "benchmarks/", "--benchmark-only", f"--benchmark-json={bj_path}", "-q",
                  "-p", "no:cacheprovider", "-o", "addopts=-ra"],
              extra_env={"VITKERN_BENCH_GRID": "suite", "VITKERN_BENCH_BUDGET_S": str(max(10, int(limit - 40))),
                         "VITKERN_BENCH_SKIPS_JSON": os.path.join(w, "benchmark-skips.json")})
    bj = load_json(bj_path)
    rows = benchmark_rows(bj)

    # 6. vitkern.bench: the larger models first (B/16-224 was measured by stage 5)
    bench_dir = os.path.join(w, "bench")
    limit = suite.timeout_for(5)
    grid = (["--quick", "--providers", "timm-eager,vitkern-auto"] if args.quick else
            ["--target-ms", "200", "--providers", "timm-eager,vitkern-auto,vitkern-cuda,hf-sdpa", "--batch", "256,1",
             "--models", "vit_large_patch16_224,vit_huge_patch14_224,vit_base_patch16_384"])
    suite.run(5, [PY, "-m", "vitkern.bench", "--out", bench_dir, "--progress", "plain",
                  "--budget-s", str(max(10, int(limit - 30)))] + grid)
    bench_rec = load_json(os.path.join(bench_dir, "bench.json"))
    if bench_rec and not os.path.exists(os.path.join(bench_dir, "bench.md")):
        render_bench_report(bench_rec, bench_dir)

    # 7. profile of the fastest vitkern backend
    prof_dir = os.path.join(w, "profile")
    try:
        best = best_vitkern_provider(rows, bench_rec)
    except Exception as exc:  # never lose the profile stage to a malformed record
        log(f"choosing the profiled provider failed ({exc}); using vitkern-auto")
        best = "vitkern-auto"
    suite.run(6, [PY, "-m", "vitkern.profile", "--out", prof_dir] + (["--quick"] if args.quick else
              ["--model", "vit_base_patch16_224", "--batch", "256", "--provider", best]))
    prof_rec = load_json(os.path.join(prof_dir, "profile.json"))

    # the record: every part guarded, so that a surprise in one never costs the others
    errors: List[str] = []

    def safe(label: str, fn, default=None):
        try:
            return fn()
        except Exception as exc:  # recorded in the record and its summary
            import traceback

            errors.append(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
            log(f"{label} failed: {type(exc).__name__}: {exc}")
            return default

    fallback_gpu, fallback_commit = gpu_name_and_commit()
    gpu = env.get("device") or fallback_gpu
    commit = env.get("git_commit") or fallback_commit
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    base = sanitize(f"{gpu.replace('NVIDIA ', '')}-{date}-{commit.replace('+', '-')}")
    if isinstance(prof_rec, dict):
        prof_rec["kernels"] = prof_rec.get("kernels", [])[:80]
    rec: Dict[str, Any] = {
        "schema": SCHEMA, "gpu": gpu, "commit": commit, "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s, "total_seconds": round(time.monotonic() - suite.t0, 1),
        "stage_budgets": dict(STAGES), "stages": suite.stages, "environment": env, "cuda_extension": cuda_msg,
        "tests": safe("junit summary", lambda: junit_summary(junit)), "audit": load_json(audit_json),
        "targets": safe("target evaluation", lambda: evaluate_targets(rows, bench_rec), []),
        "best_vitkern_provider": best, "grid": GRID_NOTE,
        "benchmark_rows": rows, "benchmark_skips": load_json(os.path.join(w, "benchmark-skips.json")),
        "benchmarks": bj, "bench": bench_rec, "profile": prof_rec, "suite_errors": errors,
    }
    # A --quick run is a CPU smoke test of the suite itself: its record stays in the work folder
    # instead of joining the GPU records in benchmarks/results/.
    results_dir = w if args.quick else os.path.join(REPO, "benchmarks", "results")
    os.makedirs(results_dir, exist_ok=True)
    rec_path = os.path.join(results_dir, base + ".json")
    md_path = os.path.join(results_dir, base + ".md")
    bench_md = safe("reading bench.md", lambda: open(os.path.join(bench_dir, "bench.md")).read()) \
        if os.path.exists(os.path.join(bench_dir, "bench.md")) else None
    prof_md = safe("reading profile.md", lambda: open(os.path.join(prof_dir, "profile.md")).read()) \
        if os.path.exists(os.path.join(prof_dir, "profile.md")) else None
    summary = safe("summary", lambda: render_summary(rec, bench_md, prof_md))
    if summary is None:
        summary = (f"# GPU suite: {gpu} at commit {commit}\n\nThe summary could not be rendered; the JSON record "
                   "holds every stage's output. Errors:\n\n" + "\n".join(f"    {e}" for e in errors) + "\n")
    elif errors:
        summary += "\n## Suite errors\n\n" + "\n".join(f"- {e.splitlines()[0]}" for e in errors) + "\n"
    with open(rec_path, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    with open(md_path, "w") as f:
        f.write(summary)
    log(f"wrote {rec_path} and {md_path}")

    # one log with every stage's output, in order
    with open(suite.suite_log, "w") as out_log:
        for s in suite.stages:
            out_log.write(f"\n{'=' * 30} {s['name']}: {s['status']} ({s.get('seconds', 0)} s) {'=' * 30}\n")
            out_log.write(open(os.path.join(w, s["log"]), errors="replace").read())
    if args.out:
        safe("copy to OUT", lambda: copy_out(args.out, base, rec_path, md_path, suite.suite_log, junit, bench_dir, prof_dir))
    print(summary)
    return 0 if all(s["status"] in ("ok", "skipped") for s in suite.stages) else 1


GRID_NOTE = {
    "benchmarks": "pytest benchmarks/ with VITKERN_BENCH_GRID=suite: per-op benchmarks at ViT-B/16 batch-256 shapes "
                  "(bf16, fwd and fwd+bwd, every vitkern backend vs the torch baselines) and model throughput of "
                  "B/16-224 at batch 256, 32, 1 for every provider; torch.compile(max-autotune) only for batch 256 "
                  "inference, run last and only with 75 s of the stage left; ~200 ms of timed calls per case",
    "bench": "python -m vitkern.bench: L/16-224, H/14-224, B/16-384 at batch 256 and 1 (batch 32 trimmed to fit the "
             "9-minute suite), providers timm-eager, vitkern-auto, vitkern-cuda, hf-sdpa; cases past the stage "
             "budget are recorded as skipped with that reason",
    "not_in_suite": "the full grid (every model x batch 1/32/256 x provider, torch.compile everywhere): run "
                    "`VITKERN_BENCH_GRID=full pytest benchmarks/ --benchmark-only` and `python -m vitkern.bench`",
}

MAX_OUT_FILES = 8
MAX_OUT_BYTES = 15 * 2**20


def copy_out(out: str, base: str, rec_path: str, md_path: str, suite_log: str, junit: str, bench_dir: str,
             prof_dir: str) -> None:
    """At most 8 flat files under 16 MiB each, named with letters, digits, '.', '_' and '-'."""
    os.makedirs(out, exist_ok=True)
    trace = os.path.join(prof_dir, "trace.json")
    trace_gz = trace + ".gz"
    if os.path.exists(trace):
        with open(trace, "rb") as src, gzip.open(trace_gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
    files = [(rec_path, base + ".json"), (md_path, base + ".md"), (suite_log, "suite-log.txt"),
             (junit, "gpu-tests.xml"), (os.path.join(bench_dir, "bench.png"), "bench.png"),
             (os.path.join(prof_dir, "profile.png"), "profile.png"), (trace_gz, "profile-trace.json.gz")]
    copied = 0
    for src, name in files[:MAX_OUT_FILES]:
        if not os.path.exists(src):
            continue
        dst = os.path.join(out, sanitize(name))
        if src == rec_path and os.path.getsize(src) > MAX_OUT_BYTES:
            # keep the record valid JSON: drop the raw pytest-benchmark JSON (benchmark_rows keep its numbers)
            rec = load_json(src) or {}
            rec["benchmarks"] = "dropped from this copy to stay under the device tool's 16 MiB per file"
            with open(dst, "w") as f:
                json.dump(rec, f, indent=1, default=str)
        elif os.path.getsize(src) > MAX_OUT_BYTES:
            if src.endswith((".txt", ".md", ".json")):  # keep the end of a too-long text file: it holds the summary
                with open(src, "rb") as f:
                    f.seek(-MAX_OUT_BYTES, os.SEEK_END)
                    data = f.read()
                with open(dst, "wb") as f:
                    f.write(data)
                log(f"{name} truncated to its last {MAX_OUT_BYTES} bytes")
            else:
                log(f"{name} is over {MAX_OUT_BYTES} bytes: not copied")
                continue
        else:
            shutil.copyfile(src, dst)
        copied += 1
    log(f"copied {copied} files into {out}")


if __name__ == "__main__":
    sys.exit(main())
