"""Triton `linear` (GEMM + bias / GELU / residual epilogue) forward and backward against the fp64
eager reference. Runs on the GPU when there is one, else on CPU tensors in the Triton interpreter."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TRITON_DEVICE, assert_close, assert_ratio

import vitkern.ops as ops
from vitkern import reference

DEV = TRITON_DEVICE


def _inputs(lead, k, n, dtype, *, bias, residual, transposed=False):
    x = torch.randn(*lead, k, device=DEV, dtype=dtype)
    w = torch.randn(n, k, device=DEV, dtype=dtype) / math.sqrt(k)
    if transposed:
        # Non-contiguous operands: the kernels read x and weight through their strides.
        x = torch.randn(k, *lead, device=DEV, dtype=dtype).movedim(0, -1)
        w = (torch.randn(k, n, device=DEV, dtype=dtype) / math.sqrt(k)).t()
    b = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    r = torch.randn(*lead, n, device=DEV, dtype=dtype) if residual else None
    return x, w, b, r


def _run(fn, x, w, b, r, dy, activation):
    """Output and the gradients of (x, weight, bias, residual) for upstream gradient dy (None =
    y.sum(), whose gradient reaches the kernels as a zero-stride expanded tensor)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    y = fn(leaves[0], leaves[1], leaves[2], activation=activation, residual=leaves[3])
    if dy is None:
        y.sum().backward()
    else:
        y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check(dtype, lead, k, n, *, bias, activation, residual, transposed=False, sum_grad=False):
    x, w, b, r = _inputs(lead, k, n, dtype, bias=bias, residual=residual, transposed=transposed)
    dy = None if sum_grad else torch.randn(*lead, n, device=DEV, dtype=dtype)
    y, grads = _run(lambda *a, **kw: ops.linear(*a, **kw, backend="triton"), x, w, b, r, dy, activation)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    y_ref, grads_ref = _run(reference.linear, d(x), d(w), d(b), d(r), d(dy), activation)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, name="y")
    rows = x.numel() // k
    # With GELU the kernels round GELU'(pre) (saved by the forward) and dy' = dy * GELU'(pre) to the
    # input dtype before the two GEMMs (eager PyTorch rounds dy' once), so each of the summed terms
    # of dx (over N), dweight and dbias (over the rows) carries roundings of the input dtype: their
    # error grows like sqrt(terms).
    red_rows = math.sqrt(rows) if activation == "gelu" else 1.0
    red_n = math.sqrt(n) if activation == "gelu" else 1.0
    for name, got, ref, scale in zip(("dx", "dweight", "dbias", "dresidual"), grads, grads_ref,
                                     (red_n, red_rows, red_rows, 1.0)):
        if ref is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert_close(got, ref, dtype, scale=scale, name=name)


