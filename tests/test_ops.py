"""The public functional ops (issue 2, point 6): exact signatures, agreement with the eager
reference and with independent PyTorch formulations (values and gradients), and the errors for
bad input. Kernel-backend accuracy is tested per family in tests/test_triton_*.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern import BackendUnavailableError, dispatch, ops, reference


pytestmark = pytest.mark.usefixtures("one_thread")


E = inspect.Parameter.empty
POS, KW = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY

# Issue 2, point 6, verbatim: (name, kind, default) of every parameter; plus the ViT family's keyword
# options of issue 13 (no_embed_class, q_norm / k_norm, scale), and the packed (NaFlex) batches of
# issue 23 (attention's cu_seqlens / max_seqlen, patch_embed's grids), before `backend`.
SIGNATURES = {
    "patch_embed": [("x", POS, E), ("weight", POS, E), ("bias", POS, E), ("cls_token", POS, None),
                    ("pos_embed", POS, None), ("no_embed_class", KW, False), ("keep", KW, None),
                    ("grids", KW, None), ("pos_embed_ar_preserving", KW, False), ("backend", KW, "auto")],
    "layer_norm": [("x", POS, E), ("weight", POS, E), ("bias", POS, E), ("eps", POS, 1e-6), ("backend", KW, "auto")],
    "ln_linear": [("x", POS, E), ("ln_weight", POS, E), ("ln_bias", POS, E), ("weight", POS, E), ("bias", POS, None),
                  ("eps", KW, 1e-6), ("activation", KW, None), ("backend", KW, "auto")],
    "attention": [("qkv", POS, E), ("num_heads", POS, E), ("scale", KW, None), ("q_norm", KW, None),
                  ("k_norm", KW, None), ("cu_seqlens", KW, None), ("max_seqlen", KW, None), ("backend", KW, "auto")],
    "linear": [("x", POS, E), ("weight", POS, E), ("bias", POS, None), ("activation", KW, None),
               ("residual", KW, None), ("scale", KW, None), ("backend", KW, "auto")],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    fn = getattr(vitkern.ops, name)
    params = [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    assert params == SIGNATURES[name]
    assert fn.__doc__ and "[" in fn.__doc__  # documents shapes


def test_ops_exports_exactly_the_five():
    assert sorted(vitkern.ops.__all__) == sorted(SIGNATURES)
    assert set(dispatch.OPS) == set(SIGNATURES)


# --------------------------------------------------------------------------------------------
# Values and gradients: op (eager and auto on CPU) == reference == an independent torch formula


def _leaf(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(True)


def _check(op_fn, ref_fn, torch_fn, inputs, atol=1e-10):
    """op == reference exactly-ish, reference == torch formula, and their gradients agree."""
    outs = {}
    for name, fn in (("op", op_fn), ("reference", ref_fn), ("torch", torch_fn)):
        for t in inputs:
            t.grad = None
        y = fn()
        g = torch.randn_like(y) if not outs else outs["op"][2]
        y.backward(g)
        outs[name] = (y.detach(), [t.grad.clone() for t in inputs], g)
    for name in ("reference", "torch"):
        torch.testing.assert_close(outs["op"][0], outs[name][0], atol=atol, rtol=atol, msg=lambda m: f"value vs {name}: {m}")
        for i, (a, b) in enumerate(zip(outs["op"][1], outs[name][1])):
            torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"grad {i} vs {name}: {m}")


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("batch, size, patch, with_cls", [(2, (16, 24), 8, True), (1, (8, 8), 8, False), (3, (12, 12), 4, True)])
def test_patch_embed(backend, batch, size, patch, with_cls):
    dim, chans = 16, 3
    x = _leaf(batch, chans, *size)
    w, b = _leaf(dim, chans, patch, patch, scale=0.1), _leaf(dim)
    tokens = (1 if with_cls else 0) + (size[0] // patch) * (size[1] // patch)
    cls = _leaf(1, 1, dim) if with_cls else None
    pos = _leaf(1, tokens, dim)
    inputs = [t for t in (x, w, b, cls, pos) if t is not None]

    def torch_fn():
        z = F.conv2d(x, w, b, stride=patch).flatten(2).transpose(1, 2)
        if cls is not None:
            z = torch.cat([cls.expand(batch, -1, -1), z], dim=1)
        return z + pos

    _check(lambda: ops.patch_embed(x, w, b, cls, pos, backend=backend),
           lambda: reference.patch_embed(x, w, b, cls, pos), torch_fn, inputs)
    assert ops.patch_embed(x, w, b, cls, pos, backend=backend).shape == (batch, tokens, dim)


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("shape", [(2, 17, 64), (1, 1, 48), (5, 96)])
def test_layer_norm(backend, shape):
    dim = shape[-1]
    x, w, b = _leaf(*shape, scale=3.0), _leaf(dim), _leaf(dim)
    _check(lambda: ops.layer_norm(x, w, b, 1e-6, backend=backend),
           lambda: reference.layer_norm(x, w, b, 1e-6),
           lambda: F.layer_norm(x, (dim,), w, b, 1e-6), [x, w, b])


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("activation, with_bias", [(None, True), ("gelu", True), (None, False)])
def test_ln_linear(backend, activation, with_bias):
    dim, out = 32, 48
    x, lw, lb = _leaf(2, 7, dim), _leaf(dim), _leaf(dim)
    w = _leaf(out, dim, scale=0.2)
    b = _leaf(out) if with_bias else None
    inputs = [t for t in (x, lw, lb, w, b) if t is not None]

    def torch_fn():
        y = F.linear(F.layer_norm(x, (dim,), lw, lb, 1e-5), w, b)
        return F.gelu(y) if activation else y

    _check(lambda: ops.ln_linear(x, lw, lb, w, b, eps=1e-5, activation=activation, backend=backend),
           lambda: reference.ln_linear(x, lw, lb, w, b, eps=1e-5, activation=activation), torch_fn, inputs)


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("batch, tokens, heads, head_dim, scale", [(2, 17, 2, 32, None), (1, 1, 3, 16, None),
                                                                   (2, 7, 4, 80, 0.05)])
def test_attention(backend, batch, tokens, heads, head_dim, scale):
    dim = heads * head_dim
    qkv = _leaf(batch, tokens, 3 * dim)

    def torch_fn():
        q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(batch, tokens, dim)

    _check(lambda: ops.attention(qkv, heads, scale=scale, backend=backend),
           lambda: reference.attention(qkv, heads, scale=scale), torch_fn, [qkv])


def test_reference_attention_probabilities():
    qkv = torch.randn(2, 5, 3 * 8, dtype=torch.float64)
    out, probs = reference.attention(qkv, 2, return_probs=True)
    assert probs.shape == (2, 2, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    v = qkv.reshape(2, 5, 3, 2, 4)[:, :, 2].permute(0, 2, 1, 3)
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2).reshape(2, 5, 8))


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("activation, with_bias, with_residual", [(None, True, True), ("gelu", True, False),
                                                                  (None, False, False), ("gelu", False, True)])
def test_linear(backend, activation, with_bias, with_residual):
    x, w = _leaf(3, 5, 24), _leaf(40, 24, scale=0.2)
    b = _leaf(40) if with_bias else None
    r = _leaf(3, 5, 40) if with_residual else None
    inputs = [t for t in (x, w, b, r) if t is not None]

    def torch_fn():
        y = F.linear(x, w, b)
        y = F.gelu(y) if activation else y
        return y + r if r is not None else y

    _check(lambda: ops.linear(x, w, b, activation=activation, residual=r, backend=backend),
           lambda: reference.linear(x, w, b, activation=activation, residual=r), torch_fn, inputs)


def test_ops_keep_fp32_and_match_fp64_reference():
    # fp32 in, fp32 out, within the fp32 tolerance of the fp64 oracle.
    x = torch.randn(2, 9, 32)
    lw, lb, w, b = torch.randn(32), torch.randn(32), torch.randn(96, 32) * 0.2, torch.randn(96)
    y = ops.ln_linear(x, lw, lb, w, b)
    assert y.dtype == torch.float32
    expected = reference.ln_linear(x.double(), lw.double(), lb.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), expected, atol=2e-5, rtol=2e-5)
    a = ops.attention(y, 2)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), reference.attention(y.double(), 2), atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# Bad input: the error names the argument with expected vs. actual


def test_patch_embed_errors():
    x, w, b = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 4, 4), torch.randn(8)
    with pytest.raises(ValueError, match=r"x must have 3 channels .* got 4"):
        ops.patch_embed(torch.randn(1, 4, 16, 16), w, b)
    with pytest.raises(ValueError, match=r"multiples of the patch size \(4, 4\), got \(18, 16\)"):
        ops.patch_embed(torch.randn(1, 3, 18, 16), w, b)
    with pytest.raises(ValueError, match=r"x must have 4 dims, got 3"):
        ops.patch_embed(torch.randn(3, 16, 16), w, b)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 17, 8\).*got \(1, 16, 8\)"):
        ops.patch_embed(x, w, b, torch.randn(1, 1, 8), torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match=r"cls_token must have shape \(1, 1, 8\), got \(1, 8\)"):
        ops.patch_embed(x, w, b, torch.randn(1, 8))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor"):
        ops.patch_embed(x.long(), w, b)


def test_layer_norm_and_ln_linear_errors():
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\) \(the last dim of x\), got \(15,\)"):
        ops.layer_norm(x, torch.randn(15), torch.randn(16))
    with pytest.raises(ValueError, match="eps must be positive"):
        ops.layer_norm(x, torch.randn(16), torch.randn(16), eps=0.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(out_features, 16\).*got \(32, 8\)"):
        ops.ln_linear(x, torch.randn(16), torch.randn(16), torch.randn(32, 8))
    with pytest.raises(ValueError, match=r"activation must be one of \(None, 'gelu', 'gelu_tanh', 'quick_gelu'\), got 'relu'"):
        ops.ln_linear(x, torch.randn(16), torch.randn(16), torch.randn(32, 16), activation="relu")
    with pytest.raises(ValueError, match=r"ln_bias must have shape \(16,\)"):
        ops.ln_linear(x, torch.randn(16), torch.randn(3), torch.randn(32, 16))


def test_attention_errors():
    with pytest.raises(ValueError, match=r"qkv's last dim must be 3 \* dim .* got 25"):
        ops.attention(torch.randn(1, 4, 25), 1)
    with pytest.raises(ValueError, match=r"dim = qkv.shape\[-1\] / 3 = 24 must be divisible by num_heads = 5"):
        ops.attention(torch.randn(1, 4, 72), 5)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        ops.attention(torch.randn(1, 4, 72), 0)
    with pytest.raises(ValueError, match=r"qkv must have 3 dims, got 2"):
        ops.attention(torch.randn(4, 72), 2)


def test_linear_errors():
    x, w = torch.randn(2, 3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"x's last dim must be weight's in_features 8 .* got 7"):
        ops.linear(torch.randn(2, 3, 7), w)
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 3, 5\).*got \(2, 3, 8\)"):
        ops.linear(x, w, residual=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        ops.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"weight must have 2 dims, got 1"):
        ops.linear(x, torch.randn(8))


def test_mixed_devices_named():
    x = torch.randn(2, 8, device="meta")
    with pytest.raises(ValueError, match=r"weight is on cpu but x is on meta"):
        ops.linear(x, torch.randn(5, 8))


def test_unknown_backend_named():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'tpu'"):
        ops.linear(torch.randn(2, 8), torch.randn(5, 8), backend="tpu")


def _op_call(op: str, dtype_x: torch.dtype):
    """A small valid call of `op` whose activations are `dtype_x` and whose weights are fp32."""
    x16 = lambda *s: torch.randn(*s).to(dtype_x)  # noqa: E731
    if op == "patch_embed":
        return lambda backend: ops.patch_embed(x16(1, 3, 8, 8), torch.randn(16, 3, 4, 4), torch.randn(16), backend=backend)
    if op == "layer_norm":
        return lambda backend: ops.layer_norm(x16(2, 16), torch.randn(16), torch.randn(16), backend=backend)
    if op == "ln_linear":
        return lambda backend: ops.ln_linear(x16(2, 16), torch.randn(16), torch.randn(16), torch.randn(32, 16),
                                             torch.randn(32), backend=backend)
    if op == "attention":
        # attention has no weights: the mismatch case for it is an unsupported dtype instead.
        return lambda backend: ops.attention(x16(1, 4, 48), 2, backend=backend)
    return lambda backend: ops.linear(x16(2, 16), torch.randn(32, 16), torch.randn(32), backend=backend)


@pytest.mark.parametrize("op", [o for o in dispatch.OPS if o != "attention"])
def test_dtype_mismatch_is_named_alike_on_every_backend(op):
    # Refused before dispatch, so eager (which would promote to fp32) and the fused backends (which
    # read one dtype) give the same TypeError, whether or not the backend could run here.
    call = _op_call(op, torch.float16)
    messages = set()
    for backend in ("auto",) + dispatch.BACKENDS:
        with pytest.raises(TypeError) as info:
            call(backend)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "is torch.float32 but x is torch.float16" in message and "one dtype" in message, message


@pytest.mark.parametrize("op", dispatch.OPS)
def test_cpu_input_on_cuda_backend_is_refused(op):
    with pytest.raises(BackendUnavailableError) as info:
        _op_call(op, torch.float32)("cuda")
    message = str(info.value)
    assert f"backend='cuda' cannot run vitkern.ops.{op}" in message
    assert any(r in message for r in ("no CUDA device is visible", "needs CUDA tensors", "no cuda implementation")), message
