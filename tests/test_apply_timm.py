"""vitkern.apply on timm's own VisionTransformer / VisionTransformerDistilled instances (issue #22).

Each model is built tiny from its arguments with random weights (hidden 64, 2 blocks, 16 x 16 images in
8 x 8 patches) and compared with an unpatched deep copy: outputs and every parameter gradient within
1e-5 (fp32) on the eager backend and on the Triton interpreter (backend="triton": every op must run
there or raise), and by the ratio test against float64 on the CUDA emulator. Then: the family options,
forward_features / forward_intermediates, hooks, PEFT LoRA, training with dropout and gradient
checkpointing, torch.compile(fullgraph=True), autocast, dtype moves, revert, idempotence, and what an
unsupported model or bad call gets.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
from timm.layers import Mlp, SwiGLU  # noqa: E402
from timm.layers.attention import Attention  # noqa: E402
from timm.layers.layer_scale import LayerScale  # noqa: E402
from timm.layers.patch_embed import PatchEmbed  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer  # noqa: E402

import vitkern  # noqa: E402
from vitkern.apply import timm as apply_timm  # noqa: E402
from apply_utils import (  # noqa: E402
    OpCounter, assert_classes_untouched, assert_reverted, assert_same_results, class_snapshot, compare,
    instance_patches, perturb, run,
)
from conftest import INTERPRETING, TRITON_DEVICE, assert_ratio  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
VARIANTS = {
    "plain": dict(),
    # LayerScale, QK-norm, 2 registers with no_embed_class, tanh GELU
    "family": dict(init_values=0.5, qk_norm=True, reg_tokens=2, no_embed_class=True, act_layer="gelu_tanh"),
    # QuickGELU, mean pooling with fc_norm and no class token, norm_pre, scale_attn/mlp norms, no proj bias
    "options": dict(act_layer="quick_gelu", global_pool="avg", fc_norm=True, class_token=False, pre_norm=True,
                    scale_attn_norm=True, scale_mlp_norm=True, proj_bias=False),
    "distilled": dict(),
    # the attention-pool head (SigLIP), any image size (patch grid NHWC, position embedding resampled)
    "map_dynamic_size": dict(global_pool="map", class_token=False, dynamic_img_size=True),
}


def _model(variant: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    cls = VisionTransformerDistilled if variant == "distilled" else VisionTransformer
    return perturb(cls(**{**TINY, **VARIANTS[variant], **overrides}))


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _check_fused(counter: OpCounter, depth: int = 2) -> None:
    """Every block ran its two LN + projections as ln_linear and its attention on the op (no fallback)."""
    assert counter.counts["ln_linear"] == 2 * depth, counter.counts
    assert counter.counts["attention"] == depth, counter.counts
    assert counter.counts["patch_embed"] == 1, counter.counts


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_timm_eager(variant, monkeypatch):
    model = _model(variant)
    counter = OpCounter(monkeypatch)
    report, patched = compare(model, _image())
    counter.reset()
    patched(_image())
    _check_fused(counter)
    assert report.libraries == ["timm"]
    fused = dict(report.fused)
    assert "patch_embed" in fused and "blocks.0" in fused and "blocks.1" in fused and "head" in fused
    if variant == "map_dynamic_size":
        assert "attn_pool" in fused and dict(report.left).keys() == {"attn_pool"}  # its 1-query attention
        compare(model, _image(1)[:, :, :, :8].repeat(1, 1, 2, 3))  # a 32 x 24 image: a 4 x 3 patch grid
    else:
        assert report.left == []
    if variant == "distilled":
        assert "head_dist" in fused
    if variant == "family":
        assert "QK-norm" in fused["blocks.0"] and "LayerScale" in fused["blocks.0"] and "gelu_tanh" in fused["blocks.0"]


@pytest.mark.skipif(not INTERPRETING and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("variant", ["family", "distilled"])
def test_matches_timm_triton(variant):
    model = _model(variant).to(TRITON_DEVICE)
    compare(model, _image(1).to(TRITON_DEVICE), backend="triton")


def test_forward_features_and_intermediates():
    model = _model("family")
    x = _image()
    compare(model, x, call=lambda m, t: m.forward_features(t))
    compare(model, x, call=lambda m, t: m.forward_intermediates(t, indices=[0, 1], return_prefix_tokens=True))
    compare(model, x, call=lambda m, t: m.forward_head(m.forward_features(t), pre_logits=True))


def test_revert_restores_exactly_and_no_class_is_touched():
    import timm.layers

    classes = [nn.Module, nn.LayerNorm, nn.Linear, nn.Conv2d, nn.GELU, nn.Identity, nn.Dropout, VisionTransformer,
               VisionTransformerDistilled, Block, Attention, Mlp, LayerScale, PatchEmbed, timm.layers.LayerNorm]
    snapshot = class_snapshot(classes)
    layer_norm_forward = nn.LayerNorm.forward
    model = _model("family")
    x = _image()
    want = run(model, x)
    report = vitkern.apply(model)
    assert nn.LayerNorm.forward is layer_norm_forward
    assert_classes_untouched(snapshot)
    assert "forward" in model.blocks[0].__dict__ and model.blocks[0].forward.__func__ is not Block.forward
    assert vitkern.apply.__module__ == "vitkern.apply" and report
    assert vitkern.revert(model) is True
    assert_reverted(model)
    assert model.blocks[0].forward.__func__ is Block.forward
    assert_classes_untouched(snapshot)
    assert_same_results(run(model, x), want, tol=0)  # the very same computation again
    assert vitkern.revert(model) is False  # nothing left to revert


def test_apply_is_idempotent():
    model = _model("plain")
    first = vitkern.apply(model)
    patched = sorted(instance_patches(model))
    second = vitkern.apply(model)
    assert sorted(instance_patches(model)) == patched
    assert str(first) == str(second)
    assert model.blocks[0].forward.__func__ is apply_timm.block_forward
    vitkern.revert(model)
    assert_reverted(model)


def test_pickled_patched_model_loads_unpatched_and_applies_again(tmp_path):
    """A bound method pickles as getattr(module, name): torch.save(model) of a patched model loads
    with timm's own forwards back, and apply / revert work on it."""
    model = _model("plain")
    vitkern.apply(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x = _image()
    assert_same_results(run(loaded, x), run(model, x))
    report = vitkern.apply(loaded)
    assert report and loaded.blocks[0].forward.__func__ is apply_timm.block_forward
    vitkern.revert(loaded)
    assert_reverted(loaded)


def test_hooks_and_swapped_modules_are_honoured(monkeypatch):
    """A hook on a sub-module the fused block would skip makes that half call its modules: the hook
    fires once per call with timm's tensors and its change to the output is kept."""
    model = _model("plain")
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    seen = {"ref": [], "patched": []}

    def hooks(m, key):
        m.blocks[0].norm1.register_forward_hook(lambda mod, args, out: seen[key].append(args[0].clone()) or out * 1.5)
        m.blocks[1].mlp.fc2.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))

    hooks(model, "ref")
    hooks(patched, "patched")
    x = _image()
    counter = OpCounter(monkeypatch)
    assert_same_results(run(patched, x), run(model, x))
    assert len(seen["patched"]) == len(seen["ref"]) == 1
    torch.testing.assert_close(seen["patched"][0], seen["ref"][0], atol=1e-5, rtol=1e-5)
    # Block 0's attention half and block 1's MLP half called their modules; the other halves fused.
    assert counter.counts["ln_linear"] == 2, counter.counts
    # A swapped module (an extra Sequential around fc1) is called as a module too.
    for m in (model, patched):
        m.blocks[0].mlp.fc1 = nn.Sequential(m.blocks[0].mlp.fc1)
    assert_same_results(run(patched, x), run(model, x))
    # A global module hook: every sub-module is called, as timm does.
    calls = {"n": 0}
    handle = nn.modules.module.register_module_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        run(model, x, backward=False)
        unpatched_calls, calls["n"] = calls["n"], 0
        run(patched, x, backward=False)
        assert calls["n"] == unpatched_calls  # every module timm calls, called
    finally:
        handle.remove()


