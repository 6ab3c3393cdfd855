"""The whole `vitkern.ViT(backend="triton")`, forward and backward, against the eager model.

Runs in the Triton interpreter on CPU tensors (a tiny config keeps it inside a minute) and on the
GPU under `make gpu`. fp32 is compared with the table's tolerance; fp16/bf16 with the ratio test
of DESIGN.md: the Triton model's error against the float64 model is at most 2x the error of the
eager model run in the same low dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitkern
from conftest import HAS_CUDA, TRITON_DEVICE, assert_close, assert_ratio, seed

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _models(dtype, device, **overrides):
    torch.manual_seed(seed(0))
    eager = vitkern.ViT(**{**TINY, **overrides}, backend="eager").eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params and biases, so every term is tested
        for name, p in eager.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    oracle = copy.deepcopy(eager).double()
    triton_model = copy.deepcopy(eager).to(device=device, dtype=dtype)
    triton_model.backend = "triton"
    eager_lowp = copy.deepcopy(eager).to(device=device, dtype=dtype)
    return oracle, triton_model, eager_lowp


def _run(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads["input"] = x.grad.detach().clone()
    return out.detach(), grads


def _check(dtype, device, **overrides):
    oracle, tri, eager_lowp = _models(dtype, device, **overrides)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    out64, g64 = _run(oracle, x)
    out, g = _run(tri, x.to(device=device, dtype=dtype))
    if dtype == torch.float32:
        assert_close(out.cpu(), out64, dtype, name="logits")
        for name in g64:
            # gradients sum over batch and tokens: a few more roundings than the forward
            assert_close(g[name].cpu(), g64[name], dtype, scale=10, name=f"grad {name}")
    else:
        out_e, g_e = _run(eager_lowp, x.to(device=device, dtype=dtype))
        assert_ratio(out.cpu(), out_e.cpu(), out64, name="logits", floor=1e-3)
        for name in g64:
            assert_ratio(g[name].cpu(), g_e[name].cpu(), g64[name], name=f"grad {name}", floor=1e-3)


def _require_triton():
    ok, reasons = vitkern.available_backends()["triton"]
    if not ok:
        pytest.fail("the Triton backend must be usable in the tests (interpreter on CPU): " + "; ".join(reasons))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_model_matches_eager(dtype):
    _require_triton()
    _check(dtype, TRITON_DEVICE)


def test_triton_model_avg_pool_no_cls_token():
    _require_triton()
    _check(torch.float32, TRITON_DEVICE, global_pool="avg", class_token=False)


def test_triton_model_uses_only_triton_kernels(monkeypatch):
    """backend="triton" must not quietly fall back to eager for any op."""
    _require_triton()
    from vitkern import dispatch

    used = []
    original = dispatch.select

    def spy(op, backend, device, call):
        impl = original(op, backend, device, call)
        used.append((op, impl.backend))
        return impl

    monkeypatch.setattr(dispatch, "select", spy)
    model = vitkern.ViT(**TINY, backend="triton").eval().to(TRITON_DEVICE)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, device=TRITON_DEVICE))
    assert {op for op, _ in used} == {"patch_embed", "ln_linear", "attention", "linear", "layer_norm"}
    assert {b for _, b in used} == {"triton"}


def test_triton_model_compiles_fullgraph():
    """torch.compile traces the triton-backend model with no graph break (dispatch included)."""
    _require_triton()
    model = vitkern.ViT(**TINY, backend="triton").eval().to(TRITON_DEVICE)
    x = torch.randn(2, 3, 32, 32, device=TRITON_DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager" if not HAS_CUDA else "inductor", fullgraph=True)
    with torch.no_grad():
        expected = model(x)
        actual = compiled(x)
    assert_close(actual.cpu(), expected.double().cpu(), torch.float32, name="compiled logits")


@pytest.mark.gpu
def test_triton_model_bf16_gpu():
    _check(torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_triton_vit_base_bf16_gpu():
    """ViT-B/16 at 224, batch 8, bf16: the ratio test on real shapes (T=197, head dim 64)."""
    torch.manual_seed(seed(0))
    eager = vitkern.vit_base_patch16_224(backend="eager").eval()
    oracle = copy.deepcopy(eager).double().cuda()
    tri = copy.deepcopy(eager).to(device="cuda", dtype=torch.bfloat16)
    tri.backend = "triton"
    low = copy.deepcopy(eager).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        assert_ratio(tri(x.bfloat16()).cpu(), low(x.bfloat16()).cpu(), oracle(x).cpu(), name="vit_base logits", floor=1e-3)
