"""Helpers every Triton kernel file uses: output allocation (poisoned under test), `tuned` (a
kernel with its configs, autotune key and M bucket, whose config comes from the device's tuning
table when it has one: see the tuning section below), the one launch path, and the spec a kernel
gives `vitkern.audit`.

Importing this module imports triton; the ops layer imports kernel files only when triton is
importable.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1 at triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_index_compat() -> None:
    """Make the Triton interpreter's `tensor.__index__` work with NumPy >= 2.4.

    The interpreter holds every scalar (program ids, int arguments) as a shape-(1,) array, and
    `range(start, end, step)` in a kernel calls `__index__` on them. Triton 3.6 implements it as
    `int(self.handle.data)`, which NumPy 2.4 turned from a deprecation into a TypeError ("only
    0-dimensional arrays can be converted to Python scalars"), so under triton 3.6 + numpy 2.4
    every interpreted kernel with a runtime loop bound fails; Triton 3.8 squeezes the array first.
    Feature-detected, not version-parsed: the interpreter's own `__index__` is tried on a
    shape-(1,) array, and only when that raises is it wrapped to squeeze. Compiled (GPU) kernels
    never reach this code.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch_tensor is None or scope_type is None or getattr(patch_tensor, "_vitkern_compat", False):
        return

    class _Probe:
        class handle:
            data = np.array([1], dtype=np.int32)

    scope = scope_type()
    try:
        patch_tensor(tl.core.tensor, scope)
        try:
            tl.core.tensor.__index__(_Probe())
            return  # this interpreter already handles shape-(1,) scalars (Triton >= 3.8)
        except TypeError:
            pass
    finally:
        scope.restore()

    def patched(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))

    patched._vitkern_compat = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if interpreting():
    _interpreter_index_compat()


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, but filled with NaN when VITKERN_POISON_OUTPUTS=1 (the tests set it), so an
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("VITKERN_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out



@dataclass
class KernelSpec:
    """One compilable instance of a kernel, for `python -m vitkern.audit`.

    `signature` maps every non-constexpr argument to its Triton type ("*fp16", "i32", "fp32", ...);
    `constexprs` gives every tl.constexpr argument. `gemm_like` kernels must use wgmma on sm_90.
    """

    name: str
    fn: Callable[..., Any]
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    dtype: str = "fp16"
    gemm_like: bool = False
    label: str = field(default="")
    # Compute capabilities (major * 10 + minor) the config never runs on (`not_on`): not compiled
    # for them.
    not_on: Tuple[int, ...] = ()


def _is_fake_or_meta(value: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(value, torch.Tensor) and (is_fake(value) or value.device.type == "meta")


# Serializes interpreted launches (TRITON_INTERPRET=1) across threads; see _Launcher. Reentrant, so
# a launch made from inside one (none today) could not deadlock.
_INTERPRETER_LOCK = threading.RLock()


class _Launcher:
    """`launcher(kernel)[grid](*args)`: the one way every vitkern launcher starts a kernel.

    On a GPU it is `torch.library.wrap_triton(kernel)[grid](...)`, which launches outside tracing
    and is traced as a kernel call inside a `torch.library.triton_op` (torch.compile, opcheck).
    In the interpreter wrap_triton hands back the interpreted kernel itself, which must not run on
    the fake tensors of torch.library's fake path: there the launch is skipped (the launcher has
    already allocated its outputs, which is all the fake path needs).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            counter = _COUNTER[0]
            if counter is not None:  # a dry run: count what this launch would compile and tune, launch nothing
                counter.record(self.kernel, args, kwargs)
                return
            if interpreting() and any(_is_fake_or_meta(a) for a in (*args, *kwargs.values())):
                return
            kernel, after = self.kernel, None
            if isinstance(kernel, Tuned):  # the table's config, or an autotuner over the pruned list
                kernel, after = kernel.resolve(args, kwargs)
            if interpreting():
                # The interpreter runs a launch by patching triton.language's functions for its
                # duration (restored after) and stepping one process-wide builder's program id: a
                # second thread's launch found them restored mid-kernel ("Did you forget to add
                # @triton.jit ?") or moved its program ids. One interpreted launch at a time;
                # compiled launches take no lock.
                with _INTERPRETER_LOCK:
                    kernel[grid](*args, **kwargs)
            else:
                torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
            if after is not None:
                after()

        return launch


def launcher(kernel: Any) -> _Launcher:
    return _Launcher(kernel)



def library_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator registering a launcher-calling function as the torch.library op `name`.

    On a GPU: `torch.library.triton_op`, so torch.compile sees the Triton kernels themselves. In
    the interpreter: an opaque `torch.library.custom_op` whose fake implementation is the same
    function (its launches are skipped on fake tensors, see `launcher`), because the interpreted
    kernels cannot be traced; the kernel code is the same either way.
    """
    if not interpreting():
        return torch.library.triton_op(name, mutates_args=())

    def register(fn: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register


# ---------------------------------------------------------------------------------------------
# Tuned kernels: per-device tuning tables, M buckets, autotune records, launch counting.
#
# `tuned(kernel, configs, key=[...], name=..., rows="M")` replaces `triton.autotune(...)`. At a
# launch the config comes, in this order, from:
#   1. a forced config (`force_config`: the every-config test runs each config once);
#   2. the tuning table of the launching device (configs/<device>.json, e.g. nvidia_h200.json,
#      written by `scripts/gpu_suite.py --run sweep`): the entry with the same key values and
#      dtype whose M bucket is nearest (in log2) to this launch's;
#   3. otherwise Triton's autotuner over a pruned list: the configs the table picked for this kernel
#      at other keys when it has any, else every config (minus what the kernel's own `prune`
#      drops; VITKERN_TUNING_TABLES=0, as in the sweep, ignores the table). One autotuner per M
#      bucket, so a config tuned on the tests' small M is never reused at batch 256 (Triton's own
#      key holds only the kernel arguments named in `key`).
# In the interpreter only the first config runs (it cannot benchmark). Tables are read on the first
# launch on a CUDA device, from the device name of the launching tensor: nothing at import.
# Every autotune result (kernel, key, M bucket, every config's time) is kept in `AUTOTUNE_RESULTS`
# and appended as one JSON line to $VITKERN_AUTOTUNE_LOG when set (the GPU suite's record reads it).

TABLE_SCHEMA = "vitkern.tuning/1"
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Every Tuned kernel by name (attention builds its per-tier kernels on first use).
TUNED: Dict[str, "Tuned"] = {}
AUTOTUNE_RESULTS: List[Dict[str, Any]] = []
_FORCED: Dict[str, int] = {}
_TABLES: Dict[str, Optional["TuningTable"]] = {}
_LOCK = threading.Lock()
_COUNTER: List[Optional["LaunchCounter"]] = [None]


def device_table_name(device_name: str) -> str:
    """The table file stem of a device: 'NVIDIA H200' -> 'nvidia_h200'."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "unknown_device"


def tuning_dir() -> str:
    """Where the tables live: $VITKERN_TUNING_DIR, else the committed vitkern/kernels/triton/configs/."""
    return os.environ.get("VITKERN_TUNING_DIR") or CONFIGS_DIR


def tables_enabled() -> bool:
    """VITKERN_TUNING_TABLES=0 ignores every table (the sweep times every config itself)."""
    return os.environ.get("VITKERN_TUNING_TABLES", "1").strip() not in ("0", "false", "no")


def bucket_of(rows: int) -> int:
    """The M bucket of a launch: its row count rounded up to a power of two (1 for 0 or 1 rows)."""
    rows = int(rows)
    return 1 if rows <= 1 else triton.next_power_of_2(rows)


def config_dict(cfg: triton.Config) -> Dict[str, Any]:
    """A config as the tables store it: its meta-parameters, num_warps and num_stages."""
    return {"kwargs": dict(sorted(cfg.kwargs.items())), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def config_label(cfg: triton.Config) -> str:
    meta = " ".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{meta} w{cfg.num_warps} s{cfg.num_stages}"


def _json_value(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


@dataclass
class TuningTable:
    """One device's table: {kernel name: [entry]}, entry = {"key": {...}, "bucket": int,
    "config": config_dict, "ms": {config label: ms}}; plus the per-op backend order measured on
    that device ({op: [backend, ...]}), which `vitkern.dispatch` reads."""

    path: str
    device: str
    kernels: Dict[str, List[Dict[str, Any]]]
    backend_order: Dict[str, List[str]]
    meta: Dict[str, Any] = field(default_factory=dict)

    def lookup(self, kernel: str, key: Dict[str, Any], bucket: int) -> Optional[Dict[str, Any]]:
        """The config of the entry with this kernel and key whose M bucket is nearest (log2) to
        `bucket` (the smaller bucket on a tie), or None."""
        same = [e for e in self.kernels.get(kernel, []) if e.get("key") == key]
        if not same:
            return None
        target = math.log2(max(1, bucket))
        best = min(same, key=lambda e: (abs(math.log2(max(1, int(e["bucket"]))) - target), int(e["bucket"])))
        return best["config"]

    def winners(self, kernel: str, dtype: Optional[str]) -> List[Dict[str, Any]]:
        """Distinct configs the table picked for `kernel` (at any key) in `dtype`."""
        out: List[Dict[str, Any]] = []
        for e in self.kernels.get(kernel, []):
            if (dtype is None or e.get("key", {}).get("dtype") == dtype) and e["config"] not in out:
                out.append(e["config"])
        return out


def load_table(path: str) -> TuningTable:
    """Parse one table file; ValueError naming the file and the field when it is malformed."""
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise ValueError(f"tuning table {path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != TABLE_SCHEMA:
        raise ValueError(f"tuning table {path}: schema must be {TABLE_SCHEMA!r}, got {data.get('schema') if isinstance(data, dict) else type(data).__name__!r}")
    kernels = data.get("kernels", {})
    if not isinstance(kernels, dict):
        raise ValueError(f"tuning table {path}: 'kernels' must map kernel names to lists of entries")
    for name, entries in kernels.items():
        for i, e in enumerate(entries):
            missing = [k for k in ("key", "bucket", "config") if k not in e]
            if missing:
                raise ValueError(f"tuning table {path}: kernels[{name!r}][{i}] lacks {missing}")
            cfg = e["config"]
            if not isinstance(cfg, dict) or not {"kwargs", "num_warps", "num_stages"} <= set(cfg):
                raise ValueError(f"tuning table {path}: kernels[{name!r}][{i}].config must have kwargs, num_warps, num_stages")
    order = data.get("backend_order", {})
    if not isinstance(order, dict):
        raise ValueError(f"tuning table {path}: 'backend_order' must map op names to lists of backends")
    meta = {k: v for k, v in data.items() if k not in ("kernels", "backend_order")}
    return TuningTable(path, str(data.get("device", "")), kernels, {k: list(v) for k, v in order.items()}, meta)


def table_for_device(device_name: str) -> Optional[TuningTable]:
    """The table of `device_name` from `tuning_dir()` (None when there is none or tables are off);
    read once per process and device."""
    if not tables_enabled():
        return None
    path = os.path.join(tuning_dir(), device_table_name(device_name) + ".json")
    with _LOCK:
        if path not in _TABLES:
            _TABLES[path] = load_table(path) if os.path.exists(path) else None
        return _TABLES[path]


def clear_table_cache() -> None:
    """Forget the tables read so far, and the configs launches took from them (after the sweep
    writes a table, or in tests)."""
    with _LOCK:
        _TABLES.clear()
        for t in TUNED.values():
            t._resolved.clear()


def write_table_entry(path: str, device: str, kernel: str, key: Dict[str, Any], bucket: int,
                      config: Dict[str, Any], ms: Dict[str, float], meta: Optional[Dict[str, Any]] = None) -> None:
    """Add or replace one entry of the table at `path` (created if missing), atomically (write a
    temporary file, then rename), so a sweep cut at any moment leaves a valid partial table."""
    data: Dict[str, Any] = {"schema": TABLE_SCHEMA, "device": device, "kernels": {}, "backend_order": {}}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(meta or {})
    entries = data.setdefault("kernels", {}).setdefault(kernel, [])
    entries[:] = [e for e in entries if not (e["key"] == key and int(e["bucket"]) == int(bucket))]
    entries.append({"key": key, "bucket": int(bucket), "config": config, "ms": ms})
    entries.sort(key=lambda e: (json.dumps(e["key"], sort_keys=True), e["bucket"]))
    _write_json_atomic(path, data)


def write_backend_order(path: str, device: str, order: Dict[str, List[str]]) -> None:
    """Set the table's measured per-op backend order (read by `vitkern.dispatch`)."""
    data: Dict[str, Any] = {"schema": TABLE_SCHEMA, "device": device, "kernels": {}, "backend_order": {}}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["backend_order"] = {op: list(b) for op, b in order.items()}
    _write_json_atomic(path, data)


def _write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def all_tuned() -> Dict[str, "Tuned"]:
    """Every Tuned kernel of the kernel files, by name (imports them; a file whose tuned kernels
    are built on first use, per tier, as attention's `_tuned(kernel, tier)` over `CONFIGS`, has
    them built here)."""
    import importlib
    import pkgutil

    package = importlib.import_module(__package__ or "vitkern.kernels.triton")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        build, tiers = getattr(module, "_tuned", None), getattr(module, "CONFIGS", None)
        if callable(build) and isinstance(tiers, dict):
            for tier, kernels in tiers.items():
                for kernel in kernels:
                    build(kernel, tier)
    return dict(TUNED)


def table_problems(table: TuningTable) -> List[str]:
    """What is wrong with a table's entries against the code (empty when nothing): a kernel that no
    longer exists, a key whose names differ from the kernel's, a bucket that is no power of two,
    a config that is not in the kernel's list."""
    tuned_kernels = all_tuned()
    problems = []
    for name, entries in table.kernels.items():
        t = tuned_kernels.get(name)
        if t is None:
            problems.append(f"{name}: no tuned kernel has this name")
            continue
        configs = [config_dict(c) for c in t.configs]
        for i, e in enumerate(entries):
            where = f"{name}[{i}] ({e.get('key')}, bucket {e.get('bucket')})"
            if sorted(e["key"]) != sorted(t.key + ["dtype"]):
                problems.append(f"{where}: key names {sorted(e['key'])} != {sorted(t.key + ['dtype'])}")
            b = int(e["bucket"])
            if b < 1 or b & (b - 1):
                problems.append(f"{where}: bucket {b} is not a power of two")
            if e["config"] not in configs:
                problems.append(f"{where}: config {e['config']} is not one of the kernel's {len(configs)} configs")
    return problems


@contextmanager
def force_config(name: str, index: int) -> Iterator[None]:
    """Launch Tuned kernel `name` ("*": every Tuned kernel) with config `index` of its pruned list
    (modulo its length), bypassing table and autotuner, inside the block (also in the interpreter)."""
    previous = _FORCED.get(name)
    _FORCED[name] = index
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(name, None)
        else:
            _FORCED[name] = previous


def _first_tensor(named: Dict[str, Any]) -> Optional[torch.Tensor]:
    return next((v for v in named.values() if isinstance(v, torch.Tensor)), None)


class Tuned:
    """A @triton.jit kernel with its config list and autotune key; launched through `launcher`
    (or `tuned[grid](...)`), which picks the config (see this section's comment).

    `rows` names the argument holding the launch's row count M (or is a function of the named
    arguments), whose power-of-two bucket is part of the tuning key; `prune(configs, named_args)`
    drops configs that cannot run for these arguments (e.g. too much shared memory)."""

    def __init__(self, fn: Any, configs: Sequence[triton.Config], key: Sequence[str], name: str,
                 rows: Any = "M", prune: Optional[Callable[..., List[triton.Config]]] = None) -> None:
        if not configs:
            raise ValueError(f"tuned({name!r}): configs must not be empty")
        arg_names = list(fn.arg_names)
        unknown = [k for k in key if k not in arg_names]
        if unknown:
            raise ValueError(f"tuned({name!r}): key names {unknown} are not arguments of the kernel {arg_names}")
        if isinstance(rows, str) and rows not in arg_names:
            raise ValueError(f"tuned({name!r}): rows={rows!r} is not an argument of the kernel {arg_names}")
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.name = name
        self.rows = rows
        self.prune = prune
        self.arg_names = arg_names
        self._autotuners: Dict[Tuple[int, Tuple[int, ...]], Any] = {}
        self._resolved: Dict[Tuple[Any, ...], Any] = {}
        self._key_pos = [(k, arg_names.index(k)) for k in self.key]
        self._rows_pos = arg_names.index(rows) if isinstance(rows, str) else -1
        TUNED[name] = self

    def __repr__(self) -> str:
        return f"Tuned({self.name}, {len(self.configs)} configs, key={self.key}, rows={self.rows!r})"

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return _Launcher(self)[grid]

    # -- the tuning key ---------------------------------------------------------------------
    def named_args(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        return {**dict(zip(self.arg_names, args)), **kwargs}

    def tuning_key(self, named: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
        """({key argument: value, ..., "dtype": first tensor's dtype}, M bucket) of a launch."""
        key = {k: _json_value(named[k]) for k in self.key if k in named}
        first = _first_tensor(named)
        key["dtype"] = str(first.dtype).replace("torch.", "") if first is not None else None
        rows = self.rows(named) if callable(self.rows) else named[self.rows]
        # A symbolic row count (tracing with dynamic shapes) gets bucket 0 rather than a guard that
        # would specialize the graph on it: the autotuner then tunes at run time.
        return key, bucket_of(rows) if isinstance(rows, int) else 0

    def candidates(self, named: Dict[str, Any]) -> List[triton.Config]:
        """The configs that can run these arguments (the kernel's prune applied; never empty)."""
        if self.prune is None:
            return list(self.configs)
        return list(self.prune(list(self.configs), named)) or self.configs[:1]

    def plan(self, named: Dict[str, Any], device_name: Optional[str]) -> Tuple[List[triton.Config], str]:
        """(configs to choose among, where they come from: "forced", "table", "interpreter",
        "pruned by table", "autotune") for a launch on `device_name` (None: no table)."""
        cands = self.candidates(named)
        forced = _FORCED.get(self.name, _FORCED.get("*"))
        if forced is not None:
            return [cands[forced % len(cands)]], "forced"
        if device_name is None and interpreting():
            return cands[:1], "interpreter"
        table = table_for_device(device_name) if device_name else None
        if table is not None:
            key, bucket = self.tuning_key(named)
            hit = table.lookup(self.name, key, bucket)
            match = [c for c in cands if config_dict(c) == hit] if hit else []
            if match:
                return match[:1], "table"
            won = table.winners(self.name, key["dtype"])
            pruned = [c for c in cands if config_dict(c) in won]
            if pruned:
                return pruned, "pruned by table"
        return cands, "autotune"

    # -- launching --------------------------------------------------------------------------
    def _fast_key(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
        """The launch's key values, rows, first dtype and device, read without building dicts:
        a repeated launch then costs one lookup (eager ViT steps launch ~100 kernels)."""
        try:
            values = tuple(kwargs[k] if k in kwargs else args[i] for k, i in self._key_pos)
            if callable(self.rows):
                rows = self.rows(self.named_args(args, kwargs))
            else:
                rows = kwargs[self.rows] if self.rows in kwargs else args[self._rows_pos]
            first = next(a for a in args if isinstance(a, torch.Tensor))
        except (IndexError, StopIteration, KeyError):
            return None
        key = values + (rows, first.dtype, first.device)
        try:
            hash(key)
        except TypeError:  # symbolic sizes (torch.compile with dynamic shapes): no fast path
            return None
        return key

    def resolve(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Tuple[Any, Optional[Callable[[], None]]]:
        """(the Triton kernel object to launch, a callback recording a fresh autotune result)."""
        fast = None if _FORCED else self._fast_key(args, kwargs)
        if fast is not None:
            hit = self._resolved.get(fast)
            if hit is not None:
                return hit, None
        at, after = self._resolve(args, kwargs)
        if fast is not None:
            self._resolved[fast] = at  # from now on this launch's choice (tuned or not) is settled
        return at, after

    def _resolve(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Tuple[Any, Optional[Callable[[], None]]]:
        named = self.named_args(args, kwargs)
        first = _first_tensor(named)
        device_name = None
        if first is not None and first.device.type == "cuda" and not interpreting():
            device_name = torch.cuda.get_device_name(first.device)
        pool, source = self.plan(named, device_name)
        if interpreting() and source != "forced":
            pool = pool[:1]
        key, bucket = self.tuning_key(named)
        ids = tuple(self.configs.index(c) for c in pool)
        tuner_key = (bucket, ids)
        with _LOCK:
            at = self._autotuners.get(tuner_key)
            if at is None:
                at = triton.autotune(configs=pool, key=self.key)(self.fn)
                self._autotuners[tuner_key] = at
        if len(pool) <= 1:
            return at, None
        check_not_tuning_in_capture(self.name, at, args, kwargs, first, source, len(pool))
        seen = len(at.cache)

        def after() -> None:
            if len(at.cache) > seen:
                self._record(at, key, bucket, source, device_name)

        return at, after

    def _record(self, at: Any, key: Dict[str, Any], bucket: int, source: str, device_name: Optional[str]) -> None:
        timings = getattr(at, "configs_timings", None) or {}
        ms = {}
        for cfg, t in timings.items():
            t = t[0] if isinstance(t, (list, tuple)) else t
            ms[config_label(cfg)] = float(t) if t is not None and math.isfinite(float(t)) else None
        best = getattr(at, "best_config", None)
        result = {"kernel": self.name, "key": key, "bucket": bucket, "source": source,
                  "best": config_label(best) if best is not None else None,
                  "best_config": config_dict(best) if best is not None else None,
                  "ms": ms, "bench_s": getattr(at, "bench_time", None), "device": device_name}
        AUTOTUNE_RESULTS.append(result)
        sweep = os.environ.get("VITKERN_TUNING_SWEEP_TABLE")
        if sweep and best is not None and device_name:
            # the GPU suite's sweep: each result joins the device's table as soon as it is known
            write_table_entry(sweep, device_name, self.name, key, bucket, config_dict(best), ms)
        path = os.environ.get("VITKERN_AUTOTUNE_LOG")
        if path:
            with open(path, "a") as f:  # one short line per result: appends from several processes stay whole
                f.write(json.dumps(result) + "\n")


# -- CUDA graphs: no autotuning inside a capture ------------------------------------------------


def autotuner_key(at: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
    """The key Triton's `Autotuner.run` caches a launch's tuned config under (the `key` arguments'
    values, then the dtypes of the tensor arguments: triton 3.2 to 3.8), or None when it cannot be
    formed (another Triton)."""
    try:
        named = {**dict(zip(at.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in at.arg_names}
        key = [named[k] for k in at.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuple(key)
    except (AttributeError, TypeError):
        return None


def would_autotune(at: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """True when launching the autotuner `at` with these arguments benchmarks its configs first
    (more than one config, none cached for this key)."""
    if len(getattr(at, "configs", ())) <= 1:
        return False
    key = autotuner_key(at, args, kwargs)
    return key is None or key not in getattr(at, "cache", {})


def stream_capturing(tensor: Optional[torch.Tensor]) -> bool:
    """True while the current CUDA stream of `tensor`'s device is being captured into a CUDA graph
    (False off a GPU, and for fake tensors under tracing)."""
    if tensor is None or tensor.device.type != "cuda" or _is_fake_or_meta(tensor):
        return False
    return torch.cuda.is_current_stream_capturing()


def check_not_tuning_in_capture(name: str, at: Any, args: Sequence[Any], kwargs: Dict[str, Any],
                                first: Optional[torch.Tensor], source: str, configs: int) -> None:
    """Raise instead of autotuning inside a CUDA graph capture: the autotuner's benchmark
    synchronizes the device and times launches, which a capture forbids (and would record). The
    configs must be decided before capture: by the device's tuning table, or by running the same
    shapes once (a warm-up; `vitkern.export.cuda_graph` does both)."""
    if stream_capturing(first) and would_autotune(at, args, kwargs):
        raise RuntimeError(
            f"vitkern: Triton kernel {name} would autotune {configs} configs ({source}) inside a CUDA graph "
            "capture, which cannot synchronize or benchmark. Run the model once at these shapes before capturing "
            "(a warm-up decides the configs), or give this device a tuning table "
            "(vitkern/kernels/triton/configs/README.md)")


def not_on(config: triton.Config, *archs: int) -> triton.Config:
    """`config`, marked not to run on these compute capabilities (major * 10 + minor, e.g. 80 for
    sm_80): where ptxas spills one tile on one arch and its replacement loses wgmma on another, each
    arch keeps its clean one. `arch_pruner` drops it there; the audit does not compile it there."""
    config.vitkern_not_on = tuple(archs)
    return config


def excluded_archs(config: triton.Config) -> Tuple[int, ...]:
    """The archs `not_on` excluded `config` from (empty: it runs everywhere)."""
    return getattr(config, "vitkern_not_on", ())


def arch_pruner(configs: List[triton.Config], named_args: Dict[str, Any], **_: Any) -> List[triton.Config]:
    """A `prune` for `tuned`: the configs that may run on the device of the first tensor argument.
    Off a GPU (the interpreter) every config stays; the interpreter runs the first."""
    first = _first_tensor(named_args)
    if first is None or first.device.type != "cuda":
        return configs
    major, minor = torch.cuda.get_device_capability(first.device)
    return [c for c in configs if major * 10 + minor not in excluded_archs(c)]


def tuned(fn: Any = None, configs: Sequence[triton.Config] = (), *, key: Sequence[str], name: str,
          rows: Any = "M", prune: Optional[Callable[..., List[triton.Config]]] = None) -> Any:
    """`Tuned(fn, configs, key, name, rows, prune)`; without `fn`, a decorator for a @triton.jit kernel."""
    if fn is None:
        return lambda f: Tuned(f, configs, key, name, rows, prune)
    return Tuned(fn, configs, key, name, rows, prune)


# -- counting what launches would compile and tune (the GPU suite's dry run) --------------------


def _kernel_name(kernel: Any) -> str:
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", type(kernel).__name__)


def _specialization(args: Sequence[Any]) -> Tuple[Any, ...]:
    """What Triton specializes a compile on, per runtime argument: a tensor's dtype (pointers
    taken as 16-byte aligned, as torch allocations are), an int's value 1, divisibility by 16 and
    width past int32, a float's type, a bool's or None's value."""
    out: List[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(str(a.dtype))
        elif isinstance(a, bool) or a is None:
            out.append(a)
        elif isinstance(a, int):
            out.append("1" if a == 1 else ("i64" if abs(a) >= 2**31 else "i32") + (":16" if a % 16 == 0 else ""))
        elif isinstance(a, float):
            out.append("fp32")
        else:
            out.append(type(a).__name__)
    return tuple(out)


class LaunchCounter:
    """What a sequence of launches would cost on a GPU, counted without compiling: distinct
    compiles (kernel x config x constexprs x specialization; Triton's disk cache keeps them across
    processes, so one counter spans a whole run) and autotune benchmarks (configs timed per
    distinct tuning key and M bucket, per process: call `new_process()` between stages)."""

    def __init__(self, device_name: Optional[str] = None) -> None:
        self.device_name = device_name
        self.compiles: set = set()
        self.tuned_keys: set = set()
        self.launches = 0
        self.stage_compiles = 0
        self.stage_tuned_configs = 0
        self.stage_table_hits = 0

    def new_process(self) -> None:
        self.tuned_keys = set()

    def reset_stage(self) -> Dict[str, int]:
        """The counts since the last reset: {"compiles", "autotune_configs", "table_hits", "launches"}."""
        out = {"compiles": self.stage_compiles, "autotune_configs": self.stage_tuned_configs,
               "table_hits": self.stage_table_hits, "launches": self.launches}
        self.stage_compiles = self.stage_tuned_configs = self.stage_table_hits = self.launches = 0
        return out

    def _compile(self, ident: Tuple[Any, ...]) -> None:
        if ident not in self.compiles:
            self.compiles.add(ident)
            self.stage_compiles += 1

    def record(self, kernel: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> None:
        self.launches += 1
        spec = _specialization(args)
        constexprs = tuple(sorted((k, _json_value(v)) for k, v in kwargs.items()))
        if isinstance(kernel, Tuned):
            named = kernel.named_args(args, kwargs)
            pool, source = kernel.plan(named, self.device_name)
            if source == "interpreter":  # the count is of a GPU run: every candidate is in play
                pool, source = kernel.candidates(named), "autotune"
            key, bucket = kernel.tuning_key(named)
            if source == "table":
                self.stage_table_hits += 1
            tuning = (kernel.name, json.dumps(key, sort_keys=True), bucket, tuple(kernel.configs.index(c) for c in pool))
            if len(pool) > 1 and tuning not in self.tuned_keys:
                self.tuned_keys.add(tuning)
                self.stage_tuned_configs += len(pool)
            for cfg in pool:
                self._compile((kernel.name, json.dumps(config_dict(cfg), sort_keys=True), constexprs, spec))
            return
        name = _kernel_name(kernel)
        configs = getattr(kernel, "configs", None)  # a bare triton.autotune: every config, no bucket
        if configs:
            tuning = (name, tuple(kwargs.items()), spec)
            if len(configs) > 1 and tuning not in self.tuned_keys:
                self.tuned_keys.add(tuning)
                self.stage_tuned_configs += len(configs)
            for cfg in configs:
                self._compile((name, json.dumps(config_dict(cfg), sort_keys=True), constexprs, spec))
            return
        self._compile((name, "", constexprs, spec))


@contextmanager
def counting(device_name: Optional[str] = None, counter: Optional[LaunchCounter] = None) -> Iterator[LaunchCounter]:
    """Inside the block every launch through `launcher` is counted by the counter and skipped (run
    the ops on meta tensors). `device_name` selects the tuning table the count assumes."""
    counter = counter or LaunchCounter(device_name)
    previous = _COUNTER[0]
    _COUNTER[0] = counter
    try:
        yield counter
    finally:
        _COUNTER[0] = previous
