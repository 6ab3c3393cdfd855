"""Edge cases of issue 9 outside attention: each test failed before its fix.

* dtype mixes: every backend refuses a bias, residual, pos_embed or weight of another dtype than
  x with one message naming both (eager used to promote to fp32, or fail in a matmul naming neither);
* fp16 linear epilogues past fp16's range: GELU of a huge negative pre-activation is 0 (not NaN),
  a product past 65504 cancelled by the residual stays finite (eager computes them in fp32);
* LayerNorm without affine parameters (weight / bias None) on eager and Triton (the CUDA backend's
  case is in test_cuda_ops.py, on the emulator);
* Triton linear / ln_linear with a stride whose BLOCK multiple passes 2^31 (it crashed the process:
  run in a subprocess so a crash fails the test instead of killing pytest).

The loader cases (part of q/k/v missing, odd MLP widths through timm and HF) are in test_weights.py
and test_config.py; the CUDA backend's (GELU at +-inf, sizes past int32) in test_cuda_ops.py.

The Triton cases run in the interpreter on CPU tensors (fp32/fp16 only there).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TRITON_DEVICE, assert_close

import vitkern
from vitkern import dispatch, ops, reference

HAS_TRITON = not dispatch.backend_unavailable_reasons("triton")
BACKENDS_HERE = ["eager"] + (["triton"] if HAS_TRITON else [])  # the CUDA backend: test_cuda_ops.py

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)


def _dev(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


# ------------------------------------------------------------------------------ dtype mixes (6, 11)


def _mixed_calls(dev):
    h, f = torch.float16, torch.float32
    x = torch.randn(3, 16, device=dev, dtype=h)
    w = torch.randn(8, 16, device=dev, dtype=h)
    img = torch.randn(1, 3, 8, 8, device=dev, dtype=h)
    pw = torch.randn(16, 3, 4, 4, device=dev, dtype=h)
    return {
        "bias": (lambda b: ops.linear(x, w, torch.randn(8, device=dev, dtype=f), backend=b), "bias"),
        "residual": (lambda b: ops.linear(x, w, residual=torch.randn(3, 8, device=dev, dtype=f), backend=b), "residual"),
        "weight": (lambda b: ops.linear(x, w.float(), backend=b), "weight"),
        "ln_linear weight": (lambda b: ops.ln_linear(x, None, None, w.float(), backend=b), "weight"),
        "ln_weight": (lambda b: ops.ln_linear(x, torch.ones(16, device=dev), None, w, backend=b), "ln_weight"),
        "layer_norm bias": (lambda b: ops.layer_norm(x, None, torch.zeros(16, device=dev), backend=b), "bias"),
        "pos_embed": (
            lambda b: ops.patch_embed(img, pw, None, None, torch.randn(1, 4, 16, device=dev, dtype=f), backend=b),
            "pos_embed",
        ),
    }


@pytest.mark.parametrize("case", list(_mixed_calls("cpu")))
def test_mixed_dtypes_refused_alike_on_every_backend(case):
    messages = {}
    for backend in BACKENDS_HERE:
        call, name = _mixed_calls(_dev(backend))[case]
        with pytest.raises(TypeError) as info:
            call(backend)
        messages[backend] = str(info.value)
        assert f"{name} is torch.float32 but x is torch.float16" in messages[backend], messages[backend]
    assert len(set(messages.values())) == 1, messages


def test_fp64_image_in_fp32_model_names_x_and_weight():
    model = vitkern.ViT(**TINY).eval()
    with pytest.raises(TypeError, match=r"weight is torch.float32 but x is torch.float64"):
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


# ------------------------------------------------------------------------------ fp16 epilogues (5)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_fp16_gelu_of_huge_negative_preactivation_is_zero(backend):
    dev = _dev(backend)
    # x @ w^T = -1e5 (past fp16's 65504); GELU of it is -0 to every digit.
    x = torch.full((2, 16), 25.0, device=dev, dtype=torch.float16)
    w = torch.full((4, 16), -250.0, device=dev, dtype=torch.float16)
    y = ops.linear(x, w, torch.zeros(4, device=dev, dtype=torch.float16), activation="gelu", backend=backend)
    assert y.dtype == torch.float16
    assert torch.equal(y.float(), torch.zeros(2, 4, device=dev)), y


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_fp16_product_past_range_cancelled_by_residual_is_finite(backend):
    dev = _dev(backend)
    x = torch.full((2, 16), 25.0, device=dev, dtype=torch.float16)
    w = torch.full((4, 16), 175.0, device=dev, dtype=torch.float16)  # x @ w^T = 7e4
    residual = torch.full((2, 4), -60000.0, device=dev, dtype=torch.float16)
    y = ops.linear(x, w, residual=residual, backend=backend)
    expected = 70000.0 + residual.double()
    assert torch.isfinite(y).all(), y
    assert_close(y, expected, torch.float16, name="y")


def test_eager_fp16_linear_rounds_once():
    # The epilogue in fp32 rounds once: equal to the fp64 result rounded to fp16, element by element.
    x = torch.randn(5, 64, dtype=torch.float16)
    w = (torch.randn(48, 64) / 8).to(torch.float16)
    b, r = torch.randn(48).to(torch.float16), torch.randn(5, 48).to(torch.float16)
    y = ops.linear(x, w, b, activation="gelu", residual=r, backend="eager")
    ref = reference.linear(x.double(), w.double(), b.double(), activation="gelu", residual=r.double())
    assert (y.double() - ref).abs().max().item() <= 2 ** -10 * ref.abs().max().item()


# ------------------------------------------------------------------------------ LayerNorm without affine (9)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("affine", ["none", "weight only", "bias only"])
def test_layer_norm_and_ln_linear_without_affine(backend, affine):
    dev = _dev(backend)
    d, n = 24, 40
    x = (torch.randn(3, 5, d, device=dev) * 2 + 1).requires_grad_()
    g = (1 + 0.5 * torch.randn(d, device=dev)).requires_grad_() if affine == "weight only" else None
    beta = (0.5 * torch.randn(d, device=dev)).requires_grad_() if affine == "bias only" else None
    w = (torch.randn(n, d, device=dev) / math.sqrt(d)).requires_grad_()
    leaves = [t for t in (x, g, beta, w) if t is not None]

    def d64(t):
        return t.detach().double().requires_grad_() if t is not None else None

    x64, g64, b64, w64 = (d64(t) for t in (x, g, beta, w))
    refs = [t for t in (x64, g64, b64, w64) if t is not None]
    for name, got, ref in (
        ("layer_norm", ops.layer_norm(x, g, beta, backend=backend), reference.layer_norm(x64, g64, b64)),
        ("ln_linear", ops.ln_linear(x, g, beta, w, activation="gelu", backend=backend),
         reference.ln_linear(x64, g64, b64, w64, activation="gelu")),
    ):
        assert_close(got, ref, torch.float32, name=name)
        dy = torch.randn(got.shape, device=dev)
        grads = torch.autograd.grad(got, leaves, dy, allow_unused=True)
        grads_ref = torch.autograd.grad(ref, refs, dy.double(), allow_unused=True)
        for i, (gr, gr_ref) in enumerate(zip(grads, grads_ref)):
            if gr_ref is None:  # w does not reach layer_norm's output
                assert gr is None, f"{name} grad {i}"
                continue
            assert_close(gr, gr_ref, torch.float32, scale=4, name=f"{name} grad {i}")


# ------------------------------------------------------------------------------ strides past 2^31 / BLOCK (7)

# Runs in a child process (a wrapped int32 pointer step is a SIGSEGV, which would kill pytest).
# Each operand lives in a sparse anonymous mapping (MAP_NORESERVE): gigabytes of address space,
# of which only the touched elements' pages take memory (a few hundred KiB).
_STRIDED_CHILD = r"""
import mmap, os, sys
import torch
from vitkern import ops, reference

