"""The Triton patch embedding (vitkern.ops.patch_embed(backend="triton")) against the float64 oracle.

Runs on conftest.TRITON_DEVICE: CPU tensors in the Triton interpreter here, CUDA on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, TRITON_DEVICE, assert_close

import vitkern.ops as ops
from vitkern import dispatch, reference

pytestmark = pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable")

DEV = TRITON_DEVICE
NAMES = ("x", "weight", "bias", "cls_token", "pos_embed")


def _inputs(batch, chans, height, width, patch, dim, dtype, cls=True, pos=True, bias=True):
    ph, pw = patch if isinstance(patch, tuple) else (patch, patch)
    tokens = (height // ph) * (width // pw) + (1 if cls else 0)
    # Conv2d-like init scale so the outputs stay O(1) whatever K = chans * ph * pw.
    scale = (chans * ph * pw) ** -0.5
    return [
        torch.randn(batch, chans, height, width).to(dtype),
        (torch.randn(dim, chans, ph, pw) * scale).to(dtype),
        torch.randn(dim).to(dtype) if bias else None,
        torch.randn(1, 1, dim).to(dtype) if cls else None,
        torch.randn(1, tokens, dim).to(dtype) if pos else None,
    ]


def _check(inputs, dtype, x_grad=True, x_transform=None):
    leaves = [t.to(DEV, copy=True).requires_grad_(x_grad or i > 0) if t is not None else None for i, t in enumerate(inputs)]
    x_in = x_transform(leaves[0]) if x_transform else leaves[0]
    y = ops.patch_embed(x_in, *leaves[1:], backend="triton")
    ref_leaves = [t.detach().double().requires_grad_(x_grad or i > 0) if t is not None else None for i, t in enumerate(inputs)]
    y_ref = reference.patch_embed(*ref_leaves)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y.cpu(), y_ref, dtype, name="tokens")

    dy = torch.randn(y_ref.shape).to(dtype)
    y.backward(dy.to(DEV))
    y_ref.backward(dy.double())
    batch = inputs[0].shape[0]
    for name, leaf, ref in zip(NAMES, leaves, ref_leaves):
        if leaf is None:
            continue
        if name == "x" and not x_grad:
            assert leaf.grad is None
            continue
        assert leaf.grad is not None, name
        assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape, name
        # Parameter gradients sum over the batch (and bias over the patches too): the summed
        # fp16 terms carry one rounding each, so the error grows like sqrt(number of terms).
        terms = {"weight": batch * y_ref.shape[1], "bias": batch * y_ref.shape[1]}.get(name, batch)
        scale = 1.0 if name == "x" else max(1.0, terms ** 0.5 / 4)
        assert_close(leaf.grad.cpu(), ref.grad, dtype, scale=scale, name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch,height,width,patch,dim",
    [(1, 32, 32, 8, 64), (3, 32, 32, 16, 192), (3, 12, 20, 4, 64)],
    ids=["32px-p8-d64-b1", "32px-p16-d192-b3", "12x20-p4-d64-b3"],
)
def test_patch_embed_matches_reference(batch, height, width, patch, dim, dtype):
    _check(_inputs(batch, 3, height, width, patch, dim, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cls,pos,bias", [(False, False, False), (False, True, True), (True, False, False)])
def test_patch_embed_optional_terms(cls, pos, bias, dtype):
    _check(_inputs(3, 3, 12, 20, 4, 64, dtype, cls=cls, pos=pos, bias=bias), dtype)


def test_patch_embed_no_dx_when_x_is_constant():
    _check(_inputs(2, 3, 32, 32, 8, 64, torch.float32), torch.float32, x_grad=False)


def test_patch_embed_hybrid_patch1_rect_patch_and_channels_last():
    # Hybrid: a CNN feature map (many channels) with patch size 1.
    _check(_inputs(2, 40, 3, 5, 1, 64, torch.float32), torch.float32)
    # A rectangular patch, on a channels_last (non-contiguous) image.
    _check(
        _inputs(2, 3, 12, 20, (4, 5), 64, torch.float32),
        torch.float32,
        x_transform=lambda x: x.contiguous(memory_format=torch.channels_last),
    )


def test_patch_embed_refuses_mixed_dtypes():
    x, w, b, c, p = _inputs(1, 3, 16, 16, 8, 64, torch.float32)
    with pytest.raises(TypeError, match="weight is torch.float16 but x is torch.float32"):
        ops.patch_embed(x.to(DEV), w.half().to(DEV), b.to(DEV), c.to(DEV), p.to(DEV), backend="triton")
    with pytest.raises(TypeError, match="pos_embed is torch.float16 but x is torch.float32"):
        ops.patch_embed(x.to(DEV), w.to(DEV), b.to(DEV), c.to(DEV), p.half().to(DEV), backend="triton")


OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if HAS_CUDA
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


def test_patch_embed_opcheck():
    x, w, b, c, p = [t.to(DEV) for t in _inputs(2, 3, 16, 16, 8, 64, torch.float32)]
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, (x, w, b, c, p), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, (x, w, None, None, None), test_utils=OPCHECK_UTILS)
    dt = torch.randn(2, 5, 64, device=DEV)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_bwd.default, (dt, x, w, True, True), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_bwd.default, (dt[:, 1:].contiguous(), x, w, False, False), test_utils=OPCHECK_UTILS)


@pytest.mark.gpu
@pytest.mark.parametrize("patch,dim", [(16, 768), (14, 1280), (32, 384)])
def test_patch_embed_bf16(patch, dim):
    size = 224 if patch != 14 else 224
    _check(_inputs(2, 3, size, size, patch, dim, torch.bfloat16), torch.bfloat16)


@pytest.mark.gpu
def test_patch_embed_int32_overflow_batch():
    # ViT-B/16 at batch 4096: the tokens (4096 * 197 * 768 elements) pass 2^31. dtokens is zero
    # except on the last two images, so every gradient equals the one of those two images alone:
    # checked against the oracle run on just them, where the offsets are largest.
    batch, dim = 4096, 768
    x, w, b, c, p = _inputs(batch, 3, 224, 224, 16, dim, torch.bfloat16)
    assert batch * 197 * dim > 2**31
    leaves = [t.cuda().requires_grad_() for t in (x, w, b, c, p)]
    y = ops.patch_embed(*leaves, backend="triton")
    tail = slice(batch - 2, batch)
    ref_leaves = [x[tail].double().requires_grad_()] + [t.double().requires_grad_() for t in (w, b, c, p)]
    y_ref = reference.patch_embed(*ref_leaves)
    assert_close(y[tail].cpu(), y_ref, torch.bfloat16, name="tokens tail")
    dy = torch.zeros_like(y)
    dy_tail = torch.randn(2, 197, dim, dtype=torch.bfloat16)
    dy[tail] = dy_tail.cuda()
    y.backward(dy)
    y_ref.backward(dy_tail.double())
    assert_close(leaves[0].grad[tail].cpu(), ref_leaves[0].grad, torch.bfloat16, name="dx tail")
    assert torch.count_nonzero(leaves[0].grad[: batch - 2]) == 0
    for name, leaf, ref in zip(NAMES[1:], leaves[1:], ref_leaves[1:]):
        # Sums over 2 images (and 196 patches for weight/bias): see _check for the scale.
        assert_close(leaf.grad.cpu(), ref.grad, torch.bfloat16, scale=4.0, name=f"d{name}")


@pytest.mark.gpu
def test_patch_embed_torch_compile_fullgraph():
    x, w, b, c, p = [t.cuda() for t in _inputs(2, 3, 32, 32, 8, 64, torch.float16)]
    w.requires_grad_()

    def f(x, w, b, c, p):
        return ops.patch_embed(x, w, b, c, p, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, w, b, c, p)
    assert_close(out.cpu(), reference.patch_embed(*[t.detach().double().cpu() for t in (x, w, b, c, p)]), torch.float16, name="tokens")
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_patch_embed_bwd_is_deterministic():
    from vitkern.kernels.triton import patch_embed as tpe

    x, w, _, _, _ = [t.to(DEV) if t is not None else None for t in _inputs(3, 3, 16, 24, 8, 64, torch.float32)]
    dt = torch.randn(3, 7, 64, device=DEV)
    first = tpe.patch_embed_bwd(dt, x, w, True, True)
    second = tpe.patch_embed_bwd(dt, x, w, True, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
