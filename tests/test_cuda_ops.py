"""The CUDA C++ kernels (csrc/, backend="cuda"), forward and backward, against the fp64 eager reference.

Every test runs twice, through the `dev` fixture:
* on a GPU ("cuda", marked `gpu`, run by `make gpu`; skipped without one): the extension is taken
  from `vitkern._C` or built just in time, and a failing build fails these tests;
* on the CPU emulator ("emulated", run by `make test` everywhere): csrc/ compiled by
  tests/cuda_emu/emulator.py, torch layer (bindings.cpp) and kernels as written, with the kernels'
  threads run as fibers and cuBLASLt replaced by a fake written from its documentation. Its ops are
  torch.ops.vitkern_emu.cuda_* for CPU tensors, and backend="cuda" is pointed at them for the test.
  This checks everything but the hardware: index math, launch limits, fragment layouts, the torch
  layer and autograd, the fake implementations under torch.compile. The GPU-memory-sized and
  tool-based tests (batch 4096, compute-sanitizer) are GPU only. Outputs are NaN-poisoned before every launch (conftest sets
VITKERN_POISON_OUTPUTS=1, which csrc/bindings.cpp honours), so an element a kernel forgets fails.

Shapes: the Triton tests' grid (T in {1, 17, 50, 197}, head dim 64/80, D in {64, 192}, batch 1
and 3) plus head dim 128, odd LayerNorm widths (scalar path), and ViT-B at batch 4096, where
B * T * 4D exceeds 2^31 (int64 offsets). The whole `vitkern.ViT(backend="cuda")` is held to the
ratio test of DESIGN.md, and compute-sanitizer's memcheck runs a small script over every op
(with VITKERN_TEST_SANITIZER=1: it takes a minute or two).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_CUDA, assert_close, assert_ratio, attention_rounding, seed, unit_roundoff

import vitkern
import vitkern.ops as ops
from vitkern import reference

DTYPES = (torch.bfloat16, torch.float16)
EPS = 1e-6


def _use_gpu_extension() -> str:
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    from vitkern.kernels import cuda as cuda_kernels
    from vitkern.ops import _cuda  # noqa: F401  (registers backend "cuda" until vitkern.ops imports it)

    error = cuda_kernels.load_error()
    assert error is None, f"the CUDA extension must build and load on a GPU machine: {error}"
    return "cuda"


def _use_emulated_extension(monkeypatch) -> str:
    """Points backend="cuda" at the emulator's build of csrc/ (CPU tensors) for one test."""
    from cuda_emu import emulator
    from vitkern import dispatch
    from vitkern.ops import _cuda

    why = emulator.toolchain_error()
    if why:
        pytest.skip(f"the CUDA emulator cannot be built here: {why}")
    emulator.load_torch_ops()
    monkeypatch.setattr(_cuda, "OPS_NAMESPACE", "vitkern_emu")
    monkeypatch.setattr(_cuda, "ACCEPTS_CPU", True)
    monkeypatch.setattr(_cuda, "_READY", True)  # the real extension is not needed
    _cuda._register_fakes()  # for torch.ops.vitkern_emu: torch.compile traces through them
    real = dispatch.backend_unavailable_reasons
    monkeypatch.setattr(dispatch, "backend_unavailable_reasons", lambda b: [] if b == "cuda" else real(b))
    return "cpu"


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def dev(request, monkeypatch):
    """The device the test's tensors live on: "cuda" (a GPU) or "cpu" (the emulator, whose kernels
    also run with UBSan checks: a misaligned vector access or an int overflow fails the launch)."""
    return _use_gpu_extension() if request.param == "cuda" else _use_emulated_extension(monkeypatch)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu)])
def gpu_dev(request) -> str:
    """For the tests that need the real device (its memory, the sanitizer)."""
    return _use_gpu_extension()


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _grads(leaves):
    return [t.grad if t is not None else None for t in leaves]


