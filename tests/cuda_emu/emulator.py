"""Builds csrc/*.cu for the CPU emulator (vk_emu.h) and loads the result with ctypes.

The CUDA kernels cannot run on a machine without a GPU, but their host entry points (`vk_*` in
csrc/vitkern_kernels.h: raw pointers, sizes, strides, a stream) can, once the three pieces of
CUDA-only syntax are rewritten for a host compiler:

* ``kernel<<<grid, block, smem, stream>>>(args)``  ->  ``::vk_emu::launch(LaunchConfig(grid, block, smem, stream), kernel, args)``
* ``extern __shared__ T name[];`` and ``__shared__ T name[N];``  ->  this CTA's shared memory in the emulator
* ``asm volatile("mma.sync.aligned.m16n8k16...")``  ->  ``::vk_emu::ptx_mma(...)`` (the PTX ISA's fragment layouts)

Everything else is compiled by g++ as written. Line numbers are preserved, so a compiler error or a
debugger points at csrc/. The shared library (emulator + kernels + the fake cuBLASLt of fake_cublaslt.cpp)
is cached in ~/.cache/vitkern/emu/<hash of its sources and flags>; `build(torch_ops=True)` links
csrc/bindings.cpp too, so the whole CUDA backend (torch layer, autograd) runs on CPU tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# VK_EMU_CSRC: emulate another copy of csrc/ (e.g. a deliberately broken one, to see a test catch it).
CSRC = Path(os.environ.get("VK_EMU_CSRC", REPO / "csrc"))
RUNTIME_SOURCES = ("emu_runtime.cpp", "fake_cublaslt.cpp")
CXXFLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-Wno-attributes", "-Wno-unused-result"]
# UBSan checks in the kernels and the emulator: what x86 forgives but a GPU does not (a 16-byte vector
# access at a misaligned address) and what is wrong everywhere (signed int overflow in index math,
# shifts, out-of-range array indices). No UBSan runtime is linked: emu_runtime.cpp's handlers fail the
# kernel launch with the source location, so the calling test fails.
SANITIZE = ["-fsanitize=alignment,signed-integer-overflow,shift,bounds,vla-bound", "-fno-sanitize-recover=all"]


class TranslationError(ValueError):
    """A piece of CUDA syntax in csrc/ that the emulator does not know how to run."""


# ---------------------------------------------------------------------------------------------
# Source rewriting


def _match_close(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes text[i] == open_ (string literals skipped)."""
    depth, j, n = 0, i, len(text)
    while j < n:
        c = text[j]
        if c == '"':
            j = text.index('"', j + 1) + 1
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise TranslationError(f"unbalanced {open_}{close} at offset {i}")


def _callee_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends at text[end] (just before '<<<'): a qualified name with
    template arguments, e.g. vk::layer_norm_fwd_kernel<T, true, N>."""
    j = end
    while True:
        if j > 0 and text[j - 1] == ">":  # template arguments: walk back to the matching '<'
            depth, k = 0, j - 1
            while k >= 0:
                depth += {">": 1, "<": -1}.get(text[k], 0)
                if depth == 0:
                    break
                k -= 1
            j = k
        k = j
        while k > 0 and (text[k - 1].isalnum() or text[k - 1] in "_:"):
            k -= 1
        if k == j:
            raise TranslationError(f"cannot find the kernel name before '<<<' at offset {end}")
        j = k
        if not (j > 0 and text[j - 1] == ">" and text[j:j + 2] == "::"):
            return j


def _rewrite_launches(text: str) -> str:
    out, pos = [], 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out)
        start = _callee_start(text, i)
        callee = text[start:i]
        j = text.find(">>>", i)
        config = text[i + 3:j]
        k = j + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise TranslationError(f"kernel launch of {callee} without an argument list")
        close = _match_close(text, k, "(", ")")
        args = text[k + 1:close - 1]
        sep = ", " if args.strip() else ""
        out.append(text[pos:start])
        out.append(f"::vk_emu::launch(::vk_emu::LaunchConfig({config}), {callee}{sep}{args})")
        pos = close


_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w\s]+?)\s+(?:__align__\(\s*\d+\s*\)\s+)?"
    r"(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?P<type>[\w:\s]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\])+)\s*;")


def _rewrite_shared(text: str, file_id: int) -> str:
    text = _DYNAMIC_SHARED.sub(
        lambda m: f"{m['type']}* {m['name']} = static_cast<{m['type']}*>(::vk_emu::dynamic_smem());", text)

    def static(m: re.Match) -> str:
        site = file_id * 1_000_000 + text.count("\n", 0, m.start()) + 1
        return f"auto& {m['name']} = ::vk_emu::static_shared<{m['type']}{m['dims']}>({site});"

    text = _STATIC_SHARED.sub(static, text)
    if "__shared__" in text.replace("__shared__ must", ""):
        line = text.count("\n", 0, text.index("__shared__")) + 1
        raise TranslationError(f"line {line}: a __shared__ declaration the emulator cannot rewrite")
    return text


def _split_top(s: str, sep: str) -> List[str]:
    """Splits at `sep` outside brackets and string literals."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        c = s[i]
        if c == '"':
            j = s.index('"', i + 1) + 1
            cur.append(s[i:j])
            i = j
            continue
        depth += c in "([{"
        depth -= c in ")]}"
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _operands(section: str) -> List[str]:
    """'"+f"(c[0]), "r"(a[0])' -> ['c[0]', 'a[0]']."""
    exprs = []
    for item in _split_top(section, ","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r'"[^"]*"\s*\((.*)\)', item, re.S)
        if not m:
            raise TranslationError(f"cannot parse asm operand {item!r}")
        exprs.append(m.group(1).strip())
    return exprs


