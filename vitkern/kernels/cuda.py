"""Finds the compiled CUDA extension `vitkern._C`, or builds it just in time from csrc/.

`load_error()` says why the extension cannot be used here (None when it can); it never raises, so a
missing or broken build never breaks `import vitkern`. Nothing here runs at `import vitkern`: the
dispatcher calls `load_error()` the first time the CUDA backend is asked for, on a machine with a
visible GPU. Order:

1. `import vitkern._C` (built by `pip install .` / setup.py);
2. else, when nvcc and a CUDA build of torch are present, build csrc/ into a cache directory and load
   it with `torch.ops.load_library` (VITKERN_CUDA_JIT=0 turns this off). The sources are those a
   wheel or a non-editable install ships in vitkern/_csrc/, else the checkout's csrc/ (`find_csrc()`),
   so an install made without nvcc (or with VITKERN_SKIP_CUDA_BUILD=1) can still build later.

The just-in-time build (`build()`) compiles each kernel file with nvcc separately from the torch
bindings (the kernel files include no torch headers), MAX_JOBS at a time, keeps every file's
`-Xptxas -v` report next to its object (tests/test_cuda_build.py asserts 0 spill bytes from them),
and links with the host compiler. The cache directory is keyed by a hash of the sources, the flags
and the toolchain, so an unchanged tree reuses the last build. Knobs: VITKERN_CUDA_ARCHS ("80;90a";
the just-in-time build for a GPU compiles only that GPU's architecture unless it is set),
MAX_JOBS (min(4, CPUs)), NVCC_THREADS (unset), CUDA_HOME (/usr/local/cuda), VITKERN_CUDA_CACHE
(~/.cache/vitkern), CXX (c++). setup.py takes its flags from the same functions.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vitkern/
REPO_ROOT = PACKAGE_DIR.parent
# Longest first, so that with 2 jobs the attention file never starts last.
KERNEL_SOURCES = ("attention.cu", "layernorm.cu", "gemm_epilogue.cu", "patch_embed.cu", "attention_stats.cu")
BINDINGS = "bindings.cpp"
# The torch layers, compiled with the host compiler: the model's ops and the inspection op's.
BINDINGS_SOURCES = (BINDINGS, "attention_stats_bindings.cpp")
HEADERS = ("common.cuh", "vitkern_kernels.h", "attention_stats.h")
SOURCES = KERNEL_SOURCES + BINDINGS_SOURCES + HEADERS  # every file the just-in-time build reads
DEFAULT_ARCHS = "80;90a"
# Where the sources are looked for, in order: a wheel ships csrc/ as vitkern/_csrc (setup.py's
# build_py copies it there); a checkout or an editable install has it at the repository root.
INSTALLED_CSRC = PACKAGE_DIR / "_csrc"
CHECKOUT_CSRC = REPO_ROOT / "csrc"


def missing_sources(directory: Path) -> List[str]:
    """The files of SOURCES that `directory` lacks."""
    return [s for s in SOURCES if not (Path(directory) / s).is_file()]


def find_csrc() -> Path:
    """The first of INSTALLED_CSRC, CHECKOUT_CSRC that holds every source; else whichever exists
    (INSTALLED_CSRC first), so that `toolchain_error()` names what is missing there."""
    candidates = (INSTALLED_CSRC, CHECKOUT_CSRC)
    for directory in candidates:
        if not missing_sources(directory):
            return directory
    return next((d for d in candidates if d.is_dir()), INSTALLED_CSRC)


CSRC = find_csrc()


# --------------------------------------------------------------------------------------------
# Toolchain discovery (shared with setup.py)


def cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


def nvcc_path() -> Optional[str]:
    return shutil.which("nvcc", path=os.path.join(cuda_home(), "bin")) or shutil.which("nvcc")


def cuda_archs() -> List[str]:
    """VITKERN_CUDA_ARCHS as a list ("80;90a" -> ["80", "90a"])."""
    return [a.strip() for a in os.environ.get("VITKERN_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";") if a.strip()]


def gencode_flags(archs: Sequence[str]) -> List[str]:
    # The -gencode form for 90a: the -arch=sm_90a shorthand also runs a plain sm_90 pass on some nvcc versions.
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _nvidia_wheel_roots() -> List[Path]:
    """site-packages/nvidia/{cu13,cu12,cublas} directories of the pip CUDA wheels, best match first."""
    roots: List[Path] = []
    search = list(dict.fromkeys(sys.path + [sysconfig.get_paths().get("purelib", ""), sysconfig.get_paths().get("platlib", "")]))
    for base in search:
        nvidia = Path(base) / "nvidia" if base else None
        if nvidia is None or not nvidia.is_dir():
            continue
        for sub in ("cu13", "cu12", "cublas"):
            if (nvidia / sub).is_dir():
                roots.append(nvidia / sub)
    try:
        import torch

        major = (torch.version.cuda or "").split(".")[0]
    except Exception:  # pragma: no cover - torch always importable where this runs
        major = ""
    roots.sort(key=lambda p: 0 if p.name == f"cu{major}" else 1)
    return roots


def cublas_paths() -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(include dir with cublasLt.h, lib dir, library file name such as libcublasLt.so.13), or Nones.

    CUDA_HOME is tried first, then the nvidia pip wheels next to torch (cu13, cu12 layouts)."""
    candidates = [Path(cuda_home())] + _nvidia_wheel_roots()
    for root in candidates:
        inc = root / "include"
        if not (inc / "cublasLt.h").is_file():
            continue
        for libdir in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"):
            libs = sorted(glob.glob(str(libdir / "libcublasLt.so*")), key=len)
            if libs:
                return str(inc), str(libdir), os.path.basename(libs[0])
    return None, None, None


