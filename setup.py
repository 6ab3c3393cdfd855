"""Builds vitkern and, when it can, the CUDA extension `vitkern._C` from csrc/.

The extension is optional (like FlashAttention's): it is built only when csrc/ has sources, torch is
a CUDA build, nvcc is found and VITKERN_SKIP_CUDA_BUILD is not 1. Without it `import vitkern` works
and the dispatcher uses Triton or eager PyTorch. Knobs:
  VITKERN_SKIP_CUDA_BUILD=1   never build the extension
  VITKERN_CUDA_ARCHS="80;90a" target architectures (default 80 and 90a; 90a via -gencode=arch=compute_90a,code=sm_90a)
  MAX_JOBS, NVCC_THREADS       build parallelism (torch's cpp_extension and nvcc)
  CUDA_HOME                    the toolkit (default /usr/local/cuda); cuBLASLt headers and libraries are
                               taken from it or from the nvidia pip wheels (site-packages/nvidia/cu13 or cu12)
The flags come from vitkern/kernels/cuda.py, which also builds the same sources just in time.

csrc/ stays at the repository root (the one copy in git; CMakeLists.txt and this file build it from
there). Wheels and non-editable installs also carry it as package data, vitkern/_csrc/ (build_py
below copies it in), so that an install made without the extension can still build it just in time
where nvcc appears later; MANIFEST.in puts csrc/ and CMakeLists.txt in the sdist. An editable install
(`pip install -e .`) copies nothing: the just-in-time build reads the checkout's csrc/ directly.
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative to HERE: setuptools wants relative source paths
SHIPPED_CSRC = os.path.join("vitkern", "_csrc")  # where a wheel carries csrc/ (see vitkern/kernels/cuda.py)
SOURCE_PATTERNS = ("*.cu", "*.cpp", "*.cuh", "*.h")


def csrc_files():
    """The CUDA/C++ sources and headers of csrc/ (file names), as shipped in vitkern/_csrc/."""
    found = {os.path.basename(f) for pattern in SOURCE_PATTERNS for f in glob.glob(os.path.join(HERE, CSRC, pattern))}
    return sorted(found)


class build_py_with_csrc(build_py):
    """build_py that also copies csrc/ into the built package as vitkern/_csrc/ (not in editable mode)."""

    def _csrc_mapping(self):
        if self.editable_mode:
            return {}
        return {os.path.join(self.build_lib, SHIPPED_CSRC, name): os.path.join(CSRC, name) for name in csrc_files()}

    def run(self):
        super().run()
        for dest, src in self._csrc_mapping().items():
            self.mkpath(os.path.dirname(dest))
            self.copy_file(src, dest, preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + list(self._csrc_mapping())

    def get_output_mapping(self):
        return {**super().get_output_mapping(), **self._csrc_mapping()}


def _kernels_cuda_module():
    """vitkern/kernels/cuda.py loaded by path (not through the package): the build flags live there,
    shared with the just-in-time build, and importing vitkern itself at build time is not wanted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_vitkern_kernels_cuda", os.path.join(HERE, "vitkern", "kernels", "cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _cuda_extension():
    if os.environ.get("VITKERN_SKIP_CUDA_BUILD", "0") == "1":
        print("vitkern: VITKERN_SKIP_CUDA_BUILD=1, not building the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("vitkern: torch is not importable at build time, not building the CUDA extension")
        return [], {}
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    kc = _kernels_cuda_module()
    error = kc.toolchain_error()
    if error:
        print(f"vitkern: not building the CUDA extension: {error}")
        return [], {}
    archs = kc.cuda_archs()
    cublas_include, _, _ = kc.cublas_paths()
    os.environ.setdefault("NVCC_THREADS", "2")
    # torch adds its own -std to nvcc; the kernel files need only C++17 of it.
    nvcc = kc.nvcc_flags(archs, std=False)
    ext = cpp_extension.CUDAExtension(
        name="vitkern._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, CSRC), cublas_include],
        extra_compile_args={"cxx": ["-O2"], "nvcc": nvcc},
        extra_link_args=kc.link_flags(),
        define_macros=[("VK_PYTHON_MODULE", "1")],  # `import vitkern._C` needs PyInit__C
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_csrc, **cmdclass})
