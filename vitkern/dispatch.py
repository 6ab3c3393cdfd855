"""The backend registry: who can run this call, and why not.

Every op family (`vitkern.ops.*`) registers one `Implementation` per backend. An implementation
answers `not_supported_reasons(call)` for a concrete call (its keyword arguments), so the
dispatcher can say exactly why a backend was not used:

* an explicit `backend="triton"` (or ``VITKERN_BACKEND=triton``) that cannot run the call raises
  `BackendUnavailableError` listing every reason;
* `backend="auto"` walks the preference order of the op on the inputs' device and takes the first
  implementation that can run the call; when it skips one it says why, once, at debug level.

The preference order is a small table: measured winners per device (filled from benchmark
records in `benchmarks/results/`) and, until a device has records, the order the design predicts.
Nothing here queries a device at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

logger = logging.getLogger("vitkern.dispatch")

# eager: vitkern.reference, the float64-faithful oracle (explicit softmax, fp32 epilogues);
# triton, cuda: vitkern's fused kernels; torch: torch's own fused ops (vitkern.kernels.aten: addmm,
# F.layer_norm, SDPA, conv2d), the fast path where no vitkern kernel runs (the CPU).
BACKENDS = ("eager", "triton", "cuda", "torch")
OPS = ("patch_embed", "layer_norm", "ln_linear", "attention", "linear")
# Forward-only inspection ops (vitkern.inspect): dispatched the same way, not part of the model's five.
INSPECTION_OPS = ("attention_stats",)

Call = Mapping[str, Any]
ReasonsFn = Callable[[Call], List[str]]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call; the message lists every reason."""


@dataclass(frozen=True)
class Implementation:
    """One op on one backend: the function to call and the test of whether it can run a call."""

    op: str
    backend: str
    fn: Callable[..., Any]
    supports: Optional[ReasonsFn] = None

    def not_supported_reasons(self, call: Call) -> List[str]:
        reasons = list(backend_unavailable_reasons(self.backend))
        if not reasons and self.supports is not None:
            reasons += self.supports(call)
        return reasons


_REGISTRY: Dict[str, Dict[str, Implementation]] = {op: {} for op in OPS + INSPECTION_OPS}


