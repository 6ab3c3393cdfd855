"""QK-norm inside the Triton attention kernels (vitkern/kernels/triton/attention.py): the LayerNorm
over head_dim of q and k applied as the tiles are loaded, forward and backward, through the public
op `vitkern.ops.attention(..., q_norm=..., k_norm=..., backend="triton")`, against
`vitkern.reference.attention` in float64.

Runs on conftest.TRITON_DEVICE (CPU tensors in the Triton interpreter here, CUDA on a GPU machine).
Every gradient is checked: qkv's and the norms' weights and biases. Shapes stay small for the
interpreter; the plain (no QK-norm) path is tests/test_triton_attention.py's.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TRITON_DEVICE, assert_close, assert_ratio, attention_rounding

import vitkern  # noqa: F401  (registers the ops)
from vitkern import dispatch, ops, reference

pytestmark = pytest.mark.skipif(not dispatch.triton_importable(), reason="triton is not importable here")

DEV = TRITON_DEVICE
EPS = 1e-6


def _norm_params(kind, head_dim, dtype, scale=1.0):
    """QK-norm arguments as leaf tensors: kind None (no norm), "wb" (weight and bias), "w", "b" or
    "none" (a LayerNorm without affine parameters: weight 1, bias 0)."""
    if kind is None:
        return None
    weight = (1 + scale * torch.randn(head_dim, dtype=dtype, device=DEV)) if kind in ("wb", "w") else None
    bias = scale * torch.randn(head_dim, dtype=dtype, device=DEV) if kind in ("wb", "b") else None
    return weight, bias, EPS


def _run(fn, qkv, heads, dout, q_norm, k_norm, dtype):
    """fn's output and every gradient (qkv, q weight, q bias, k weight, k bias; None where absent),
    with all inputs cast to `dtype` as fresh leaves."""
    x = qkv.detach().to(dtype).requires_grad_(True)

    def leaf(norm):
        if norm is None:
            return None, []
        w, b, eps = norm
        w = w.detach().to(dtype).requires_grad_(True) if w is not None else None
        b = b.detach().to(dtype).requires_grad_(True) if b is not None else None
        return (w, b, eps), [w, b]

    qn, q_leaves = leaf(q_norm)
    kn, k_leaves = leaf(k_norm)
    out = fn(x, heads, qn, kn)
    out.backward(dout.to(dtype))
    grads = [x.grad] + [t.grad if t is not None else None for t in (q_leaves or [None, None]) + (k_leaves or [None, None])]
    return out.detach(), grads


def _triton(x, heads, qn, kn):
    return ops.attention(x, heads, q_norm=qn, k_norm=kn, backend="triton")


def _eager(x, heads, qn, kn):
    return reference.attention(x, heads, q_norm=qn, k_norm=kn)


GRAD_NAMES = ("dqkv", "q weight", "q bias", "k weight", "k bias")


def _ds_floors(qkv, heads, dout, q_norm, k_norm, dtype):
    """conftest.attention_rounding for a case: what the kernels' 16-bit P and dS add to each output."""
    return attention_rounding(qkv.cpu().to(dtype), dout.cpu().to(dtype), heads, dtype, q_norm=q_norm, k_norm=k_norm)


def _check(case_dtype, out, grads, ref_out, ref_grads, eager=None, close=True, extra=None):
    """fp32: assert_close against fp64 (the norms' gradients, sums over batch x heads x tokens rows,
    at 10x the tolerance); with `eager` (eager's output and gradients in the case's dtype; always
    for fp16) also the ratio test, whose floor adds extra[name] (`_ds_floors`). `close=False` leaves
    the fp64 tolerance out (the ratio test only)."""
    extra = extra or {}
    assert out.dtype == case_dtype
    if close:
        assert_close(out, ref_out, case_dtype, name="out")
    for i, (name, g, r) in enumerate(zip(GRAD_NAMES, grads, ref_grads)):
        assert (g is None) == (r is None), f"{name}: gradient presence differs from the reference"
        if g is None:
            continue
        assert g.dtype == case_dtype and g.shape == r.shape, name
        if close and case_dtype == torch.float32:
            assert_close(g, r, case_dtype, scale=1.0 if i == 0 else 10.0, name=name)
    if eager is not None:
        eager_out, eager_grads = eager
        assert_ratio(out, eager_out, ref_out, name="out", floor=1e-5 + extra.get("out", 0.0))
        for name, g, e, r in zip(GRAD_NAMES, grads, eager_grads, ref_grads):
            if g is not None:
                # The floor: a gradient eager computes exactly (e.g. the k bias's, exactly 0: a bias
                # on every key adds a constant to each softmax row) still carries fp32 rounding.
                floor = 1e-5 * max(1.0, r.abs().max().item()) + 1e-5 + extra.get(name, 0.0)
                assert_ratio(g, e, r, name=name, floor=floor)