def test_peft_lora_stays_fused(monkeypatch):
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.0)

    def wrapped(m):
        pm = peft.get_peft_model(m, peft.LoraConfig(**config))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # LoRA's B starts at zero: give the adapters a value
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return pm

    model = _model("family")
    ref = wrapped(copy.deepcopy(model))
    before = copy.deepcopy(model)
    vitkern.apply(before)  # patched first, wrapped by PEFT after
    before = wrapped(before)
    after = wrapped(copy.deepcopy(model))
    report = vitkern.apply(after)  # wrapped first, patched after
    assert "blocks.0" in " ".join(n for n, _ in report.fused)
    x = _image()
    want = run(ref, x)
    counter = OpCounter(monkeypatch)
    for patched in (before, after):
        counter.reset()
        assert_same_results(run(patched, x), want)
        # LoRA rides in the fused ops: per block LN1+QKV, LN2+fc1, and one ln_linear per adapter.
        assert counter.counts["ln_linear"] == 2 * 2 + 2 * 2, counter.counts
        assert counter.counts["attention"] == 2


def test_training_with_dropout_and_gradient_checkpointing():
    """Dropout, DropPath and attention dropout draw the same random numbers in the same order as
    timm (attention dropout runs timm's attention: vitkern's kernels have none)."""
    for attn_drop in (0.0, 0.1):
        model = _model("family", proj_drop_rate=0.1, drop_path_rate=0.2, attn_drop_rate=attn_drop).train()
        model.set_grad_checkpointing(True)

        def call(m, t):
            torch.manual_seed(7)
            return m(t)

        compare(model, _image(), call=call)