def _rewrite_asm(text: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\basm\s+(?:volatile\s*)?\(", text):
        if m.start() < pos:
            continue
        close = _match_close(text, m.end() - 1, "(", ")")
        body = text[m.end():close - 1]
        sections = _split_top(body, ":")
        instr = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0])).replace("\\n", "").strip().rstrip(";")
        opcode, _, operand_text = instr.partition(" ")
        if not opcode.startswith("mma.sync.aligned.m16n8k16.row.col."):
            raise TranslationError(f"inline PTX the emulator does not run: {opcode}")
        exprs = _operands(sections[1]) + (_operands(sections[2]) if len(sections) > 2 else [])
        groups = [[exprs[int(x.strip().lstrip("%"))] for x in g.split(",")] for g in re.findall(r"\{([^}]*)\}", operand_text)]
        if [len(g) for g in groups] != [4, 4, 2, 4]:
            raise TranslationError(f"unexpected operand groups in {instr!r}")
        d, a, b, c = groups
        call = (f'::vk_emu::ptx_mma("{opcode}", {{{{{", ".join(f"&({e})" for e in d)}}}}}, {{{{{", ".join(a)}}}}}, '
                f'{{{{{", ".join(b)}}}}}, {{{{{", ".join(c)}}}}})')
        out.append(text[pos:m.start()])
        out.append(call + "\n" * text.count("\n", m.start(), close))
        pos = close
    out.append(text[pos:])
    return "".join(out)


def translate(source: str, file_id: int = 0) -> str:
    """csrc/*.cu text -> host C++ for vk_emu.h, with the same line numbers."""
    return _rewrite_launches(_rewrite_asm(_rewrite_shared(source, file_id)))


# ---------------------------------------------------------------------------------------------
# Building and loading


