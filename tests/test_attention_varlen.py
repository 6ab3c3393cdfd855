"""Packed variable-length attention (NaViT/NaFlex, issue #23): `vitkern.ops.attention` with
cu_seqlens/max_seqlen on qkv [total_tokens, 3 * dim], block-diagonal, no padding.

Every backend is held against per-image dense attention in float64 (`vitkern.reference.attention`
on each image's rows as a batch of one), forward and every gradient (QK-norm included), and the
isolation of images is checked bit for bit: perturbing one image leaves every other image's output
and gradients unchanged.
"""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRETING, TRITON_DEVICE, assert_close

from vitkern import dispatch, ops, reference

EPS = 1e-6


def _cu(lengths, device="cpu"):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _inputs(lengths, heads, head_dim, dtype, device="cpu", qk_norm=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    total, dim = sum(lengths), heads * head_dim
    qkv = torch.randn(total, 3 * dim, generator=g, dtype=torch.float64)
    dout = torch.randn(total, dim, generator=g, dtype=torch.float64)
    norms = None
    if qk_norm:
        norms = [(1 + 0.3 * torch.randn(head_dim, generator=g, dtype=torch.float64),
                  0.2 * torch.randn(head_dim, generator=g, dtype=torch.float64), EPS) for _ in range(2)]
    return qkv.to(device, dtype), dout.to(device, dtype), norms


def _norm_args(norms, dtype, device, grad=False):
    if norms is None:
        return None, None, []
    out, leaves = [], []
    for w, b, eps in norms:
        w = w.to(device, dtype).requires_grad_(grad)
        b = b.to(device, dtype).requires_grad_(grad)
        out.append((w, b, eps))
        leaves += [w, b]
    return out[0], out[1], leaves


def _run(fn, qkv, dout, norms):
    """(out, [dqkv, d of each norm tensor]) of fn(qkv, q_norm, k_norm) under out.backward(dout)."""
    x = qkv.detach().clone().requires_grad_(True)
    qn, kn, leaves = _norm_args(norms, qkv.dtype, qkv.device, grad=True)
    out = fn(x, qn, kn)
    out.backward(dout)
    return out.detach(), [x.grad] + [t.grad for t in leaves]


def _oracle(lengths, qkv, dout, heads, norms):
    """Per-image dense float64 attention, images concatenated: the definition of the packed op."""
    cu = _cu(lengths)

    def dense(x, qn, kn):
        outs = [reference.attention(x[s:e].unsqueeze(0), heads, q_norm=qn, k_norm=kn)[0]
                for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs)

    return _run(dense, qkv.double().cpu(), dout.double().cpu(), norms)


def _packed(lengths, heads, backend, device):
    cu = _cu(lengths, device)
    return lambda x, qn, kn: ops.attention(x, heads, q_norm=qn, k_norm=kn, cu_seqlens=cu,
                                           max_seqlen=max(lengths), backend=backend)


# --------------------------------------------------------------------------------------------
# eager and torch


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_varlen_matches_per_image_dense(backend, qk_norm, dtype):
    lengths, heads, head_dim = [1, 7, 64, 130, 5], 2, 16
    qkv, dout, norms = _inputs(lengths, heads, head_dim, dtype, qk_norm=qk_norm)
    out, grads = _run(_packed(lengths, heads, backend, "cpu"), qkv, dout, norms)
    ref_out, ref_grads = _oracle(lengths, qkv, dout, heads, norms)
    assert out.shape == (sum(lengths), heads * head_dim)
    assert_close(out, ref_out, dtype, name="out")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype, scale=4, name=f"grad {i}")


