"""torch.autocast on every path, against timm under the same autocast (issue: mixed precision).

The model is a tiny timm `VisionTransformer` and `vitkern.from_timm` of it (the same weights). Under
`torch.autocast("cpu", dtype)` both run; the oracle is timm's model in float64. Each output and
every parameter gradient of vitkern must be within the ratio test of DESIGN.md: its error against
the float64 oracle at most 2x timm's own error under the same autocast, plus a floor of a few
roundings of the oracle's largest magnitude in the autocast dtype (one rounding per op boundary the
two paths place differently: vitkern rounds a fused epilogue once where timm rounds after the GEMM
and again after the activation). Output dtypes must equal timm's (logits in the autocast dtype,
`forward_features` fp32) and every gradient arrives in fp32, the parameters' dtype.

Backends: "eager" (the oracle's code), "torch" (the CPU default), "triton" (the interpreter, fp16
only: the interpreter's bf16 is not the GPU's) and "cuda" (the CPU emulator of csrc/).
"""

from __future__ import annotations

import math

import pytest
import torch

import vitkern
from vitkern import dispatch

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Roundings allowed in the floor (see the module docstring): a block has five op boundaries.
FLOOR_ROUNDINGS = 8


def _tiny_timm(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=5)  # head_dim 64: every backend
    args.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**args)


def _pair(backend: str, **kwargs):
    ref = _tiny_timm(**kwargs)
    ours = vitkern.from_timm(ref)
    ours.backend = backend
    return ref, ours


def _backend_params():
    params = [pytest.param("eager", torch.bfloat16), pytest.param("eager", torch.float16),
              pytest.param("torch", torch.bfloat16), pytest.param("torch", torch.float16)]
    if dispatch.triton_importable():
        params.append(pytest.param("triton", torch.float16))
    params += [pytest.param("cuda", torch.bfloat16), pytest.param("cuda", torch.float16)]
    return params


@pytest.fixture
def backend_on(request, monkeypatch):
    """Makes `backend` runnable here: the CUDA backend through the emulator."""
    def use(backend: str) -> None:
        if backend == "cuda":
            from test_cuda_ops import _use_emulated_extension

            _use_emulated_extension(monkeypatch)
    return use


def _ratio(name: str, got: torch.Tensor, timm_low: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.double() - oracle).abs().max().item()
    base = (timm_low.double() - oracle).abs().max().item()
    floor = FLOOR_ROUNDINGS * UNIT_ROUNDOFF[dtype] * max(1.0, oracle.abs().max().item())
    assert math.isfinite(err) and err <= 2 * base + floor, (
        f"{name}: vitkern error {err:.3e} > 2 x timm's {base:.3e} + floor {floor:.3e}")


