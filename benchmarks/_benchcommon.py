"""Settings shared by the pytest-benchmark suites (`pytest benchmarks/ --benchmark-only`).

A uniquely named module (not `conftest`) so that `from _benchcommon import ...` cannot pick up
tests/conftest.py when both folders are collected in one run.

* Device: the GPU when there is one (bf16), else the CPU (fp32) with a small configuration so
  CI exercises every benchmark in a few minutes (Ti/16 at 64 px, batch 2).
* Grid on a GPU: `VITKERN_BENCH_GRID=full` (default) measures B/16, L/16, H/14 at 224 and B/16
  at 384 over batch 1, 32, 256; `suite` (what `make gpu` uses to fit its 9 minutes) measures
  B/16-224 only and compiles timm with torch.compile only for batch 256 inference.
* `VITKERN_BENCH_BUDGET_S`: seconds after which the remaining benchmarks skip with that reason
  (pytest-benchmark writes its JSON only at the end, so a killed run would lose everything; a
  SIGTERM is turned into an interrupt, after which pytest-benchmark still writes what it has).
* `VITKERN_BENCH_TARGET_MS`: milliseconds of timed calls per GPU case (default 500).
* torch.compile cases run last (their compilation can take minutes).
* Each result's `extra_info` carries img/s (or TFLOP/s and GB/s for ops), peak memory, MFU,
  the speedup vs the baseline measured in the same session, device and versions, git commit.
"""

from __future__ import annotations

import os
import sys
import time
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a plain checkout without `pip install -e .`
    sys.path.insert(0, REPO)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
GRID = os.environ.get("VITKERN_BENCH_GRID", "full").strip().lower()
if GRID not in ("full", "suite"):
    raise pytest.UsageError(f"VITKERN_BENCH_GRID must be 'full' or 'suite', got {GRID!r}")
_BUDGET = os.environ.get("VITKERN_BENCH_BUDGET_S")
_DEADLINE = time.monotonic() + float(_BUDGET) if _BUDGET else None
# Cases that may take long to prepare (torch.compile max-autotune) start only with this much budget left.
SLOW_CASE_MIN_S = 75.0
# Milliseconds of timed calls per case (VITKERN_BENCH_TARGET_MS; the GPU suite uses 200).
TARGET_MS = float(os.environ.get("VITKERN_BENCH_TARGET_MS", "500"))


def budget_left() -> float:
    """Seconds left of VITKERN_BENCH_BUDGET_S (infinity without one)."""
    return float("inf") if _DEADLINE is None else _DEADLINE - time.monotonic()


def skip_if_out_of_budget(needed_s: float = 0.0) -> None:
    left = budget_left()
    if left <= needed_s:
        pytest.skip(f"time budget exhausted: VITKERN_BENCH_BUDGET_S={_BUDGET} s with {max(left, 0):.0f} s left "
                    f"(this case needs about {needed_s:.0f} s)")


