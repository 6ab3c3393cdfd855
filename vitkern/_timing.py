"""Timers, environment facts and measured device ceilings shared by `vitkern.bench`,
`vitkern.profile` and the pytest-benchmark suites in `benchmarks/`.

GPU timing follows the usual rules: warm up first (the first calls compile, autotune and fill
caches), time each iteration with a pair of CUDA events recorded on the current stream, and
report the median. CPU timing uses `time.perf_counter` around each iteration.
All times are in milliseconds unless a name says otherwise.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from vitkern import _threads

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Environment


def git_commit() -> str:
    """The checkout's short commit ("unknown" outside a git checkout), with "+dirty" when
    tracked files differ from it (the numbers then belong to uncommitted code)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" for a GPU, "cpu (<processor>, N threads)" for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"cpu ({proc}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> Dict[str, Any]:
    """Versions and device facts every record carries."""
    info: Dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # CPU threads of torch's ops and why that many (vitkern._threads): on a shared CPU the
        # count decides the numbers more than the code does
        "threads": torch.get_num_threads(),
        "threads_policy": _threads.last_choice(),
    }
    # versions from package metadata: importing transformers alone can take seconds
    from importlib import metadata

    for dist in ("triton", "timm", "transformers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _nvidia_smi_field("driver_version"),
        })
    return info


def _nvidia_smi_field(field_name: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-iteration times of one measured function (ms) and how they were taken."""

    times_ms: List[float]
    warmup: int
    method: str  # "cuda-events", "cuda-graph+cuda-events" or "perf_counter"
    warmup_s: float = 0.0  # wall time of the warm-up calls (compilation and autotuning show here)
    notes: List[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)

    @property
    def quartiles_ms(self) -> Tuple[float, float]:
        """(first, third) quartile of the per-call times; (min, max) with fewer than 4 calls."""
        if len(self.times_ms) < 4:
            return self.min_ms, self.max_ms
        q = statistics.quantiles(self.times_ms, n=4)
        return q[0], q[2]

    @property
    def iqr_ms(self) -> float:
        q1, q3 = self.quartiles_ms
        return q3 - q1

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(median_ms=self.median_ms, min_ms=self.min_ms, max_ms=self.max_ms, iqr_ms=self.iqr_ms,
                 quartiles_ms=list(self.quartiles_ms), iters=len(self.times_ms))
        return d


def ratio_interval(base: "Timing", other: "Timing") -> Tuple[float, float]:
    """The spread of base / other (a speedup of `other` over `base`) from the two runs' interquartile
    ranges: (base q1 / other q3, base q3 / other q1). The ratio of the medians lies inside it; a wide
    interval says the two providers' times overlap and the ratio is noise."""
    b1, b3 = base.quartiles_ms
    o1, o3 = other.quartiles_ms
    return b1 / o3, b3 / o1


class _Timed:
    """Wraps `fn` so each call is timed (CUDA events or perf_counter) and appended to `times`."""

    def __init__(self, fn: Callable[[], Any], device: torch.device) -> None:
        self.fn, self.device, self.times = fn, device, []

    def __call__(self) -> None:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn()
            end.record()
            end.synchronize()
            self.times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            self.fn()
            self.times.append((time.perf_counter() - t0) * 1e3)


def iterations_for(estimate_ms: float, target_ms: float, min_iters: int, max_iters: int) -> int:
    """How many timed iterations fill about `target_ms` given one iteration's estimate."""
    if estimate_ms <= 0:
        return max_iters
    return int(max(min_iters, min(max_iters, round(target_ms / estimate_ms))))


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, target_ms: float = 500.0,
            min_iters: int = 3, max_iters: int = 50, runner: Optional[Callable[..., Any]] = None,
            method: str = "") -> Timing:
    """Time `fn` (one step; it need not synchronize): `warmup` untimed calls, then enough timed
    calls to fill about `target_ms` (between min_iters and max_iters), each timed on its own.

    runner: pytest-benchmark's `benchmark.pedantic`, to let it drive the timed calls too (its own
    statistics are wall-clock with a synchronize per call; ours are the per-call CUDA events).
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first call compiles and autotunes), got {warmup}")
    probe = _Timed(fn, device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        probe()
    warmup_s = time.perf_counter() - t0
    iters = iterations_for(min(probe.times[-1], statistics.median(probe.times)), target_ms, min_iters, max_iters)
    timed = _Timed(fn, device)
    if runner is not None:
        runner(timed, rounds=iters, iterations=1, warmup_rounds=0)
    else:
        for _ in range(iters):
            timed()
    return Timing(timed.times, warmup, method or ("cuda-events" if device.type == "cuda" else "perf_counter"), warmup_s)


def cuda_graph(fn: Callable[[], Any], warmup: int = 3) -> Callable[[], None]:
    """Capture `fn` (whose inputs must stay at the same addresses) in a CUDA graph and return its
    replay. Warm-up runs on a side stream first, as CUDA graph capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


# --------------------------------------------------------------------------------------------
# Memory


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """torch.cuda.max_memory_allocated since the last reset; None on a CPU (not tracked there)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


PEAK_MEMORY_CPU_NOTE = "peak memory is not measured on a CPU (torch tracks allocations only on CUDA devices): null"


# --------------------------------------------------------------------------------------------
# Measured ceilings


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> Dict[str, Any]:
    """A large GEMM's FLOP/s in `dtype` and a large device copy's bytes/s (read + write): the
    measured ceilings METHOD.md asks for. Random data, never zeros (zeros run faster)."""
    if device.type == "cuda":
        n = 4096 if quick else 8192
        copy_bytes = 2**28 if quick else 2**30
        reps = 10
    else:
        n, copy_bytes, reps = (512 if quick else 1024), 2**24, 5
    # A CPU shared with other processes is slowed at random moments: its ceiling is its fastest
    # call (a median of 3 could come out several times low and put every floor above the time
    # measured later). A GPU's calls are steady: their median.
    pick = (lambda t: t.median_ms) if device.type == "cuda" else (lambda t: t.min_ms)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=2, target_ms=0, min_iters=reps, max_iters=reps)
    gemm = 2.0 * n**3 / (pick(t) * 1e-3)
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    tc = measure(lambda: dst.copy_(src), device, warmup=2, target_ms=0, min_iters=reps, max_iters=reps)
    bw = 2.0 * copy_bytes / (pick(tc) * 1e-3)
    del a, b, src, dst
    return {"gemm_flops": gemm, "gemm_shape": [n, n, n], "gemm_dtype": str(dtype).replace("torch.", ""),
            "copy_bytes_per_s": bw, "copy_bytes": copy_bytes}


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A progress bar: tqdm when installed (a dev dependency), else a small built-in one that
    prints `[#####.....] 5/10 label` lines to stderr."""

    def __init__(self, total: int, desc: str = "", disable: bool = False, plain: bool = False) -> None:
        self.total, self.n, self.desc, self.disable = total, 0, desc, disable
        self._tqdm = None
        self._t0 = time.monotonic()
        if not disable and not plain:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self._tqdm = None

    def update(self, label: str = "") -> None:
        self.n += 1
        if self.disable:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(label[:60], refresh=False)
            self._tqdm.update(1)
            return
        width = 30
        filled = int(width * self.n / max(self.total, 1))
        elapsed = time.monotonic() - self._t0
        sys.stderr.write(f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} "
                         f"{elapsed:.0f}s {label}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
