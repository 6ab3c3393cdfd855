"""The Triton LayerNorm (vitkern.ops.layer_norm(backend="triton")) against the float64 oracle.

Runs on conftest.TRITON_DEVICE: CPU tensors in the Triton interpreter here, CUDA on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, TRITON_DEVICE, assert_close

import vitkern.ops as ops
from vitkern import dispatch, reference
from vitkern.dispatch import BackendUnavailableError

pytestmark = pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable")

DEV = TRITON_DEVICE


def _inputs(shape, dtype, affine=True):
    dim = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    w = (torch.randn(dim) * 0.5 + 1).to(dtype) if affine else None
    b = torch.randn(dim).to(dtype) if affine else None
    dy = torch.randn(shape).to(dtype)
    return x, w, b, dy


def _check(shape, dtype, affine=True, eps=1e-6):
    x, w, b, dy = _inputs(shape, dtype, affine)
    leaves = [t.to(DEV, copy=True).requires_grad_() if t is not None else None for t in (x, w, b)]
    y = ops.layer_norm(leaves[0], leaves[1], leaves[2], eps, backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy.to(DEV))

    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y_ref = reference.layer_norm(ref_leaves[0], ref_leaves[1], ref_leaves[2], eps)
    y_ref.backward(dy.double())

    assert_close(y.cpu(), y_ref, dtype, name="y")
    assert_close(leaves[0].grad.cpu(), ref_leaves[0].grad, dtype, name="dx")
    if affine:
        # dweight/dbias sum over all rows: the reference's magnitude grows like sqrt(rows) and so
        # does the rounding of the summed terms (one output rounding per input row in fp16).
        rows = x.numel() // x.shape[-1]
        scale = max(1.0, rows ** 0.5 / 4)
        assert_close(leaves[1].grad.cpu(), ref_leaves[1].grad, dtype, scale=scale, name="dweight")
        assert_close(leaves[2].grad.cpu(), ref_leaves[2].grad, dtype, scale=scale, name="dbias")
        assert leaves[1].grad.dtype == dtype and leaves[2].grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,dim", [(1, 64), (17, 80), (3 * 197, 192), (17, 768)])
def test_layer_norm_matches_reference(rows, dim, dtype):
    _check((rows, dim), dtype)


def test_layer_norm_vit_b_rows():
    # Three ViT-B images' tokens; fp16 only: the interpreter is slow on 591 x 768.
    _check((3 * 197, 768), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_3d_no_affine(dtype):
    _check((3, 5, 80), dtype, affine=False)


def test_layer_norm_large_eps_and_wide_row():
    # dim above the 1024-wide tile and not a power of two; eps large enough to matter.
    _check((3, 1283), torch.float32, eps=0.5)


def test_layer_norm_noncontiguous_input():
    x = torch.randn(6, 192, device=DEV)[:, ::2]  # column stride 2
    w = torch.randn(96, device=DEV)
    b = torch.randn(96, device=DEV)
    y = ops.layer_norm(x, w, b, backend="triton")
    assert_close(y.cpu(), reference.layer_norm(x.double().cpu(), w.double().cpu(), b.double().cpu()), torch.float32, name="y")


def test_layer_norm_bwd_is_deterministic():
    x, w, b, dy = _inputs((300, 64), torch.float32)
    from vitkern.kernels.triton import layer_norm as tln

    x, w, dy = x.to(DEV), w.to(DEV), dy.to(DEV)
    _, mean, rstd = tln.layer_norm_fwd(x, w, None, 1e-6)
    first = tln.layer_norm_bwd(dy, x, w, mean, rstd)
    second = tln.layer_norm_bwd(dy, x, w, mean, rstd)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_layer_norm_stats_launcher():
    from vitkern.kernels.triton import layer_norm as tln

    x = torch.randn(19, 80, device=DEV) * 3 + 1
    mean, rstd = tln.layer_norm_stats(x, 1e-6)
    ref_mean, ref_rstd = reference.layer_norm_stats(x.double().cpu(), 1e-6)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert_close(mean.cpu(), ref_mean, torch.float32, name="mean")
    assert_close(rstd.cpu(), ref_rstd, torch.float32, name="rstd")


def test_layer_norm_refuses_mixed_dtypes():
    x = torch.randn(4, 64, device=DEV)
    w = torch.randn(64, device=DEV, dtype=torch.float16)
    b = torch.randn(64, device=DEV)
    with pytest.raises(TypeError, match="weight is torch.float16 but x is torch.float32"):
        ops.layer_norm(x, w, b, backend="triton")


def test_layer_norm_refuses_too_wide_rows():
    x = torch.randn(1, 8200, device=DEV)
    w = torch.randn(8200, device=DEV)
    with pytest.raises(BackendUnavailableError, match="at most 8192"):
        ops.layer_norm(x, w, w, backend="triton")


# In the interpreter wrap_triton cannot put the launch into a traced graph (the launchers skip it
# on fake tensors), so the AOT-dispatch comparison only means something on a GPU.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if HAS_CUDA
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


def test_layer_norm_opcheck():
    x = torch.randn(5, 64, device=DEV)
    w = torch.randn(64, device=DEV)
    b = torch.randn(64, device=DEV)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_fwd.default, (x, w, b, 1e-6), test_utils=OPCHECK_UTILS)
    _, mean, rstd = torch.ops.vitkern.layer_norm_fwd(x, w, b, 1e-6)
    dy = torch.randn(5, 64, device=DEV)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_bwd.default, (dy, x, w, mean, rstd), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_bwd.default, (dy, x, None, mean, rstd), test_utils=OPCHECK_UTILS)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,dim", [(17, 192), (3 * 197, 768), (5, 1280)])
def test_layer_norm_bf16(rows, dim):
    _check((rows, dim), torch.bfloat16)


@pytest.mark.gpu
def test_layer_norm_int32_overflow_rows():
    # 4096 x 197 rows of ViT-B: rows * dim * 2 bytes > 2^31 (byte and element offsets overflow int32).
    rows, dim = 4096 * 197, 768
    assert rows * dim > 2**31
    x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    xr = x.requires_grad_()
    y = ops.layer_norm(xr, w, b, backend="triton")
    tail = slice(rows - 300, rows)
    assert_close(y[tail].cpu(), reference.layer_norm(x[tail].detach().double().cpu(), w.double().cpu(), b.double().cpu()), torch.bfloat16, name="y tail")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, xr, dy)
    xt = x[tail].detach().double().cpu().requires_grad_()
    reference.layer_norm(xt, w.double().cpu(), b.double().cpu()).backward(dy[tail].double().cpu())
    assert_close(dx[tail].cpu(), xt.grad, torch.bfloat16, name="dx tail")


@pytest.mark.gpu
def test_layer_norm_torch_compile_fullgraph():
    x = torch.randn(4, 197, 192, device="cuda", dtype=torch.float16, requires_grad=True)
    w = torch.randn(192, device="cuda", dtype=torch.float16, requires_grad=True)
    b = torch.randn(192, device="cuda", dtype=torch.float16, requires_grad=True)

    def f(x, w, b):
        return ops.layer_norm(x, w, b, backend="triton")

    y = torch.compile(f, fullgraph=True)(x, w, b)
    assert_close(y.cpu(), reference.layer_norm(x.detach().double().cpu(), w.detach().double().cpu(), b.detach().double().cpu()), torch.float16, name="y")
    y.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, w, b))