def test_torch_compile_fullgraph(monkeypatch):
    model = _model("family", depth=1)
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    counter = OpCounter(monkeypatch)
    compiled = torch.compile(patched, fullgraph=True, backend="eager")
    x = _image()
    assert_same_results(run(compiled, x), run(model, x))
    assert counter.counts["ln_linear"] == 2 and counter.counts["attention"] == 1  # traced through the fused ops
    torch._dynamo.reset()


def test_autocast_matches_timm():
    model = _model("family")
    x = _image()

    def call(m, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(t)

    want = run(model, x, call)
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    got = run(patched, x, call)
    oracle = run(copy.deepcopy(model).double(), x.double())
    for (name, y), (_, y_ref) in zip(got[0].items(), want[0].items()):
        assert y.dtype == y_ref.dtype, name
        assert_ratio(y, y_ref, oracle[0][name], name, floor=1e-2)
    for name, g in want[2].items():
        assert got[2][name] is not None and got[2][name].dtype == g.dtype, name


def test_ddp_wrapped_before_or_after_apply(tmp_path):
    """DistributedDataParallel (one gloo process) around a patched model, and apply on a DDP-wrapped one:
    the same parameters, so DDP's gradient hooks see every gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _model("family")
        x = _image()
        want = run(model, x)
        before = copy.deepcopy(model)
        vitkern.apply(before)
        after = DDP(copy.deepcopy(model))
        report = vitkern.apply(after)
        assert "module.blocks.0" in dict(report.fused)
        for wrapped in (DDP(before), after):
            got = run(wrapped, x)
            got = (got[0], got[1], {k.removeprefix("module."): g for k, g in got[2].items()})
            assert_same_results(got, want)
    finally:
        dist.destroy_process_group()


def test_dtype_and_device_moves_after_apply():
    """The fused forwards read the parameters at each call: a model moved or cast after apply runs
    in its new dtype (float64 on the eager backend: exact to rounding)."""
    model = _model("family")
    patched = copy.deepcopy(model)
    vitkern.apply(patched)
    patched = patched.to("cpu").double()
    x = _image().double()
    assert_same_results(run(patched, x), run(copy.deepcopy(model).double(), x), tol=1e-10)
    assert patched.blocks[0].attn.qkv.weight.dtype == torch.float64


def test_unsupported_options_are_reported_and_left_on_timm():
    swiglu = _model("plain", mlp_layer=SwiGLU, act_layer=nn.SiLU)
    report, _ = compare(swiglu, _image())
    left = dict(report.left)
    assert "SwiGLU" in left["blocks.0.mlp"] and "blocks.0" in dict(report.fused)  # the attention half still fuses
    res_post = _model("plain", block_fn=ResPostBlock)
    report, _ = compare(res_post, _image())
    assert "ResPostBlock" in dict(report.left)["blocks.0"]
    timm_eva = pytest.importorskip("timm.models.eva")
    eva = perturb(timm_eva.Eva(img_size=16, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3,
                               use_rot_pos_emb=True, swiglu_mlp=True))
    with pytest.warns(UserWarning, match="nothing it can run"):
        report = vitkern.apply(eva)
    assert not report and "RoPE" in dict(report.left)["<model>"]
    assert instance_patches(eva) == []


def test_bad_calls_say_what_to_do(monkeypatch):
    with pytest.warns(UserWarning, match="found nothing it can run"):
        report = vitkern.apply(nn.Sequential(nn.Linear(4, 4)))
    assert not report and report.fused == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vitkern's own ViT: said so, no warning
        report = vitkern.apply(vitkern.ViT(**TINY))
    assert "vitkern's own ViT" in dict(report.left)["<model>"]
    with torch.device("meta"):
        meta = VisionTransformer(**TINY)
    with pytest.raises(RuntimeError, match="meta device.*Load them first"):
        vitkern.apply(meta)
    with pytest.raises(TypeError, match="vitkern.apply\\(model._orig_mod\\)"):
        vitkern.apply(torch.compile(_model("plain")))
    with pytest.raises(ValueError, match="backend must be one of"):
        vitkern.apply(_model("plain"), backend="tpu")
    monkeypatch.setattr(vitkern.dispatch, "backend_unavailable_reasons", lambda b: ["no such device here"])
    with pytest.raises(vitkern.BackendUnavailableError, match="no such device here"):
        vitkern.apply(_model("plain"), backend="triton")
    monkeypatch.undo()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="before compiling"):
        vitkern.apply(_model("plain"))


@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def test_cuda_backend_ratio_test(where, monkeypatch):
    """backend="cuda" (csrc/; on the CPU emulator without a GPU), bf16: output and every gradient
    within 2x the error of timm's own bf16 model, both against timm's model in float64. One head of
    64 (the CUDA attention kernels take head_dim 64, 80, 128)."""
    from test_cuda_ops import _use_emulated_extension, _use_gpu_extension

    device = _use_gpu_extension() if where == "cuda" else _use_emulated_extension(monkeypatch)
    model = _model("family", num_heads=1)
    x = _image()
    oracle = run(copy.deepcopy(model).double(), x.double())
    eager = run(copy.deepcopy(model).bfloat16(), x.bfloat16())
    patched = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16)
    vitkern.apply(patched, backend="cuda")
    got = run(patched, x.to(device=device, dtype=torch.bfloat16))
    eps = torch.finfo(torch.bfloat16).eps
    for name, y in oracle[0].items():
        assert_ratio(got[0][name].cpu(), eager[0][name], y, name, floor=eps * y.abs().max().item())
    assert_ratio(got[1].cpu(), eager[1], oracle[1], "d image", floor=eps * oracle[1].abs().max().item())
    for name, g in oracle[2].items():
        assert_ratio(got[2][name].cpu(), eager[2][name], g, f"d {name}", floor=eps * g.abs().max().item())