def nvcc_flags(archs: Sequence[str], *, std: bool = True) -> List[str]:
    """nvcc flags of the kernel files (setup.py passes std=False: torch adds its own -std)."""
    inc, _, _ = cublas_paths()
    flags = ["-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo"]
    if std:
        flags += ["-std=c++17"]
    threads = os.environ.get("NVCC_THREADS")
    if threads:
        flags += [f"--threads={threads}"]
    flags += gencode_flags(archs) + [f"-I{CSRC}"]
    if inc:
        flags += [f"-I{inc}"]
    return flags


def _torch_cxx_std() -> str:
    """The C++ standard torch builds its extensions with (C++20 from torch 2.10 on, else C++17)."""
    from torch.utils import cpp_extension

    try:
        text = Path(cpp_extension.__file__).read_text()
    except OSError:  # pragma: no cover
        return "-std=c++17"
    return "-std=c++20" if "-std=c++20" in text else "-std=c++17"


def link_flags() -> List[str]:
    """Libraries of the extension beyond torch's: cudart and cuBLASLt, with rpaths so it loads anywhere."""
    _, libdir, libfile = cublas_paths()
    cuda_lib = os.path.join(cuda_home(), "lib64")
    flags = [f"-L{cuda_lib}", "-lcudart", f"-Wl,-rpath,{cuda_lib}"]
    if libdir and libfile:
        flags += [f"-L{libdir}", f"-l:{libfile}", f"-Wl,-rpath,{libdir}"]
    return flags


