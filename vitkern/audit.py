"""`python -m vitkern.audit`: compile every Triton kernel config ahead of time for sm_80 and sm_90.

No GPU is needed: each `KernelSpec` listed in a kernel file's `AUDIT_SPECS` is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; the shared memory comes from
the compiled kernel's metadata, registers and spill bytes from `ptxas -v` on its PTX (sm_90 is
assembled as sm_90a, as Triton does for wgmma), and the tensor-core instruction from the PTX text.

Specs describe the specialization the runtime would apply: every pointer is taken as 16-byte
aligned (torch allocations are), an int typed "i32:16" (Triton's AOT notation) as a multiple of
16, and a unit stride is best given as a constexpr 1 (the JIT turns ints equal to 1 into
constants). Without these, loads look unaligned and the audit reports a pessimistic kernel.

The audit has one row per (spec, arch). The exit status is non-zero when any row fails: a
compile error, a spill, shared memory above the arch's per-block limit, or a `gemm_like`
fp16/bf16 spec that does not use wgmma on sm_90. A progress bar runs on stderr while it
compiles; then it prints the failing rows (every row with `--all`) and a summary, and the last
lines of a failing audit name each failing config and its reason. `--json PATH` writes every row.

A compile that raises is retried once, alone, before it counts as failing: the compiler is
deterministic, so a second failure is the kernel's, while a first failure that does not repeat
came from the machine (a ptxas or worker process killed or refused under memory or process
pressure) and is reported as a note, not a failure. Compile processes default to the cores this
process may use (affinity, cgroup quota, SMT siblings once: vitkern/_threads.py).

Usage: python -m vitkern.audit [--arch 80 90] [--module layer_norm ...] [--one-per-kernel]
                               [--jobs N] [--json PATH] [--all]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

ARCHS = (80, 90)
# Most dynamic shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KERNEL_PACKAGE = "vitkern.kernels.triton"


@dataclasses.dataclass
class Row:
    """One audited (spec, arch): what the compiler produced and whether it passes."""

    module: str
    kernel: str
    config: str
    dtype: str
    arch: int
    gemm_like: bool
    shared: Optional[int] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    mma: str = "-"
    error: str = ""
    problems: List[str] = dataclasses.field(default_factory=list)
    note: str = ""  # e.g. a first compile failure that did not repeat on the retry

    @property
    def spill_bytes(self) -> Optional[int]:
        if self.spill_stores is None:
            return None
        return self.spill_stores + (self.spill_loads or 0)

    @property
    def ok(self) -> bool:
        return not self.problems


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_modules() -> List[str]:
    """Names of the kernel files (vitkern.kernels.triton.<name>), helpers (_common) excluded."""
    pkg = importlib.import_module(KERNEL_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def load_specs(modules: Optional[Sequence[str]] = None) -> Tuple[List[Tuple[str, int, Any]], List[str], List[str]]:
    """(specs as (module, index, spec), modules without AUDIT_SPECS, import errors)."""
    specs, missing, errors = [], [], []
    for name in modules if modules is not None else kernel_modules():
        try:
            mod = importlib.import_module(f"{KERNEL_PACKAGE}.{name}")
        except Exception as exc:  # a broken kernel file is an audit failure, reported by name
            errors.append(f"{name}: import failed: {type(exc).__name__}: {exc}")
            continue
        module_specs = getattr(mod, "AUDIT_SPECS", None)
        if module_specs is None:
            missing.append(name)
            continue
        specs.extend((name, i, spec) for i, spec in enumerate(module_specs))
    return specs, missing, errors


def one_per_kernel(specs: List[Tuple[str, int, Any]]) -> List[Tuple[str, int, Any]]:
    """One spec per (module, kernel): its first bf16 spec (the dtype whose GEMMs must use wgmma),
    else its first. A quick audit that still compiles every kernel for every arch."""
    chosen: Dict[Tuple[str, str], Tuple[str, int, Any]] = {}
    for module, i, spec in specs:
        key = (module, spec.name)
        if key not in chosen or (chosen[key][2].dtype != "bf16" and spec.dtype == "bf16"):
            chosen[key] = (module, i, spec)
    return sorted(chosen.values(), key=lambda item: (item[0], item[1]))


def ptxas_path() -> str:
    """Triton's bundled ptxas (it understands the PTX version Triton emits), else CUDA's."""
    try:
        import triton.backends.nvidia as nv

        bundled = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    for candidate in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("no ptxas found (neither triton's bundled one nor CUDA's)")


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, arch: int, kernel: str) -> Tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of `kernel` from `ptxas -v`."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas_path(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-2000:]}")
    # ptxas reports per entry function; Triton emits one entry, but take the block for `kernel`.
    text = proc.stderr + proc.stdout
    block = text.split(f"Function properties for {kernel}", 1)[-1]
    regs = _RE_REGS.search(block) or _RE_REGS.search(text)
    spill = _RE_SPILL.search(block) or _RE_SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read registers/spills from ptxas -v:\n{text[-2000:]}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def mma_kind(ptx: str) -> str:
    kinds = []
    if "wgmma.mma_async" in ptx:
        kinds.append("wgmma")
    if re.search(r"\bmma\.sync\b", ptx):
        kinds.append("mma.sync")
    return "+".join(kinds) or "-"


def _ast_source(spec):
    from triton.compiler import ASTSource

    # Triton >= 3.2 wants every argument in the signature, constexprs typed "constexpr". The
    # runtime marks pointers (torch allocations are 16-byte aligned) and ints that are multiples
    # of 16 with tt.divisibility=16, which decides vectorized loads and cp.async/TMA use: the
    # audit does the same for every pointer and for ints typed "i32:16" (Triton's AOT notation).
    signature, attrs = {}, {}
    for index, arg in enumerate(spec.fn.arg_names):
        if arg in spec.constexprs:
            signature[arg] = "constexpr"
        elif arg in spec.signature:
            ty, _, div = spec.signature[arg].partition(":")
            signature[arg] = ty
            if ty.startswith("*") or div == "16":
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"KernelSpec {spec.name} ({spec.label}) gives no type or value for argument {arg!r}")
    extra = set(spec.signature) | set(spec.constexprs)
    extra -= set(spec.fn.arg_names)
    if extra:
        raise ValueError(f"KernelSpec {spec.name} ({spec.label}) names arguments the kernel lacks: {sorted(extra)}")
    constexprs = {(spec.fn.arg_names.index(k),): v for k, v in spec.constexprs.items()}
    return ASTSource(spec.fn, signature, constexprs, attrs)


def audit_one(module: str, index: int, arch: int) -> Row:
    """Compile spec `index` of kernel file `module` for sm_`arch` and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    spec = importlib.import_module(f"{KERNEL_PACKAGE}.{module}").AUDIT_SPECS[index]
    row = Row(module, spec.name, spec.label, spec.dtype, arch, spec.gemm_like)
    try:
        compiled = triton.compile(
            _ast_source(spec),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages),
        )
        ptx = compiled.asm["ptx"]
        row.shared = int(compiled.metadata.shared)
        kernel_name = getattr(compiled.metadata, "name", spec.name)
        row.registers, row.spill_stores, row.spill_loads = ptxas_usage(ptx, arch, kernel_name)
        row.mma = mma_kind(ptx)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    row.problems = problems(row)
    return row