S = 2 ** 27  # BLOCK * S passes 2^31 for BLOCK >= 16: the reduction tiles are 16 or 32 wide


def sparse(shape, strides):
    n = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    region = mmap.mmap(-1, n * 4, flags=flags)
    t = torch.frombuffer(region, dtype=torch.float32, count=n).as_strided(shape, strides)
    t.copy_(torch.randn(shape))
    return t


def check(name, got, ref):
    err = (got.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    print(name, err, flush=True)
    if not err < 1e-4:
        sys.exit(f"{name}: relative error {err}")


def grads(fn, *leaves, dy):
    leaves = [t.requires_grad_() for t in leaves]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, dy))


torch.manual_seed(0)
M, K, N = 20, 24, 8
# linear: x's reduction-dim (column) stride is S in the forward; its row stride is S in the
# backward's dW = dy^T x, whose reduction runs over the rows.
for x in (sparse((M, K), (1, S)), sparse((M, K), (S, 1))):
    w, b, dy = torch.randn(N, K), torch.randn(N), torch.randn(M, N)
    got = grads(lambda x, w, b: ops.linear(x, w, b, activation="gelu", backend="triton"), x, w, b, dy=dy)
    ref = grads(lambda x, w, b: reference.linear(x, w, b, activation="gelu"),
                x.detach().double(), w.double(), b.double(), dy=dy.double())
    for name, g, r in zip(("linear y", "linear dx", "linear dw", "linear db"), got, ref):
        check(f"{name} x.stride={x.stride()}", g.detach(), r.detach())
