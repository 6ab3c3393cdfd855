"""Packed (varlen) attention in the CUDA C++ kernels (csrc/attention.cu, issue #23), forward and every gradient.

`vitkern.ops.attention(qkv [total, 3 * dim], heads, cu_seqlens=..., max_seqlen=..., backend="cuda")`:
the forward, dQ and dK/dV kernels (plain and QK-norm) run the grid (sequences * heads, ceil(max_seqlen / 64)),
each CTA reading its sequence's rows from cu_seqlens, so a token attends only to its own image. Every test
runs through the `dev` fixture of test_cuda_ops.py: on the CPU emulator of csrc/ ("cpu") everywhere, and on
a GPU ("cuda", marked `gpu`) where there is one.

* the packed output and every gradient against per-image dense attention in float64 (the ratio test of
  test_cuda_attention_qknorm.py: at most 2x eager PyTorch's error in the same dtype, per image), bf16 and
  fp16, lengths mixed in one batch (1 token, under one tile, exactly one tile, over two tiles), head dims 64
  and 80, QK-norm on and off;
* bit for bit equal to the dense kernels run on each image alone (the same tiles, the same order);
* isolation: perturbing one image leaves every other image's output and input gradients bit-identical;
* outputs are NaN-poisoned (conftest's VITKERN_POISON_OUTPUTS), so a row, an lse entry or a gradient a
  kernel forgets to write fails; the CTAs past a short sequence's end write nothing but their zeroed
  QK-norm workspace.
Kept small for the emulator (its threads are fibers): the whole file adds well under 40 s there.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TOLERANCES, assert_ratio
from test_cuda_ops import dev  # noqa: F401  (the fixture: "cuda" on a GPU, "cpu" on the emulator)

import vitkern.ops as ops
from vitkern import reference

DTYPES = (torch.bfloat16, torch.float16)
HEADS = 2
LENGTHS = [1, 7, 64, 130]  # one token, under a tile, exactly one 64-row tile, three tiles (the last partial)


def _cu(lengths, device):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _inputs(dev, lengths, head_dim, dtype, qk_norm, heads=HEADS, seed=0):
    g = torch.Generator().manual_seed(seed)
    total, dim = sum(lengths), heads * head_dim
    qkv = torch.randn(total, 3 * dim, generator=g).to(dev, dtype)
    dout = torch.randn(total, dim, generator=g).to(dev, dtype)
    norms = None
    if qk_norm:
        norms = [((1 + 0.5 * torch.randn(head_dim, generator=g)).to(dev, dtype),
                  (0.5 * torch.randn(head_dim, generator=g)).to(dev, dtype), eps) for eps in (1e-6, 1e-5)]
    return qkv, dout, norms


def _run(fn, qkv, dout, norms):
    """(out, [dqkv, dq_weight, dq_bias, dk_weight, dk_bias]) of fn(x, q_norm, k_norm) under out.backward(dout)."""
    x = qkv.detach().clone().requires_grad_()
    leaves = [] if norms is None else [t.detach().clone().requires_grad_() for w, b, _ in norms for t in (w, b)]
    qn, kn = (None, None) if norms is None else ((leaves[0], leaves[1], norms[0][2]), (leaves[2], leaves[3], norms[1][2]))
    out = fn(x, qn, kn)
    out.backward(dout)
    return out.detach(), [x.grad] + [t.grad for t in leaves]


def _packed(lengths, dev, heads=HEADS):
    cu = _cu(lengths, dev)
    return lambda x, qn, kn: ops.attention(x, heads, q_norm=qn, k_norm=kn, cu_seqlens=cu, max_seqlen=max(lengths),
                                           backend="cuda")


def _per_image(lengths, heads=HEADS):
    """Dense `reference.attention` on each image's rows as a batch of one, images concatenated."""
    bounds = _cu(lengths, "cpu").tolist()

    def fn(x, qn, kn):
        return torch.cat([reference.attention(x[s:e].unsqueeze(0), heads, q_norm=qn, k_norm=kn)[0]
                          for s, e in zip(bounds[:-1], bounds[1:])])

    return fn


