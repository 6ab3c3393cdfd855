"""vitkern.apply on open_clip's VisionTransformer (`model.visual` of its ViT CLIP models; issue #22).

The CLIP models are built tiny from their configs with random weights (vision: width 64, 2 layers of
2 heads, 16 x 16 images in 8 x 8 patches; a 1-layer text tower) and compared with an unpatched deep
copy: `encode_image` and every parameter gradient within 1e-5 (fp32) on the eager backend and the
Triton interpreter, and the ratio test against float64 on the CUDA emulator. Then the OpenAI (QuickGELU)
and LayerScale variants, QK-norm blocks, forward_intermediates, the full model's logits, training with
gradient checkpointing, torch.compile(fullgraph=True), revert, and the options left alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")
from open_clip import transformer as oc_transformer  # noqa: E402
from open_clip.model import CLIP  # noqa: E402

import vitkern  # noqa: E402
from apply_utils import (  # noqa: E402
    OpCounter, assert_classes_untouched, assert_reverted, assert_same_results, class_snapshot, compare,
    instance_patches, perturb, run,
)
from conftest import INTERPRETING, TRITON_DEVICE, assert_ratio  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = dict(context_length=8, vocab_size=50, width=64, heads=2, layers=1)
VARIANTS = {
    "vit_b_style": dict(),
    "openai_quickgelu_layerscale": dict(ls_init_value=0.5, quick_gelu=True),
    "qk_norm": dict(qk_norm=True),  # open_clip's CustomResidualAttentionBlock with QK-norm LayerNorms
}


def _model(variant: str = "vit_b_style", head_width: int = 32, **vision) -> CLIP:
    torch.manual_seed(0)
    options = {**VARIANTS[variant], **vision}
    quick_gelu = options.pop("quick_gelu", False)
    defaults = dict(layers=2, width=64, head_width=head_width, patch_size=8, image_size=16, mlp_ratio=2)
    vision_cfg = {**defaults, **options}
    return perturb(CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=TEXT, quick_gelu=quick_gelu))


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def encode_image(m, t):
    return m.encode_image(t)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_image_matches_open_clip_eager(variant, monkeypatch):
    model = _model(variant)
    counter = OpCounter(monkeypatch)
    report, patched = compare(model, _image(), call=encode_image)
    counter.reset()
    patched.encode_image(_image())
    assert counter.counts["ln_linear"] == 4 and counter.counts["attention"] == 2 and counter.counts["patch_embed"] == 1
    fused = dict(report.fused)
    assert report.libraries == ["open_clip"]
    assert "visual._embeds" in fused and "visual.transformer.resblocks.1" in fused
    assert dict(report.left).keys() == {"visual.proj"}
    assert not [n for n in instance_patches(patched) if n.startswith("transformer.")]  # the text tower
    if variant == "qk_norm":
        assert "QK-norm" in fused["visual.transformer.resblocks.0"]
    if variant == "openai_quickgelu_layerscale":
        assert "quick_gelu" in fused["visual.transformer.resblocks.0"]


@pytest.mark.skipif(not INTERPRETING and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
def test_encode_image_matches_open_clip_triton():
    model = _model("openai_quickgelu_layerscale").to(TRITON_DEVICE)
    compare(model, _image(1).to(TRITON_DEVICE), backend="triton", call=encode_image)


def test_forward_intermediates_and_full_model():
    model = _model("vit_b_style")
    x = _image()
    compare(model.visual, x, call=lambda m, t: m.forward_intermediates(t, indices=[0, 1], output_extra_tokens=True))
    text = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    compare(model, x, call=lambda m, t: m(t, text))


def test_training_with_gradient_checkpointing_and_patch_dropout():
    model = _model("openai_quickgelu_layerscale", patch_dropout=0.5).train()
    model.set_grad_checkpointing(True)

    def call(m, t):
        torch.manual_seed(7)
        return m.encode_image(t)

    compare(model, _image(), call=call)


def test_torch_compile_fullgraph(monkeypatch):
    model = _model("openai_quickgelu_layerscale", layers=1).visual
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    counter = OpCounter(monkeypatch)
    compiled = torch.compile(patched, fullgraph=True, backend="eager")
    x = _image()
    assert_same_results(run(compiled, x), run(model, x))
    assert counter.counts["ln_linear"] == 2 and counter.counts["attention"] == 1, counter.counts
    torch._dynamo.reset()


def test_autocast_matches_open_clip():
    model = _model("openai_quickgelu_layerscale").visual
    x = _image()

    def call(m, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(t)

    want = run(model, x, call)
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    got = run(patched, x, call)
    oracle = run(copy.deepcopy(model).double(), x.double())
    for name, y_ref in want[0].items():
        assert got[0][name].dtype == y_ref.dtype, name
        assert_ratio(got[0][name], y_ref, oracle[0][name], name, floor=1e-2)
    for name, g in want[2].items():
        assert got[2][name] is not None and got[2][name].dtype == g.dtype, name


def test_revert_and_classes_untouched():
    classes = [nn.Module, nn.LayerNorm, nn.Linear, nn.MultiheadAttention, nn.Sequential, nn.Conv2d, nn.GELU]
    classes += [c for c in vars(oc_transformer).values()
                if isinstance(c, type) and c.__module__ == oc_transformer.__name__]
    snapshot = class_snapshot(classes)
    model = _model("qk_norm")
    x = _image()
    want = run(model, x, encode_image)
    vitkern.apply(model)
    assert "_embeds" in model.visual.__dict__
    assert_classes_untouched(snapshot)
    assert vitkern.revert(model)
    assert_reverted(model)
    assert "_embeds" not in model.visual.__dict__
    assert_same_results(run(model, x, encode_image), want, tol=0)
    assert_classes_untouched(snapshot)


def test_options_vitkern_lacks_are_left_and_named():
    # scaled cosine attention and per-head scales: open_clip's own attention stays (the MLP half fuses).
    model = _model("vit_b_style", scaled_cosine_attn=True, scale_heads=True)
    report = vitkern.apply(model)
    left = dict(report.left)
    assert "scaled_cosine_attn" in left["visual.transformer.resblocks.0.attn"]
    assert "scale_heads" in left["visual.transformer.resblocks.0.attn"]
    assert "ln_2+c_fc" in dict(report.fused)["visual.transformer.resblocks.0"]
    # scale_heads alone runs in open_clip (its scaled-cosine path does not run batch-first): equal results.
    report, _ = compare(_model("vit_b_style", scale_heads=True), _image(), call=encode_image)
    assert "scale_heads" in dict(report.left)["visual.transformer.resblocks.0.attn"]


@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def test_cuda_backend_ratio_test(where, monkeypatch):
    """backend="cuda" (on the CPU emulator without a GPU), bf16, one head of 64: encode_image and every
    gradient of the vision tower within 2x the error of open_clip's own bf16 model, both against it in
    float64."""
    from test_cuda_ops import _use_emulated_extension, _use_gpu_extension

    device = _use_gpu_extension() if where == "cuda" else _use_emulated_extension(monkeypatch)
    model = _model("openai_quickgelu_layerscale", head_width=64).visual
    x = _image()
    oracle = run(copy.deepcopy(model).double(), x.double())
    eager = run(copy.deepcopy(model).bfloat16(), x.bfloat16())
    patched = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16)
    vitkern.apply(patched, backend="cuda")
    got = run(patched, x.to(device=device, dtype=torch.bfloat16))
    eps = torch.finfo(torch.bfloat16).eps
    for key, y in oracle[0].items():
        assert_ratio(got[0][key].cpu(), eager[0][key], y, key, floor=eps * y.abs().max().item())
    for key, g in oracle[2].items():
        assert_ratio(got[2][key].cpu(), eager[2][key], g, f"d {key}", floor=eps * g.abs().max().item())