def _d64(t):
    return t.detach().double() if t is not None else None


def _run(fn, tensors, dy):
    leaves = _leaves(tensors)
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), _grads(leaves)


def _check_all(name, got, ref, dtype, factor=2.0):
    """Gradients are sums of terms rounded to `dtype` (dh, the normalized x, P): their error is a few
    ulps of the result's magnitude, not of each element, so the tolerance scales with max |ref|."""
    for n, g, r in zip(name, got, ref):
        if r is None:
            assert g is None, f"{n}: expected no gradient"
            continue
        assert g is not None, f"{n}: missing"
        assert g.dtype == dtype and g.shape == r.shape, f"{n}: {g.dtype} {tuple(g.shape)} vs {tuple(r.shape)}"
        assert_close(g, r, dtype, scale=factor * max(1.0, r.abs().max().item()), name=n)


# ------------------------------------------------------------------------------------------ LayerNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (17,), (3, 197)])
@pytest.mark.parametrize("d", [1, 64, 100, 192, 768, 1280])
def test_layer_norm(dev, dtype, lead, d):
    x = (torch.randn(*lead, d, device=dev) * 2 + torch.randn(*lead, 1, device=dev)).to(dtype)
    w = (1 + 0.5 * torch.randn(d, device=dev)).to(dtype)
    b = (0.5 * torch.randn(d, device=dev)).to(dtype)
    dy = torch.randn(*lead, d, device=dev, dtype=dtype)
    y, grads = _run(lambda *a: ops.layer_norm(*a, EPS, backend="cuda"), (x, w, b), dy)
    y_ref, grads_ref = _run(lambda *a: reference.layer_norm(*a, EPS), [_d64(t) for t in (x, w, b)], _d64(dy))
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, name="y")
    _check_all(("dx", "dweight", "dbias"), grads, grads_ref, dtype)


@pytest.mark.parametrize("affine", ["none", "weight only", "bias only"])
def test_layer_norm_and_ln_linear_without_affine(dev, affine):
    # nn.LayerNorm(elementwise_affine=False): weight and/or bias None (an AttributeError before).
    dtype, d, n = torch.float16, 64, 192
    x = (torch.randn(17, d, device=dev) * 2 + 1).to(dtype)
    g = (1 + 0.5 * torch.randn(d, device=dev)).to(dtype) if affine == "weight only" else None
    beta = (0.5 * torch.randn(d, device=dev)).to(dtype) if affine == "bias only" else None
    w = (torch.randn(n, d, device=dev) / math.sqrt(d)).to(dtype)
    for fn, ref_fn, tensors, names in (
        (lambda *a: ops.layer_norm(*a, EPS, backend="cuda"), lambda *a: reference.layer_norm(*a, EPS),
         (x, g, beta), ("dx", "dweight", "dbias")),
        (lambda *a: ops.ln_linear(*a, eps=EPS, activation="gelu", backend="cuda"),
         lambda *a: reference.ln_linear(*a, eps=EPS, activation="gelu"), (x, g, beta, w), ("dx", "dln_weight", "dln_bias", "dweight")),
    ):
        dy = torch.randn(17, n if len(tensors) == 4 else d, device=dev, dtype=dtype)
        y, grads = _run(fn, tensors, dy)
        y_ref, grads_ref = _run(ref_fn, [_d64(t) for t in tensors], _d64(dy))
        assert_close(y, y_ref, dtype, scale=2, name="y")
        _check_all(names, grads, grads_ref, dtype, factor=4.0)


# ------------------------------------------------------------------------------------------ linear


def _linear_inputs(dev, lead, k, n, dtype, bias, residual):
    x = torch.randn(*lead, k, device=dev).to(dtype)
    w = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=dev).to(dtype) if bias else None
    r = torch.randn(*lead, n, device=dev).to(dtype) if residual else None
    return x, w, b, r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (17,), (3, 197)])