def _d64(norms):
    return None if norms is None else [(w.double(), b.double(), eps) for w, b, eps in norms]


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_varlen_matches_per_image_dense(dev, dtype, head_dim, qk_norm):
    qkv, dout, norms = _inputs(dev, LENGTHS, head_dim, dtype, qk_norm)
    out, grads = _run(_packed(LENGTHS, dev), qkv, dout, norms)
    ref, ref_grads = _run(_per_image(LENGTHS), qkv.cpu().double(), dout.cpu().double(),
                          None if norms is None else [(w.cpu(), b.cpu(), e) for w, b, e in _d64(norms)])
    low, low_grads = _run(_per_image(LENGTHS), qkv.cpu(), dout.cpu(),
                          None if norms is None else [(w.cpu(), b.cpu(), e) for w, b, e in norms])
    floor = TOLERANCES[dtype]["atol"]
    assert out.shape == (sum(LENGTHS), HEADS * head_dim) and out.dtype == dtype
    # Per image: a short image's error is held to its own eager error, not the batch's largest.
    bounds = _cu(LENGTHS, "cpu").tolist()
    names = ["dqkv", "dq_weight", "dq_bias", "dk_weight", "dk_bias"]
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert_ratio(out[s:e].cpu(), low[s:e], ref[s:e], name=f"out, image {i}", floor=floor)
        assert_ratio(grads[0][s:e].cpu(), low_grads[0][s:e], ref_grads[0][s:e], name=f"dqkv, image {i}", floor=floor)
    assert len(grads) == len(ref_grads) == (5 if qk_norm else 1)
    for name, g, r, lo in zip(names[1:], grads[1:], ref_grads[1:], low_grads[1:]):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_ratio(g.cpu(), lo, r, name=name, floor=floor)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_varlen_is_the_dense_kernel_on_each_image(dev, qk_norm):
    """Bit for bit: each image's output, lse and dqkv from the packed launch are the dense kernels' on that image
    alone (same tiles from the image's first row, same order); lse [heads, total] covers every token."""
    from vitkern.ops import _cuda

    lengths, head_dim, dtype = [70, 1, 9], 64, torch.bfloat16
    qkv, dout, norms = _inputs(dev, lengths, head_dim, dtype, qk_norm, seed=1)
    flat = [] if norms is None else [a for w, b, eps in norms for a in (w, b, eps)]
    norm_args = flat if flat else [None, None, 0.0, None, None, 0.0]
    cu, scale = _cu(lengths, dev), head_dim ** -0.5
    op = _cuda._ops()
    out, lse = op.cuda_attention_fwd(qkv, HEADS, scale, *norm_args, cu, max(lengths))
    assert lse.shape == (HEADS, sum(lengths)) and lse.dtype == torch.float32
    dqkv, *norm_grads = op.cuda_attention_bwd(dout, qkv, out, lse, HEADS, scale, *norm_args, cu, max(lengths))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(dqkv).all()
    bounds = cu.tolist()
    sums = [torch.zeros(head_dim if qk_norm else 0, dtype=torch.float64) for _ in norm_grads]
    for s, e in zip(bounds[:-1], bounds[1:]):
        x = qkv[s:e].unsqueeze(0)
        o, l = op.cuda_attention_fwd(x, HEADS, scale, *norm_args)
        assert torch.equal(out[s:e], o[0]) and torch.equal(lse[:, s:e], l[0])
        d, *ng = op.cuda_attention_bwd(dout[s:e].unsqueeze(0).contiguous(), x, o, l, HEADS, scale, *norm_args)
        assert torch.equal(dqkv[s:e], d[0])
        for acc, g in zip(sums, ng):
            acc += g.cpu().double()
    # The norms' weight and bias gradients: the per-image sums (summed in another order: to rounding).
    for name, g, acc in zip(("dq_weight", "dq_bias", "dk_weight", "dk_bias"), norm_grads, sums):
        assert g.shape == (head_dim if qk_norm else 0,)
        if qk_norm:
            torch.testing.assert_close(g.cpu().double(), acc, atol=0.05 * acc.abs().max().item() + 1e-2, rtol=0.02,
                                       msg=name)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_varlen_images_do_not_interact(dev, qk_norm):
    """Perturb image 1 only (qkv and dout): the other images' outputs and qkv gradients stay bit-identical."""
    lengths, head_dim, dtype = [9, 70, 3], 80, torch.float16
    qkv, dout, norms = _inputs(dev, lengths, head_dim, dtype, qk_norm, seed=2)
    s, e = 9, 79
    other = torch.ones(sum(lengths), dtype=torch.bool, device=dev)
    other[s:e] = False
    fn = _packed(lengths, dev)
    out1, g1 = _run(fn, qkv, dout, norms)
    qkv2, dout2 = qkv.clone(), dout.clone()
    qkv2[s:e] = (torch.randn(e - s, qkv.shape[1]) * 3).to(dev, dtype)
    dout2[s:e] = torch.randn(e - s, dout.shape[1]).to(dev, dtype)
    out2, g2 = _run(fn, qkv2, dout2, norms)
    assert torch.equal(out1[other], out2[other])
    assert torch.equal(g1[0][other], g2[0][other])
    assert not torch.equal(out1[~other], out2[~other])


