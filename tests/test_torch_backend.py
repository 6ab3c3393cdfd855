"""The "torch" backend (vitkern.kernels.aten: torch's own fused ops), the CPU default.

Each op and every gradient against the float64 oracle (vitkern.reference): float64 to the fp64
tolerance, float32 to the fp32 tolerance of the table in conftest.py, fp16/bf16 by the ratio test
against timm's way of computing in that dtype (torch's modules: the GEMM output rounded before the
activation and again before the skip connection), which is what this backend is. The oneDNN
inference path (fused GEMM + GELU, GEMM + skip connection) is held to the same bounds, and must not
run when a gradient is needed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from vitkern import ops, reference
from vitkern.kernels import aten

pytestmark = pytest.mark.usefixtures("one_thread")

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]


def _run(fn, tensors, dy):
    leaves = _leaves(*tensors)
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return out.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves]


def _timm_way(fn_name):
    """The computation timm's modules do in a low dtype (torch's ops, one rounding per op)."""
    return {
        "linear": lambda x, w, b, r, s, act: r + aten.activate(F.linear(x, w, b), act) * s,
        "ln_linear": lambda x, lw, lb, w, b, act: aten.activate(F.linear(F.layer_norm(x, (x.shape[-1],), lw, lb, 1e-6), w, b), act),
    }[fn_name]


def _ratio_or_close(name, got, low, oracle, dtype):
    if dtype in (torch.float32, torch.float64):
        assert_close(got, oracle, dtype, name=name)
        return
    err = (got.double() - oracle).abs().max().item()
    base = (low.double() - oracle).abs().max().item()
    floor = 2 * UNIT_ROUNDOFF[dtype] * max(1.0, oracle.abs().max().item())
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x torch's {base:.3e} + {floor:.3e}"


DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "quick_gelu"])
def test_linear_with_scale_and_residual(dtype, act):
    x, w, b = torch.randn(3, 37, 48), torch.randn(80, 48) / 7, torch.randn(80)
    r, s = torch.randn(3, 37, 80), torch.rand(80) + 0.5
    dy = torch.randn(3, 37, 80)
    tensors = [t.to(dtype) for t in (x, w, b, r, s)]
    got, g_got = _run(lambda x, w, b, r, s: ops.linear(x, w, b, activation=act, residual=r, scale=s, backend="torch"),
                      tensors, dy)
    low, g_low = _run(lambda x, w, b, r, s: _timm_way("linear")(x, w, b, r, s, act), tensors, dy)
    ref, g_ref = _run(lambda x, w, b, r, s: reference.linear(x, w, b, activation=act, residual=r, scale=s),
                      [t.double() for t in tensors], dy.double())
    assert got.dtype == dtype
    _ratio_or_close("out", got, low, ref, dtype)
    for name, g, lo, r_ in zip(("dx", "dw", "db", "dres", "dscale"), g_got, g_low, g_ref):
        _ratio_or_close(name, g, lo, r_, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "gelu", "gelu_tanh", "residual", "scale"])
def test_onednn_path_inference_and_training(dtype, case):
    """oneDNN's linear (the CPU path of this backend): inference with its fused epilogues, and
    training through _OneDNNLinearFn (oneDNN forward, addmm's gradient formulas), each against
    the float64 oracle; double backward through it works."""
    if not aten._ONEDNN:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    x, w, b = torch.randn(2, 29, 64), torch.randn(96, 64) / 8, torch.randn(96)
    r, s = torch.randn(2, 29, 96), torch.rand(96) + 0.5
    act = case if case.startswith("gelu") else None
    res = r if case in ("residual", "scale") else None
    scale = s if case == "scale" else None
    dy = torch.randn(2, 29, 96)
    tensors = [t.to(dtype) if t is not None else None for t in (x, w, b, res, scale)]
    fn = lambda x, w, b, r, s: aten.linear(x, w, b, activation=act, residual=r, scale=s)  # noqa: E731
    timm_way = lambda x, w, b, r, s: aten._epilogue(aten.activate(F.linear(x, w, b), act), r, s)  # noqa: E731
    oracle = lambda x, w, b, r, s: reference.linear(x, w, b, activation=act, residual=r, scale=s)  # noqa: E731
    assert aten._onednn_applies(tensors[0], tensors[1])
    with torch.no_grad():
        got = fn(*tensors)
    ref, g_ref = _run(oracle, [t.double() if t is not None else None for t in tensors], dy.double())
    low, g_low = _run(timm_way, tensors, dy)
    assert got.dtype == dtype and got.shape == (2, 29, 96)
    _ratio_or_close(f"{case} inference", got, low, ref, dtype)
    trained, g_got = _run(fn, tensors, dy)
    _ratio_or_close(f"{case} training", trained, low, ref, dtype)
    for name, g, lo, r_ in zip(("dx", "dw", "db", "dres", "dscale"), g_got, g_low, g_ref):
        if r_ is not None:
            _ratio_or_close(f"{case} {name}", g, lo, r_, dtype)
    if dtype == torch.float32:  # second order: the backward's GEMMs are differentiable
        def second_order(f, cast):
            xg, wg = cast(tensors[0]).requires_grad_(), cast(tensors[1]).requires_grad_()
            rest = [cast(t) if t is not None else None for t in tensors[2:]]
            (gx,) = torch.autograd.grad(f(xg, wg, *rest).square().sum(), xg, create_graph=True)
            gx.square().sum().backward()
            return wg.grad

        got2 = second_order(fn, lambda t: t.clone())
        low2 = second_order(timm_way, lambda t: t.clone())
        ref2 = second_order(oracle, lambda t: t.double())
        err, base = (got2.double() - ref2).abs().max().item(), (low2.double() - ref2).abs().max().item()
        floor = 2 * 2.0 ** -24 * ref2.abs().max().item()
        assert err <= 2 * base + floor, f"{case} double backward: error {err:.3e} > 2 x torch's {base:.3e} + {floor:.3e}"


def test_onednn_path_stays_out_of_tracing_and_functorch():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    assert aten._onednn_applies(x, w) == aten._ONEDNN
    assert not aten._onednn_applies(x.double(), w.double())
    assert not aten._onednn_applies(x, w.t())  # a transposed weight view: addmm takes it as it is
    grads = torch.func.grad(lambda w: aten.linear(x, w, activation="gelu").sum())(w)  # functorch: plain ops
    torch.testing.assert_close(grads, torch.func.grad(lambda w: F.gelu(F.linear(x, w)).sum())(w))
    compiled = torch.compile(lambda x, w: aten.linear(x, w, activation="gelu"), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w), F.gelu(F.linear(x, w)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_linear_and_layer_norm(dtype):
    x, lw, lb = torch.randn(2, 19, 40), torch.rand(40) + 0.5, torch.randn(40)
    w, b = torch.randn(72, 40) / 6, torch.randn(72)
    dy = torch.randn(2, 19, 72)
    tensors = [t.to(dtype) for t in (x, lw, lb, w, b)]
    got, g_got = _run(lambda *t: ops.ln_linear(*t, activation="gelu", backend="torch"), tensors, dy)
    low, g_low = _run(lambda *t: _timm_way("ln_linear")(*t, "gelu"), tensors, dy)
    ref, g_ref = _run(lambda *t: reference.ln_linear(*t, activation="gelu"), [t.double() for t in tensors], dy.double())
    _ratio_or_close("out", got, low, ref, dtype)
    for name, g, lo, r in zip(("dx", "dln_w", "dln_b", "dw", "db"), g_got, g_low, g_ref):
        _ratio_or_close(name, g, lo, r, dtype)
    y = ops.layer_norm(tensors[0], tensors[1], tensors[2], backend="torch")
    y_low = F.layer_norm(tensors[0], (40,), tensors[1], tensors[2], 1e-6)
    _ratio_or_close("layer_norm", y, y_low, reference.layer_norm(x.double(), lw.double(), lb.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm,scale", [(False, None), (True, None), (False, 0.3)])
def test_attention(dtype, qk_norm, scale):
    b, t, heads, hd = 2, 23, 3, 16
    qkv = torch.randn(b, t, 3 * heads * hd)
    nw, nb = torch.rand(hd) + 0.5, torch.randn(hd)
    dy = torch.randn(b, t, heads * hd)

    def call(qkv, nw, nb, fn, **kw):
        norm = (nw, nb, 1e-6) if qk_norm else None
        return fn(qkv, heads, q_norm=norm, k_norm=norm, scale=scale, **kw)

    tensors = [x.to(dtype) for x in (qkv, nw, nb)]
    got, g_got = _run(lambda *x: call(*x, ops.attention, backend="torch"), tensors, dy)
    low, g_low = _run(lambda *x: call(*x, reference.attention), tensors, dy)  # eager in the same dtype
    ref, g_ref = _run(lambda *x: call(*x, reference.attention), [x.double() for x in tensors], dy.double())
    _ratio_or_close("out", got, low, ref, dtype)
    _ratio_or_close("dqkv", g_got[0], g_low[0], g_ref[0], dtype)
    if qk_norm:
        # QK-norm's weight and bias gradients sum dq over every row: in bf16 torch's SDPA backward
        # rounds dq where the oracle's code keeps fp32, about 4x its error. Their yardstick is timm's
        # own computation (timm's Attention: nn.LayerNorm of q and k, then SDPA), written out here.
        def timm_attention(qkv, nw, nb):
            q, k, v = qkv.reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = F.layer_norm(q, (hd,), nw, nb, 1e-6), F.layer_norm(k, (hd,), nw, nb, 1e-6)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, heads * hd)

        _, g_timm = _run(timm_attention, tensors, dy)
        for name, g, lo, r in zip(("dnorm_w", "dnorm_b"), g_got[1:], g_timm[1:], g_ref[1:]):
            _ratio_or_close(name, g, lo, r, dtype)


def _graph_nodes(t):
    """The names of the autograd nodes behind t."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_16bit_cpu_kernel_choice(dtype):
    """docs/perf/cpu.md: fp16 SDPA runs on fp32 copies (torch's fp16 CPU kernel is 2-5x slower);
    bf16 inference is torch's bf16 kernel itself, bf16 training its forward with the backward on
    fp32 copies. Each is checked against the kernels it claims to run, bit for bit."""
    torch.manual_seed(0)
    b, t, heads, hd = 2, 23, 3, 16
    qkv, dy = torch.randn(b, t, 3 * heads * hd).to(dtype), torch.randn(b, t, heads * hd).to(dtype)

    def split(x):
        return x.reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(o):
        return o.transpose(1, 2).reshape(b, t, heads * hd)

    with torch.no_grad():
        got = aten.attention(qkv, heads)
        q, k, v = split(qkv)
        up = merge(F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype))
        assert torch.equal(got, up if dtype == torch.float16 else merge(F.scaled_dot_product_attention(q, k, v)))
    leaf = qkv.clone().requires_grad_()
    out = aten.attention(leaf, heads)
    out.backward(dy)
    if dtype == torch.bfloat16:
        assert "_Bf16FlashFp32BackwardBackward" in _graph_nodes(out)
        q, k, v = split(qkv)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        assert torch.equal(out, merge(o))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dy.float().reshape(b, t, heads, hd).transpose(1, 2), q.float(), k.float(), v.float(), o.float(), lse, 0.0, False)
        want = torch.stack([g.to(dtype) for g in (dq, dk, dv)]).permute(1, 3, 0, 2, 4).reshape(b, t, 3 * heads * hd)
        assert torch.equal(leaf.grad, want)
    else:
        assert "ToCopyBackward0" in _graph_nodes(out)