@pytest.mark.parametrize("k,n", [(64, 192), (192, 64), (192, 768), (768, 192)])
@pytest.mark.parametrize("bias,activation,residual", [(True, None, False), (True, "gelu", False), (True, None, True),
                                                      (False, None, False), (False, "gelu", True)])
def test_linear(dev, dtype, lead, k, n, bias, activation, residual):
    tensors = _linear_inputs(dev, lead, k, n, dtype, bias, residual)
    dy = torch.randn(*lead, n, device=dev, dtype=dtype)

    def run(fn, ts, g):
        return _run(lambda x, w, b, r: fn(x, w, b, activation=activation, residual=r), ts, g)

    y, grads = run(lambda *a, **kw: ops.linear(*a, **kw, backend="cuda"), tensors, dy)
    y_ref, grads_ref = run(reference.linear, [_d64(t) for t in tensors], _d64(dy))
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, scale=2, name="y")
    _check_all(("dx", "dweight", "dbias", "dresidual"), grads, grads_ref, dtype)


def test_linear_fp16_gelu_past_range(dev):
    # x @ w^T = -1e5 is -inf in the fp16 pre-activation the GEMM stores: GELU of it is 0 (it was
    # NaN), GELU' too, so the backward stays finite; a +7e4 product overflows to +inf, where GELU is inf.
    x = torch.full((3, 16), 25.0, device=dev, dtype=torch.float16)
    w = torch.full((4, 16), -250.0, device=dev, dtype=torch.float16)
    w[3] = 175.0
    dy = torch.ones(3, 4, device=dev, dtype=torch.float16)
    y, (dx, dw) = _run(lambda a, b: ops.linear(a, b, activation="gelu", backend="cuda"), (x, w), dy)
    assert torch.equal(y[:, :3].float(), torch.zeros(3, 3)), y
    assert torch.isposinf(y[:, 3]).all(), y
    assert torch.isfinite(dw[:3]).all() and not torch.isnan(dx).any(), (dx, dw)


def test_sizes_past_int32_are_refused_by_name(dev):
    # The kernels take batch, heads, tokens as ints and launch batch * heads blocks along grid.x: a
    # batch of 2^31 (a stride-0 view, nothing allocated) is refused naming it instead of wrapping.
    from vitkern.ops import _cuda

    qkv = torch.zeros(1, 1, 3 * 64, device=dev, dtype=torch.float16).expand(2**31, 1, 3 * 64)
    with pytest.raises(RuntimeError, match=r"batch \* num_heads \(the kernels' grid.x\) is 2147483648"):
        _cuda._ops().cuda_attention_fwd(qkv, 1, 0.125)


# ------------------------------------------------------------------------------------------ ln_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (17,), (3, 197)])
@pytest.mark.parametrize("d,n", [(64, 192), (192, 576), (192, 768), (100, 64)])
@pytest.mark.parametrize("bias,activation", [(True, None), (True, "gelu"), (False, None)])
def test_ln_linear(dev, dtype, lead, d, n, bias, activation):
    x = (torch.randn(*lead, d, device=dev) * 2 + torch.randn(*lead, 1, device=dev)).to(dtype)
    g = (1 + 0.5 * torch.randn(d, device=dev)).to(dtype)
    beta = (0.5 * torch.randn(d, device=dev)).to(dtype)
    w = (torch.randn(n, d, device=dev) / math.sqrt(d)).to(dtype)
    b = torch.randn(n, device=dev).to(dtype) if bias else None
    dy = torch.randn(*lead, n, device=dev, dtype=dtype)

    def run(fn, ts, gy):
        return _run(lambda *a: fn(*a, eps=EPS, activation=activation), ts, gy)

    y, grads = run(lambda *a, **kw: ops.ln_linear(*a, **kw, backend="cuda"), (x, g, beta, w, b), dy)
    y_ref, grads_ref = run(reference.ln_linear, [_d64(t) for t in (x, g, beta, w, b)], _d64(dy))
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, scale=2, name="y")
    _check_all(("dx", "dln_weight", "dln_bias", "dweight", "dbias"), grads, grads_ref, dtype, factor=4.0)


