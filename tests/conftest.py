"""Shared test setup: the Triton interpreter on CPU-only machines, the `gpu` marker, and the one
tolerance table every kernel test uses.

Without a CUDA device, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton
kernels run on CPU tensors in the interpreter. Tests import the helpers below with
`from conftest import ...`.
"""

from __future__ import annotations

import os
import subprocess


def _has_cuda_device() -> bool:
    # Decided without importing torch (which may import triton): the driver's tool answers.
    if os.environ.get("VITKERN_TEST_FORCE_INTERPRET") == "1":
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_CUDA = _has_cuda_device()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel launchers allocate outputs with vitkern.kernels.triton._common.empty: NaN-filled under test.
os.environ.setdefault("VITKERN_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = HAS_CUDA and torch.cuda.is_available()
# Where the Triton tests run: the GPU when there is one, else CPU tensors in the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Max |kernel - fp64 reference| allowed, per input dtype, as atol + rtol * |reference|.
# fp16/bf16 entries cover one rounding of the output plus fp32-accumulated dot products of
# length <= 4096; attention and whole blocks also use the ratio test (`assert_ratio`).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=3e-2),
}

# The ratio test of DESIGN.md: kernel error <= RATIO * (error of eager PyTorch in the same dtype) + floor.
RATIO = 2.0


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """The tolerance of `dtype`, optionally scaled (e.g. for gradients summed over many rows)."""
    t = TOLERANCES[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, name: str = "") -> None:
    """Compare in float64 against the oracle with the table's tolerance for `dtype`."""
    t = tol(dtype, scale)
    torch.testing.assert_close(actual.double(), expected.double(), atol=t["atol"], rtol=t["rtol"], msg=lambda m: f"{name}: {m}")


def assert_ratio(actual: torch.Tensor, eager_lowp: torch.Tensor, oracle: torch.Tensor, name: str = "", floor: float = 1e-6) -> None:
    """Ratio test: max |actual - oracle| <= RATIO * max |eager_lowp - oracle| + floor."""
    err = (actual.double() - oracle.double()).abs().max().item()
    base = (eager_lowp.double() - oracle.double()).abs().max().item()
    assert err <= RATIO * base + floor, f"{name}: kernel error {err:.3e} > {RATIO} x eager error {base:.3e} (+{floor:g})"


def assert_max_diff(actual: torch.Tensor, expected: torch.Tensor, bound: float, name: str = "") -> None:
    """max |actual - expected| <= bound (in float64). Fails with one line naming the error and the
    bound: an `assert` on the tensors themselves makes pytest print their reprs, and those of the
    models that produced them, in its explanation."""
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= bound, f"{name + ': ' if name else ''}max |difference| {err:.3e} > bound {bound:g}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def pytest_configure(config):
    # SIGTERM (the GPU suite's stage limit, or any kill) -> KeyboardInterrupt: pytest then ends the
    # session cleanly, so the junit XML (--junitxml) of every finished test is still written. Only
    # in the main thread of the main process (pytest-xdist's controller stops its workers itself).
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and not hasattr(config, "workerinput"):
        def on_sigterm(signum, frame):
            raise KeyboardInterrupt("SIGTERM: the caller's time limit")

        signal.signal(signal.SIGTERM, on_sigterm)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by `make gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small CPU ops: on a busy 2-core machine two
    oversubscribed threads ran them up to 10x slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
