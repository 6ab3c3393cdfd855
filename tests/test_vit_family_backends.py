"""The ViT family's options through the fused backends (issue 13): a tiny ViT with each option, run with
backend="triton" (the Triton interpreter on a CPU) and backend="cuda" (csrc/ on the CPU emulator of
tests/cuda_emu), forward and every gradient, against the same model in float64 on the eager backend.

An explicit backend refuses a call its kernels cannot take (`dispatch.select` raises, naming the
option), so a passing test also shows that every op of the model, with the option, ran in that
backend's kernels: nothing fell back to eager on the way. The attention-pool head's single-query
attention is eager by design (vitkern.model.AttentionPoolLatent); its linears and norm are fused.

Low precision is held to the ratio test of DESIGN.md (at most 2x the error of the eager model in the
same dtype, both against float64); fp32 on the interpreter too, with a small floor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HAS_CUDA, assert_ratio, seed

import vitkern
from vitkern import dispatch

# head_dim 64: the CUDA attention kernels are built for 64, 80 and 128. 16 x 16 images in 8 x 8
# patches: 4 patch tokens, so prefix tokens are a large share of every sequence.
TINY = dict(img_size=16, patch_size=8, embed_dim=64, num_heads=1, depth=1, num_classes=5)

OPTIONS = {
    "layer_scale": dict(init_values=0.5),  # linear(scale=) in proj and fc2
    "gelu_tanh": dict(act_layer="gelu_tanh"),  # ln_linear(activation=) in LN2 + fc1
    "quick_gelu": dict(act_layer="quick_gelu"),
    "qk_norm": dict(qk_norm=True),  # attention(q_norm=, k_norm=)
    "registers_no_embed_class": dict(reg_tokens=3, no_embed_class=True),  # patch_embed: 4 prefix tokens, pos on patches
    "distilled": dict(distilled=True),  # patch_embed: class + distillation token; head_dist
    "map_pool": dict(global_pool="map", class_token=False),  # attention-pool head
    "pre_norm": dict(pre_norm=True),  # norm_pre (layer_norm), patch embedding without bias
}


def _model(option: str) -> vitkern.ViT:
    torch.manual_seed(seed(0))
    model = vitkern.ViT(**TINY, **OPTIONS[option], backend="eager").double()
    with torch.no_grad():  # off the initialization (zero tokens and biases, LayerScale's value): every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _run(model: vitkern.ViT, x: torch.Tensor, weights: torch.Tensor):
    """The output and the gradients of <output, weights> w.r.t. the image and every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.double() * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, x.grad, grads


def _check_backend(option: str, backend: str, dtype: torch.dtype, device: str) -> None:
    oracle_model = _model(option)
    torch.manual_seed(seed(1))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    weights = torch.randn(4, TINY["num_classes"], dtype=torch.float64)
    oracle = _run(oracle_model, x, weights)

    eager_model = copy.deepcopy(oracle_model).to(dtype)
    eager = _run(eager_model, x.to(dtype), weights)
    fused_model = copy.deepcopy(oracle_model).to(device=device, dtype=dtype)
    fused_model.backend = backend
    fused = _run(fused_model, x.to(device=device, dtype=dtype), weights.to(device))

    def check(actual, eager_lowp, expected, what, scale=None):
        # Floor: one rounding of the result itself (the dtype's eps at its largest value). A
        # parameter gradient summed over a handful of rows can come out of eager nearly exact by
        # luck; no kernel that rounds its output once can be held below that.
        floor = torch.finfo(dtype).eps * (expected.abs().max().item() if scale is None else scale)
        assert_ratio(actual.cpu(), eager_lowp, expected, f"{option} {what}", floor=floor)

    check(fused[0], eager[0], oracle[0], "output")
    check(fused[1], eager[1], oracle[1], "d image")
    assert set(fused[2]) == set(oracle[2])
    for name, g in oracle[2].items():
        assert fused[2][name] is not None, f"{option}: no gradient for {name}"
        scale = None
        if name.endswith("k_norm.bias"):
            # Exactly zero (q . (k + b) shifts every score of a row by q . b, which the softmax
            # ignores): both results are rounding noise of terms as large as k_norm.weight's gradient.
            assert g.abs().max() < 1e-12
            scale = oracle[2][name.replace(".bias", ".weight")].abs().max().item()
        check(fused[2][name], eager[2][name], g, f"d {name}", scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_triton_backend_runs_each_family_option(option, dtype):
    if "triton" not in dispatch.implementations("linear") or dispatch.backend_unavailable_reasons("triton"):
        pytest.skip("triton cannot run here")
    from conftest import TRITON_DEVICE

    _check_backend(option, "triton", dtype, TRITON_DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def test_cuda_backend_runs_each_family_option(option, dtype, where, monkeypatch):
    from test_cuda_ops import _use_emulated_extension, _use_gpu_extension

    if where == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU")
        _use_gpu_extension()
        device = "cuda"
    else:
        device = _use_emulated_extension(monkeypatch)
    _check_backend(option, "cuda", dtype, device)