def register(op: str, backend: str, fn: Callable[..., Any], supports: Optional[ReasonsFn] = None) -> Implementation:
    """Register `fn` as `backend`'s implementation of `op` (replacing an earlier one)."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known: {OPS + INSPECTION_OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    impl = Implementation(op, backend, fn, supports)
    _REGISTRY[op][backend] = impl
    return impl


def implementations(op: str) -> Dict[str, Implementation]:
    return dict(_REGISTRY[op])


# --------------------------------------------------------------------------------------------
# Whole-backend availability (cached: it does not change within a process)


def _memoized(fn: Callable[[], Optional[str]]) -> Callable[[], Optional[str]]:
    """Cache a no-argument probe in a plain dict (torch.compile traces a dict lookup cleanly,
    whereas it warns on functools.lru_cache)."""
    cache: Dict[str, Optional[str]] = {}

    @functools.wraps(fn)
    def wrapper() -> Optional[str]:
        if "value" not in cache:
            cache["value"] = fn()
        return cache["value"]

    return wrapper


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read at triton import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_memoized
def _triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"importing triton failed: {type(exc).__name__}: {exc}"
    return None


def triton_importable() -> bool:
    """True when `import triton` works (ops files register Triton implementations only then)."""
    return _triton_import_error() is None


@_memoized
def _cuda_extension_error() -> Optional[str]:
    from vitkern.kernels import cuda as cuda_kernels

    return cuda_kernels.load_error()


def backend_unavailable_reasons(backend: str) -> List[str]:
    """Why `backend` cannot run anything in this process (empty when it can run something)."""
    if backend in ("eager", "torch"):
        return []
    if backend == "triton":
        error = _triton_import_error()
        if error:
            return [error]
        if not triton_interpret() and not torch.cuda.is_available():
            return ["no CUDA device is visible (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"]
        return []
    if backend == "cuda":
        if not torch.cuda.is_available():
            return ["no CUDA device is visible (torch.cuda.is_available() is False)"]
        error = _cuda_extension_error()
        return [error] if error else []
    raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")


def available_backends() -> Dict[str, Tuple[bool, List[str]]]:
    """For each backend: (usable here, reasons it is not). A backend usable here may still decline
    particular calls (dtype, shape); `vitkern.ops.*` says why when asked for it explicitly."""
    out = {}
    for backend in BACKENDS:
        reasons = backend_unavailable_reasons(backend)
        if not reasons:
            missing = [op for op in OPS if backend not in _REGISTRY[op]]
            if len(missing) == len(OPS):
                reasons = ["no op is implemented for this backend in this build"]
        out[backend] = (not reasons, reasons)
    return out


# --------------------------------------------------------------------------------------------
# Preference order for backend="auto"

# Measured winners: {device-name substring: {op: (backend, ...)}}. Filled at run time, the first
# time `auto` dispatches eagerly on a CUDA device, from that device's tuning table
# (vitkern/kernels/triton/configs/<device>.json, "backend_order": written by the GPU suite from a
# record's per-op timings, see `measured_order_from_record`); entries set by hand stay first.
MEASURED_ORDER: Dict[str, Dict[str, Tuple[str, ...]]] = {}
_ORDER_LOADED: Dict[int, bool] = {}


def measured_order_from_record(record: Mapping[str, Any]) -> Dict[str, Tuple[str, ...]]:
    """Per op, the vitkern backends of a GPU-suite record ordered fastest first, then "eager".

    Reads the record's per-op rows ({"op", "mode", "provider": "vitkern-<backend>", "ms_median"};
    benchmarks/results/README.md): forward+backward times where the op has them, else forward.
    The benchmark's op names map to dispatch ops (ln_qkv -> ln_linear, proj_residual -> linear)."""
    op_of = {"patch_embed": "patch_embed", "ln_qkv": "ln_linear", "attention": "attention",
             "proj_residual": "linear", "layer_norm": "layer_norm"}
    times: Dict[str, Dict[str, Dict[str, float]]] = {}
    for row in record.get("op_rows") or record.get("benchmark_rows") or []:
        op, provider, ms = op_of.get(str(row.get("op"))), str(row.get("provider", "")), row.get("ms_median")
        backend = provider.split("-", 1)[1] if provider.startswith("vitkern-") else None
        if op is None or backend not in ("triton", "cuda") or not ms:
            continue
        times.setdefault(op, {}).setdefault(str(row.get("mode")), {})[backend] = float(ms)
    order: Dict[str, Tuple[str, ...]] = {}
    for op, by_mode in times.items():
        timed = by_mode.get("fwdbwd") or by_mode.get("fwd") or {}
        order[op] = (tuple(sorted(timed, key=timed.get)) + tuple(b for b in ("triton", "cuda") if b not in timed)
                     + FALLBACK_ORDER)
    return order


def _load_measured_order(device: torch.device) -> None:
    """Once per device: its tuning table's backend order into MEASURED_ORDER (eager calls only:
    under torch.compile the device is not asked its name and the order known so far is used)."""
    if torch.compiler.is_compiling():
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _ORDER_LOADED.get(index) or not triton_importable():
        return
    _ORDER_LOADED[index] = True
    from vitkern.kernels.triton import _common as triton_common

    name = torch.cuda.get_device_name(index)
    table = triton_common.table_for_device(name)
    if table is not None and table.backend_order:
        MEASURED_ORDER.setdefault(name, {})
        for op, backends in table.backend_order.items():
            MEASURED_ORDER[name].setdefault(op, tuple(backends))