# (batch, tokens, heads, head_dim, dtype, q_norm kind, k_norm kind): odd token counts, head dims
# 64 (one chunk), 80 (split 64 + 16) and 24 (one masked chunk of 32), q only / k only / both,
# weight and bias present or absent; T = 197 once (the interpreter is slow).
CASES = [
    (1, 1, 1, 64, torch.float32, "wb", "wb"),
    (2, 17, 2, 64, torch.float32, "wb", None),
    (1, 17, 1, 64, torch.float32, None, "wb"),
    (1, 50, 2, 80, torch.float32, "wb", "wb"),
    (2, 13, 1, 24, torch.float32, "w", "b"),
    (1, 17, 1, 80, torch.float32, "none", "w"),
    (3, 17, 1, 64, torch.float16, "wb", "wb"),
    (1, 50, 1, 80, torch.float16, "b", "wb"),
    (1, 17, 2, 24, torch.float16, "wb", "none"),
    (1, 197, 1, 64, torch.float16, "wb", "wb"),
]


def _case_id(case):
    b, t, h, d, dt, qk, kk = case
    return f"B{b}-T{t}-H{h}-d{d}-{str(dt).split('.')[-1]}-q_{qk}-k_{kk}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_qk_norm_forward_backward_matches_fp64_reference(case):
    batch, tokens, heads, head_dim, dtype, q_kind, k_kind = case
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, dtype=dtype, device=DEV)
    dout = torch.randn(batch, tokens, heads * head_dim, dtype=dtype, device=DEV)
    q_norm = _norm_params(q_kind, head_dim, dtype, scale=0.5)
    k_norm = _norm_params(k_kind, head_dim, dtype, scale=0.5)
    out, grads = _run(_triton, qkv, heads, dout, q_norm, k_norm, dtype)
    ref_out, ref_grads = _run(_eager, qkv, heads, dout, q_norm, k_norm, torch.float64)
    eager = _run(_eager, qkv, heads, dout, q_norm, k_norm, dtype) if dtype == torch.float16 else None
    _check(dtype, out, grads, ref_out, ref_grads, eager, extra=_ds_floors(qkv, heads, dout, q_norm, k_norm, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_large_magnitude_q_and_k(dtype):
    """q and k rows of mean ~1000 and spread ~100 (the normalization removes both: two-pass fp32
    statistics, no cancellation), and weights of ~4 that make logits of ~100 (the backward's
    recomputed P must be the forward's). Checked against fp64 and, in both dtypes, by the ratio
    test against eager in the same dtype."""
    batch, tokens, heads, head_dim = 1, 29, 2, 64
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, device=DEV)
    qk = slice(0, 2 * heads * head_dim)
    qkv[..., qk] = 100 * qkv[..., qk] + 1000
    qkv = qkv.to(dtype)
    dout = torch.randn(batch, tokens, heads * head_dim, dtype=dtype, device=DEV)
    q_norm = (4 + torch.randn(head_dim, device=DEV).to(dtype), torch.randn(head_dim, device=DEV).to(dtype), EPS)
    k_norm = (4 + torch.randn(head_dim, device=DEV).to(dtype), torch.randn(head_dim, device=DEV).to(dtype), EPS)
    out, grads = _run(_triton, qkv, heads, dout, q_norm, k_norm, dtype)
    ref_out, ref_grads = _run(_eager, qkv, heads, dout, q_norm, k_norm, torch.float64)
    eager = _run(_eager, qkv, heads, dout, q_norm, k_norm, dtype)
    assert all(torch.isfinite(g).all() for g in grads)
    # fp16: rounding the normalized q and k (as eager does) moves logits of ~100 by ~0.05, beyond the
    # fp16 table's tolerance for eager too; the ratio test is the measure there.
    _check(dtype, out, grads, ref_out, ref_grads, eager, close=dtype == torch.float32,
           extra=_ds_floors(qkv, heads, dout, q_norm, k_norm, dtype))


def test_qk_norm_every_config_of_the_tier():
    """Each QK-norm config of the tier (forced, as an autotuner would try them): the norms' partial
    sums land in a workspace of fixed row groups whatever the row block (the 64-key dK/dV tiles
    write two groups of 32), and every group is written (the workspace is NaN-poisoned)."""
    from vitkern.kernels.triton import _common
    from vitkern.kernels.triton import attention as kernels

    batch, tokens, heads, head_dim = 1, 150, 1, 64
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, dtype=torch.float16, device=DEV)
    dout = torch.randn(batch, tokens, heads * head_dim, dtype=torch.float16, device=DEV)
    q_norm = _norm_params("wb", head_dim, torch.float16, scale=0.5)
    k_norm = _norm_params("wb", head_dim, torch.float16, scale=0.5)
    ref_out, ref_grads = _run(_eager, qkv, heads, dout, q_norm, k_norm, torch.float64)
    eager = _run(_eager, qkv, heads, dout, q_norm, k_norm, torch.float16)
    extra = _ds_floors(qkv, heads, dout, q_norm, k_norm, torch.float16)
    lists = kernels.configs(("half", 64), qk_norm=True)
    for i in range(max(len(lists["dq"]), len(lists["dkdv"]))):
        with _common.force_config("*", i):
            out, grads = _run(_triton, qkv, heads, dout, q_norm, k_norm, torch.float16)
        for name, g, e, r in zip(GRAD_NAMES, grads, eager[1], ref_grads):
            floor = 1e-5 * max(1.0, r.abs().max().item()) + 1e-5 + extra.get(name, 0.0)
            assert_ratio(g, e, r, name=f"config {i}: {name}", floor=floor)