def test_varlen_long_sequence_eager():
    # One image of ~600 tokens among small ones (a 384-px image at patch 16 has 577).
    lengths, heads, head_dim = [600, 3, 41], 1, 64
    qkv, dout, _ = _inputs(lengths, heads, head_dim, torch.float64)
    out, (dqkv,) = _run(_packed(lengths, heads, "eager", "cpu"), qkv, dout, None)
    ref_out, (ref_dqkv,) = _oracle(lengths, qkv, dout, heads, None)
    assert torch.equal(out, ref_out) and torch.equal(dqkv, ref_dqkv)
    # Against one dense [600, 600] attention computed independently (SDPA in float64).
    q, k, v = qkv[:600].reshape(600, 3, heads, head_dim).permute(1, 2, 0, 3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(600, -1)
    torch.testing.assert_close(out[:600], sdpa, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_varlen_images_do_not_interact(backend):
    _assert_isolated([3, 17, 9], 2, 16, torch.float32, backend, "cpu")


def _assert_isolated(lengths, heads, head_dim, dtype, backend, device):
    """Perturb image 1 only: the other images' outputs and gradients stay bit-identical."""
    qkv, dout, _ = _inputs(lengths, heads, head_dim, dtype, device)
    cu = _cu(lengths)
    s, e = cu[1].item(), cu[2].item()
    other = torch.ones(sum(lengths), dtype=torch.bool, device=device)
    other[s:e] = False
    fn = _packed(lengths, heads, backend, device)
    out1, (g1,) = _run(fn, qkv, dout, None)
    qkv2, dout2 = qkv.clone(), dout.clone()
    qkv2[s:e] = torch.randn_like(qkv2[s:e]) * 3
    dout2[s:e] = torch.randn_like(dout2[s:e])
    out2, (g2,) = _run(fn, qkv2, dout2, None)
    assert torch.equal(out1[other], out2[other])
    assert torch.equal(g1[other], g2[other])
    assert not torch.equal(out1[~other], out2[~other])


def test_varlen_torch_backend_is_auto_on_cpu():
    lengths = [4, 9]
    qkv, _, _ = _inputs(lengths, 2, 16, torch.float32)
    call = dict(qkv=qkv, num_heads=2, scale=None, cu_seqlens=_cu(lengths), max_seqlen=9)
    assert dispatch.select("attention", "auto", qkv.device, call).backend == "torch"


def test_varlen_cuda_backend_takes_packed_calls():
    # csrc/attention.cu has the packed kernels (tests/test_cuda_attention_varlen.py): only this call's dtype
    # and device are declined, never cu_seqlens.
    impl = dispatch.implementations("attention").get("cuda")
    if impl is None or impl.supports is None:
        pytest.skip("no cuda implementation registered")
    qkv, _, _ = _inputs([4, 9], 2, 64, torch.float32)
    reasons = impl.supports(dict(qkv=qkv, num_heads=2, scale=None, cu_seqlens=_cu([4, 9]), max_seqlen=9))
    assert reasons and not any("cu_seqlens" in r for r in reasons)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument


def _bad(**kw):
    qkv = torch.randn(10, 3 * 32)
    args = dict(cu_seqlens=_cu([4, 6]), max_seqlen=6)
    args.update(kw)
    return qkv, args


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int64)), TypeError, "cu_seqlens must be int32.*int64"),
        (dict(cu_seqlens=[0, 4, 10]), TypeError, "cu_seqlens must be a torch.Tensor"),
        (dict(cu_seqlens=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, "cu_seqlens must be 1-D"),
        (dict(cu_seqlens=torch.tensor([0, 7, 4, 10], dtype=torch.int32)), ValueError, "strictly increasing.*not sorted"),
        (dict(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "end at the number of packed tokens 10"),
        (dict(cu_seqlens=torch.tensor([0, 4, 4, 10], dtype=torch.int32)), ValueError, "zero-length"),
        (dict(max_seqlen=5), ValueError, "max_seqlen = 5 but sequence 1 has 6 tokens"),
        (dict(max_seqlen=0), ValueError, "max_seqlen must be None or a positive int"),
        (dict(cu_seqlens=_cu([4, 6], "meta")), ValueError, "cu_seqlens is on meta but qkv is on cpu"),
        (dict(cu_seqlens=None), ValueError, "max_seqlen was given without cu_seqlens"),
    ],
)
def test_varlen_bad_input(kwargs, error, match):
    qkv, args = _bad(**kwargs)
    with pytest.raises(error, match=match):
        ops.attention(qkv, 2, **args)


def test_varlen_bad_qkv_shape():
    with pytest.raises(ValueError, match=r"qkv must be packed \[total_tokens, 3 \* dim\]"):
        ops.attention(torch.randn(1, 10, 96), 2, cu_seqlens=_cu([4, 6]))
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        ops.attention(torch.randn(10, 96), 5, cu_seqlens=_cu([4, 6]))