def _run(model, x, dtype, *, train: bool):
    """(logits, features, {param name: grad}) under autocast on x's device."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype):
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    grads = {}
    if train:
        logits.float().square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits, feats, grads


def _oracle(ref, x):
    oracle = ref.double()
    oracle.zero_grad(set_to_none=True)
    feats = oracle.forward_features(x.double())
    logits = oracle.forward_head(feats)
    logits.square().mean().backward()
    grads = {n: p.grad for n, p in oracle.named_parameters()}
    return logits.detach(), feats.detach(), grads


@pytest.mark.parametrize("backend,dtype", _backend_params())
def test_model_under_autocast_matches_timm(backend, dtype, backend_on):
    backend_on(backend)
    ref, ours = _pair(backend)
    x = torch.randn(2, 3, 32, 32)
    t_logits, t_feats, t_grads = _run(ref, x, dtype, train=True)
    logits, feats, grads = _run(ours, x, dtype, train=True)
    assert logits.dtype == t_logits.dtype == dtype
    assert feats.dtype == t_feats.dtype == torch.float32
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert set(grads) == set(t_grads)
    assert all(g.dtype == torch.float32 for g in grads.values())
    o_logits, o_feats, o_grads = _oracle(ref, x)
    _ratio("logits", logits, t_logits, o_logits, dtype)
    _ratio("forward_features", feats, t_feats, o_feats, dtype)
    for name, g in grads.items():
        _ratio(f"grad {name}", g, t_grads[name], o_grads[name], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_under_cuda_autocast_matches_timm(backend, dtype):
    """On a GPU: autocast("cuda") (LayerNorm's fp32 rule there) on each backend against timm."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ref, ours = _pair(backend)
    ref, ours = ref.cuda(), ours.cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    t_logits, t_feats, t_grads = _run(ref, x, dtype, train=True)
    logits, feats, grads = _run(ours, x, dtype, train=True)
    assert (logits.dtype, feats.dtype) == (t_logits.dtype, t_feats.dtype)
    o_logits, o_feats, o_grads = _oracle(_tiny_timm().cuda(), x)
    _ratio("logits", logits, t_logits, o_logits, dtype)
    _ratio("forward_features", feats, t_feats, o_feats, dtype)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        _ratio(f"grad {name}", g, t_grads[name], o_grads[name], dtype)


def _path_params():
    """(backend, dtype) for the family/hook/LoRA paths: the Triton interpreter in fp16 only."""
    params = [pytest.param("torch", torch.bfloat16), pytest.param("eager", torch.bfloat16),
              pytest.param("cuda", torch.bfloat16)]
    if dispatch.triton_importable():
        params.append(pytest.param("triton", torch.float16))
    return params


@pytest.mark.parametrize("backend,dtype", _path_params())
def test_autocast_family_options_and_hooks(backend, dtype, backend_on):
    """LayerScale, QK-norm, registers and no class token (no_embed_class), QuickGELU, map pooling;
    then the unfused path of a block with a forward hook: each within the ratio test of timm."""
    backend_on(backend)
    x = torch.randn(2, 3, 32, 32)
    configs = (dict(init_values=0.1, qk_norm=True),
               dict(reg_tokens=2, class_token=False, no_embed_class=True, global_pool="avg", act_layer="quick_gelu"),
               dict(global_pool="map"))
    if backend == "triton":
        configs = configs[:1]  # the interpreter is slow: the options inside its kernels (LayerScale, QK-norm)
    for kwargs in configs:
        ref, ours = _pair(backend, **kwargs)
        o_logits, _, o_grads = _oracle(_tiny_timm(**kwargs), x)
        t_logits, _, t_grads = _run(ref, x, dtype, train=True)
        seen = []
        ours.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        for path in ("fused", "hooked"):
            logits, _, grads = _run(ours, x, dtype, train=True)
            assert logits.dtype == t_logits.dtype, (kwargs, path)
            _ratio(f"{kwargs} {path} logits", logits, t_logits, o_logits, dtype)
            for name, g in grads.items():
                _ratio(f"{kwargs} {path} grad {name}", g, t_grads[name], o_grads[name], dtype)
        assert seen == [dtype, dtype]  # the hook saw the attention's output in the autocast dtype


@pytest.mark.parametrize("backend,dtype", _path_params())
def test_autocast_lora_fused_and_unfused(backend, dtype, backend_on):
    peft = pytest.importorskip("peft")
    backend_on(backend)
    x = torch.randn(2, 3, 32, 32)
    ref, ours = _pair(backend)
    config = dict(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=False)
    ref_l = peft.get_peft_model(ref, peft.LoraConfig(**config))
    ours_l = peft.get_peft_model(ours, peft.LoraConfig(**config))
    torch.manual_seed(1)
    ours_l.load_state_dict(ref_l.state_dict())
    t_logits, _, t_grads = _run(ref_l, x, dtype, train=True)
    oracle = _tiny_timm()
    oracle_l = peft.get_peft_model(oracle, peft.LoraConfig(**config))
    oracle_l.load_state_dict(ref_l.state_dict())
    o_logits, _, o_grads = _oracle(oracle_l, x)
    for path in ("fused", "unfused"):
        if path == "unfused":
            ours.blocks[1].mlp.register_forward_pre_hook(lambda m, i: None)
        logits, _, grads = _run(ours_l, x, dtype, train=True)
        assert logits.dtype == dtype
        assert any("lora_A" in n for n in grads)
        _ratio(f"lora {path} logits", logits, t_logits, o_logits, dtype)
        for name, g in grads.items():
            assert g.dtype == torch.float32
            _ratio(f"lora {path} grad {name}", g, t_grads[name], o_grads[name], dtype)


def test_autocast_backbone_api_and_inspect():
    dtype = torch.bfloat16
    x = torch.randn(2, 3, 32, 32)
    ref, ours = _pair("torch")
    ours.eval()
    ref.eval()
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        final, maps = ours.forward_intermediates(x, indices=[0, 1])
        t_final, t_maps = ref.forward_intermediates(x, indices=[0, 1])
        assert final.dtype == t_final.dtype and [m.dtype for m in maps] == [m.dtype for m in t_maps]
        backbone = vitkern.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(0, 1),
                                        img_size=32, depth=2, patch_size=8)
        feats = backbone(x)
        assert all(torch.isfinite(f).all() for f in feats)
        from vitkern import inspect as vk_inspect

        probs = vk_inspect.attention_maps(ours, x, kind="cls")
    assert torch.isfinite(torch.as_tensor(probs if isinstance(probs, torch.Tensor) else probs[0])).all()


