"""The ViT family's options in the CUDA backend (csrc/, backend="cuda"), forward and backward.

* linear and ln_linear activations: exact GELU, tanh GELU (SigLIP), QuickGELU (CLIP), and none;
* linear's LayerScale `scale` (DINOv2, DeiT III, CaiT): residual + scale * act(x W^T + b), with and
  without an activation and a residual, every gradient (the fused dh / dscale pass);
* patch_embed's prefix tokens (class, distillation, register: cls_token [1, prefix, dim]) and
  `no_embed_class` (pos_embed over the patch tokens only).

Each test runs through the `dev` fixture of tests/test_cuda_ops.py: "cuda" on a GPU (marked `gpu`),
and "emulated" on the CPU emulator of csrc/ (tests/cuda_emu), where outputs are NaN-poisoned
(conftest) and the kernels run with UBSan's alignment and overflow checks. Results are compared with
the float64 reference (vitkern.reference) by the ratio test: the kernel's error at most 2x that of
eager PyTorch in the same dtype, plus a floor of one rounding (unit roundoff) of the result's largest magnitude. (Without
the floor, about 1 in 20 gradients fail by 2-3.4x: the CUDA path rounds dh = dout * scale * act'(h)
to the input dtype before the GEMMs, as it did for GELU, where eager differentiates in fp32.) Shapes
cover the scalar paths (rows and columns not multiples of 8) and the 16-byte vector paths. The
kernel-level tests at the end hold the epilogue to one rounding of its float64 value.

The last section calls the new kernel entry points directly on the emulator (as
tests/test_cuda_emulated.py does), including the limits of the activations at +-inf.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close, assert_ratio, seed, unit_roundoff
from test_cuda_ops import _d64, _run, dev  # noqa: F401  (dev is the fixture)

import vitkern.ops as ops
from vitkern import dispatch, reference

DTYPES = (torch.bfloat16, torch.float16)
ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu")
EPS = 1e-6
# The unit roundoff (half an ulp of 1): the largest relative error of one rounding to the dtype.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

pytestmark = pytest.mark.usefixtures("one_thread")


def _ratio_all(names, got, low, ref, dtype, extra=None):
    """The ratio test for every output: kernel error <= 2 x eager's in `dtype` + one rounding of max |ref|
    (+ extra[name]: what the kernel's own 16-bit intermediates, which eager keeps in fp32, can add)."""
    extra = extra or {}
    for n, g, lo, r in zip(names, got, low, ref):
        if r is None:
            assert g is None, f"{n}: expected no gradient"
            continue
        assert g is not None, f"{n}: missing"
        assert g.dtype == dtype and g.shape == r.shape, f"{n}: {g.dtype} {tuple(g.shape)} vs {tuple(r.shape)}"
        assert torch.isfinite(g.float()).all(), f"{n}: not finite (an element never written?)"
        floor = UNIT_ROUNDOFF[dtype] * max(1.0, r.abs().max().item()) + extra.get(n, 0.0)
        assert_ratio(g, lo, r, name=n, floor=floor)


def _three_ways(fn_cuda, fn_ref, tensors, dy):
    """(kernel, eager in the same dtype, float64 oracle): outputs and gradients of each."""
    got = _run(fn_cuda, tensors, dy)
    low = _run(fn_ref, tensors, dy)
    ref = _run(fn_ref, [_d64(t) for t in tensors], _d64(dy))
    return got, low, ref


# ------------------------------------------------------------------------------------------ linear


def _epilogue_rounding(x, w, b, g, dy, activation, dtype):
    """{output: the most the CUDA linear's 16-bit intermediates can add to its error}: with an
    activation or a LayerScale gamma the forward stores the pre-activation h in the dtype (the
    backward's input) and the backward's first pass rounds dh = dy gamma act'(h) to the dtype (the
    operand of dx = dh W, dweight = dh^T x, and of dbias's column sums); eager keeps both in fp32.
    First order, elementwise, in float64: |fl(h) - h| <= u |h| moves act(h) by |act'(h)| u |h| and
    dh by |dy gamma act''(h)| u |h|; dh's own rounding is u |dh|; each then propagates through its
    sums with absolute values (operand_rounding's argument)."""
    if activation is None and g is None:
        return {}  # the kernels' GEMMs read x and dy themselves: nothing rounded in between
    u = unit_roundoff(dtype)
    x, w, dy = x.double().reshape(-1, x.shape[-1]), w.double(), dy.double().reshape(-1, w.shape[0])
    h = (x @ w.t() + (b.double() if b is not None else 0)).requires_grad_(True)
    gamma = g.double() if g is not None else torch.ones(w.shape[0], dtype=torch.float64)
    (a1,) = torch.autograd.grad(reference.activate(h, activation).sum(), h, create_graph=True)
    (a2,) = torch.autograd.grad(a1.sum(), h) if a1.requires_grad else (torch.zeros_like(h),)
    h, a1 = h.detach(), a1.detach()
    e_dh = u * (dy * gamma * a1).abs() + u * (dy * gamma * a2 * h).abs()
    return {
        "y": u * (gamma * a1 * h).abs().max().item(),
        "dx": (e_dh @ w.abs()).max().item(),
        "dweight": (e_dh.t() @ x.abs()).max().item(),
        "dbias": e_dh.sum(0).max().item(),
        "dscale": u * (dy.abs() * (a1 * h).abs()).sum(0).max().item(),
    }


def _linear_case(dev, lead, k, n, dtype, bias, residual, scale):
    x = torch.randn(*lead, k, device=dev).to(dtype)
    w = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=dev).to(dtype) if bias else None
    r = torch.randn(*lead, n, device=dev).to(dtype) if residual else None
    # LayerScale's gamma: DINOv2 initializes it at 1e-5 and trains it up; a spread of magnitudes.
    g = (torch.rand(n, device=dev) * 2 - 0.5).to(dtype) if scale else None
    dy = torch.randn(*lead, n, device=dev, dtype=dtype)
    return (x, w, b, r, g), dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k,n", [((17,), 40, 24), ((2, 13), 64, 37), ((3, 50), 192, 768)])