# ln_linear: the weight's column stride (the reduction dim of the forward) and x's row stride
# (the backward's dW reduction) are S.
x, w = sparse((M, K), (S, 1)), sparse((N, K), (1, S))
g, beta, dy = torch.randn(K), torch.randn(K), torch.randn(M, N)
for design in ("normalize", "fold"):
    os.environ["VITKERN_LN_LINEAR_DESIGN"] = design
    got = grads(lambda *a: ops.ln_linear(*a, backend="triton"), x, g, beta, w, dy=dy)
    ref = grads(lambda *a: reference.ln_linear(*a), *(t.detach().double() for t in (x, g, beta, w)), dy=dy.double())
    for name, gg, r in zip(("y", "dx", "dln_weight", "dln_bias", "dweight"), got, ref):
        check(f"ln_linear ({design}) {name}", gg.detach(), r.detach())
print("ok")
"""


@pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable")
def test_triton_gemms_with_strides_past_int32_over_block():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _STRIDED_CHILD], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("ok"), (
        f"exit status {proc.returncode} (a negative status is the signal that killed it, -11 SIGSEGV)\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


# ------------------------------------------------------------ option tensors on another device (19)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_option_tensors_on_another_device_are_refused_by_name(backend):
    """PatchDropout's `keep` and the QK-norm tensors are checked apart from the main inputs: one on
    the meta device with CPU inputs is refused naming it, before any backend runs."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 3, 16, 16, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    keep = torch.zeros(2, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="keep is on meta but x is on cpu"):
        ops.patch_embed(x, weight, None, keep=keep, backend=backend)
    qkv = torch.randn(2, 5, 3 * 8, generator=g)  # 2 heads of 4
    for name in ("q_norm", "k_norm"):
        for part, norm in (("weight", (torch.ones(4, device="meta"), None, 1e-6)),
                           ("bias", (None, torch.zeros(4, device="meta"), 1e-6))):
            with pytest.raises(TypeError, match=f"{name}'s {part} is torch.float32 on meta; it must match qkv: "
                                                "torch.float32 on cpu"):
                ops.attention(qkv, 2, **{name: norm}, backend=backend)
