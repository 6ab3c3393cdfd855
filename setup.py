"""Builds vitkern and, when it can, the CUDA extension `vitkern._C` from csrc/.

The extension is optional (like FlashAttention's): it is built only when csrc/ has sources, torch is
a CUDA build, nvcc is found and VITKERN_SKIP_CUDA_BUILD is not 1. Without it `import vitkern` works
and the dispatcher uses Triton or eager PyTorch. Knobs:
  VITKERN_SKIP_CUDA_BUILD=1   never build the extension
  VITKERN_CUDA_ARCHS="80;90a" target architectures (default 80 and 90a)
  MAX_JOBS, NVCC_THREADS       build parallelism (torch's cpp_extension and nvcc)
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    if os.environ.get("VITKERN_SKIP_CUDA_BUILD", "0") == "1":
        print("vitkern: VITKERN_SKIP_CUDA_BUILD=1, not building the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("vitkern: torch is not importable at build time, not building the CUDA extension")
        return [], {}
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    if torch.version.cuda is None or shutil.which("nvcc", path=os.path.join(os.environ["CUDA_HOME"], "bin")) is None:
        print("vitkern: torch is not a CUDA build or nvcc is missing, not building the CUDA extension")
        return [], {}
    archs = os.environ.get("VITKERN_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    nvcc = ["-O3", "--use_fast_math", "-std=c++17", f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + gencode
    ext = cpp_extension.CUDAExtension(
        name="vitkern._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