def test_varlen_is_accepted_by_the_cuda_backend(dev):
    from vitkern import dispatch
    from vitkern.ops import _cuda

    qkv, _, _ = _inputs(dev, [4, 9], 64, torch.float16, False)
    call = dict(qkv=qkv, num_heads=HEADS, scale=None, cu_seqlens=_cu([4, 9], dev), max_seqlen=9)
    assert _cuda._attention_supports(call) == []
    assert dispatch.select("attention", "cuda", qkv.device, call).backend == "cuda"
    # The head_dim limits stay: 32 is not instantiated.
    small, _, _ = _inputs(dev, [4, 9], 32, torch.float16, False)
    reasons = _cuda._attention_supports(dict(call, qkv=small))
    assert any("head_dim is 32" in r for r in reasons)
    # A packed qkv whose token stride is not a multiple of 8 elements (16-byte rows) is declined by name.
    wide = torch.zeros(13, 3 * HEADS * 64 + 4, device=dev, dtype=torch.float16)[:, : 3 * HEADS * 64]
    assert any("strides" in r for r in _cuda._attention_supports(dict(call, qkv=wide)))


def test_varlen_op_checks(dev):
    from vitkern.ops import _cuda

    qkv, _, _ = _inputs(dev, [4, 9], 64, torch.float16, False)
    fwd, cu = _cuda._ops().cuda_attention_fwd, _cu([4, 9], dev)
    none = [None, None, 0.0, None, None, 0.0]
    with pytest.raises(RuntimeError, match=r"with cu_seqlens, qkv must be packed \[total_tokens, 3 \* dim\]"):
        fwd(qkv.unsqueeze(0), HEADS, 0.125, *none, cu, 9)
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be int32, got Long"):
        fwd(qkv, HEADS, 0.125, *none, cu.long(), 9)
    with pytest.raises(RuntimeError, match=r"max_seqlen must be in \[1, "):
        fwd(qkv, HEADS, 0.125, *none, cu, 0)
    with pytest.raises(RuntimeError, match=r"max_seqlen = 9 was given without cu_seqlens"):
        fwd(qkv.unsqueeze(0), HEADS, 0.125, *none, None, 9)
    with pytest.raises(RuntimeError, match=r"qkv must be \[batch, tokens, 3 \* dim\]"):
        fwd(qkv, HEADS, 0.125)  # 2-D without cu_seqlens


def test_varlen_fakes_follow_the_schemas(dev):
    from vitkern.ops import _cuda

    m = lambda *s, dtype=torch.bfloat16: torch.empty(s, device="meta", dtype=dtype)  # noqa: E731
    op, cu = _cuda._ops(), m(4, dtype=torch.int32)
    out, lse = op.cuda_attention_fwd(m(20, 384), 2, 0.125, None, None, 0.0, None, None, 0.0, cu, 11)
    assert (out.shape, lse.shape, lse.dtype) == ((20, 128), (2, 20), torch.float32)
    grads = op.cuda_attention_bwd(m(20, 128), m(20, 384), m(20, 128), m(2, 20, dtype=torch.float32), 2, 0.125,
                                  m(64), m(64), 1e-6, None, None, 0.0, cu, 11)
    assert [tuple(g.shape) for g in grads] == [(20, 384), (64,), (64,), (0,), (0,)]


def test_varlen_under_torch_compile(dev):
    """fullgraph, forward and backward (max_seqlen given: cu_seqlens is not read while tracing): the fakes give
    the packed shapes, and the compiled graph calls the same kernels (bit-identical results)."""
    lengths, head_dim = [3, 66], 64
    qkv, dout, norms = _inputs(dev, lengths, head_dim, torch.bfloat16, True, seed=3)
    cu = _cu(lengths, dev)

    def f(x, qn, kn):
        return ops.attention(x, HEADS, q_norm=qn, k_norm=kn, cu_seqlens=cu, max_seqlen=66, backend="cuda")

    expected = _run(f, qkv, dout, norms)
    got = _run(torch.compile(f, fullgraph=True), qkv, dout, norms)
    assert torch.equal(got[0], expected[0])
    for g, e in zip(got[1], expected[1]):
        assert torch.equal(g, e)