def test_linear_activations(dev, dtype, activation, lead, k, n):
    """Every activation, forward and backward, with a bias: 26 x 37 outputs (not a multiple of 8) take
    the scalar epilogue, 17 x 24 and 150 x 768 the vector one."""
    (x, w, b, _, _), dy = _linear_case(dev, lead, k, n, dtype, True, False, False)
    (y, grads), (y_low, grads_low), (y_ref, grads_ref) = _three_ways(
        lambda *a: ops.linear(*a, activation=activation, backend="cuda"),
        lambda *a: reference.linear(*a, activation=activation), (x, w, b), dy)
    extra = _epilogue_rounding(x, w, b, None, dy, activation, dtype)
    _ratio_all(("y",), (y,), (y_low,), (y_ref,), dtype, extra)
    _ratio_all(("dx", "dweight", "dbias"), grads, grads_low, grads_ref, dtype, extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead,k,n", [((2, 9), 24, 19), ((3, 50), 64, 192)])
def test_linear_layer_scale(dev, dtype, activation, residual, bias, lead, k, n):
    """residual + gamma * act(x W^T + b): every gradient, dgamma from the fused column sums (18 or 150
    rows: one chunk of rows, test_linear_layer_scale_many_rows takes several). 19 columns take the
    scalar kernels, 192 the vector ones."""
    tensors, dy = _linear_case(dev, lead, k, n, dtype, bias, residual, True)

    def call(fn, **kw):
        return lambda x, w, b, r, g: fn(x, w, b, activation=activation, residual=r, scale=g, **kw)

    (y, grads), (y_low, grads_low), (y_ref, grads_ref) = _three_ways(
        call(ops.linear, backend="cuda"), call(reference.linear), tensors, dy)
    x, w, b, _, g = tensors
    extra = _epilogue_rounding(x, w, b, g, dy, activation, dtype)
    _ratio_all(("y",), (y,), (y_low,), (y_ref,), dtype, extra)
    _ratio_all(("dx", "dweight", "dbias", "dresidual", "dscale"), grads, grads_low, grads_ref, dtype, extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [24, 37])
def test_linear_layer_scale_many_rows(dev, dtype, n):
    """700 rows: dgamma is the fixed-order sum of three chunks' fp32 partial sums."""
    tensors, dy = _linear_case(dev, (700,), 16, n, dtype, True, True, True)

    def call(fn, **kw):
        return lambda x, w, b, r, g: fn(x, w, b, activation="quick_gelu", residual=r, scale=g, **kw)

    (y, grads), (y_low, grads_low), (y_ref, grads_ref) = _three_ways(
        call(ops.linear, backend="cuda"), call(reference.linear), tensors, dy)
    x, w, b, _, g = tensors
    extra = _epilogue_rounding(x, w, b, g, dy, "quick_gelu", dtype)
    _ratio_all(("y",), (y,), (y_low,), (y_ref,), dtype, extra)
    _ratio_all(("dx", "dweight", "dbias", "dresidual", "dscale"), grads, grads_low, grads_ref, dtype, extra)
    # Deterministic: the same inputs give bit-identical gradients.
    _, again = _run(call(ops.linear, backend="cuda"), tensors, dy)
    assert all(torch.equal(a, b) for a, b in zip(grads, again) if a is not None)


def test_linear_layer_scale_without_its_gradient(dev):
    """A frozen gamma (no requires_grad): still scales the branch and dh; no gradient appears for it."""
    dtype = torch.float16
    (x, w, b, r, g), dy = _linear_case(dev, (9,), 16, 24, dtype, True, True, True)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.linear(xl, wl, b, activation="gelu", residual=r, scale=g, backend="cuda")
    y.backward(dy)
    x64, w64 = _d64(x).requires_grad_(), _d64(w).requires_grad_()
    y64 = reference.linear(x64, w64, _d64(b), activation="gelu", residual=_d64(r), scale=_d64(g))
    y64.backward(_d64(dy))
    assert g.grad is None
    assert_close(y, y64, dtype, scale=2, name="y")
    assert_close(xl.grad, x64.grad, dtype, scale=4 * max(1.0, x64.grad.abs().max().item()), name="dx")
    assert_close(wl.grad, w64.grad, dtype, scale=4 * max(1.0, w64.grad.abs().max().item()), name="dweight")


# ------------------------------------------------------------------------------------------ ln_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,d,n", [((19,), 36, 45), ((2, 50), 64, 256)])
def test_ln_linear_activations(dev, dtype, activation, lead, d, n):
    x = (torch.randn(*lead, d, device=dev) * 2 + torch.randn(*lead, 1, device=dev)).to(dtype)
    g = (1 + 0.5 * torch.randn(d, device=dev)).to(dtype)
    beta = (0.5 * torch.randn(d, device=dev)).to(dtype)
    w = (torch.randn(n, d, device=dev) / math.sqrt(d)).to(dtype)
    b = torch.randn(n, device=dev).to(dtype)
    dy = torch.randn(*lead, n, device=dev, dtype=dtype)
    (y, grads), (y_low, grads_low), (y_ref, grads_ref) = _three_ways(
        lambda *a: ops.ln_linear(*a, eps=EPS, activation=activation, backend="cuda"),
        lambda *a: reference.ln_linear(*a, eps=EPS, activation=activation), (x, g, beta, w, b), dy)
    # The GEMM's input is the LayerNorm's output (rounded to the dtype by the kernel and by eager alike).
    # The error e of d(ln_out) = dh W (the "dx" floor of the GEMM) goes on through the LayerNorm's
    # backward: dx = rstd (g' - mean g' - xhat mean(g' xhat)) with g' = gamma d(ln_out), so
    # |d dx| <= rstd max|gamma e| (2 + max|xhat|) (mean|xhat| <= 1); dgamma and dbeta are row sums of
    # d(ln_out) xhat and d(ln_out).
    x64 = x.double().reshape(-1, d)
    ln = reference.layer_norm(x64, g.double(), beta.double(), EPS)
    mean, rstd = reference.layer_norm_stats(x64, EPS)
    xhat = (x64 - mean[:, None]) * rstd[:, None]
    extra = _epilogue_rounding(ln, w, b, None, dy, activation, dtype)
    if extra:
        e = extra.pop("dx")  # the most |d d(ln_out)| of one element
        extra.update(dx=(rstd.max() * g.double().abs().max() * e * (2 + xhat.abs().max())).item(),
                     dln_weight=(e * xhat.abs().sum(0)).max().item(), dln_bias=e * x64.shape[0])
    _ratio_all(("y",), (y,), (y_low,), (y_ref,), dtype, extra)
    _ratio_all(("dx", "dln_weight", "dln_bias", "dweight", "dbias"), grads, grads_low, grads_ref, dtype, extra)


# ------------------------------------------------------------------------------------------ patch_embed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("no_embed_class", [False, True])
@pytest.mark.parametrize("pos,bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dim,hw,patch", [(64, (32, 48), 16), (36, (12, 20), 4)])
def test_patch_embed_prefix_tokens(dev, dtype, prefix, no_embed_class, pos, bias, dim, hw, patch):
    """[prefix tokens; patches W^T + b] + pos_embed, every gradient (dcls and dpos are batch column
    sums of dout's rows read in place); dim 36 takes the scalar epilogue, 64 the vector one."""
    batch, chans = 3, 3
    h, w = hw
    patches = (h // patch) * (w // patch)
    tokens = prefix + patches
    x = torch.randn(batch, chans, h, w, device=dev).to(dtype)
    wt = (torch.randn(dim, chans, patch, patch, device=dev) / math.sqrt(chans * patch * patch)).to(dtype)
    tensors = (
        x,
        wt,
        torch.randn(dim, device=dev).to(dtype) if bias else None,
        torch.randn(1, prefix, dim, device=dev).to(dtype) if prefix else None,
        torch.randn(1, patches if no_embed_class else tokens, dim, device=dev).to(dtype) if pos else None,
    )
    dy = torch.randn(batch, tokens, dim, device=dev, dtype=dtype)
    (y, grads), (y_low, grads_low), (y_ref, grads_ref) = _three_ways(
        lambda *a: ops.patch_embed(*a, no_embed_class=no_embed_class, backend="cuda"),
        lambda *a: reference.patch_embed(*a, no_embed_class=no_embed_class), tensors, dy)
    assert y.shape == (batch, tokens, dim)
    _ratio_all(("out",), (y,), (y_low,), (y_ref,), dtype)
    _ratio_all(("dx", "dweight", "dbias", "dcls", "dpos"), grads, grads_low, grads_ref, dtype)


def test_patch_embed_empty_prefix_tensor(dev):
    """cls_token of shape [1, 0, dim] (a model with no prefix tokens that still holds the parameter)."""
    dtype, dim = torch.bfloat16, 64
    x = torch.randn(2, 3, 32, 32, device=dev).to(dtype)
    wt = (torch.randn(dim, 3, 16, 16, device=dev) / 27).to(dtype)
    cls = torch.zeros(1, 0, dim, device=dev, dtype=dtype)
    pos = torch.randn(1, 4, dim, device=dev).to(dtype)
    dy = torch.randn(2, 4, dim, device=dev, dtype=dtype)
    y, grads = _run(lambda *a: ops.patch_embed(*a, backend="cuda"), (x, wt, None, cls, pos), dy)
    y_ref, grads_ref = _run(reference.patch_embed, [_d64(t) for t in (x, wt, None, cls, pos)], _d64(dy))
    assert_close(y, y_ref, dtype, scale=2, name="out")
    assert grads[3].shape == (1, 0, dim)
    assert_close(grads[4], grads_ref[4], dtype, scale=2 * max(1.0, grads_ref[4].abs().max().item()), name="dpos")


# ------------------------------------------------------------------------------------------ whole model


@pytest.mark.parametrize("act", ["gelu_tanh", "quick_gelu"])
def test_vit_with_the_family_options_on_the_cuda_backend(dev, act):
    """A DINOv2-with-registers-like ViT (LayerScale, 1 class + 2 register tokens, no_embed_class) with a
    SigLIP / CLIP activation, every op on backend="cuda" (an explicit backend raises rather than fall
    back): logits and every parameter's gradient within the ratio test, as test_cuda_ops' ViT test."""
    import vitkern

    dtype = torch.bfloat16
    torch.manual_seed(seed(0))
    kwargs = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=1, num_classes=8, act_layer=act,
                  init_values=0.5, reg_tokens=2, no_embed_class=True)
    eager = vitkern.ViT(**kwargs, backend="eager").to(dev).eval()
    with torch.no_grad():  # non-trivial LayerNorm, bias and LayerScale parameters
        for p in eager.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = vitkern.ViT(**kwargs, backend="cuda").to(dev).eval()
    model.load_state_dict(eager.state_dict())
    oracle = vitkern.ViT(**kwargs, backend="eager").to(dev).double().eval()
    oracle.load_state_dict(eager.state_dict())
    low, model = eager.to(dtype), model.to(dtype)
    x = torch.randn(3, 3, 32, 32, device=dev)
    out, out_low, out_ref = model(x.to(dtype)), low(x.to(dtype)), oracle(x.double())
    assert_ratio(out, out_low, out_ref, name="logits", floor=1e-3)
    for o in (out.float(), out_low.float(), out_ref):
        o.square().mean().backward()
    for (name, p), p_low, p_ref in zip(model.named_parameters(), low.parameters(), oracle.parameters()):
        assert p.grad is not None, name
        assert_ratio(p.grad, p_low.grad, p_ref.grad, name=f"grad {name}", floor=1e-3 * max(1.0, p_ref.grad.abs().max().item()))


# ------------------------------------------------------------------------------------------ dispatch, schema, errors


def test_cuda_backend_takes_the_family_options(dev):
    """The reasons of backend "cuda" are empty for the options built here, and QK-norm is still declined
    (another change adds it: only the options of this file are asserted to be accepted)."""
    from vitkern.ops import _cuda

    dtype = torch.float16
    x = torch.randn(5, 16, device=dev, dtype=dtype)
    w = torch.randn(24, 16, device=dev, dtype=dtype)
    gamma = torch.randn(24, device=dev, dtype=dtype)
    for activation in ACTIVATIONS:
        call = dict(x=x, weight=w, bias=None, activation=activation, residual=None, scale=gamma)
        assert _cuda._linear_supports(call) == [], activation
        ln_call = dict(x=x, ln_weight=None, ln_bias=None, weight=w, bias=None, eps=EPS, activation=activation)
        assert _cuda._ln_linear_supports(ln_call) == [], activation
    img = torch.randn(2, 3, 32, 32, device=dev, dtype=dtype)
    pw = torch.randn(64, 3, 16, 16, device=dev, dtype=dtype)
    cls = torch.randn(1, 5, 64, device=dev, dtype=dtype)
    pe_call = dict(x=img, weight=pw, bias=None, cls_token=cls, pos_embed=torch.randn(1, 4, 64, device=dev, dtype=dtype),
                   no_embed_class=True)
    assert _cuda._patch_embed_supports(pe_call) == []
    # backend="cuda" is taken, not refused (select raises BackendUnavailableError with the reasons).
    assert dispatch.select("patch_embed", "cuda", img.device, pe_call).backend == "cuda"
    assert dispatch.select("linear", "cuda", x.device, call).backend == "cuda"
    qkv = torch.randn(2, 17, 3 * 64, device=dev, dtype=dtype)
    norm = (torch.ones(64, device=dev, dtype=dtype), None, 1e-6)
    reasons = _cuda._attention_supports(dict(qkv=qkv, num_heads=1, scale=None, q_norm=norm, k_norm=norm))
    if reasons:  # until QK-norm is in csrc/attention.cu: declined by name
        assert any("QK-norm" in r for r in reasons), reasons


def test_bad_arguments_are_refused_by_name(dev):
    from vitkern.ops import _cuda

    o = _cuda._ops()
    x = torch.randn(4, 16, device=dev, dtype=torch.float16)
    w = torch.randn(24, 16, device=dev, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"act must be an activation code .* got 7"):
        o.cuda_linear_fwd(x, w, None, None, None, 7)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[24\], got \[16\]"):
        o.cuda_linear_fwd(x, w, None, None, torch.randn(16, device=dev, dtype=torch.float16), 0)
    with pytest.raises(RuntimeError, match=r"scale must have dtype Half .* got BFloat16"):
        o.cuda_linear_fwd(x, w, None, None, torch.randn(24, device=dev, dtype=torch.bfloat16), 1)
    img = torch.randn(2, 3, 32, 32, device=dev, dtype=torch.float16)
    pw = torch.randn(64, 3, 16, 16, device=dev, dtype=torch.float16)
    cls = torch.randn(1, 2, 64, device=dev, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"cls_token must have shape \(1, n_prefix, 64\) .* got \[2, 2, 64\]"):
        o.cuda_patch_embed_fwd(img, pw, None, cls.expand(2, 2, 64).contiguous(), None, False)
    with pytest.raises(RuntimeError, match=r"pos_embed \(no_embed_class: the patch tokens only\) must have shape \[1, 4, 64\], got \[1, 6, 64\]"):
        o.cuda_patch_embed_fwd(img, pw, None, cls, torch.randn(1, 6, 64, device=dev, dtype=torch.float16), True)


def test_torch_compile_traces_the_family_options(dev):
    """fullgraph through the fakes of the new schemas, forward and backward: LayerScale + QuickGELU,
    tanh GELU, register tokens with no_embed_class; the same bits as the eager calls."""
    dtype = torch.bfloat16
    x = torch.randn(2, 3, 32, 32, device=dev, dtype=dtype)
    pw = torch.randn(64, 3, 16, 16, device=dev, dtype=dtype) / 27
    cls = torch.randn(1, 3, 64, device=dev, dtype=dtype)
    pos = torch.randn(1, 4, 64, device=dev, dtype=dtype)
    w = torch.randn(64, 64, device=dev, dtype=dtype) / 8
    gamma = torch.rand(64, device=dev, dtype=dtype)

    def f(x, pw, cls, pos, w, gamma):
        t = ops.patch_embed(x, pw, None, cls, pos, no_embed_class=True, backend="cuda")
        h = ops.ln_linear(t, None, None, w, None, activation="gelu_tanh", backend="cuda")
        return ops.linear(h, w, None, activation="quick_gelu", residual=t, scale=gamma, backend="cuda")

    expected = f(x, pw, cls, pos, w, gamma)
    got = torch.compile(f, fullgraph=True)(x, pw, cls, pos, w, gamma)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # The backward graph too (its fakes give dgamma [64] and dcls [1, 3, 64]).
    leaves = [t.clone().requires_grad_() for t in (pw, cls, pos, w, gamma)]
    torch.compile(f, fullgraph=True)(x, *leaves).float().square().mean().backward()
    eager_leaves = [t.clone().requires_grad_() for t in (pw, cls, pos, w, gamma)]
    f(x, *eager_leaves).float().square().mean().backward()
    for name, a, b in zip(("dweight", "dcls", "dpos", "dw", "dgamma"), leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------ kernel entry points (emulator)

VK = {torch.float16: 0, torch.bfloat16: 1}
ACT_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}


@pytest.fixture(scope="module")
def emu():
    from cuda_emu import emulator

    why = emulator.toolchain_error()
    if why:
        pytest.skip(f"the CUDA emulator cannot be built here: {why}")
    return emulator.load()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _rounded_once(name, got, exact, dtype, atol=1e-5):
    """The epilogue evaluates in fp32 from the stored inputs and rounds once: within one unit roundoff of
    `dtype` of the float64 value (atol: fp32's own error where terms cancel, and fp16's subnormals)."""
    torch.testing.assert_close(got.double(), exact, rtol=UNIT_ROUNDOFF[dtype], atol=atol, msg=lambda m: f"{name}: {m}")


def test_activation_codes_match_the_header():
    """ACTIVATION_CODES of vitkern/ops/_cuda.py and enum VkActivation of csrc/vitkern_kernels.h agree."""
    import re
    from pathlib import Path

    from vitkern.ops import _cuda

    header = (Path(__file__).resolve().parent.parent / "csrc" / "vitkern_kernels.h").read_text()
    enum = dict((name, int(v)) for name, v in re.findall(r"VK_ACT_(\w+) = (\d+)", header))
    assert enum == {"NONE": 0, "GELU": 1, "GELU_TANH": 2, "QUICK_GELU": 3}
    assert {(a or "none").upper(): c for a, c in _cuda.ACTIVATION_CODES.items()} == enum
    assert _cuda.ACTIVATION_CODES == ACT_CODES


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu"])
def test_activation_limits_and_overflow(emu, dtype, activation):
    """act and act' at +-inf (an fp16 GEMM output past 65504) and far in both tails: the limits, never NaN."""
    h = torch.tensor([float("-inf"), -1e4, -60.0, -12.0, -3.0, -1.5, -0.7, 0.0, 0.7, 1.5, 3.0, 12.0, 60.0, 1e4,
                      float("inf")]).to(dtype)
    n = h.numel()
    out, dh = torch.full_like(h, float("nan")), torch.full_like(h, float("nan"))
    dout = torch.ones_like(h)
    emu.check("vk_linear_epilogue_fwd", VK[dtype], ACT_CODES[activation], _ptr(h), None, None, _ptr(out), 1, n, None)
    emu.check("vk_linear_epilogue_bwd", VK[dtype], ACT_CODES[activation], _ptr(dout), _ptr(h), None, _ptr(dh), None,
              None, 1, n, None)
    finite = torch.isfinite(h)
    h64 = h[finite].double().requires_grad_()
    y64 = reference.activate(h64, activation)
    (g64,) = torch.autograd.grad(y64, h64, torch.ones_like(h64))
    assert not torch.isnan(out).any() and not torch.isnan(dh).any(), (out, dh)
    _rounded_once("act", out[finite], y64.detach(), dtype)
    _rounded_once("act'", dh[finite], g64, dtype)
    assert out[0] == 0 and dh[0] == 0 and out[-1] == float("inf") and dh[-1] == 1, (out, dh)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(5, 24), (300, 40), (7, 13), (600, 33)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_epilogue_entry_points(emu, dtype, rows, cols, activation):
    """vk_linear_epilogue_fwd/bwd against float64: out = act(h) * scale + residual, dh, dscale (several
    chunks of 256 rows at 300 and 600 rows; 13 and 33 columns: the scalar path)."""
    from test_cuda_emulated import Buffers

    h = (torch.randn(rows, cols) * 3).to(dtype)
    g, r, dout = torch.randn(cols).to(dtype), torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype)
    buf = Buffers()
    hd, gd, rd, dod = (buf.new(nm, t.shape, dtype, t) for nm, t in (("h", h), ("scale", g), ("residual", r), ("dout", dout)))
    out, dh, dg = buf.new("out", (rows, cols), dtype), buf.new("dh", (rows, cols), dtype), buf.new("dscale", (cols,), dtype)
    ws = buf.new("ws", (emu.call("vk_colsum_workspace_floats", rows, cols),), torch.float32)
    code = ACT_CODES[activation]
    emu.check("vk_linear_epilogue_fwd", VK[dtype], code, _ptr(hd), _ptr(gd), _ptr(rd), _ptr(out), rows, cols, None)
    emu.check("vk_linear_epilogue_bwd", VK[dtype], code, _ptr(dod), _ptr(hd), _ptr(gd), _ptr(dh), _ptr(dg), _ptr(ws),
              rows, cols, None)
    buf.check_guards()
    h64 = h.double().requires_grad_()
    a64 = reference.activate(h64, activation)
    y64 = a64 * g.double() + r.double()
    (dh64,) = torch.autograd.grad(y64, h64, dout.double())
    _rounded_once("out", out, y64.detach(), dtype)
    _rounded_once("dh", dh, dh64, dtype)
    dg64 = (dout.double() * a64.detach()).sum(0)
    _rounded_once("dscale", dg, dg64, dtype, atol=1e-6 * rows * 10)  # fp32 sums of the same terms, one rounding
    # dscale needs the scale (it is its gradient), and an unknown activation code is refused.
    assert emu.call("vk_linear_epilogue_bwd", VK[dtype], code, _ptr(dod), _ptr(hd), None, _ptr(dh), _ptr(dg), _ptr(ws),
                    rows, cols, None) != 0
    assert emu.call("vk_linear_epilogue_fwd", VK[dtype], 4, _ptr(hd), None, None, _ptr(out), rows, cols, None) != 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 36])