def toolchain_error() -> Optional[str]:
    """Why the extension cannot be built here (None when it can)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "torch is not importable"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if nvcc_path() is None:
        return f"nvcc was not found (CUDA_HOME={cuda_home()}, PATH)"
    if cublas_paths()[0] is None:
        return "cuBLASLt headers (cublasLt.h) were not found in CUDA_HOME or the nvidia pip wheels"
    missing = missing_sources(CSRC)
    if missing:
        return f"the CUDA sources are not shipped with this installation ({CSRC} lacks {', '.join(missing)})"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"the host compiler {os.environ.get('CXX', 'c++')!r} was not found"
    return None


# --------------------------------------------------------------------------------------------
# The just-in-time build


@dataclass
class BuildResult:
    library: Path  # the linked extension (load with torch.ops.load_library)
    objects: Dict[str, Path]  # kernel file -> object file (cuobjdump -sass reads these)
    ptxas_logs: Dict[str, str]  # kernel file -> its -Xptxas -v report
    cached: bool  # True when nothing had to be compiled
    seconds: float = 0.0
    commands: List[str] = field(default_factory=list)


def _toolchain_id() -> str:
    import torch

    nvcc = nvcc_path()
    try:
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):  # pragma: no cover
        nvcc_version = "?"
    return "|".join([torch.__version__, str(torch.version.cuda), nvcc_version, sys.version, str(cublas_paths())])


def cache_dir(archs: Optional[Sequence[str]] = None) -> Path:
    """The build directory of this tree, these archs and this toolchain."""
    archs = list(archs or cuda_archs())
    h = hashlib.sha256()
    for name in sorted(SOURCES):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(repr((archs, nvcc_flags(archs), link_flags(), _torch_cxx_std())).encode())
    h.update(_toolchain_id().encode())
    root = Path(os.environ.get("VITKERN_CUDA_CACHE") or Path.home() / ".cache" / "vitkern")
    return root / f"cuda-{'-'.join(archs)}-{h.hexdigest()[:16]}"


def _run(cmd: List[str], log: Optional[Path] = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-6000:]}")
    if log is not None:
        log.write_text(out)
    return out


def _bindings_cmd(src: Path, obj: Path) -> List[str]:
    import torch
    from torch.utils import cpp_extension

    incs = cpp_extension.include_paths() + [os.path.join(cuda_home(), "include"), str(CSRC)]
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return (
        [os.environ.get("CXX", "c++"), "-c", "-O2", "-fPIC", _torch_cxx_std(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C"]
        + [f"-I{i}" for i in incs]
        + [str(src), "-o", str(obj)]
    )


def _link_cmd(objs: List[Path], out: Path) -> List[str]:
    from torch.utils import cpp_extension

    torch_lib = cpp_extension.library_paths()[0]
    return (
        [os.environ.get("CXX", "c++"), "-shared", "-o", str(out)]
        + [str(o) for o in objs]
        + [f"-L{torch_lib}", "-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda", f"-Wl,-rpath,{torch_lib}"]
        + link_flags()
    )


def build(archs: Optional[Sequence[str]] = None, *, jobs: Optional[int] = None, verbose: bool = False) -> BuildResult:
    """Compiles csrc/ for `archs` (default VITKERN_CUDA_ARCHS) into `cache_dir(archs)`, or reuses it.

    Raises RuntimeError with the compiler output when a step fails."""
    import time

    error = toolchain_error()
    if error:
        raise RuntimeError(f"cannot build the vitkern CUDA extension: {error}")
    archs = list(archs or cuda_archs())
    out_dir = cache_dir(archs)
    lib = out_dir / "_C.so"
    objects = {s: out_dir / (s + ".o") for s in KERNEL_SOURCES}
    logs = {s: out_dir / (s + ".ptxas.log") for s in KERNEL_SOURCES}
    if lib.is_file() and all(p.is_file() for p in list(objects.values()) + list(logs.values())):
        return BuildResult(lib, objects, {s: p.read_text() for s, p in logs.items()}, cached=True)

    start = time.time()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private directory and move the results in: concurrent builders never see half a file.
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    nvcc = nvcc_path()
    flags = nvcc_flags(archs)
    commands: Dict[str, List[str]] = {s: [nvcc, "-c", *flags, str(CSRC / s), "-o", str(tmp / (s + ".o"))] for s in KERNEL_SOURCES}
    for name in BINDINGS_SOURCES:
        commands[name] = _bindings_cmd(CSRC / name, tmp / (name + ".o"))
    jobs = jobs or int(os.environ.get("MAX_JOBS", "0")) or min(4, os.cpu_count() or 1)
    order = list(KERNEL_SOURCES[:1]) + list(BINDINGS_SOURCES) + list(KERNEL_SOURCES[1:])

    def compile_one(name: str) -> None:
        if verbose:
            print(" ".join(commands[name]), flush=True)
        log = tmp / (name + ".ptxas.log") if name not in BINDINGS_SOURCES else None
        _run(commands[name], log)

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for fut in [pool.submit(compile_one, n) for n in order]:
                fut.result()
        link = _link_cmd([tmp / (s + ".o") for s in order], tmp / "_C.so")
        _run(link)
        out_dir.mkdir(exist_ok=True)
        for s in KERNEL_SOURCES:
            os.replace(tmp / (s + ".o"), objects[s])
            os.replace(tmp / (s + ".ptxas.log"), logs[s])
        os.replace(tmp / "_C.so", lib)  # last: its presence marks a complete build
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(
        lib,
        objects,
        {s: p.read_text() for s, p in logs.items()},
        cached=False,
        seconds=time.time() - start,
        commands=[" ".join(c) for c in commands.values()] + [" ".join(link)],
    )


# --------------------------------------------------------------------------------------------
# ptxas reports


@dataclass(frozen=True)
class KernelResources:
    function: str  # mangled name
    arch: str  # e.g. "sm_90a"
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int  # static shared memory (dynamic shared memory is not in the report)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> List[KernelResources]:
    """Every function in an `-Xptxas -v` report with its registers, stack, spills and static smem.
    Non-entry (called) functions appear too, with registers -1: their spills count as well."""
    out: List[KernelResources] = []
    entry = arch = None
    props: Optional[str] = None
    spill: Optional[Tuple[int, int, int]] = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry, arch = m.group(1), m.group(2)
            continue
        m = _PROPS.search(line)
        if m:
            props = m.group(1)
            continue
        m = _SPILL.search(line)
        if m and props is not None:
            spill = tuple(int(v) for v in m.groups())
            if props != entry:  # a called function: it has no "Used" line of its own
                out.append(KernelResources(props, arch or "?", -1, spill[0], spill[1], spill[2], 0))
                spill = None
            continue
        m = _USED.search(line)
        if m and entry is not None:
            stack, st, ld = spill if spill is not None and props == entry else (0, 0, 0)
            out.append(KernelResources(entry, arch or "?", int(m.group(1)), stack, st, ld, int(m.group(2) or 0)))
            entry, props, spill = None, None, None
    return out


def demangle(names: Sequence[str]) -> List[str]:
    """c++filt's readable names (the input unchanged when c++filt is absent)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return list(names)
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return lines if len(lines) == len(names) else list(names)