def problems(row: Row) -> List[str]:
    """Why `row` fails the audit (empty when it passes)."""
    if row.error:
        return [f"compile failed: {row.error}"]
    out = []
    if row.spill_bytes:
        out.append(f"spills {row.spill_stores} B stores / {row.spill_loads} B loads")
    if row.shared is not None and row.shared > SHARED_LIMIT[row.arch]:
        out.append(f"shared memory {row.shared} B > sm_{row.arch} limit {SHARED_LIMIT[row.arch]} B")
    if row.gemm_like and row.arch == 90 and row.dtype in ("fp16", "bf16") and "wgmma" not in row.mma:
        out.append(f"gemm_like {row.dtype} kernel does not use wgmma on sm_90 (mma: {row.mma})")
    return out


def _worker(job):
    return audit_one(*job)


def _job_row(job, exc: BaseException) -> Row:
    """The row of a job whose worker process died (or could not start) before returning one."""
    module, index, arch = job
    spec = importlib.import_module(f"{KERNEL_PACKAGE}.{module}").AUDIT_SPECS[index]
    row = Row(module, spec.name, spec.label, spec.dtype, arch, spec.gemm_like)
    row.error = f"worker failed: {type(exc).__name__}: {exc}".strip()
    row.problems = problems(row)
    return row