def toolchain_error() -> Optional[str]:
    """Why the emulated library cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    from vitkern.kernels import cuda as kc

    if not Path(kc.cuda_home(), "include", "cuda_fp16.h").is_file():
        return f"CUDA headers not found under {kc.cuda_home()}/include"
    if kc.cublas_paths()[0] is None:
        return "cuBLASLt headers (nvidia-cublas wheel) not found"
    return None


def _include_dirs() -> List[str]:
    from vitkern.kernels import cuda as kc

    return [str(HERE), str(CSRC), str(Path(kc.cuda_home(), "include")), str(kc.cublas_paths()[0])]


def _sources() -> List[Path]:
    from vitkern.kernels.cuda import KERNEL_SOURCES  # the files the real build compiles

    return [CSRC / s for s in KERNEL_SOURCES] + [HERE / s for s in RUNTIME_SOURCES]


def _cache_dir() -> Path:
    import torch  # bindings.cpp is compiled against its headers

    h = hashlib.sha256(torch.__version__.encode())
    inputs = _sources() + [HERE / "vk_emu.h", Path(__file__)] + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))
    from vitkern.kernels.cuda import BINDINGS_SOURCES

    for p in inputs + [CSRC / name for name in BINDINGS_SOURCES]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(" ".join(CXXFLAGS + SANITIZE + _include_dirs()).encode())
    h.update(subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.encode())
    root = Path(os.environ.get("VK_EMU_CACHE") or Path.home() / ".cache" / "vitkern" / "emu")
    return root / h.hexdigest()[:16]


def _compile(units: Sequence[Tuple[List[str], Path]], verbose: bool) -> None:
    """Runs g++ for each (command without -o, object) not yet built, os.cpu_count() at a time; each
    object appears atomically."""
    pending = [(cmd, obj) for cmd, obj in units if not obj.is_file()]
    running: List[Tuple[subprocess.Popen, Path, Path]] = []
    errors = []

    def reap(block: bool) -> None:
        for item in list(running):
            p, tmp, obj = item
            if block or p.poll() is not None:
                log, _ = p.communicate()
                running.remove(item)
                if p.returncode != 0:
                    errors.append(f"{' '.join(p.args)}\n{log}")
                else:
                    os.replace(tmp, obj)

    for cmd, obj in pending:
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        full = ["g++", *cmd, "-o", str(tmp)]
        if verbose:
            print(" ".join(full), file=sys.stderr)
        running.append((subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), tmp, obj))
        while len(running) >= max(1, os.cpu_count() or 1):
            time.sleep(0.05)
            reap(block=False)
    reap(block=True)
    if errors:
        raise RuntimeError("building the emulated CUDA kernels failed:\n" + "\n".join(errors)[-8000:])


def _torch_flags() -> Tuple[List[str], List[str]]:
    """Compile and link flags for code that includes torch headers (bindings.cpp)."""
    import torch
    from torch.utils import cpp_extension

    lib_dir = Path(torch.__file__).parent / "lib"
    cflags = [f"-I{d}" for d in cpp_extension.include_paths()]
    cflags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    return cflags, [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch"]


def build(torch_ops: bool = False, verbose: bool = False) -> Path:
    """Compiles the emulator, the csrc/ kernels and the fake cuBLASLt, and links them with either the
    extern "C" wrappers of the vk_* entry points (ctypes, `torch_ops=False`) or csrc/bindings.cpp
    compiled with VK_EMULATION (`torch_ops=True`: load with torch.ops.load_library; its ops are
    torch.ops.vitkern_emu.cuda_* for CPU tensors). Returns the library's path; everything is cached."""
    out_dir = _cache_dir()
    lib = out_dir / ("libvk_emu_ops.so" if torch_ops else "libvk_emu.so")
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{d}" for d in _include_dirs()]
    units = []
    for i, src in enumerate(_sources()):
        extra: List[str] = []
        if src.suffix == ".cu":  # translated into the cache dir, keeping csrc/'s line numbers
            cpp = out_dir / (src.stem + ".cu.cpp")
            cpp.write_text(f'#line 1 "{src}"\n' + translate(src.read_text(), file_id=i + 1))
            src, extra = cpp, ["-include", "vk_emu.h"]
        units.append(([*CXXFLAGS, *SANITIZE, *includes, *extra, "-c", str(src)], out_dir / (src.name + ".o")))
    link_flags: List[str] = []
    if torch_ops:
        cflags, link_flags = _torch_flags()
        # -std=c++20: recent torch headers need it (the last -std wins)
        from vitkern.kernels.cuda import BINDINGS_SOURCES  # every torch layer the real build links

        for name in BINDINGS_SOURCES:
            units.append(([*CXXFLAGS, "-std=c++20", *includes, *cflags, "-DVK_EMULATION", "-c", str(CSRC / name)],
                          out_dir / (name + ".o")))
    else:
        shim = out_dir / "c_shim.cpp"
        shim.write_text(_c_shim())
        units.append(([*CXXFLAGS, *includes, "-c", str(shim)], out_dir / "c_shim.o"))
    _compile(units, verbose)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    # -Bsymbolic: the library's own cudaGetLastError, cublasLt* ... win over libcudart/libcublasLt
    # that torch may have loaded into the process.
    subprocess.run(["g++", "-shared", "-Wl,-Bsymbolic", "-o", str(tmp), *[str(o) for _, o in units], *link_flags],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, lib)  # atomic: a concurrent build never sees half a library
    return lib