def test_qk_norm_weight_gradients_only_where_required():
    """A weight that does not require grad gets none; the others still do; absent ones stay None."""
    head_dim = 32
    qkv = torch.randn(1, 9, 3 * head_dim, device=DEV, requires_grad=True)
    qw = torch.randn(head_dim, device=DEV)  # no requires_grad
    qb = torch.randn(head_dim, device=DEV, requires_grad=True)
    kw = torch.randn(head_dim, device=DEV, requires_grad=True)
    out = ops.attention(qkv, 1, q_norm=(qw, qb, EPS), k_norm=(kw, None, EPS), backend="triton")
    out.sum().backward()
    assert qw.grad is None and qb.grad is not None and kw.grad is not None and qkv.grad is not None
    x64 = qkv.detach().double().requires_grad_(True)
    qb64, kw64 = qb.detach().double().requires_grad_(True), kw.detach().double().requires_grad_(True)
    reference.attention(x64, 1, q_norm=(qw.double(), qb64, EPS), k_norm=(kw64, None, EPS)).sum().backward()
    assert_close(qkv.grad, x64.grad, torch.float32, name="dqkv")
    assert_close(qb.grad, qb64.grad, torch.float32, scale=10.0, name="q bias")
    assert_close(kw.grad, kw64.grad, torch.float32, scale=10.0, name="k weight")


def test_qk_norm_strided_weight_and_custom_eps():
    """A weight that is a strided view (the kernels read a unit-stride copy) and a large eps."""
    head_dim = 64
    qkv = torch.randn(2, 11, 3 * head_dim, device=DEV)
    dout = torch.randn(2, 11, head_dim, device=DEV)
    wide = torch.randn(2 * head_dim, device=DEV)
    q_norm = (wide[::2], None, 0.5)
    k_norm = (None, wide[1::2], 1e-3)
    assert not q_norm[0].is_contiguous()
    out, grads = _run(_triton, qkv, 1, dout, q_norm, k_norm, torch.float32)
    ref_out, ref_grads = _run(_eager, qkv, 1, dout, q_norm, k_norm, torch.float64)
    _check(torch.float32, out, grads, ref_out, ref_grads)