# Until a device has records: fused kernels beat eager. Between the two fused backends nothing is
# measured yet (no GPU record): both pass their tests on the CPU (Triton in its interpreter, CUDA in
# tests/cuda_emu's emulator), and Triton comes first because on Hopper its GEMM-like kernels use wgmma
# (the audit shows it) while csrc/attention.cu uses mma.sync; cuBLASLt's GEMMs may well win the linear
# layers, which the first benchmark record will tell (benchmarks/test_ops.py times both per op).
# After the fused backends, a call they decline (float64, an option they lack) runs on torch's own
# fused ops, and on the oracle only where those cannot take it.
FALLBACK_ORDER: Tuple[str, ...] = ("torch", "eager")
PREDICTED_ORDER: Tuple[str, ...] = ("triton", "cuda") + FALLBACK_ORDER
# On the CPU: torch's best CPU ops (oneDNN GEMMs and convolution, the flash CPU SDPA kernel), never
# slower than timm's modules, which call the same ops (`python -m vitkern.bench --device cpu
# --compare timm` measures it). The Triton interpreter and the CUDA emulator are test vehicles, not
# fast paths: ask for backend="triton" to use the interpreter.
CPU_ORDER: Tuple[str, ...] = FALLBACK_ORDER


def auto_order(op: str, device: torch.device) -> Tuple[str, ...]:
    """Backends to try, best first, for `op` on `device` (CPU_ORDER off CUDA)."""
    if device.type != "cuda":
        return CPU_ORDER
    _load_measured_order(device)
    if MEASURED_ORDER:  # only then ask the device its name (keeps the common path trace-friendly)
        name = torch.cuda.get_device_name(device)
        for key, table in MEASURED_ORDER.items():
            if key in name and op in table:
                return table[op]
    return PREDICTED_ORDER


def auto_backends(device: Any = "cpu") -> Dict[str, str]:
    """For each of the model's ops, the backend `backend="auto"` runs on `device` for a call that
    every backend takes (e.g. fp32 tokens): on the CPU torch's own fused ops ("torch"), on a GPU the
    measured or predicted fused backend. A backend named by VITKERN_BACKEND is what runs instead."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("auto_backends: no CUDA device is visible (torch.cuda.is_available() is False)")
    chosen = {}
    for op in OPS:
        usable = [b for b in auto_order(op, device) if b in _REGISTRY[op] and not backend_unavailable_reasons(b)]
        chosen[op] = usable[0] if usable else "none"
    return chosen


def requested_backend(backend: str) -> str:
    """`backend` unless it is "auto" and VITKERN_BACKEND names one."""
    if backend == "auto":
        env = os.environ.get("VITKERN_BACKEND", "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"VITKERN_BACKEND must be one of {('auto',) + BACKENDS}, got {env!r}")
            return env
        return "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


_LOGGED: set = set()


def select(op: str, backend: str, device: torch.device, call: Call) -> Implementation:
    """The implementation of `op` that runs `call` (its keyword arguments) on `device`."""
    backend = requested_backend(backend)
    impls = _REGISTRY[op]
    if op in OPS and _rows_empty(call) and "eager" in impls:
        # An empty batch (timm's models accept one): nothing for a kernel to compute, and a
        # zero-sized grid is an error on CUDA. Any backend's answer is the eager op's empty result,
        # whose autograd edge gives the zero gradients timm's do.
        return impls["eager"]
    if backend != "auto":
        impl = impls.get(backend)
        reasons = (
            [f"vitkern has no {backend} implementation of {op} in this build"]
            if impl is None
            else impl.not_supported_reasons(call)
        )
        if reasons:
            raise BackendUnavailableError(
                f"backend={backend!r} cannot run vitkern.ops.{op} here:\n  - " + "\n  - ".join(reasons)
            )
        return impl
    skipped: List[str] = []
    for name in auto_order(op, device):
        impl = impls.get(name)
        reasons = ["not implemented"] if impl is None else impl.not_supported_reasons(call)
        if not reasons:
            if skipped:
                _log_once(op, name, skipped)
            return impl
        skipped.append(f"{name}: " + "; ".join(reasons))
    raise BackendUnavailableError(f"no backend can run vitkern.ops.{op} here:\n  - " + "\n  - ".join(skipped))


def _rows_empty(call: Call) -> bool:
    """The call's first tensor (x or qkv: the rows every op maps) has no elements."""
    first = next((v for v in call.values() if isinstance(v, torch.Tensor)), None)
    return first is not None and first.numel() == 0


def _log_once(op: str, chosen: str, skipped: Sequence[str]) -> None:
    key = (op, chosen, tuple(skipped))
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.debug("vitkern.ops.%s: auto chose %s; skipped %s", op, chosen, " | ".join(skipped))
