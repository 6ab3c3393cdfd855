"""Fixtures of the pytest-benchmark suites; the settings live in `_benchcommon` (see there)."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchcommon import _BUDGET, DEVICE, DTYPE, GRID, TARGET_MS  # noqa: E402
from vitkern import _threads, _timing, bench  # noqa: E402

# The thread count of every command (vitkern/_threads.py), chosen before anything is measured and
# reported in the header and in each record: on a shared CPU it decides the numbers.
THREADS = _threads.configure(who="vitkern benchmarks", flag="", quiet=True)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def env_info() -> Dict[str, Any]:
    """Device name, torch/triton/CUDA versions and git commit, once per session."""
    env = _timing.environment(DEVICE)
    return {k: env.get(k) for k in ("device", "torch", "triton", "cuda", "git_commit", "timm", "transformers", "threads",
                                    "threads_policy")}


@pytest.fixture(scope="session")
def settings() -> bench.Settings:
    """Timing policy and the peak MFU is computed against (datasheet for known GPUs, else measured)."""
    s = bench.default_settings(DEVICE, DTYPE)
    if DEVICE.type == "cuda":
        s.target_ms = TARGET_MS
    return s


@pytest.fixture(scope="session")
def baselines() -> Dict[Tuple, float]:
    """Baseline ms per step measured in this session, keyed per case (timm eager for models,
    the torch composition for ops): speedups are always against the same run."""
    return {}


def pytest_report_header(config):
    return [f"vitkern benchmarks on {_timing.device_name(DEVICE)} ({str(DTYPE).replace('torch.', '')}), "
            f"grid {GRID if DEVICE.type == 'cuda' else 'cpu-small'}, budget {_BUDGET or 'none'} s",
            _threads.describe("threads", THREADS, _threads.last_choice() or "", flag="")]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch_threads"] = THREADS
    machine_info["torch_threads_policy"] = _threads.last_choice()


def pytest_configure(config):
    # SIGTERM (the GPU suite's stage limit) -> KeyboardInterrupt: pytest then still runs its
    # session-finish hooks, so pytest-benchmark writes the JSON of every finished benchmark.
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt("SIGTERM: the caller's time limit")

        signal.signal(signal.SIGTERM, on_term)


def pytest_collection_modifyitems(config, items):
    # torch.compile cases last: their compilation may take minutes, and the budget guard lets
    # them start only when enough of it is left after everything else was measured.
    items.sort(key=lambda item: "timm-compile" in item.nodeid)


_SKIPS = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_sessionfinish(session, exitstatus):
    # Skipped cases with their reasons, for the GPU suite's record (pytest-benchmark lists only results).
    path = os.environ.get("VITKERN_BENCH_SKIPS_JSON")
    if path:
        import json

        with open(path, "w") as f:
            json.dump(_SKIPS, f, indent=1)