@pytest.mark.parametrize("n_prefix", [0, 1, 5])
@pytest.mark.parametrize("no_embed_class", [False, True])
def test_patch_embed_epilogue_prefix(emu, dtype, dim, n_prefix, no_embed_class):
    from test_cuda_emulated import Buffers

    batch, patches = 3, 7
    tokens = torch.randn(batch, patches, dim).to(dtype)
    prefix = torch.randn(n_prefix, dim).to(dtype)
    pos = torch.randn(patches + (0 if no_embed_class else n_prefix), dim).to(dtype)
    buf = Buffers()
    td, pd = buf.new("tokens", tokens.shape, dtype, tokens), buf.new("pos", pos.shape, dtype, pos)
    cd = buf.new("prefix", prefix.shape, dtype, prefix) if n_prefix else None
    out = buf.new("out", (batch, n_prefix + patches, dim), dtype)
    emu.check("vk_patch_embed_epilogue", VK[dtype], _ptr(td), _ptr(cd), _ptr(pd), _ptr(out), batch, n_prefix, patches,
              dim, no_embed_class, None)
    buf.check_guards()
    ref = torch.cat([prefix.double().expand(batch, n_prefix, dim), tokens.double()], dim=1)
    if no_embed_class:
        ref[:, n_prefix:] += pos.double()
    else:
        ref += pos.double()
    assert_close(out, ref, dtype, name="out")
    if n_prefix:  # prefix rows without a prefix pointer: refused, not read from address 0
        assert emu.call("vk_patch_embed_epilogue", VK[dtype], _ptr(td), None, _ptr(pd), _ptr(out), batch, n_prefix,
                        patches, dim, no_embed_class, None) != 0