# Each epilogue option on, and off, in at least one case; shapes cross the 64-wide interpreter
# tiles (N = 200 and K = 80 are not multiples of the block) without crossing every option with
# every shape.
CASES = [
    # lead dims, K, N, bias, activation, residual
    ((17,), 64, 192, True, "gelu", False),     # fc1-like
    ((3, 50), 192, 64, True, None, True),      # proj / fc2-like: bias + residual
    ((1,), 80, 200, False, None, False),       # single row, K and N off the block, bare GEMM
    ((3, 50), 64, 200, False, "gelu", True),   # GELU + residual, no bias
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-K{c[1]}-N{c[2]}-b{int(c[3])}-{c[4]}-r{int(c[5])}")
def test_linear_matches_reference(dtype, case):
    lead, k, n, bias, activation, residual = case
    _check(dtype, lead, k, n, bias=bias, activation=activation, residual=residual)


def test_linear_strided_operands_and_expanded_grad():
    # x and weight transposed views, dy a zero-stride expansion (from y.sum()).
    _check(torch.float32, (17,), 80, 64, bias=True, activation=None, residual=True, transposed=True, sum_grad=True)


def test_linear_gelu_with_expanded_grad():
    _check(torch.float16, (17,), 64, 64, bias=True, activation="gelu", residual=False, sum_grad=True)


def test_linear_inference_skips_saving_dact():
    # Without autograd the forward does not write GELU'(pre): the GELU epilogue alone.
    x, w, b, r = _inputs((3, 50), 64, 200, torch.float16, bias=True, residual=True)
    with torch.no_grad():
        y = ops.linear(x, w, b, activation="gelu", residual=r, backend="triton")
    ref = reference.linear(x.double(), w.double(), b.double(), activation="gelu", residual=r.double())
    assert_close(y, ref, torch.float16, name="y")


def test_linear_triton_refuses_mixed_dtypes():
    x = torch.randn(4, 64, device=DEV)
    w = torch.randn(32, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"weight is torch.float16 but x is torch.float32"):
        ops.linear(x, w, backend="triton")


def test_linear_opcheck_fwd():
    x = torch.randn(9, 32, device=DEV)
    w = torch.randn(40, 32, device=DEV)
    b = torch.randn(40, device=DEV)
    r = torch.randn(9, 40, device=DEV)
    torch.library.opcheck(torch.ops.vitkern.linear_fwd.default, (x, w, b, r, "gelu", True))
    torch.library.opcheck(torch.ops.vitkern.linear_fwd.default, (x, w, None, None, "gelu", False))


def test_linear_opcheck_bwd():
    x = torch.randn(9, 32, device=DEV)
    w = torch.randn(40, 32, device=DEV)
    dy = torch.randn(9, 40, device=DEV)
    dact = torch.rand(9, 40, device=DEV) * 1.2 - 0.1  # GELU' lies in about [-0.13, 1.13]
    torch.library.opcheck(torch.ops.vitkern.linear_bwd.default, (dy, x, w, dact, "gelu", True, True, True))
    torch.library.opcheck(torch.ops.vitkern.linear_bwd.default, (dy, x, w, dact[:0], None, False, True, False))


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=["fc1", "proj", "gelu-res"])
def test_linear_bf16(case):
    lead, k, n, bias, activation, residual = case
    _check(torch.bfloat16, lead, k, n, bias=bias, activation=activation, residual=residual)


@pytest.mark.gpu
def test_linear_bf16_vit_b_shape():
    # fc1 of ViT-B/16 at batch 2: K = 768, N = 3072 (the autotuned large tiles, not the test tile).
    _check(torch.bfloat16, (2, 197), 768, 3072, bias=True, activation="gelu", residual=False)


@pytest.mark.gpu
def test_linear_int32_overflow():
    """fc1 of ViT-B/16 at batch 4096: M * N = 4096 * 197 * 3072 > 2^31, so every [M, N] access
    (y, dact, dy) overflows int32 offsets unless the kernels use int64."""
    torch.cuda.empty_cache()
    m, k, n = 4096 * 197, 768, 3072
    dtype = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    b = torch.randn(n, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    y = ops.linear(xl, wl, bl, activation="gelu", backend="triton")
    y.backward(dy)
    y = y.detach()
    # Rows past 2^31 / N (and the first rows) against the fp64 oracle, row-wise.
    tail = slice(m - 300, m)
    for rows in (slice(0, 64), tail):
        xd = x[rows].double().requires_grad_()
        yd = reference.linear(xd, w.double(), b.double(), activation="gelu")
        yd.backward(dy[rows].double())
        assert_close(y[rows], yd, dtype, name=f"y[{rows}]")
        assert_close(xl.grad[rows], xd.grad, dtype, scale=math.sqrt(n), name=f"dx[{rows}]")
    del y  # 5 GB; eager bf16 autograd below needs ~40 GB of the GPU's 80
    # dweight and dbias sum all 806k rows: fp64 oracle accumulated over row chunks, and the ratio
    # test against eager PyTorch in bf16 (which also rounds dy' to bf16 before its GEMMs).
    wd = w.double().requires_grad_()
    bd = b.double().requires_grad_()
    for start in range(0, m, 65536):
        rows = slice(start, min(m, start + 65536))
        reference.linear(x[rows].double(), wd, bd, activation="gelu").backward(dy[rows].double())
    we, be = w.clone().requires_grad_(), b.clone().requires_grad_()
    reference.linear(x, we, be, activation="gelu").backward(dy)
    assert_ratio(wl.grad, we.grad, wd.grad, name="dweight")
    assert_ratio(bl.grad, be.grad, bd.grad, name="dbias")