def test_triton_no_longer_declines_qk_norm(monkeypatch):
    """The Triton backend's reasons accept q_norm/k_norm, so `auto` (its order on a CUDA device:
    triton first) picks Triton for a QK-norm call instead of falling back to eager."""
    head_dim = 32
    qkv = torch.randn(1, 7, 3 * head_dim, device=DEV)
    norm = (torch.randn(head_dim, device=DEV), torch.randn(head_dim, device=DEV), EPS)
    triton_impl = dispatch.implementations("attention")["triton"]
    for call in (dict(q_norm=norm), dict(k_norm=norm), dict(q_norm=norm, k_norm=norm)):
        assert triton_impl.not_supported_reasons(dict(qkv=qkv, num_heads=1, scale=None, **call)) == []
    monkeypatch.setattr(dispatch, "auto_order", lambda op, device: ("triton", "eager"))
    chosen = dispatch.select("attention", "auto", qkv.device, dict(qkv=qkv, num_heads=1, scale=None, q_norm=norm, k_norm=norm))
    assert chosen is triton_impl
    out = ops.attention(qkv, 1, q_norm=norm, k_norm=norm, backend="auto")
    ref = reference.attention(qkv.double(), 1, q_norm=(norm[0].double(), norm[1].double(), EPS),
                              k_norm=(norm[0].double(), norm[1].double(), EPS))
    assert_close(out, ref, torch.float32, name="auto out")


def test_opcheck_qk_norm_ops():
    head_dim = 32
    qkv = torch.randn(2, 9, 3 * 2 * head_dim, device=DEV)
    w, b = torch.randn(head_dim, device=DEV), torch.randn(head_dim, device=DEV)
    norms = (True, w, b, 1e-6, True, None, b, 1e-5)
    torch.library.opcheck(torch.ops.vitkern.attention_fwd.default, (qkv, 2, 0.2, *norms))
    out, lse = torch.ops.vitkern.attention_fwd(qkv, 2, 0.2, *norms)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.vitkern.attention_bwd.default, (dout, qkv, lse, 2, 0.2, *norms))


def test_torch_compile_fullgraph_qk_norm():
    """The QK-norm op traces without graph breaks (aot_eager: the graph is checked). The q and k
    norms have their own weights, as in timm (dynamo refuses one tensor passed twice to an
    autograd.Function)."""
    head_dim = 32
    qkv = torch.randn(1, 9, 3 * 2 * head_dim, device=DEV, requires_grad=True)
    qw, qb, kw = (torch.randn(head_dim, device=DEV, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda x, qw, qb, kw: ops.attention(x, 2, q_norm=(qw, qb, EPS), k_norm=(kw, None, EPS), backend="triton"),
                       fullgraph=True, backend="aot_eager")
    fn(qkv, qw, qb, kw).sum().backward()
    x64, qw64, qb64, kw64 = (t.detach().double().requires_grad_(True) for t in (qkv, qw, qb, kw))
    reference.attention(x64, 2, q_norm=(qw64, qb64, EPS), k_norm=(kw64, None, EPS)).sum().backward()
    assert_close(qkv.grad, x64.grad, torch.float32, name="dqkv")
    for name, t, t64 in (("q weight", qw, qw64), ("q bias", qb, qb64), ("k weight", kw, kw64)):
        assert_close(t.grad, t64.grad, torch.float32, scale=10.0, name=name)


def test_qk_norm_configs_share_the_score_tile():
    """As the plain lists (tests/test_triton_attention.py): the first QK-norm config of each kernel
    in a tier (the one the interpreter runs) has the same (BLOCK_M, BLOCK_N), so the backward
    recomputes the forward's scores bit for bit there; ("fp32", 128) is the exception in both."""
    from vitkern.kernels.triton import attention as kernels

    assert set(kernels.CONFIGS_QK_NORM) == set(kernels.CONFIGS)
    for tier, lists in kernels.CONFIGS_QK_NORM.items():
        if tier == ("fp32", 128):
            continue
        tiles = {k: (c[0].kwargs["BLOCK_M"], c[0].kwargs["BLOCK_N"]) for k, c in lists.items()}
        assert len(set(tiles.values())) == 1, f"tier {tier}: first configs differ: {tiles}"