class EmulatedCudaError(RuntimeError):
    pass


_CTYPES = {
    "int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float, "size_t": ctypes.c_size_t,
    "bool": ctypes.c_bool, "cudaError_t": ctypes.c_int, "const char*": ctypes.c_char_p, "void": None,
}


def _ctype(decl: str):
    """A C type from csrc/vitkern_kernels.h -> its ctypes type (every pointer and the stream -> c_void_p)."""
    decl = " ".join(decl.split())
    if decl.endswith("*") and decl != "const char*" or decl == "cudaStream_t":
        return ctypes.c_void_p
    return _CTYPES[decl]


def _declarations() -> List[Tuple[str, str, List[Tuple[str, str]]]]:
    """(return type, name, [(param type, param name)]) of every vk_* function in csrc/vitkern_kernels.h."""
    header = re.sub(r"//[^\n]*", "", (CSRC / "vitkern_kernels.h").read_text())
    decls = []
    for m in re.finditer(r"([\w\s\*]+?)\s*\b(vk_\w+)\s*\(([^)]*)\)\s*;", header):
        params = []
        for p in (p.strip() for p in m.group(3).split(",")):
            if p:
                t, name = re.fullmatch(r"(.*?[\s\*])(\w+)", p).groups()
                params.append((" ".join(t.split()), name))
        decls.append((" ".join(m.group(1).split()), m.group(2), params))
    return decls


def signatures() -> dict:
    """{name: (restype, argtypes)} of every vk_* entry point, parsed from the header so the ctypes
    calls follow it instead of a second copy of it."""
    return {name: (_ctype(ret), [_ctype(t) for t, _ in params]) for ret, name, params in _declarations()}


def _c_shim() -> str:
    """extern "C" wrappers vkc_<name> of the (C++-linkage) vk_* entry points, for ctypes."""
    lines = ['#include "vitkern_kernels.h"', 'extern "C" {']
    for ret, name, params in _declarations():
        plist = ", ".join(f"{t} {n}" for t, n in params)
        lines.append(f"{ret} vkc_{name[3:]}({plist}) {{ return {name}({', '.join(n for _, n in params)}); }}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Emulator:
    """The loaded library: the `vk_*` host entry points of csrc/ plus the emulator's controls."""

    SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.vk_emu_last_message.restype = ctypes.c_char_p
        self.lib.vk_emu_configure.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_longlong]
        self.functions = {}
        for name, (restype, argtypes) in signatures().items():
            if hasattr(self.lib, "vkc_" + name[3:]):
                fn = getattr(self.lib, "vkc_" + name[3:])
                fn.restype, fn.argtypes = restype, argtypes
                self.functions[name] = fn
        self.configure()

    def configure(self, schedule: str = "forward", seed: int = 0, max_dynamic_smem: int = 227 << 10) -> None:
        """schedule: the order fibers run between synchronizations; max_dynamic_smem: the device's
        per-block shared memory (227 KiB on sm_90, 163 KiB on sm_80)."""
        self.lib.vk_emu_configure(self.SCHEDULES[schedule], seed, max_dynamic_smem)

    def last_message(self) -> str:
        return self.lib.vk_emu_last_message().decode()

    def call(self, name: str, *args) -> int:
        """Calls vk_<name>(*args) (ints, floats and pointers as ctypes values) and returns its status."""
        return self.functions[name](*args)

    def check(self, name: str, *args) -> None:
        status = self.call(name, *args)
        if status != 0:
            raise EmulatedCudaError(f"{name} returned {status}: {self.last_message()}")


_loaded: Optional[Emulator] = None


def load() -> Emulator:
    global _loaded
    if _loaded is None:
        _loaded = Emulator(build())
    return _loaded


_torch_ops_loaded = False


def load_torch_ops() -> None:
    """Builds (once) and loads the emulated extension: torch.ops.vitkern_emu.cuda_* for CPU tensors."""
    global _torch_ops_loaded
    if not _torch_ops_loaded:
        import torch

        torch.ops.load_library(str(build(torch_ops=True)))
        _torch_ops_loaded = True