def default_jobs() -> Tuple[int, str]:
    """Compile processes: one per core this process may use (its affinity and cgroup quota, SMT
    siblings once: vitkern._threads.available_cores), not os.cpu_count(). Separate processes do
    not wait on each other as a thread team does, so a busy machine needs no fewer of them."""
    from vitkern import _threads

    cores = _threads.available_cores()
    return cores, f"{cores} core{'s' * (cores != 1)} available; --jobs N to choose"


def run_audit(
    modules: Optional[Sequence[str]] = None,
    archs: Sequence[int] = ARCHS,
    quick: bool = False,
    jobs: Optional[int] = None,
    progress: Optional[Any] = None,
) -> Tuple[List[Row], List[str], List[str]]:
    """Audit every spec (or one per kernel and dtype with `quick`) for each arch.

    Returns (rows, modules without AUDIT_SPECS, import errors), rows in spec order. Must run with
    TRITON_INTERPRET unset (the interpreter replaces @triton.jit kernels with uncompilable
    stand-ins). `progress(done, total, row)` is called as each row finishes. A row whose compile
    raised (or whose worker died) is compiled once more in this process: only a failure that
    repeats counts; one that does not is kept as the row's `note`."""
    if _interpreting():
        raise RuntimeError("vitkern.audit compiles real kernels: run it with TRITON_INTERPRET unset")
    specs, missing, errors = load_specs(modules)
    if quick:
        specs = one_per_kernel(specs)
    # A config excluded from an arch (`_common.not_on`: it never runs there) is not compiled for it.
    work = [(module, index, arch) for module, index, spec in specs for arch in archs
            if arch not in getattr(spec, "not_on", ())]
    jobs = max(1, min(len(work), jobs or default_jobs()[0]))
    rows: List[Optional[Row]] = [None] * len(work)
    done = 0

    def finished(i: int, row: Row) -> None:
        nonlocal done
        rows[i] = row
        done += 1
        if progress is not None:
            progress(done, len(work), row)

    if jobs == 1:
        for i, job in enumerate(work):
            finished(i, _worker(job))
    else:
        # fork: the workers inherit the imported kernel modules instead of importing them again.
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_worker, job): i for i, job in enumerate(work)}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    row = future.result()
                except Exception as exc:  # a worker killed (e.g. out of memory): retried below
                    row = _job_row(work[i], exc)
                finished(i, row)
    for i, row in enumerate(rows):
        if isinstance(row, Row) and row.error:
            again = _worker(work[i])
            if not again.error:
                again.note = f"first compile failed, the retry passed (not the kernel's: the machine's): {row.error}"
            rows[i] = again
    return [r for r in rows if r is not None], missing, errors


def failure_line(r: Row) -> str:
    """'FAIL attention._attention_fwd_kernel [BLOCK_M=128 ...] bf16 sm_90: spills 8 B stores / 8 B loads'."""
    return f"FAIL {r.module}.{r.kernel} [{r.config}] {r.dtype} sm_{r.arch}: {'; '.join(r.problems)}"