# ------------------------------------------------------------------------------------------ attention


def _qkv(dev, batch, tokens, heads, head_dim, dtype, strided):
    dim = heads * head_dim
    qkv = torch.randn(batch, tokens, 3 * dim + (8 if strided else 0), device=dev).to(dtype)
    # strided: the packed projection inside a wider buffer (token stride 3D + 8), read through its strides
    return qkv[..., : 3 * dim] if strided else qkv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tokens", [1, 17, 50, 65, 197])
@pytest.mark.parametrize("heads,head_dim", [(1, 64), (3, 64), (2, 80), (2, 128)])
@pytest.mark.parametrize("strided", [False, True])
def test_attention(dev, dtype, batch, tokens, heads, head_dim, strided):
    qkv = _qkv(dev, batch, tokens, heads, head_dim, dtype, strided)
    dy = torch.randn(batch, tokens, heads * head_dim, device=dev, dtype=dtype)
    y, (dqkv,) = _run(lambda q: ops.attention(q, heads, backend="cuda"), (qkv,), dy)
    y_ref, (dqkv_ref,) = _run(lambda q: reference.attention(q, heads), (_d64(qkv),), _d64(dy))
    y_low, (dqkv_low,) = _run(lambda q: reference.attention(q, heads), (qkv,), dy)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, name="out")
    # Beyond 2x eager's error: one rounding of the result, and what the kernel's 16-bit P and dS
    # (eager's dS is fp32) can add (conftest.attention_rounding).
    u, extra = unit_roundoff(dtype), attention_rounding(qkv, dy, heads, dtype)
    assert_ratio(y, y_low, y_ref, name="out", floor=u * y_ref.abs().max().item() + extra["out"])
    assert dqkv.shape == qkv.shape
    assert_close(dqkv, dqkv_ref, dtype, scale=2 * max(1.0, dqkv_ref.abs().max().item()), name="dqkv")
    assert_ratio(dqkv, dqkv_low, dqkv_ref, name="dqkv", floor=u * dqkv_ref.abs().max().item() + extra["dqkv"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_explicit_scale(dev, dtype):
    qkv = _qkv(dev, 2, 33, 2, 64, dtype, False)
    y = ops.attention(qkv, 2, scale=0.3, backend="cuda")
    assert_close(y, reference.attention(_d64(qkv), 2, scale=0.3), dtype, name="out")


# ------------------------------------------------------------------------------------------ patch_embed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hw,patch", [((32, 48), 16), ((32, 32), 8), ((28, 42), 14), ((7, 5), 1)])
@pytest.mark.parametrize("dim", [64, 192])
@pytest.mark.parametrize("cls,pos,bias", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_patch_embed(dev, dtype, batch, hw, patch, dim, cls, pos, bias):
    chans = 3 if patch > 1 else 16
    h, w = hw
    tokens = (1 if cls else 0) + (h // patch) * (w // patch)
    x = torch.randn(batch, chans, h, w, device=dev).to(dtype)
    wt = (torch.randn(dim, chans, patch, patch, device=dev) / math.sqrt(chans * patch * patch)).to(dtype)
    tensors = (
        x,
        wt,
        torch.randn(dim, device=dev).to(dtype) if bias else None,
        torch.randn(1, 1, dim, device=dev).to(dtype) if cls else None,
        torch.randn(1, tokens, dim, device=dev).to(dtype) if pos else None,
    )
    dy = torch.randn(batch, tokens, dim, device=dev, dtype=dtype)
    y, grads = _run(lambda *a: ops.patch_embed(*a, backend="cuda"), tensors, dy)
    y_ref, grads_ref = _run(reference.patch_embed, [_d64(t) for t in tensors], _d64(dy))
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, scale=2, name="out")
    _check_all(("dx", "dweight", "dbias", "dcls", "dpos"), grads, grads_ref, dtype)


def test_patch_embed_without_input_grad_returns_none(dev):
    x = torch.randn(2, 3, 32, 32, device=dev, dtype=torch.bfloat16)
    w = torch.randn(64, 3, 16, 16, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ops.patch_embed(x, w, None, backend="cuda").sum().backward()
    assert x.grad is None and w.grad is not None and torch.isfinite(w.grad.float()).all()


# ------------------------------------------------------------------------------------------ large batch (int64 offsets)


def _big_enough(bytes_needed: int) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < bytes_needed:
        pytest.skip(f"needs {bytes_needed / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


def test_vit_b_batch_4096_fc1_gelu_overflows_int32(gpu_dev):
    dev = gpu_dev
    """fc1 of ViT-B at batch 4096: 4096 * 197 * 3072 = 2.48e9 elements > 2^31."""
    dtype, k, n = torch.bfloat16, 768, 3072
    rows = 4096 * 197
    _big_enough(40 * 2**30)
    x = torch.randn(rows, k, device=dev, dtype=dtype)
    w = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dtype).requires_grad_()
    b = torch.randn(n, device=dev, dtype=dtype)
    xr = x.clone().requires_grad_()
    y = ops.linear(xr, w, b, activation="gelu", backend="cuda")
    assert y.shape == (rows, n)
    pick = torch.tensor([0, 1, rows // 2, rows - 2, rows - 1], device=dev)
    ref = reference.linear(x[pick].double(), w.detach().double(), b.double(), activation="gelu")
    assert_close(y[pick], ref, dtype, scale=2, name="y rows")
    dy = torch.randn_like(y)
    y.backward(dy)
    # dx of a row depends only on that row's dy.
    h = (x[pick].double() @ w.detach().double().t() + b.double()).requires_grad_()
    reference.gelu(h).backward(dy[pick].double())
    dx_ref = h.grad @ w.detach().double()
    assert_close(xr.grad[pick], dx_ref, dtype, scale=4 * max(1.0, dx_ref.abs().max().item()), name="dx rows")
    assert torch.isfinite(w.grad.float()).all()


def test_vit_b_batch_4096_attention_and_layer_norm(gpu_dev):
    dev = gpu_dev
    """Attention and LayerNorm at ViT-B batch 4096 (qkv: 1.86e9 elements): rows far past 2^31 bytes."""
    dtype, batch, tokens, heads, hd = torch.bfloat16, 4096, 197, 12, 64
    _big_enough(30 * 2**30)
    qkv = torch.randn(batch, tokens, 3 * heads * hd, device=dev, dtype=dtype).requires_grad_()
    y = ops.attention(qkv, heads, backend="cuda")
    dy = torch.randn_like(y)
    y.backward(dy)
    for bi in (0, batch - 1):
        q = qkv[bi : bi + 1].detach().double().requires_grad_()
        r = reference.attention(q, heads)
        r.backward(dy[bi : bi + 1].double())
        assert_close(y[bi : bi + 1], r, dtype, name=f"out[{bi}]")
        assert_close(qkv.grad[bi : bi + 1], q.grad, dtype, scale=4 * max(1.0, q.grad.abs().max().item()), name=f"dqkv[{bi}]")
    del qkv, y, dy
    x = torch.randn(batch * tokens, heads * hd, device=dev, dtype=dtype)
    w = torch.randn(heads * hd, device=dev, dtype=dtype)
    b = torch.randn(heads * hd, device=dev, dtype=dtype)
    out = ops.layer_norm(x, w, b, EPS, backend="cuda")
    pick = torch.tensor([0, x.shape[0] // 2, x.shape[0] - 1], device=dev)
    assert_close(out[pick], reference.layer_norm(x[pick].double(), w.double(), b.double(), EPS), dtype, name="ln rows")


# ------------------------------------------------------------------------------------------ whole model


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_cuda_backend_matches_eager_within_the_ratio_test(dev, dtype):
    torch.manual_seed(seed(0))
    kwargs = dict(img_size=64, patch_size=16, embed_dim=192, depth=3, num_heads=3, num_classes=16)
    eager = vitkern.ViT(**kwargs, backend="eager").to(dev).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters
        for name, p in eager.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = vitkern.ViT(**kwargs, backend="cuda").to(dev).eval()
    model.load_state_dict(eager.state_dict())
    oracle = vitkern.ViT(**kwargs, backend="eager").to(dev).double().eval()
    oracle.load_state_dict(eager.state_dict())
    low = eager.to(dtype)
    model = model.to(dtype)
    x = torch.randn(4, 3, 64, 64, device=dev)

    out = model(x.to(dtype))
    out_low = low(x.to(dtype))
    out_ref = oracle(x.double())
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert_ratio(out, out_low, out_ref, name="logits", floor=1e-3)

    # Training step: gradients of every parameter against the same yardstick.
    out.float().square().mean().backward()
    out_low.float().square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), p_low, p_ref in zip(model.named_parameters(), low.parameters(), oracle.parameters()):
        assert p.grad is not None, name
        assert_ratio(p.grad, p_low.grad, p_ref.grad, name=f"grad {name}", floor=1e-3 * max(1.0, p_ref.grad.abs().max().item()))


def test_torch_compile_traces_the_cuda_ops(dev):
    """fullgraph: the fake implementations give every output's shape and dtype (on the emulator too)."""
    qkv = torch.randn(2, 50, 3 * 128, device=dev, dtype=torch.bfloat16)
    w = torch.randn(128, 128, device=dev, dtype=torch.bfloat16) / 12
    b = torch.randn(128, device=dev, dtype=torch.bfloat16)

    def f(qkv, w, b):
        return ops.linear(ops.attention(qkv, 2, backend="cuda"), w, b, activation="gelu", backend="cuda")

    expected = f(qkv, w, b)
    got = torch.compile(f, fullgraph=True)(qkv, w, b)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_double_backward_and_torch_func_name_the_backend(dev):
    """Issue 19, item 4: a gradient of a CUDA op's gradient (create_graph=True: gradient penalties,
    R1) and torch.func transforms raise naming the cuda backend and backend='eager' (torch's own
    messages named neither), and a first-order backward is untouched."""
    g = torch.Generator().manual_seed(seed(0))
    qkv = torch.randn(1, 5, 3 * 64, generator=g).to(dev, torch.bfloat16)
    x = torch.randn(3, 64, generator=g).to(dev, torch.bfloat16)
    w, b = torch.randn(64, generator=g).to(dev, torch.bfloat16), torch.randn(64, generator=g).to(dev, torch.bfloat16)
    cases = [("attention", lambda t: ops.attention(t, 1, backend="cuda"), qkv),
             ("layer_norm", lambda t: ops.layer_norm(t, w, b, backend="cuda"), x)]
    for name, fn, t in cases:
        leaf = t.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match=rf"cuda backend .*{name}.*create_graph=True.*backend='eager'"):
            torch.autograd.grad(fn(leaf).float().square().sum(), leaf, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"torch.func transforms .*cuda backend of {name}.*backend='eager'"):
            torch.func.grad(lambda u: fn(u).float().sum())(t)
        fn(leaf).float().sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


# ------------------------------------------------------------------------------------------ memcheck


def _compute_sanitizer():
    from vitkern.kernels import cuda as cuda_kernels

    return shutil.which("compute-sanitizer", path=os.path.join(cuda_kernels.cuda_home(), "bin")) or shutil.which("compute-sanitizer")


SANITIZER_SCRIPT = textwrap.dedent(
    """
    import torch, vitkern.ops as ops
    from vitkern.ops import _cuda  # noqa: F401
    dev = "cuda"
    for dtype in (torch.bfloat16, torch.float16):
        for tokens, heads, hd in ((1, 3, 64), (197, 3, 64), (70, 2, 80), (70, 2, 128)):
            qkv = torch.randn(2, tokens, 3 * heads * hd, device=dev, dtype=dtype, requires_grad=True)
            ops.attention(qkv, heads, backend="cuda").sum().backward()
        for d in (100, 768):
            x = torch.randn(5, 17, d, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(d, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(d, device=dev, dtype=dtype, requires_grad=True)
            ops.layer_norm(x, w, b, backend="cuda").sum().backward()
            W = torch.randn(3 * d, d, device=dev, dtype=dtype, requires_grad=True)
            bb = torch.randn(3 * d, device=dev, dtype=dtype, requires_grad=True)
            ops.ln_linear(x, w, b, W, bb, activation="gelu", backend="cuda").sum().backward()
            r = torch.randn(5, 17, 3 * d, device=dev, dtype=dtype, requires_grad=True)
            ops.linear(x, W, bb, residual=r, backend="cuda").sum().backward()
            g = torch.rand(3 * d, device=dev, dtype=dtype, requires_grad=True)
            for act in (None, "gelu_tanh", "quick_gelu"):  # LayerScale: the dh / dgamma pass
                ops.linear(x, W, bb, residual=r, scale=g, activation=act, backend="cuda").sum().backward()
        for patch, hw in ((16, (32, 48)), (14, (28, 28))):
            x = torch.randn(2, 3, *hw, device=dev, dtype=dtype, requires_grad=True)
            wt = torch.randn(64, 3, patch, patch, device=dev, dtype=dtype, requires_grad=True)
            t = 1 + (hw[0] // patch) * (hw[1] // patch)
            cls = torch.randn(1, 1, 64, device=dev, dtype=dtype, requires_grad=True)
            pos = torch.randn(1, t, 64, device=dev, dtype=dtype, requires_grad=True)
            ops.patch_embed(x, wt, None, cls, pos, backend="cuda").sum().backward()
            regs = torch.randn(1, 5, 64, device=dev, dtype=dtype, requires_grad=True)  # class + 4 registers
            ops.patch_embed(x, wt, None, regs, pos[:, 1:], no_embed_class=True, backend="cuda").sum().backward()
    torch.cuda.synchronize()
    print("sanitizer script done")
    """
)


def test_compute_sanitizer_memcheck_is_clean(gpu_dev, tmp_path):
    """About a minute or two under memcheck (every kernel, cuBLASLt's too, is instrumented), so it
    runs when VITKERN_TEST_SANITIZER=1: the time-boxed `make gpu` stage runs it separately."""
    if os.environ.get("VITKERN_TEST_SANITIZER", "0") in ("", "0"):
        pytest.skip("set VITKERN_TEST_SANITIZER=1 to run compute-sanitizer memcheck over every CUDA op (1-2 min)")
    tool = _compute_sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "memcheck_ops.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, VITKERN_POISON_OUTPUTS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "99", "--target-processes", "all", sys.executable, str(script)],
        capture_output=True, text=True, timeout=480, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "sanitizer script done" in out, out[-6000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-6000:]


def test_vit_cuda_backend_compiles_fullgraph(monkeypatch):
    """The whole model with backend="cuda" is one graph for torch.compile, forward and backward. On
    the emulator only: whether dynamo traces the Python layer does not depend on the device, and the
    GPU suite's time is better spent on test_torch_compile_traces_the_cuda_ops."""
    dev = _use_emulated_extension(monkeypatch)
    torch.manual_seed(seed(0))
    model = vitkern.ViT(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=1, num_classes=8,
                        backend="cuda").to(dev).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, device=dev, dtype=torch.bfloat16)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    got.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in model.parameters())
