"""Higher-order autograd and threads (issue 19, items 4 and 6); each test failed before its fix.

* Double backward (`torch.autograd.grad(..., create_graph=True)`: gradient penalties, R1) and
  `torch.func` transforms (grad, vmap) on the fused backends raise an error that names the backend
  and the way out (backend='eager'); before, torch's own messages named neither (or, for a double
  backward, a gradient came back silently lacking the fused ops' second-order terms). The eager
  backend supports both, and keeps doing so. (The CUDA backend's cases, on the emulator:
  test_cuda_ops.py.)
* Two threads running a Triton model under the interpreter: interpreted launches are serialized
  (they patch triton.language for their duration; a second thread's launch crashed with "Did you
  forget to add @triton.jit").
"""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import INTERPRETING, TRITON_DEVICE

import vitkern
from vitkern import dispatch, ops

HAS_TRITON = not dispatch.backend_unavailable_reasons("triton")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is unavailable here")
TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)


def _op_calls(backend, device, dtype):
    """[(name, function of one input tensor x on `backend`, x)] for each of the five ops, tiny."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    d, n = 16, 32
    w, b = r(n, d), r(n)
    lw, lb = r(d), r(d)
    img = r(1, 3, 16, 16)
    pw, pb, cls, pos = r(d, 3, 8, 8), r(d), r(1, 1, d), r(1, 5, d)
    return [
        ("attention", lambda x: ops.attention(x, 2, backend=backend), r(1, 5, 3 * 32)),
        ("layer_norm", lambda x: ops.layer_norm(x, lw, lb, backend=backend), r(3, d)),
        ("linear", lambda x: ops.linear(x, w, b, activation="gelu", backend=backend), r(3, d)),
        ("ln_linear", lambda x: ops.ln_linear(x, lw, lb, w, b, backend=backend), r(3, d)),
        ("patch_embed", lambda x: ops.patch_embed(x, pw, pb, cls, pos, backend=backend), img),
    ]


def _gradient_penalty(fn, x):
    """R1-style: || d sum(fn(x)^2) / dx ||^2, differentiated again w.r.t. x."""
    x = x.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), x)
    return ggx


@needs_triton
@pytest.mark.parametrize("op", ["attention", "layer_norm", "linear", "ln_linear", "patch_embed"])
def test_triton_double_backward_names_backend_and_way_out(op):
    name, fn, x = next(c for c in _op_calls("triton", TRITON_DEVICE, torch.float32) if c[0] == op)
    with pytest.raises(RuntimeError, match=rf"triton backend .*{name}.*create_graph=True.*backend='eager'"):
        _gradient_penalty(fn, x)
    # (A first-order backward through the guard is what every other Triton test runs.)


@needs_triton
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_triton_torch_func_names_backend_and_way_out(transform):
    _, fn, x = _op_calls("triton", TRITON_DEVICE, torch.float32)[0]  # attention
    if transform == "grad":
        call = lambda: torch.func.grad(lambda t: fn(t).sum())(x)  # noqa: E731
    else:
        call = lambda: torch.func.vmap(fn)(x.unsqueeze(0).expand(2, -1, -1, -1))  # noqa: E731
    with pytest.raises(RuntimeError, match=r"torch.func transforms .*triton backend of attention.*backend='eager'"):
        call()


@needs_triton
def test_triton_model_r1_penalty_names_backend():
    torch.manual_seed(0)
    model = vitkern.ViT(**TINY, backend="triton").to(TRITON_DEVICE)
    x = torch.randn(2, 3, 16, 16, device=TRITON_DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"vitkern's triton backend computes first-order gradients.*backend='eager'"):
        (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("op", ["attention", "layer_norm", "linear", "ln_linear", "patch_embed"])
def test_eager_double_backward_and_torch_func(op):
    """The way out works: gradgradcheck in float64, and torch.func.grad equals autograd's gradient."""
    name, fn, x = next(c for c in _op_calls("eager", "cpu", torch.float64) if c[0] == op)
    x = x.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    (expected,) = torch.autograd.grad(fn(x).square().sum(), x)
    got = torch.func.grad(lambda t: fn(t).square().sum())(x.detach())
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if name == "attention":
        batched = torch.func.vmap(fn)(x.detach().unsqueeze(0).expand(2, -1, -1, -1))
        single = fn(x.detach())
        # The batched matmuls may sum in another order: at most n eps sum|terms| apart per dot, with
        # n = head_dim + tokens (scores, then P v) and sum|terms| <= max|qkv|^2 head_dim (+ max|v|).
        n, bound = 16 + 5, x.abs().max().item() ** 2 * 16 * torch.finfo(torch.float64).eps
        torch.testing.assert_close(batched[1], single, atol=n * bound, rtol=0)


def test_eager_model_r1_penalty():
    torch.manual_seed(0)
    model = vitkern.ViT(**TINY, backend="eager").double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    penalty = gx.square().sum()
    penalty.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    # The penalty reaches the attention's projection through the second-order terms (the head's
    # and the final norm's biases shift the logits only, so they get none).
    assert grads["blocks.0.attn.qkv.weight"].abs().max() > 0


def _same_weights(model, backend):
    twin = vitkern.ViT(**TINY, backend=backend)
    twin.load_state_dict(model.state_dict())
    return twin


def _r1_penalty_grads(model, x, amp):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    (gx,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    gx.square().sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_cpu_bf16_autocast_r1_penalty():
    """The CPU default path under bf16 autocast has a second derivative (timm's, plain SDPA on the
    CPU, has none: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
    not implemented"): the bf16 attention's create_graph backward is fp32 math SDPA. Its R1 gradients
    pass the ratio test against the eager backend's under the same autocast, both against float64
    (largest error / bound 0.52 at seed 0)."""
    torch.manual_seed(0)
    model = vitkern.ViT(**TINY, backend="torch")
    x = torch.randn(2, 3, 16, 16)
    got = _r1_penalty_grads(model, x, amp=True)
    eager = _r1_penalty_grads(_same_weights(model, "eager"), x, amp=True)
    ref = _r1_penalty_grads(_same_weights(model, "eager").double(), x.double(), amp=False)
    assert got["blocks.0.attn.qkv.weight"].abs().max() > 0
    for name, r in ref.items():
        err = (got[name].double() - r).abs().max().item()
        base = (eager[name].double() - r).abs().max().item()
        floor = 2 * 2.0 ** -8 * r.abs().max().item()
        assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x eager's {base:.3e} + {floor:.3e}"


# ---------------------------------------------------------------------------------------------
# Threads under the interpreter (item 6)


@needs_triton
@pytest.mark.skipif(not INTERPRETING, reason="the lock is for the interpreter; compiled launches are thread-safe")
def test_two_threads_run_a_triton_model_under_the_interpreter():
    torch.manual_seed(0)
    model = vitkern.ViT(**TINY, backend="triton").eval()
    xs = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    results, errors = [None, None], []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(2):
                    results[i] = model(xs[i])
        except Exception as e:  # noqa: BLE001 (reported below with the thread's index)
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