def test_attention_bf16_cpu_double_backward():
    """A gradient penalty through the bf16 CPU attention (plain SDPA on the CPU has no second
    derivative; this path's create_graph backward is fp32 math SDPA): within the ratio test of the
    oracle's own bf16 computation against float64."""
    torch.manual_seed(0)
    b, t, heads, hd = 1, 11, 2, 16
    qkv = torch.randn(b, t, 3 * heads * hd)

    def penalty(fn, x):
        x = x.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x).float().square().sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.float().square().sum(), x)
        return ggx

    got = penalty(lambda x: aten.attention(x, heads), qkv.bfloat16())
    low = penalty(lambda x: reference.attention(x, heads), qkv.bfloat16())
    ref = penalty(lambda x: reference.attention(x, heads), qkv.double())
    _ratio_or_close("second order", got, low, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_embed_with_prefix_position_and_keep(dtype):
    x, w, bias = torch.randn(2, 3, 24, 16), torch.randn(32, 3, 8, 8) / 14, torch.randn(32)
    cls, pos = torch.randn(1, 2, 32), torch.randn(1, 2 + 6, 32)
    keep = torch.tensor([[5, 0, 3], [1, 2, 4]])
    dy = torch.randn(2, 2 + 3, 32)
    tensors = [t.to(dtype) for t in (x, w, bias, cls, pos)]
    got, g_got = _run(lambda *t: ops.patch_embed(*t, keep=keep, backend="torch"), tensors, dy)
    ref, g_ref = _run(lambda *t: reference.patch_embed(*t, keep=keep), [t.double() for t in tensors], dy.double())
    low, g_low = _run(lambda *t: reference.patch_embed(*t, keep=keep), tensors, dy)  # eager in the same dtype
    _ratio_or_close("out", got, low, ref, dtype)
    for name, g, lo, r in zip(("dx", "dw", "db", "dcls", "dpos"), g_got, g_low, g_ref):
        _ratio_or_close(name, g, lo, r, dtype)
    no_embed = ops.patch_embed(tensors[0], tensors[1], tensors[2], tensors[3], tensors[4][:, 2:],
                               no_embed_class=True, backend="torch")
    _ratio_or_close("no_embed_class", no_embed,
                    reference.patch_embed(tensors[0], tensors[1], tensors[2], tensors[3], tensors[4][:, 2:],
                                          no_embed_class=True),
                    reference.patch_embed(x.double(), w.double(), bias.double(), cls.double(), pos[:, 2:].double(),
                                          no_embed_class=True), dtype)
