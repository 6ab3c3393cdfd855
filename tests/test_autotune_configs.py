"""Every autotune config of every Triton kernel, run once against the fp64 reference.

The interpreter runs only a kernel's first config (it cannot benchmark several), so every other
tile shape is first executed on a GPU: this file runs each one there, once, through the public
ops, by forcing config i of every tuned kernel at once (`_common.force_config("*", i)`; a kernel
with fewer configs repeats its own modulo its length) for i up to the longest list. 16-bit
kernels run in bf16 (fp16 shares their config lists), the fp32 lists in fp32.

`CASES` and `run_case` are also what `scripts/gpu_suite.py --dry-run` replays on meta tensors to
count the compiles of this test. On the CPU, `test_two_fp32_linear_configs_in_the_interpreter` runs
both configs of the fp32 linear kernels through the interpreter as a self-check of the forcing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import torch

from conftest import HAS_CUDA, assert_close, seed

from vitkern import ops

triton = pytest.importorskip("triton")
from vitkern.kernels.triton import _common  # noqa: E402


@contextmanager
def _design(name: str) -> Iterator[None]:
    """VITKERN_LN_LINEAR_DESIGN for the block (read at each call by the ln_linear launcher)."""
    old = os.environ.get("VITKERN_LN_LINEAR_DESIGN")
    os.environ["VITKERN_LN_LINEAR_DESIGN"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VITKERN_LN_LINEAR_DESIGN", None)
        else:
            os.environ["VITKERN_LN_LINEAR_DESIGN"] = old


def _inputs(case: str, device: str, dtype: torch.dtype) -> List[torch.Tensor]:
    """Fresh random leaves for `case` (fixed seed: the reference sees the same values)."""
    g = torch.Generator().manual_seed(seed(0))

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    # 2 x 197 rows: two ViT images; widths cross every tile edge of the 128-wide configs.
    if case == "linear":
        return [r(394, 320), r(448, 320, scale=320**-0.5), r(448), r(394, 448)]
    if case in ("ln_linear", "ln_linear_fold"):
        return [r(394, 320), 1 + r(320, scale=0.1), r(320, scale=0.1), r(448, 320, scale=320**-0.5), r(448)]
    if case.startswith("attention"):
        head_dim = int(case.split("_d")[1])
        return [r(2, 197, 3 * 2 * head_dim)]
    if case == "patch_embed":
        return [r(2, 3, 64, 48), r(192, 3, 16, 16, scale=0.02), r(192), r(1, 1, 192), r(1, 13, 192)]
    raise ValueError(f"unknown case {case!r}")


def _forward(case: str, leaves: List[torch.Tensor], backend: str) -> torch.Tensor:
    if case == "linear":
        x, w, b, res = leaves
        return ops.linear(x, w, b, residual=res, activation="gelu", backend=backend)
    if case in ("ln_linear", "ln_linear_fold"):
        x, g, beta, w, b = leaves
        return ops.ln_linear(x, g, beta, w, b, eps=1e-6, activation="gelu", backend=backend)
    if case.startswith("attention"):
        return ops.attention(leaves[0], 2, backend=backend)
    if case == "patch_embed":
        x, w, b, cls, pos = leaves
        return ops.patch_embed(x, w, b, cls, pos, backend=backend)
    raise ValueError(f"unknown case {case!r}")


# The cases and the tuned kernels each one reaches (forward + backward). The folded ln_linear
# design has no backward of its own (its backward is design (a)'s), so it runs forward only.
CASES: Dict[str, Tuple[str, ...]] = {
    "linear": ("linear.fwd", "linear.dw"),
    "ln_linear": ("ln_linear.fwd", "ln_linear.dw", "linear.fwd"),
    "ln_linear_fold": ("ln_linear.fold_fwd",),
    "attention_d64": ("attention.*64",),
    "attention_d80": ("attention.*96",),
    "attention_d128": ("attention.*128",),
    "patch_embed": ("patch_embed.fwd", "patch_embed.dx", "patch_embed.dw"),
}
MAX_CONFIGS = 4  # the longest config list of any tuned kernel (asserted below)


def run_case(case: str, device: str, dtype: torch.dtype, backend: str = "triton") -> List[torch.Tensor]:
    """The case's output and the gradients of every leaf, with `backend` (`device` may be "meta")."""
    leaves = _inputs(case, device, dtype)
    with _design("fold" if case == "ln_linear_fold" else "normalize"):
        out = _forward(case, leaves, backend)
        if case == "ln_linear_fold":
            return [out]
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed(1))).to(device=device, dtype=dtype)
        grads = torch.autograd.grad(out, leaves, dy)
    return [out, *grads]