def test_varlen_max_seqlen_defaults_from_cu_seqlens():
    lengths = [4, 6]
    qkv, _, _ = _inputs(lengths, 2, 16, torch.float64)
    a = ops.attention(qkv, 2, cu_seqlens=_cu(lengths), backend="eager")
    b = ops.attention(qkv, 2, cu_seqlens=_cu(lengths), max_seqlen=32, backend="eager")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# attention_stats on packed input: one AttentionStats per image


def test_varlen_attention_stats_per_image():
    lengths, heads, head_dim = [5, 10], 2, 16
    grids = [(2, 2), (3, 3)]
    qkv, _, _ = _inputs(lengths, heads, head_dim, torch.float64)
    cu = _cu(lengths)
    out, stats = ops.attention_with_stats(qkv, heads, cu_seqlens=cu, grid=grids, full=True, backend="eager")
    assert torch.equal(out, ops.attention(qkv, heads, cu_seqlens=cu, backend="eager"))
    assert len(stats) == 2
    for (s, e), g, st in zip(reference._bounds(cu), grids, stats):
        dense = ops.attention_stats(qkv[s:e].unsqueeze(0), None, heads, grid=g, full=True, backend="eager")
        _, probs = reference.attention(qkv[s:e].unsqueeze(0), heads, return_probs=True)
        assert st.prefix_probs.shape == (1, heads, 1, e - s)
        torch.testing.assert_close(st.prefix_probs, probs[:, :, :1])
        torch.testing.assert_close(st.full, probs.mean(1))
        torch.testing.assert_close(st.distance, dense.distance)
    with pytest.raises(ValueError, match="one \\(grid_h, grid_w\\) per image"):
        ops.attention_stats(qkv, None, heads, cu_seqlens=cu, grid=(2, 2), backend="eager")


# --------------------------------------------------------------------------------------------
# triton (the interpreter on CPU): small mixed lengths; the ~600-token case runs in eager only


triton_only = pytest.mark.skipif(not dispatch.triton_importable(), reason="triton not importable")


@triton_only
@pytest.mark.parametrize(
    "lengths, heads, head_dim, dtype, qk_norm",
    [
        ([1, 7, 64, 130], 1, 64, torch.float32, False),
        ([1, 7, 64, 130], 1, 64, torch.float16, False),
        ([5, 33, 1], 2, 80, torch.float32, False),
        ([5, 33, 1], 1, 80, torch.float16, True),
        ([3, 40, 17], 2, 64, torch.float32, True),
    ],
)
def test_varlen_triton_matches_per_image_dense(lengths, heads, head_dim, dtype, qk_norm):
    qkv, dout, norms = _inputs(lengths, heads, head_dim, dtype, TRITON_DEVICE, qk_norm=qk_norm)
    out, grads = _run(_packed(lengths, heads, "triton", TRITON_DEVICE), qkv, dout, norms)
    ref_out, ref_grads = _oracle(lengths, qkv, dout, heads, norms)
    assert_close(out, ref_out, dtype, name="out")
    # Gradients sum over up to 130 keys (and over every row for the norms' weights).
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype, scale=8 if i == 0 else 64, name=f"grad {i}")


@triton_only
def test_varlen_triton_images_do_not_interact():
    _assert_isolated([3, 20, 9], 1, 16, torch.float32, "triton", TRITON_DEVICE)


def test_packed_configs_share_the_interpreters_score_tile():
    """The packed kernels' lists (the dense ones but for `_PACKED_CONFIGS`) keep the dense rule: the
    first config of fwd, dq and dkdv in a tier has one (BLOCK_M, BLOCK_N), so the interpreter's
    backward recomputes the forward's scores bit for bit (tests/test_triton_attention.py)."""
    from vitkern.kernels.triton import attention as dense
    from vitkern.kernels.triton import attention_varlen as packed

    for qk_norm, table in ((False, dense.CONFIGS), (True, dense.CONFIGS_QK_NORM)):
        for tier in table:
            if tier == ("fp32", 128):  # no shared tile in the dense lists either (see there)
                continue
            lists = packed.packed_configs(tier, qk_norm)
            tiles = {k: (c[0].kwargs["BLOCK_M"], c[0].kwargs["BLOCK_N"]) for k, c in lists.items()}
            assert len(set(tiles.values())) == 1, f"tier {tier} qk_norm={qk_norm}: first configs differ: {tiles}"