def format_table(rows: Sequence[Row]) -> str:
    header = ("kernel", "config", "dtype", "arch", "smem B", "regs", "spill B", "mma", "status")
    body = []
    for r in rows:
        body.append(
            (
                f"{r.module}.{r.kernel}",
                r.config,
                r.dtype,
                f"sm_{r.arch}",
                "-" if r.shared is None else str(r.shared),
                "-" if r.registers is None else str(r.registers),
                "-" if r.spill_bytes is None else str(r.spill_bytes),
                r.mma,
                "ok" if r.ok else "FAIL: " + "; ".join(r.problems),
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def to_json(rows: Sequence[Row], missing: Sequence[str], errors: Sequence[str]) -> Dict[str, Any]:
    import triton

    return {
        "triton_version": triton.__version__,
        "modules_without_specs": list(missing),
        "import_errors": list(errors),
        "rows": [
            {**dataclasses.asdict(r), "spill_bytes": r.spill_bytes, "ok": r.ok}
            for r in rows
        ],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkern.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS, help="compute capabilities")
    parser.add_argument("--module", nargs="+", default=None, help="kernel files to audit (default: all)")
    parser.add_argument("--one-per-kernel", action="store_true", help="one config per kernel (its first bf16 one)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel compile processes (default: one per available core)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every row as JSON")
    parser.add_argument("--all", action="store_true", help="print every row (default: the failing rows only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)

    if _interpreting():
        # The interpreter swaps kernels for stand-ins at import: audit in a clean child process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "vitkern.audit", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode

    jobs, why = (args.jobs, "--jobs") if args.jobs else default_jobs()
    print(f"vitkern.audit: compiling for {', '.join(f'sm_{a}' for a in args.arch)} with {jobs} process"
          f"{'es' * (jobs != 1)} ({why})", file=sys.stderr, flush=True)
    bar, started, last = None, time.monotonic(), [0.0]

    def progress(done: int, total: int, row: Row) -> None:
        nonlocal bar
        label = f"{row.module}.{row.kernel} sm_{row.arch}" + ("" if row.ok else " FAIL")
        if sys.stderr.isatty():
            if bar is None:
                from vitkern._timing import Progress

                bar = Progress(total, desc="vitkern.audit")
            bar.update(label)
            return
        # A log gets a line every 10 % or 30 s, with the time left at the rate so far.
        now = time.monotonic()
        step = max(1, total // 10)
        if done == total or done % step == 0 or now - last[0] >= 30:
            last[0] = now
            left = (now - started) / done * (total - done)
            print(f"vitkern.audit: {done}/{total} compiled, {now - started:.0f} s, about {left:.0f} s left ({label})",
                  file=sys.stderr, flush=True)

    rows, missing, errors = run_audit(args.module, args.arch, args.one_per_kernel, jobs,
                                      progress=None if args.no_progress else progress)
    if bar is not None:
        bar.close()
    failed = [r for r in rows if not r.ok]
    shown = rows if args.all else failed
    if shown:
        print(format_table(shown))
        print()
    # Rows compiled again after a transient failure: one line per cause (a dead worker takes
    # every pending row with it).
    noted: Dict[str, List[Row]] = {}
    for r in rows:
        if r.note:
            noted.setdefault(r.note, []).append(r)
    for note, same in noted.items():
        names = ", ".join(f"{r.module}.{r.kernel} [{r.config}] {r.dtype} sm_{r.arch}" for r in same[:2])
        more = f" and {len(same) - 2} more" if len(same) > 2 else ""
        print(f"note: {names}{more}: {note}")
    summary = f"{len(rows)} compiled kernel configs, {len(failed)} failing"
    if missing:
        summary += f"; kernel files without AUDIT_SPECS: {', '.join(missing)}"
    if not args.all and rows:
        summary += " (--all prints every row" + (", --json PATH writes them" if not args.json else "") + ")"
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows, missing, errors), f, indent=1)
    # The last lines of a failing audit name every failing config and why.
    for r in failed:
        print(failure_line(r))
    for error in errors:
        print(f"FAIL: {error}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