def cuobjdump_path() -> Optional[str]:
    """CUDA's cuobjdump, or the copy Triton bundles (CPU machines without the full toolkit)."""
    found = shutil.which("cuobjdump", path=os.path.join(cuda_home(), "bin")) or shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # noqa: F401

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.is_file() else None
    except Exception:
        return None


def sass_by_function(obj: Path, arch: str) -> Dict[str, str]:
    """{mangled function name: its SASS} of one architecture in an object file or library."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump was not found (CUDA_HOME/bin or triton's bundle)")
    text = _run([tool, "-sass", "-arch", arch, str(obj)])
    funcs: Dict[str, str] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            funcs[current] = ""
        elif current is not None:
            funcs[current] += line + "\n"
    return funcs


# --------------------------------------------------------------------------------------------
# Loading


_LOADED_FROM: Optional[str] = None


def _jit_enabled() -> bool:
    return os.environ.get("VITKERN_CUDA_JIT", "1") not in ("0", "", "false", "no")


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """None if the CUDA extension is loaded (its ops registered under torch.ops.vitkern.cuda_*),
    else the reason it cannot be. Builds it just in time when it is not installed (see module doc)."""
    global _LOADED_FROM
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "torch is not importable"
    try:
        mod = importlib.import_module("vitkern._C")
        _LOADED_FROM = getattr(mod, "__file__", "vitkern._C")
        return None
    except ImportError as exc:
        installed_error = f"vitkern._C is not installed ({exc})"
    except Exception as exc:  # pragma: no cover - a broken build
        return f"importing the CUDA extension vitkern._C failed: {type(exc).__name__}: {exc}"
    if not _jit_enabled():
        return f"{installed_error} and VITKERN_CUDA_JIT=0 disables the just-in-time build"
    if not torch.cuda.is_available():
        # Building takes minutes of CPU; without a GPU nothing could use the result.
        return f"{installed_error} and no CUDA device is visible to build it just in time for"
    error = toolchain_error()
    if error:
        return f"{installed_error}; the just-in-time build is impossible: {error}"
    try:
        # Only this GPU's architecture unless VITKERN_CUDA_ARCHS asks for more: half the build time.
        major, minor = torch.cuda.get_device_capability()
        own = f"{major}{minor}" + ("a" if major == 9 else "")
        archs = cuda_archs() if "VITKERN_CUDA_ARCHS" in os.environ else [own]
        if not any(a.rstrip("a") == f"{major}{minor}" for a in archs):
            archs = archs + [own]
        result = build(archs)
        torch.ops.load_library(str(result.library))
        _LOADED_FROM = str(result.library)
    except Exception as exc:
        return f"{installed_error}; the just-in-time build failed: {type(exc).__name__}: {str(exc)[-3000:]}"
    return None


def loaded_from() -> Optional[str]:
    """Where the loaded extension came from (None before a successful `load_error()`)."""
    return _LOADED_FROM


def ptxas_markdown(result: BuildResult) -> str:
    """A markdown table of every kernel's registers, static shared memory and spills per arch
    (the source of docs/perf/cuda.md's ptxas table)."""
    lines = ["| file | kernel | arch | registers | static smem (B) | stack / spill stores / spill loads (B) |", "|---|---|---|---|---|---|"]
    for source in KERNEL_SOURCES:
        kernels = parse_ptxas(result.ptxas_logs[source])
        for name, k in zip(demangle([k.function for k in kernels]), kernels):
            short = re.sub(r"^void |\(anonymous namespace\)::|vk::", "", name)
            short = re.sub(r"\(.*$", "", short)
            lines.append(f"| {source} | `{short}` | {k.arch} | {k.registers} | {k.smem_bytes} | {k.stack_bytes} / {k.spill_store_bytes} / {k.spill_load_bytes} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m vitkern.kernels.cuda [--archs "80;90a"]`: build (or reuse) the extension, print
    where it is and its ptxas table; exit status 1 if any kernel spills."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--archs", default=";".join(cuda_archs()), help="e.g. '80;90a'")
    parser.add_argument("--verbose", action="store_true", help="print the compiler commands")
    args = parser.parse_args(argv)
    result = build([a for a in args.archs.split(";") if a], verbose=args.verbose)
    print(f"extension: {result.library} ({'cached' if result.cached else f'built in {result.seconds:.0f} s'})\n")
    print(ptxas_markdown(result))
    spills = [k for log in result.ptxas_logs.values() for k in parse_ptxas(log) if k.spill_store_bytes or k.spill_load_bytes or k.stack_bytes]
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
