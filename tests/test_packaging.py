"""Packaging: a wheel or sdist of vitkern carries every CUDA source the just-in-time build reads.

A wheel built without the extension (VITKERN_SKIP_CUDA_BUILD=1, or no nvcc at install time) must still
let `vitkern.kernels.cuda` build csrc/ later, so setup.py ships csrc/ as vitkern/_csrc/ and
`find_csrc()` looks there before the checkout's csrc/. The sdist carries csrc/ and CMakeLists.txt.
An editable install ships nothing extra (the checkout's csrc/ is read in place).

The builds go through setuptools' PEP 517 backend (what `pip wheel --no-build-isolation` calls) in a
copy of the working tree, with VITKERN_SKIP_CUDA_BUILD=1: a few seconds each, no compiler, no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from vitkern.kernels import cuda as cuda_kernels

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
SOURCE_SUFFIXES = (".cu", ".cpp", ".cuh", ".h")


def _csrc_files() -> list:
    return sorted(p.name for p in CSRC.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def _copy_tree(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files): no build/,
    *.egg-info or .venv leaking into the package."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs a git checkout of vitkern")
    for rel in filter(None, listed.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _backend(hook: str, src: Path, out: Path) -> Path:
    """Runs setuptools.build_meta.<hook>(out) in `src` (as pip does) and returns the built file."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VITKERN_SKIP_CUDA_BUILD": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    code = f"import sys\nfrom setuptools import build_meta\nprint(build_meta.{hook}(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{hook} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _copy_tree(tmp_path_factory.mktemp("tree"))


def test_csrc_is_what_the_builds_compile():
    # setup.py compiles csrc/*.cu and csrc/*.cpp; the just-in-time build compiles cuda.py's list: the same files.
    compiled = sorted(n for n in _csrc_files() if n.endswith((".cu", ".cpp")))
    assert compiled == sorted(cuda_kernels.KERNEL_SOURCES + cuda_kernels.BINDINGS_SOURCES)
    assert set(cuda_kernels.HEADERS) <= set(_csrc_files())
    assert sorted(cuda_kernels.SOURCES) == sorted(compiled + list(cuda_kernels.HEADERS))


def test_checkout_reads_csrc_in_place():
    # No vitkern/_csrc/ in a checkout (or an editable install): the repository's csrc/ is used.
    assert not cuda_kernels.INSTALLED_CSRC.exists()
    assert cuda_kernels.CSRC == cuda_kernels.CHECKOUT_CSRC == CSRC
    assert cuda_kernels.missing_sources(CSRC) == []


def test_find_csrc_prefers_the_installed_copy(tmp_path, monkeypatch):
    installed, checkout = tmp_path / "site" / "vitkern" / "_csrc", tmp_path / "repo" / "csrc"
    monkeypatch.setattr(cuda_kernels, "INSTALLED_CSRC", installed)
    monkeypatch.setattr(cuda_kernels, "CHECKOUT_CSRC", checkout)
    assert cuda_kernels.find_csrc() == installed  # neither exists: the installed place is named
    checkout.mkdir(parents=True)
    for name in cuda_kernels.SOURCES:
        (checkout / name).write_text("// checkout\n")
    assert cuda_kernels.find_csrc() == checkout
    installed.mkdir(parents=True)
    (installed / "common.cuh").write_text("// partial\n")
    assert cuda_kernels.find_csrc() == checkout  # an incomplete copy is passed over
    assert cuda_kernels.missing_sources(installed) == [s for s in cuda_kernels.SOURCES if s != "common.cuh"]
    for name in cuda_kernels.SOURCES:
        (installed / name).write_text("// installed\n")
    assert cuda_kernels.find_csrc() == installed
    shutil.rmtree(checkout)
    (installed / "bindings.cpp").unlink()
    assert cuda_kernels.find_csrc() == installed and cuda_kernels.missing_sources(installed) == ["bindings.cpp"]


def _check_wheel(wheel: Path, tmp: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = sorted(n.split("/")[-1] for n in names if n.startswith("vitkern/_csrc/"))
        assert shipped == _csrc_files(), f"vitkern/_csrc/ in {wheel.name}: {shipped}"
        for name in shipped:
            assert zf.read(f"vitkern/_csrc/{name}") == (CSRC / name).read_bytes(), name
        assert "vitkern/kernels/cuda.py" in names
        assert not any(n.startswith(("csrc/", "tests/", "build/")) for n in names)
        site = tmp / "site"
        zf.extractall(site)
    # The unpacked wheel as an installed vitkern (run outside the checkout): the sources are found.
    code = ("import json, vitkern.kernels.cuda as c\n"
            "print(json.dumps({'file': c.__file__, 'csrc': str(c.CSRC), 'missing': c.missing_sources(c.CSRC)}))")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).resolve() == (site / "vitkern" / "kernels" / "cuda.py").resolve()
    assert Path(found["csrc"]).resolve() == (site / "vitkern" / "_csrc").resolve()
    assert found["missing"] == []


def test_wheel_ships_the_cuda_sources(tree, tmp_path):
    wheel = _backend("build_wheel", tree, tmp_path / "dist")
    _check_wheel(wheel, tmp_path)


def test_sdist_carries_csrc_and_cmake_and_builds_the_same_wheel(tree, tmp_path):
    sdist = _backend("build_sdist", tree, tmp_path / "dist")
    with tarfile.open(sdist) as tf:
        root = tf.getnames()[0].split("/")[0]
        names = {n[len(root) + 1:] for n in tf.getnames()}
        tf.extractall(tmp_path / "unpacked", filter="data")
    for needed in ["CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "vitkern/kernels/cuda.py"]:
        assert needed in names, needed
    in_csrc = [n[len("csrc/"):] for n in names if n.startswith("csrc/")]
    assert sorted(n for n in in_csrc if n and "/" not in n) == _csrc_files()
    # pip installs an sdist by building a wheel from it: that wheel ships the sources too.
    wheel = _backend("build_wheel", tmp_path / "unpacked" / root, tmp_path / "dist2")
    _check_wheel(wheel, tmp_path)


def test_editable_wheel_copies_nothing(tree, tmp_path):
    wheel = _backend("build_editable", tree, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if "_csrc" in n or n.endswith((".cu", ".cuh"))]
    assert not (tree / "vitkern" / "_csrc").exists()
