"""QK-norm inside the CUDA attention kernels (csrc/attention.cu, issue #13), forward and every gradient.

`vitkern.ops.attention(qkv, heads, q_norm=(weight, bias, eps), k_norm=..., backend="cuda")` normalizes
each head's q and/or k row over head_dim as the kernels stage it (no normalized copy is written), and
the backward applies the LayerNorm backward in the dQ / dK epilogues and reduces the weight and bias
gradients deterministically. Every test runs through the `dev` fixture of test_cuda_ops.py: on the CPU
emulator of csrc/ ("cpu") everywhere, and on a GPU ("cuda", marked `gpu`) where there is one.

Each result is held against `vitkern.reference.attention` in float64 with the ratio test (at most 2x
the error of eager PyTorch in the same dtype, plus a floor derived from the kernels' own 16-bit P and
dS, conftest.attention_rounding: the true k-bias gradient is 0, since adding one vector to every key
shifts a softmax row by a constant). Outputs are
NaN-poisoned (conftest), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_ratio, attention_rounding, unit_roundoff
from test_cuda_ops import dev  # noqa: F401  (the fixture: "cuda" on a GPU, "cpu" on the emulator)

import vitkern.ops as ops
from vitkern import reference

DTYPES = (torch.float16, torch.bfloat16)
BATCH, HEADS = 2, 2


def _norm_args(dev, dtype, head_dim, weight=True, bias=True, eps=1e-6):
    w = (1 + 0.5 * torch.randn(head_dim, device=dev)).to(dtype) if weight else None
    b = (0.5 * torch.randn(head_dim, device=dev)).to(dtype) if bias else None
    return (w, b, eps)


def _run(fn, qkv, q_norm, k_norm, dy):
    """fn(qkv, q_norm, k_norm) with fresh leaves; returns (out, [dqkv, dq_w, dq_b, dk_w, dk_b]) (None
    where the argument is None or that side is off). qkv keeps its token stride: the leaf is a buffer
    of stride(1) columns and fn gets the view of its first 3 * dim (a clone would be contiguous)."""

    def leaf(t):
        return t.detach().clone().requires_grad_() if t is not None else None

    width = qkv.shape[-1]
    buffer = qkv.new_zeros(*qkv.shape[:2], qkv.stride(1))
    buffer[..., :width] = qkv
    buffer.requires_grad_()
    x = buffer[..., :width]
    assert x.stride() == qkv.stride()
    qn = (leaf(q_norm[0]), leaf(q_norm[1]), q_norm[2]) if q_norm is not None else None
    kn = (leaf(k_norm[0]), leaf(k_norm[1]), k_norm[2]) if k_norm is not None else None
    y = fn(x, qn, kn)
    y.backward(dy)
    params = [t for n in (qn, kn) for t in (n[:2] if n is not None else (None, None))]
    return y.detach(), [buffer.grad[..., :width]] + [t.grad if t is not None else None for t in params]


def _d64(norm):
    if norm is None:
        return None
    w, b, eps = norm
    return (w.double() if w is not None else None, b.double() if b is not None else None, eps)


def _check(qkv, q_norm, k_norm, dtype, heads=HEADS, scale=None):
    """The cuda op against the float64 reference and eager PyTorch in `dtype`: output and every gradient."""
    dy = torch.randn(*qkv.shape[:2], qkv.shape[-1] // 3, device=qkv.device).to(dtype)

    def op(backend):
        return lambda x, qn, kn: ops.attention(x, heads, scale=scale, q_norm=qn, k_norm=kn, backend=backend)

    def ref(x, qn, kn):
        return reference.attention(x, heads, scale=scale, q_norm=qn, k_norm=kn)

    y, grads = _run(op("cuda"), qkv, q_norm, k_norm, dy)
    y_ref, grads_ref = _run(ref, qkv.double(), _d64(q_norm), _d64(k_norm), dy.double())
    y_low, grads_low = _run(ref, qkv, q_norm, k_norm, dy)
    # Beyond 2x eager's error: one rounding of the result, and what the kernels' 16-bit P and dS
    # (eager's dS is fp32) can add, through the norms' backward (conftest.attention_rounding). The
    # true k-bias gradient is 0 (a constant shift of every softmax row): its floor is the rounding
    # bound alone.
    u = unit_roundoff(dtype)
    extra = attention_rounding(qkv, dy, heads, dtype, scale, q_norm=q_norm, k_norm=k_norm)
    extra = {{"q weight": "dq_weight", "q bias": "dq_bias", "k weight": "dk_weight", "k bias": "dk_bias"}.get(k, k): v
             for k, v in extra.items()}
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_ratio(y, y_low, y_ref, name="out", floor=u * y_ref.abs().max().item() + extra["out"])
    names = ("dqkv", "dq_weight", "dq_bias", "dk_weight", "dk_bias")
    for name, g, r, low in zip(names, grads, grads_ref, grads_low):
        if r is None:
            assert g is None, f"{name}: a gradient for an argument that was None"
            continue
        assert g is not None and g.dtype == dtype and g.shape == r.shape, f"{name}: {g if g is None else (g.dtype, g.shape)}"
        assert_ratio(g, low, r, name=name, floor=u * r.abs().max().item() + extra.get(name, 0.0))
    return y, grads


def _qkv(dev, dtype, tokens, head_dim, heads=HEADS, batch=BATCH, strided=False, magnitude=1.0):
    dim = heads * head_dim
    x = (torch.randn(batch, tokens, 3 * dim + (8 if strided else 0), device=dev) * magnitude).to(dtype)
    # strided: the packed projection inside a wider buffer (token stride 3 * dim + 8), read through its strides
    return x[..., : 3 * dim] if strided else x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("tokens", [1, 17, 70])
@pytest.mark.parametrize("sides", ["q", "k", "qk"])
def test_qk_norm(dev, dtype, head_dim, tokens, sides):
    qkv = _qkv(dev, dtype, tokens, head_dim)
    q_norm = _norm_args(dev, dtype, head_dim) if "q" in sides else None
    k_norm = _norm_args(dev, dtype, head_dim, eps=1e-5) if "k" in sides else None
    _check(qkv, q_norm, k_norm, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_affine,k_affine", [((False, False), (True, False)), ((False, True), (False, False))])
def test_qk_norm_without_weight_or_bias(dev, dtype, q_affine, k_affine):
    # eps 0.1 against a variance of about 0.01: eps must reach the kernels to match.
    qkv = _qkv(dev, dtype, 33, 64, magnitude=0.1)
    q_norm = _norm_args(dev, dtype, 64, *q_affine, eps=0.1)
    k_norm = _norm_args(dev, dtype, 64, *k_affine, eps=1e-6)
    _check(qkv, q_norm, k_norm, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_strided_qkv_and_explicit_scale(dev, dtype):
    qkv = _qkv(dev, dtype, 70, 80, strided=True)
    assert qkv.stride(1) == 3 * HEADS * 80 + 8
    _check(qkv, _norm_args(dev, dtype, 80), _norm_args(dev, dtype, 80), dtype, scale=0.3)


def test_qk_norm_head_dim_128(dev):
    # Head dim 128: the dK/dV kernel's query tiles are 32 rows (a different staging shape).
    _check(_qkv(dev, torch.bfloat16, 70, 128, heads=1), _norm_args(dev, torch.bfloat16, 128),
           _norm_args(dev, torch.bfloat16, 128), torch.bfloat16, heads=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_large_magnitude(dev, dtype):
    # Rows of magnitude ~100 with an offset of 300: the statistics must be fp32 and centred (two passes);
    # the normalized q, k are O(1) whatever qkv's scale, and the backward's rstd is ~1e-2.
    qkv = _qkv(dev, dtype, 70, 64, magnitude=100.0)
    qkv = (qkv.float() + 300.0 * torch.randn(BATCH, 70, 1, device=dev)).to(dtype)
    _check(qkv, _norm_args(dev, dtype, 64), _norm_args(dev, dtype, 64), dtype)


def test_qk_norm_backward_is_deterministic(dev):
    qkv = _qkv(dev, torch.float16, 70, 64)
    q_norm, k_norm = _norm_args(dev, torch.float16, 64), _norm_args(dev, torch.float16, 64)
    dy = torch.randn(BATCH, 70, HEADS * 64, device=dev).half()

    def fn(x, qn, kn):
        return ops.attention(x, HEADS, q_norm=qn, k_norm=kn, backend="cuda")

    first, second = _run(fn, qkv, q_norm, k_norm, dy), _run(fn, qkv, q_norm, k_norm, dy)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_qk_norm_is_supported_by_the_cuda_backend(dev):
    from vitkern.ops import _cuda

    qkv = _qkv(dev, torch.float16, 5, 64)
    call = dict(qkv=qkv, num_heads=HEADS, scale=None, q_norm=_norm_args(dev, torch.float16, 64))
    assert _cuda._attention_supports(call) == []


def test_op_checks_name_the_norm_argument(dev):
    from vitkern.ops import _cuda

    qkv = _qkv(dev, torch.float16, 5, 64)
    w, b = torch.ones(64, device=dev, dtype=torch.float16), torch.zeros(64, device=dev, dtype=torch.float16)
    fwd = _cuda._ops().cuda_attention_fwd
    with pytest.raises(RuntimeError, match=r"q_weight and q_bias must be given together .* q_bias None"):
        fwd(qkv, HEADS, 0.125, w, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"k_weight must have shape \[64\], got \[32\]"):
        fwd(qkv, HEADS, 0.125, None, None, 0.0, w[:32].contiguous(), b[:32].contiguous(), 1e-6)
    with pytest.raises(RuntimeError, match=r"q_bias must have dtype Half .* got BFloat16"):
        fwd(qkv, HEADS, 0.125, w, b.bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match=r"k_eps must be a finite float >= 0, got -1"):
        fwd(qkv, HEADS, 0.125, None, None, 0.0, w, b, -1.0)
    out, lse = fwd(qkv, HEADS, 0.125)  # the plain path: the norm arguments default to None
    dout = torch.randn_like(out)
    with pytest.raises(RuntimeError, match=r"k_weight must be contiguous"):
        _cuda._ops().cuda_attention_bwd(dout, qkv, out, lse, HEADS, 0.125, None, None, 0.0,
                                        torch.ones(64, 2, device=dev, dtype=torch.float16)[:, 0], b, 1e-6)
    dqkv, *norm_grads = _cuda._ops().cuda_attention_bwd(dout, qkv, out, lse, HEADS, 0.125)
    assert dqkv.shape == qkv.shape and [t.shape for t in norm_grads] == [(0,)] * 4


def test_fakes_follow_the_schemas(dev):
    from vitkern.ops import _cuda

    m = lambda *s, dtype=torch.bfloat16: torch.empty(s, device="meta", dtype=dtype)  # noqa: E731
    ops_ = _cuda._ops()
    out, lse = ops_.cuda_attention_fwd(m(2, 17, 384), 2, 0.125, m(64), m(64), 1e-6)
    assert (out.shape, lse.shape, lse.dtype) == ((2, 17, 128), (2, 2, 17), torch.float32)
    grads = ops_.cuda_attention_bwd(m(2, 17, 128), m(2, 17, 384), m(2, 17, 128), m(2, 2, 17, dtype=torch.float32), 2,
                                    0.125, None, None, 0.0, m(64), m(64), 1e-6)
    assert [tuple(g.shape) for g in grads] == [(2, 17, 384), (0,), (0,), (64,), (64,)]


def test_qk_norm_emulated_warp_orders_agree(monkeypatch):
    """The emulator runs the warps of a CTA one after another between barriers, in an order it is told:
    a missing __syncthreads (the epilogue's partial sums reuse the shared tiles) changes the results
    with the order. Forward, reverse and random orders must give identical bits."""
    import ctypes

    from cuda_emu import emulator
    from test_cuda_ops import _use_emulated_extension

    dev = _use_emulated_extension(monkeypatch)
    lib = ctypes.CDLL(str(emulator.build(torch_ops=True)))  # the loaded library: its schedule setting
    lib.vk_emu_configure.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_longlong]
    qkv = _qkv(dev, torch.bfloat16, 70, 80)
    q_norm, k_norm = _norm_args(dev, torch.bfloat16, 80), _norm_args(dev, torch.bfloat16, 80)
    dy = torch.randn(BATCH, 70, HEADS * 80, device=dev).bfloat16()

    def fn(x, qn, kn):
        return ops.attention(x, HEADS, q_norm=qn, k_norm=kn, backend="cuda")

    results = []
    try:
        for schedule in (0, 1, 2):  # forward, reverse, random (emulator.Emulator.SCHEDULES)
            lib.vk_emu_configure(schedule, 7, 227 << 10)
            results.append(_run(fn, qkv, q_norm, k_norm, dy))
    finally:
        lib.vk_emu_configure(0, 0, 227 << 10)
    (y0, g0), rest = results[0], results[1:]
    for y, g in rest:
        assert torch.equal(y, y0)
        assert all(torch.equal(a, b) for a, b in zip(g, g0))


def test_qk_norm_under_torch_compile(dev):
    """fullgraph, forward and backward: the fakes give the QK-norm outputs' shapes (the gradients of the
    norm weights included), and the compiled graph calls the same kernels."""
    qkv = _qkv(dev, torch.bfloat16, 17, 64)
    w, b = _norm_args(dev, torch.bfloat16, 64)[:2]
    dy = torch.randn(BATCH, 17, HEADS * 64, device=dev).bfloat16()

    def f(x, qn, kn):
        return ops.attention(x, HEADS, q_norm=qn, k_norm=kn, backend="cuda")

    q_norm, k_norm = (w, b, 1e-6), (None, b, 1e-5)
    expected = _run(f, qkv, q_norm, k_norm, dy)
    got = _run(torch.compile(f, fullgraph=True), qkv, q_norm, k_norm, dy)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    for g, e in zip(got[1], expected[1]):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, atol=0, rtol=0)