def test_autocast_compile_and_export():
    dtype = torch.bfloat16
    x = torch.randn(2, 3, 32, 32)
    _, ours = _pair("torch")
    ours.eval()
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        eager = ours(x)
        compiled = torch.compile(ours, fullgraph=True, backend="eager")(x)
    assert compiled.dtype == eager.dtype == dtype
    # Eager inference takes oneDNN's fused GEMM + GELU / + skip connection (one rounding where the
    # traced plain ops round twice): equal to a few roundings of the logits.
    floor = FLOOR_ROUNDINGS * UNIT_ROUNDOFF[dtype] * max(1.0, eager.float().abs().max().item())
    assert (compiled.float() - eager.float()).abs().max().item() <= floor
    with torch.autocast("cpu", dtype=dtype):
        program = torch.export.export(ours, (x,))
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        exported = program.module()(x)
    assert (exported.float() - eager.float()).abs().max().item() <= floor


def test_autocast_bad_dtypes_and_half_models():
    x = torch.randn(2, 3, 32, 32)
    _, ours = _pair("torch")
    ours.eval()
    with torch.no_grad():
        expected = ours(x)
        # float64 and int8 are not autocast dtypes on the CPU: torch's own answer is a warning that
        # it disables autocast; the model then runs in fp32, unchanged (no crash inside a kernel).
        for dtype in (torch.float64, torch.int8):
            with pytest.warns(UserWarning, match="not supported"), torch.autocast("cpu", dtype=dtype):
                torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
    half = ours.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_grad_scaler_skips_overflow_steps_like_timm():
    """fp16 autocast + GradScaler: the same steps are skipped (inf gradients) and the same scale
    results as with timm; the parameters stay within fp16 training noise of timm's."""
    dtype = torch.float16
    ref, ours = _pair("torch")
    opt_t = torch.optim.SGD(ref.parameters(), lr=1e-2)
    opt_v = torch.optim.SGD(ours.parameters(), lr=1e-2)
    scaler_t = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler_v = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    torch.manual_seed(3)
    for step in range(6):
        x = torch.randn(2, 3, 32, 32)
        # Step 2's loss is scaled past fp16's range: its fp16 gradients are inf in both models (an
        # unambiguous overflow, not one at the edge of the range that rounding could decide).
        boost = 1e30 if step == 2 else 1.0
        scales = []
        for model, opt, scaler in ((ref, opt_t, scaler_t), (ours, opt_v, scaler_v)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype):
                loss = model(x).float().square().mean() * boost
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        assert scales[0] == scales[1], f"step {step}: timm's scale {scales[0]}, vitkern's {scales[1]}"
    assert scaler_v.get_scale() == 2.0 ** 7  # the overflow step was seen, skipped, and halved the scale
    for (name, p_t), p_v in zip(ref.named_parameters(), ours.parameters()):
        tol = 16 * UNIT_ROUNDOFF[dtype] * max(1.0, p_t.abs().max().item())
        assert (p_t - p_v).abs().max().item() <= tol, name


def test_fp16_training_follows_timms_loss_curve():
    """200 AdamW steps of fp16 autocast + GradScaler on scikit-learn's digits, timm and vitkern from
    the same weights and batches: the same steps are skipped, and the loss curves agree (the runs
    part by fp16 rounding, so their averages over the last 50 steps are compared, not each step)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div(16.0).sub(0.5).div(0.5)
    images = torch.nn.functional.interpolate(images[:, None], size=16, mode="bilinear").expand(-1, 3, -1, -1)
    labels = torch.tensor(digits.target)
    kwargs = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    ref = _tiny_timm(**kwargs)
    ours = vitkern.from_timm(ref)
    curves = []
    for model in (ref, ours):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        scaler = torch.amp.GradScaler("cpu")
        gen = torch.Generator().manual_seed(0)
        losses, skipped = [], []
        for step in range(200):
            idx = torch.randint(0, len(labels), (32,), generator=gen)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(images[idx]).float(), labels[idx])
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < scale)
            losses.append(loss.item())
        curves.append((losses, skipped))
    (t_losses, t_skipped), (v_losses, v_skipped) = curves
    assert v_skipped[:5] == t_skipped[:5]  # the first overflow steps, before the runs part
    assert sum(v_skipped) == pytest.approx(sum(t_skipped), abs=2)
    t_end, v_end = sum(t_losses[-50:]) / 50, sum(v_losses[-50:]) / 50
    assert t_end < 0.5 * t_losses[0] and v_end < 0.5 * v_losses[0]  # both learned
    assert v_end == pytest.approx(t_end, rel=0.25), (t_end, v_end)