def run_every_config(case: str, device: str, dtype: torch.dtype, check: Callable[[int, List[torch.Tensor]], None]) -> None:
    """run_case once per config index (every tuned kernel forced to config i), `check`ing each."""
    for i in range(MAX_CONFIGS):
        with _common.force_config("*", i):
            check(i, run_case(case, device, dtype))


def _reference(case: str, dtype: torch.dtype) -> List[torch.Tensor]:
    leaves = [t.detach().double().requires_grad_() for t in _inputs(case, "cpu", dtype)]
    with _design("normalize"):
        out = _forward(case, leaves, "eager")
        if case == "ln_linear_fold":
            return [out.detach()]
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed(1))).to(dtype).double()
        return [out.detach(), *torch.autograd.grad(out, leaves, dy)]


def _check_against_reference(case: str, dtype: torch.dtype) -> Callable[[int, List[torch.Tensor]], None]:
    expected = _reference(case, dtype)

    def check(index: int, actual: List[torch.Tensor]) -> None:
        names = ["output"] + [f"grad {i}" for i in range(len(actual) - 1)]
        for name, a, e in zip(names, actual, expected):
            # Gradients sum hundreds of rounded products: the table's tolerance, scaled.
            assert_close(a.float().cpu(), e, dtype, scale=1.0 if name == "output" else 4.0, name=f"{case} config {index} {name}")

    return check


def test_max_configs_covers_every_list():
    # Every tuned kernel's list must be reachable by run_every_config's indices.
    from vitkern.kernels.triton import attention, linear, ln_linear, patch_embed  # noqa: F401

    for kernel in attention.CONFIGS.values():
        for configs in kernel.values():
            assert len(configs) <= MAX_CONFIGS
    assert _common.TUNED and all(len(t.configs) <= MAX_CONFIGS for t in _common.TUNED.values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_autotune_config_matches_reference(case, dtype):
    run_every_config(case, "cuda", dtype, _check_against_reference(case, dtype))


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter self-check; on a GPU the test above runs every config")
def test_two_fp32_linear_configs_in_the_interpreter():
    """Both fp32 linear configs (64x64x16 and 128x64x16) run through the interpreter when forced,
    and each matches the reference: the forcing reaches the launch, not only the first config."""
    from vitkern.kernels.triton import linear

    assert len(linear.F32_CONFIGS) == 2
    seen = []

    def x(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_()

    g = torch.Generator().manual_seed(seed(0))
    inputs = [x(70, 48), x(80, 48), x(80)]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    out_ref = ops.linear(*ref, activation="gelu", backend="eager")
    grads_ref = torch.autograd.grad(out_ref.sum(), ref)
    real = _common.Tuned.plan

    def spy(self, named, device_name):
        pool, source = real(self, named, device_name)
        if self.name.startswith("linear."):
            seen.append((self.name, _common.config_label(pool[0]), source))
        return pool, source

    for index in range(2):
        with _common.force_config("linear.fwd_f32", index), _common.force_config("linear.dw_f32", index):
            _common.Tuned.plan = spy
            try:
                out = ops.linear(*inputs, activation="gelu", backend="triton")
                grads = torch.autograd.grad(out.sum(), inputs)
            finally:
                _common.Tuned.plan = real
        assert_close(out, out_ref, torch.float32, name=f"config {index} output")
        for i, (a, e) in enumerate(zip(grads, grads_ref)):
            assert_close(a, e, torch.float32, scale=4.0, name=f"config {index} grad {i}")
    labels = {name: {label for n, label, _ in seen if n == name} for name in ("linear.fwd_f32", "linear.dw_f32")}
    assert all(len(v) == 2 for v in labels.values()), labels
    assert {source for _, _, source in seen} == {"forced"}
