"""vitkern.apply on Hugging Face transformers' vision transformers, and the "vitkern" attention entry
(issue #22).

Each class is built tiny from its config with random weights (hidden 64, 2 layers, 16 x 16 images in
8 x 8 patches, eager attention) and compared with an unpatched deep copy: outputs (every field of its
ModelOutput: last_hidden_state, pooler_output, logits, image_embeds, ...) and every parameter
gradient within 1e-5 (fp32) on the eager backend and on the Triton interpreter, and by the ratio test
against float64 on the CUDA emulator. Then: output_hidden_states / output_attentions,
interpolate_pos_encoding, save_pretrained -> from_pretrained -> apply, gradient checkpointing in
training, PEFT LoRA, hooks, torch.compile(fullgraph=True), the text towers left alone, revert, and
`register_hf_attention` (attn_implementation="vitkern").
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, DeiTConfig,
    DeiTForImageClassificationWithTeacher, DeiTModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel, SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel, ViTConfig,
    ViTForImageClassification, ViTModel,
)

import vitkern  # noqa: E402
from vitkern.apply import transformers as apply_hf  # noqa: E402
from apply_utils import (  # noqa: E402
    OpCounter, assert_classes_untouched, assert_reverted, assert_same_results, class_snapshot, compare,
    instance_patches, perturb, run,
)
from conftest import INTERPRETING, TRITON_DEVICE, assert_ratio  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=16, patch_size=8,
         attn_implementation="eager")
TEXT = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vocab_size=50,
            max_position_embeddings=8)


def _vision(**overrides):
    return {**V, **overrides}


BUILD = {
    "ViTModel": lambda **kw: ViTModel(ViTConfig(**_vision(**kw))),
    "ViTForImageClassification": lambda **kw: ViTForImageClassification(ViTConfig(**_vision(num_labels=3, **kw))),
    "DeiTModel": lambda **kw: DeiTModel(DeiTConfig(**_vision(**kw))),
    "DeiTForImageClassificationWithTeacher": lambda **kw: DeiTForImageClassificationWithTeacher(
        DeiTConfig(**_vision(num_labels=3, **kw))),
    "Dinov2Model": lambda **kw: Dinov2Model(Dinov2Config(**_vision(mlp_ratio=2, layerscale_value=0.5, **kw))),
    "Dinov2WithRegistersModel": lambda **kw: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        **_vision(mlp_ratio=2, num_register_tokens=2, **kw))),
    "CLIPVisionModel": lambda **kw: CLIPVisionModel(CLIPVisionConfig(**_vision(**kw))),
    "CLIPVisionModelWithProjection": lambda **kw: CLIPVisionModelWithProjection(CLIPVisionConfig(
        **_vision(projection_dim=32, **kw))),
    "CLIPModel": lambda **kw: CLIPModel(CLIPConfig(text_config=dict(TEXT, attn_implementation="eager"),
                                                   vision_config=_vision(**kw), projection_dim=32,
                                                   attn_implementation="eager")),
    "SiglipVisionModel": lambda **kw: SiglipVisionModel(SiglipVisionConfig(**_vision(**kw))),
    "SiglipModel": lambda **kw: SiglipModel(SiglipConfig(text_config=dict(TEXT, attn_implementation="eager"),
                                                         vision_config=_vision(**kw), attn_implementation="eager")),
}
# On the interpreter (3 to 6 s each): one model per family, chosen to contain the others' code. Each
# runs every module of the classes not listed as a sub-module: ViTModel has ViTForImageClassification's
# (its classifier is the same fused Linear as the pooler's dense layer); the DeiT teacher model contains
# DeiTModel; CLIPModel's vision tower is a CLIPVisionModel and its visual_projection is
# CLIPVisionModelWithProjection's; SiglipModel's vision tower is a SiglipVisionModel.
FAMILIES = ["ViTModel", "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2WithRegistersModel",
            "CLIPModel", "SiglipModel"]
TOWERS = ("CLIPModel", "SiglipModel")  # CLIPModel / SiglipModel: their vision towers, through get_image_features


def _model(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return perturb(BUILD[name](**overrides))


def _image(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def _call(name: str, **kwargs):
    if name in TOWERS:
        return lambda m, t: m.get_image_features(pixel_values=t, **kwargs)
    return lambda m, t: m(pixel_values=t, **kwargs)


def _check_fused(counter: OpCounter, layers: int = 2) -> None:
    assert counter.counts["ln_linear"] == 2 * layers, counter.counts
    assert counter.counts["attention"] == layers, counter.counts
    assert counter.counts["patch_embed"] == 1, counter.counts


@pytest.mark.parametrize("name", list(BUILD))
def test_matches_transformers_eager(name, monkeypatch):
    model = _model(name)
    counter = OpCounter(monkeypatch)
    report, patched = compare(model, _image(), call=_call(name))
    counter.reset()
    run(patched, _image(), _call(name), backward=False)
    _check_fused(counter)
    assert report.libraries == ["transformers"]
    fused = " ".join(n for n, _ in report.fused)
    assert "embeddings" in fused and "layer" in fused
    # output_hidden_states keeps the layers fused (transformers records them with hooks on the layers).
    counter.reset()
    compare(model, _image(), call=_call(name, output_hidden_states=True), grads=False)
    # output_attentions: the attention runs transformers' own code, so the maps are the unpatched model's.
    got = run(patched, _image(), _call(name, output_attentions=True), backward=False)[0]
    want = run(model, _image(), _call(name, output_attentions=True), backward=False)[0]
    maps = [k for k in want if "attentions" in k]
    assert len(maps) == 2 and all(want[k] is not None for k in maps)
    assert_same_results((got, None, {}), (want, None, {}), grads=False)


@pytest.mark.skipif(not INTERPRETING and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("name", FAMILIES)
def test_matches_transformers_triton(name):
    model = _model(name).to(TRITON_DEVICE)
    compare(model, _image(1).to(TRITON_DEVICE), backend="triton", call=_call(name))


@pytest.mark.parametrize("name", ["ViTModel", "DeiTModel", "CLIPVisionModel", "SiglipVisionModel"])
def test_interpolate_pos_encoding(name, monkeypatch):
    counter = OpCounter(monkeypatch)
    compare(_model(name), _image(1, 24), call=_call(name, interpolate_pos_encoding=True))
    assert counter.counts["patch_embed"] == 1  # the interpolated positions ride in the fused op


@pytest.mark.parametrize("name", ["Dinov2Model", "Dinov2WithRegistersModel"])
def test_dinov2_other_resolution(name, monkeypatch):
    counter = OpCounter(monkeypatch)
    compare(_model(name), _image(1, 24))
    assert counter.counts["patch_embed"] == 1


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model"])
def test_attention_mask_runs_the_models_attention(name, monkeypatch):
    """A padding mask: each layer's attention half runs transformers' own attention with it (vitkern's
    kernels have no mask); the MLP halves stay fused."""
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    counter = OpCounter(monkeypatch)
    compare(_model(name), _image(), call=lambda m, t: m(pixel_values=t, attention_mask=mask))
    assert counter.counts["attention"] == 0 and counter.counts["ln_linear"] == 2, counter.counts


def test_clip_and_siglip_full_models_keep_their_text_towers():
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    for name in TOWERS:
        model = _model(name)
        report, patched = compare(model, _image(), call=lambda m, t: m(input_ids=ids, pixel_values=t))
        assert "text_model" in dict(report.left)
        assert not [n for n in instance_patches(patched) if n.startswith("text_model")]


def test_save_pretrained_from_pretrained_then_apply(tmp_path):
    model = _model("ViTForImageClassification")
    keys = list(model.state_dict())
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    assert list(patched.state_dict()) == keys
    patched.save_pretrained(tmp_path)
    loaded = ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert instance_patches(loaded) == []  # a fresh instance: nothing carried over
    vitkern.apply(loaded)
    x = _image()
    assert_same_results(run(loaded, x), run(model, x))


def test_training_with_dropout_and_gradient_checkpointing():
    for name, kw in (("ViTForImageClassification", dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)),
                     ("Dinov2Model", dict(drop_path_rate=0.2)), ("CLIPVisionModel", dict(attention_dropout=0.1))):
        model = _model(name, **kw).train()
        model.gradient_checkpointing_enable()

        def call(m, t):
            torch.manual_seed(7)
            return m(pixel_values=t)

        compare(model, _image(), call=call)


def test_peft_lora_on_q_and_v(monkeypatch):
    peft = pytest.importorskip("peft")

    def wrapped(m):
        pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return pm

    model = _model("ViTModel")
    ref = wrapped(copy.deepcopy(model))
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    patched = wrapped(patched)
    counter = OpCounter(monkeypatch)
    x = _image()
    assert_same_results(run(patched, x, _call("ViTModel")), run(ref, x, _call("ViTModel")))
    # The LoRA'd q/v are called as modules (their base layers on ops.linear); the attention and the
    # MLP half stay fused.
    assert counter.counts["attention"] == 2 and counter.counts["ln_linear"] == 2, counter.counts


def test_hooks_are_honoured(monkeypatch):
    model = _model("Dinov2Model")
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    fired = {"ref": 0, "patched": 0}
    for m, key in ((model, "ref"), (patched, "patched")):
        def hook(mod, args, out, key=key):
            fired[key] += 1
            return out * 2
        m.encoder.layer[0].attention.q_proj.register_forward_hook(hook)
        m.encoder.layer[1].mlp.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    x = _image()
    counter = OpCounter(monkeypatch)
    assert_same_results(run(patched, x), run(model, x))
    assert fired["ref"] == fired["patched"] == 1
    assert counter.counts["ln_linear"] == 2, counter.counts  # the two halves without a hooked module


def test_torch_compile_fullgraph(monkeypatch):
    model = _model("ViTModel", num_hidden_layers=1)
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    x = _image()
    patched(x, output_hidden_states=True)  # transformers installs its recording hooks (eagerly: it takes a lock)
    counter = OpCounter(monkeypatch)
    compiled = torch.compile(patched, fullgraph=True, backend="eager")
    assert_same_results(run(compiled, x), run(model, x))
    assert counter.counts["ln_linear"] == 2 and counter.counts["attention"] == 1, counter.counts
    torch._dynamo.reset()


def test_revert_restores_exactly_and_no_class_is_touched():
    from transformers.models.clip import modeling_clip
    from transformers.models.dinov2 import modeling_dinov2
    from transformers.models.vit import modeling_vit

    classes = [nn.Module, nn.LayerNorm, nn.Linear, nn.Conv2d, nn.Embedding, nn.Dropout]
    for module in (modeling_vit, modeling_dinov2, modeling_clip):
        classes += [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]
    snapshot = class_snapshot(classes)
    layer_norm_forward = nn.LayerNorm.forward
    for name in ("ViTForImageClassification", "Dinov2Model", "CLIPVisionModelWithProjection"):
        model = _model(name)
        x = _image()
        want = run(model, x)
        assert vitkern.apply(model)
        assert nn.LayerNorm.forward is layer_norm_forward
        assert_classes_untouched(snapshot)
        assert vitkern.revert(model)
        assert_reverted(model)
        assert_same_results(run(model, x), want, tol=0)
    assert_classes_untouched(snapshot)


def test_unsupported_swiglu_is_reported_and_left():
    model = _model("Dinov2Model", use_swiglu_ffn=True)
    report, _ = compare(model, _image())
    left = dict(report.left)
    assert "SwiGLU" in left["encoder.layer.0.mlp"]
    assert "encoder.layer.0" in dict(report.fused)  # the attention half still fuses


def test_autocast_matches_transformers():
    model = _model("CLIPVisionModel")
    x = _image()

    def call(m, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(pixel_values=t)

    want = run(model, x, call)
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    got = run(patched, x, call)
    oracle = run(copy.deepcopy(model).double(), x.double())
    for name, y_ref in want[0].items():
        assert got[0][name].dtype == y_ref.dtype, name
        assert_ratio(got[0][name], y_ref, oracle[0][name], name, floor=1e-2)


# --------------------------------------------------------------------------------------------
# attn_implementation="vitkern"


def _interface_model(name: str, impl: str, **kw):
    model = _model(name, **kw)
    model.set_attn_implementation(impl)
    return model


def test_hf_attention_interface(monkeypatch, tmp_path):
    assert vitkern.register_hf_attention() == "vitkern"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "vitkern" in AttentionInterface._global_mapping and "vitkern" in AttentionMaskInterface._global_mapping
    for name in ("ViTModel", "CLIPVisionModel", "SiglipVisionModel"):
        eager = _model(name)
        ours = copy.deepcopy(eager)
        ours.set_attn_implementation("vitkern")
        counter = OpCounter(monkeypatch)
        x = _image()
        assert_same_results(run(ours, x), run(eager, x))
        assert counter.counts["attention"] == 2, counter.counts
        # Attentions are returned (the eager formula), never silently None.
        got = run(ours, x, _call(name, output_attentions=True), backward=False)[0]
        want = run(eager, x, _call(name, output_attentions=True), backward=False)[0]
        assert [k for k in got if "attentions" in k] == [k for k in want if "attentions" in k] != []
        assert_same_results((got, None, {}), (want, None, {}), grads=False)
    # A padding mask is honoured (torch's SDPA runs that call), as transformers' eager attention does.
    eager = _model("ViTModel")
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation("vitkern")
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    call = lambda m, t: m(pixel_values=t, attention_mask=mask)  # noqa: E731
    assert_same_results(run(ours, _image(), call), run(eager, _image(), call))
    # from_pretrained(..., attn_implementation="vitkern")
    eager.save_pretrained(tmp_path)
    loaded = ViTModel.from_pretrained(tmp_path, attn_implementation="vitkern").eval()
    assert loaded.config._attn_implementation == "vitkern"
    assert_same_results(run(loaded, _image()), run(eager, _image()))


def test_hf_attention_function_head_mask_and_fallbacks():
    torch.manual_seed(0)
    module = nn.Module().eval()
    q, k, v = (torch.randn(2, 4, 5, 16) for _ in range(3))
    head_mask = torch.rand(1, 4, 1, 1)
    out, weights = apply_hf.attention_forward(module, q, k, v, None, scaling=0.25, head_mask=head_mask)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) * head_mask
    torch.testing.assert_close(weights, probs)
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2))
    out, weights = apply_hf.attention_forward(module, q, k, v, None, scaling=0.25)
    assert weights is None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # Causal attention (a text model routed through the interface): torch's SDPA, causal.
    out, _ = apply_hf.attention_forward(module, q, k, v, None, scaling=0.25, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def test_cuda_backend_ratio_test(where, monkeypatch):
    """backend="cuda" (on the CPU emulator without a GPU), bf16, one head of 64: outputs and every
    gradient within 2x the error of transformers' own bf16 model, both against it in float64."""
    from test_cuda_ops import _use_emulated_extension, _use_gpu_extension

    device = _use_gpu_extension() if where == "cuda" else _use_emulated_extension(monkeypatch)
    for name in ("ViTForImageClassification", "CLIPVisionModel"):
        model = _model(name, num_attention_heads=1)
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
