"""The ViT family (issue 13): DINOv2, CLIP, SigLIP, DeiT (distilled), DeiT III and the options they are
built from (LayerScale, register tokens, no_embed_class, pre_norm, QK-norm, activations, the
attention-pool head, class_token=False, PatchDropout), against timm and against float64 formulas
written here independently of vitkern.reference.

Tiny configs (depth 2, width 64, a handful of patches) keep the file at a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, seed

import vitkern
from vitkern import dispatch, ops
from vitkern.dispatch import BackendUnavailableError
from vitkern.model import PatchDropout

timm = pytest.importorskip("timm")

# The named models with small overrides: (timm name, overrides). Every option of the family is in one.
FAMILY = [
    ("vit_small_patch14_dinov2", dict(img_size=28, embed_dim=64, num_heads=2)),  # LayerScale, patch 14
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, embed_dim=64, num_heads=2)),  # + registers, no_embed_class
    ("vit_base_patch16_clip_224", dict(img_size=32, embed_dim=64, num_heads=2, act_layer="quick_gelu")),  # pre_norm
    ("vit_base_patch16_siglip_224", dict(img_size=32, embed_dim=64, num_heads=2, act_layer="gelu_tanh")),  # map pool
    ("deit_small_patch16_224", dict(img_size=32, embed_dim=64, num_heads=2)),
    ("deit_small_distilled_patch16_224", dict(img_size=32, embed_dim=64, num_heads=2)),  # dist_token, head_dist
    ("deit3_small_patch16_224", dict(img_size=32, embed_dim=64, num_heads=2)),  # LayerScale, no_embed_class
    ("vit_small_patch16_224", dict(img_size=32, embed_dim=64, num_heads=2, qk_norm=True, class_token=False,
                                   global_pool="avg", reg_tokens=3)),  # QK-norm, registers without a class token
]
PARITY = dict(atol=1e-5, rtol=1e-5)


def _timm_model(name, overrides, **extra):
    torch.manual_seed(seed(0))
    tm = timm.create_model(name, pretrained=False, depth=2, num_classes=7, **overrides, **extra)
    with torch.no_grad():
        # Off the initialization (LayerScale's 1e-5, zero biases and latent): every parameter matters.
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tm


def _forward_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(seed(1))
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return outs, x.grad, grads


@pytest.mark.parametrize("name, overrides", FAMILY, ids=[f[0] + ("_qknorm" if "qk_norm" in f[1] else "") for f in FAMILY])
def test_from_timm_parity_forward_and_gradients(name, overrides):
    tm = _timm_model(name, overrides).eval()
    model = vitkern.from_timm(tm, backend="eager")
    assert set(model.state_dict()) == set(tm.state_dict())
    assert model.num_prefix_tokens == tm.num_prefix_tokens
    x = torch.randn(2, 3, *tm.patch_embed.img_size)
    (ours,), dx, grads = _forward_and_grads(model, x)
    (theirs,), tdx, tgrads = _forward_and_grads(tm, x)
    torch.testing.assert_close(ours, theirs, **PARITY)
    torch.testing.assert_close(dx, tdx, **PARITY)
    for key, g in tgrads.items():
        assert g is not None and grads[key] is not None, key
        torch.testing.assert_close(grads[key], g, **PARITY, msg=lambda m: f"{key}: {m}")


def test_named_variants_build_timms_architecture():
    for name, overrides in FAMILY[:7]:
        model = vitkern.create_model(name, depth=2, num_classes=7, **overrides)
        tm = _timm_model(name, overrides)
        assert model.pretrained_cfg == tm.pretrained_cfg, name
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
            k: tuple(v.shape) for k, v in tm.state_dict().items()}, name
        model.load_state_dict(tm.state_dict())  # timm's keys load unchanged


def test_distilled_train_and_eval_semantics():
    tm = _timm_model("deit_small_distilled_patch16_224", dict(img_size=32, embed_dim=64, num_heads=2))
    model = vitkern.from_timm(tm, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model.get_classifier(), tuple)
    for training, distilled_training in ((False, True), (True, False), (True, True)):
        tm.train(training).set_distilled_training(distilled_training)
        model.train(training).set_distilled_training(distilled_training)
        ours, theirs = model(x), tm(x)
        assert isinstance(ours, tuple) == isinstance(theirs, tuple) == (training and distilled_training)
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,), theirs if isinstance(theirs, tuple) else (theirs,)):
            torch.testing.assert_close(a, b, **PARITY)
    torch.testing.assert_close(model.eval().forward_head(model.forward_features(x), pre_logits=True),
                               tm.eval().forward_head(tm.forward_features(x), pre_logits=True), **PARITY)


# --------------------------------------------------------------------------------------------
# PatchDropout


def test_patch_dropout_keeps_prefix_and_count_and_is_identity_in_eval():
    prefix, patches, dim = 5, 11, 4
    x = torch.randn(3, prefix + patches, dim)
    drop = PatchDropout(0.4, num_prefix_tokens=prefix)
    y = drop(x)
    keep = max(1, int(patches * (1 - 0.4)))
    assert y.shape == (3, prefix + keep, dim)
    assert torch.equal(y[:, :prefix], x[:, :prefix])
    for b in range(3):  # every kept row is a distinct patch row of the same image
        rows = [int((x[b, prefix:] == r).all(-1).nonzero()) for r in y[b, prefix:]]
        assert len(set(rows)) == keep
    assert drop.eval()(x) is x
    assert PatchDropout(0.99, num_prefix_tokens=0).train()(x).shape == (3, 1, dim)  # at least one patch
    with pytest.raises(ValueError, match=r"patch_drop_rate must be in \[0, 1\), got 1.0"):
        PatchDropout(1.0)


def test_patch_dropout_draws_the_same_tokens_as_timm():
    from timm.layers import PatchDropout as TimmPatchDropout

    x = torch.randn(4, 2 + 16, 8)
    torch.manual_seed(seed(123))
    theirs = TimmPatchDropout(0.5, num_prefix_tokens=2).train()(x)
    torch.manual_seed(seed(123))
    ours = PatchDropout(0.5, num_prefix_tokens=2).train()(x)
    assert torch.equal(ours, theirs)


def test_patch_dropout_in_the_model_as_timms():
    overrides = dict(img_size=64, embed_dim=64, num_heads=2, reg_tokens=2, patch_drop_rate=0.5)  # 16 patches
    tm = _timm_model("vit_small_patch16_224", overrides).train()
    model = vitkern.from_timm(tm, backend="eager")
    assert model.config.patch_drop_rate == 0.5 and isinstance(model.patch_drop, PatchDropout)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(seed(7))
    theirs = tm.forward_features(x)
    torch.manual_seed(seed(7))
    ours = model.forward_features(x)
    assert ours.shape == theirs.shape == (2, 3 + max(1, int(16 * 0.5)), 64)
    torch.testing.assert_close(ours, theirs, **PARITY)
    model.eval()
    assert model.forward_features(x).shape[1] == 3 + 16


# --------------------------------------------------------------------------------------------
# What remains refused, by name


def test_refusals_name_the_option():
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1)
    with pytest.raises(NotImplementedError, match=r"(?s)RoPE.*SwiGLU"):
        vitkern.from_timm(eva)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, embed_dim=64, num_heads=2)
    with pytest.raises(NotImplementedError, match=r"relative position bias"):
        vitkern.from_timm(beit)
    from timm.layers import SwiGLUPacked

    swiglu = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, embed_dim=64, num_heads=2,
                               mlp_layer=SwiGLUPacked, act_layer="silu")
    with pytest.raises(NotImplementedError, match=r"mlp is GluMlp \(a gated MLP: SwiGLU\), not timm's Mlp"):
        vitkern.from_timm(swiglu)
    relu = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, embed_dim=64, num_heads=2,
                             act_layer="relu")
    with pytest.raises(NotImplementedError, match=r"mlp.act is ReLU, not GELU, tanh GELU or QuickGELU"):
        vitkern.from_timm(relu)
    with pytest.raises(TypeError, match=r"timm VisionTransformer"):
        vitkern.from_timm(torch.nn.Linear(2, 2))


def test_config_validates_the_family_options():
    with pytest.raises(ValueError, match=r"act_layer must be None or one of .*got 'relu'"):
        vitkern.ViTConfig(act_layer="relu")
    with pytest.raises(ValueError, match=r"reg_tokens must be an int >= 0, got -1"):
        vitkern.ViTConfig(reg_tokens=-1)
    with pytest.raises(ValueError, match=r"distilled=True needs class_token=True and global_pool='token'"):
        vitkern.ViTConfig(distilled=True, global_pool="avg")
    with pytest.raises(ValueError, match=r"patch_drop_rate must be in \[0, 1\), got 1.5"):
        vitkern.ViTConfig(patch_drop_rate=1.5)
    cfg = vitkern.ViTConfig(reg_tokens=4, no_embed_class=True)
    assert cfg.num_prefix_tokens == 5 and cfg.pos_embed_prefix_tokens == 0
    assert vitkern.ViTConfig(distilled=True).num_prefix_tokens == 2


# --------------------------------------------------------------------------------------------
# The fused plan takes vitkern's LayerScale, QK-norm and activations


def test_block_plan_fuses_the_family_options(monkeypatch):
    model = vitkern.ViT(img_size=32, embed_dim=64, depth=1, num_heads=2, num_classes=3, init_values=0.1,
                        qk_norm=True, act_layer="quick_gelu", backend="eager").eval()
    plan = model.blocks[0]._current_plan()
    assert plan.attn and plan.mlp and plan.act == "quick_gelu"
    seen = []
    real_linear, real_attention = ops.linear, ops.attention

    def linear(*a, **k):
        seen.append(("linear", k.get("scale") is not None, k.get("activation")))
        return real_linear(*a, **k)

    def attention(*a, **k):
        seen.append(("attention", k.get("q_norm") is not None, None))
        return real_attention(*a, **k)

    monkeypatch.setattr(ops, "linear", linear)
    monkeypatch.setattr(ops, "attention", attention)
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert ("attention", True, None) in seen and ("linear", True, None) in seen  # gamma in proj's / fc2's epilogue
    # The module path (a hook on ls1) gives the same logits.
    handle = model.blocks[0].ls1.register_forward_hook(lambda m, i, o: None)
    torch.testing.assert_close(model(x), y, **PARITY)
    handle.remove()


# --------------------------------------------------------------------------------------------
# The op arguments against float64 formulas written here


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _check_op_against(fn, oracle, inputs, dtype=torch.float32):
    """fn(*inputs in dtype) vs oracle(*inputs in float64): output and every input's gradient."""
    low = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in inputs]
    y, ref = fn(*low), oracle(*inputs)
    assert_close(y, ref, dtype, name="out")
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(ref, [t for t in inputs if t is not None], dy)
    low_grads = torch.autograd.grad(y, [t for t in low if t is not None], dy.to(dtype))
    for i, (g, ref_g) in enumerate(zip(low_grads, grads)):
        assert_close(g, ref_g, dtype, scale=4.0, name=f"grad {i}")


ACT_F64 = {
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
    "quick_gelu": lambda h: h / (1 + torch.exp(-1.702 * h)),
}


@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
def test_linear_activation_and_scale_against_float64(activation):
    x, w, b, r, g = _f64(3, 5, 13), _f64(7, 13), _f64(7), _f64(3, 5, 7), _f64(7)
    _check_op_against(
        lambda x, w, b, r, g: ops.linear(x, w, b, activation=activation, residual=r, scale=g, backend="eager"),
        lambda x, w, b, r, g: r + g * ACT_F64[activation](torch.einsum("bti,oi->bto", x, w) + b),
        [x, w, b, r, g])
    _check_op_against(  # LayerScale alone: the block's proj / fc2 epilogue
        lambda x, w, b, r, g: ops.linear(x, w, b, residual=r, scale=g, backend="eager"),
        lambda x, w, b, r, g: r + g * (torch.einsum("bti,oi->bto", x, w) + b), [x, w, b, r, g])


@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
def test_ln_linear_activation_against_float64(activation):
    x, lw, lb, w, b = _f64(2, 5, 16), _f64(16), _f64(16), _f64(9, 16), _f64(9)

    def oracle(x, lw, lb, w, b):
        mu = x.mean(-1, keepdim=True)
        n = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6) * lw + lb
        return ACT_F64[activation](torch.einsum("bti,oi->bto", n, w) + b)

    _check_op_against(lambda *t: ops.ln_linear(*t, activation=activation, backend="eager"), oracle, [x, lw, lb, w, b])


@pytest.mark.parametrize("with_affine", [True, False])
def test_attention_qk_norm_against_float64(with_affine):
    heads, d, t = 2, 8, 7
    qkv = _f64(2, t, 3 * heads * d)
    qw, qb, kw, kb = (_f64(d), _f64(d), _f64(d), _f64(d)) if with_affine else (None,) * 4

    def oracle(qkv, *norm):
        q, k, v = qkv.reshape(2, t, 3, heads, d).permute(2, 0, 3, 1, 4)

        def ln(z, w, b):
            z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
            return z if w is None else z * w + b

        q, k = ln(q, *norm[:2]), ln(k, *norm[2:])
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        return (p @ v).transpose(1, 2).reshape(2, t, heads * d)

    def fn(qkv, *norm):
        return ops.attention(qkv, heads, q_norm=(norm[0], norm[1], 1e-5), k_norm=(norm[2], norm[3], 1e-5),
                             backend="eager")

    _check_op_against(fn, oracle, [qkv, qw, qb, kw, kb])


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_patch_embed_prefix_tokens_against_float64(no_embed_class):
    prefix, dim = 5, 6
    x, w, b, pre = _f64(2, 3, 8, 12), _f64(dim, 3, 4, 4), _f64(dim), _f64(1, prefix, dim)
    pos = _f64(1, 6 if no_embed_class else prefix + 6, dim)

    def oracle(x, w, b, pre, pos):
        tokens = F.conv2d(x, w, b, stride=4).flatten(2).transpose(1, 2)
        if no_embed_class:
            return torch.cat([pre.expand(2, -1, -1), tokens + pos], 1)
        return torch.cat([pre.expand(2, -1, -1), tokens], 1) + pos

    _check_op_against(lambda *t: ops.patch_embed(*t, no_embed_class=no_embed_class, backend="eager"), oracle,
                      [x, w, b, pre, pos])
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, %d, 6\)" % (6 if no_embed_class else 11)):
        ops.patch_embed(x, w, b, pre, pos[:, :3], no_embed_class=no_embed_class)


def test_new_arguments_are_validated():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\) \(weight's out_features\), got \(4,\)"):
        ops.linear(x, w, scale=torch.randn(4))
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'relu'"):
        ops.ln_linear(x, None, None, w, activation="relu")
    qkv = torch.randn(1, 3, 12)
    with pytest.raises(TypeError, match=r"q_norm must be None or a tuple \(weight, bias, eps\)"):
        ops.attention(qkv, 2, q_norm=torch.ones(2))
    with pytest.raises(ValueError, match=r"k_norm's weight must have shape \(2,\) \(head_dim\), got \(4,\)"):
        ops.attention(qkv, 2, k_norm=(torch.ones(4), None, 1e-6))
    with pytest.raises(ValueError, match=r"q_norm's eps must be a positive float, got 0"):
        ops.attention(qkv, 2, q_norm=(None, None, 0))


# --------------------------------------------------------------------------------------------
# Triton (the interpreter on CPU): the activations in the fc1 epilogue, forward (act' saved) and
# backward, against float64; outputs come poisoned (NaN) from the launchers under test.


def _needs_triton():
    if "triton" not in dispatch.implementations("linear") or dispatch.backend_unavailable_reasons("triton"):
        pytest.skip("triton cannot run here")


@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_linear_activation_against_float64(activation, dtype):
    _needs_triton()
    from conftest import TRITON_DEVICE

    torch.manual_seed(seed(0))
    x, w, b = _f64(7, 19), _f64(13, 19) * 0.3, _f64(13)  # odd sizes: every tile edge masked
    x, w, b = (t.detach().to(TRITON_DEVICE).requires_grad_(True) for t in (x, w, b))

    def fn(x, w, b):
        return ops.linear(x, w, b, activation=activation, backend="triton")

    _check_op_against(fn, lambda x, w, b: ACT_F64[activation](x @ w.t() + b), [x, w, b], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_linear_layer_scale_against_float64(dtype):
    _needs_triton()
    from conftest import TRITON_DEVICE

    torch.manual_seed(seed(0))
    x, w, b, r, g = (t.detach().to(TRITON_DEVICE).requires_grad_(True)
                     for t in (_f64(3, 5, 19), _f64(13, 19) * 0.3, _f64(13), _f64(3, 5, 13), _f64(13)))
    _check_op_against(lambda x, w, b, r, g: ops.linear(x, w, b, residual=r, scale=g, backend="triton"),
                      lambda x, w, b, r, g: r + g * (x @ w.t() + b), [x, w, b, r, g], dtype)
    with torch.no_grad():  # inference: no branch stored
        y = ops.linear(x.float(), w.float(), b.float(), residual=r.float(), scale=g.float(), backend="triton")
    assert_close(y, r + g * (x @ w.t() + b), torch.float32)


@pytest.mark.parametrize("prefix, no_embed_class", [(5, False), (5, True), (2, True), (0, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_patch_embed_prefix_tokens_against_float64(prefix, no_embed_class, dtype):
    _needs_triton()
    from conftest import TRITON_DEVICE

    torch.manual_seed(seed(0))
    dim, patches = 6, 6  # an 8 x 12 image in 4 x 4 patches
    tensors = [_f64(3, 3, 8, 12), _f64(dim, 3, 4, 4) * 0.3, _f64(dim), _f64(1, prefix, dim) if prefix else None,
               _f64(1, patches if no_embed_class else prefix + patches, dim)]
    x, w, b, pre, pos = (t.detach().to(TRITON_DEVICE).requires_grad_(True) if t is not None else None for t in tensors)

    def oracle(x, w, b, *rest):
        pre, pos = (rest[0], rest[1]) if prefix else (None, rest[0])
        tokens = F.conv2d(x, w, b, stride=4).flatten(2).transpose(1, 2)
        if no_embed_class:
            tokens = tokens + pos
        if pre is not None:
            tokens = torch.cat([pre.expand(3, -1, -1), tokens], 1)
        return tokens if no_embed_class else tokens + pos

    def fn(x, w, b, *rest):
        pre, pos = (rest[0], rest[1]) if prefix else (None, rest[0])
        return ops.patch_embed(x, w, b, pre, pos, no_embed_class=no_embed_class, backend="triton")

    _check_op_against(fn, oracle, [t for t in (x, w, b, pre, pos) if t is not None], dtype)


@pytest.mark.parametrize("design", ["normalize", "fold"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
def test_triton_ln_linear_activation_against_float64(activation, design, monkeypatch):
    _needs_triton()
    from conftest import TRITON_DEVICE

    monkeypatch.setenv("VITKERN_LN_LINEAR_DESIGN", design)
    torch.manual_seed(seed(0))
    x, lw, lb, w, b = (t.detach().to(TRITON_DEVICE).requires_grad_(True)
                       for t in (_f64(2, 5, 24), _f64(24), _f64(24), _f64(11, 24) * 0.3, _f64(11)))

    def oracle(x, lw, lb, w, b):
        mu = x.mean(-1, keepdim=True)
        n = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6) * lw + lb
        return ACT_F64[activation](n @ w.t() + b)

    _check_op_against(lambda *t: ops.ln_linear(*t, activation=activation, backend="triton"), oracle,
                      [x, lw, lb, w, b])


def test_triton_model_with_the_family_options_matches_eager():
    _needs_triton()
    for act in ("gelu_tanh", "quick_gelu"):
        torch.manual_seed(seed(0))
        model = vitkern.ViT(img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=3, act_layer=act,
                            init_values=0.5, reg_tokens=2, no_embed_class=True, backend="eager")
        x = torch.randn(2, 3, 32, 32)
        expected = model(x)
        model.backend = "triton"
        torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# Dispatch: backends without an option say so; auto falls back per op


def _linear_call():
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    return dict(x=x, weight=w, bias=None, activation="quick_gelu", residual=torch.randn(4, 16), scale=torch.randn(16))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_name_each_option_they_lack(backend):
    impls = {op: dispatch.implementations(op).get(backend) for op in ("linear", "ln_linear", "attention", "patch_embed")}
    if any(i is None for i in impls.values()):
        pytest.skip(f"no {backend} implementations registered in this build")
    reasons = impls["linear"].supports(_linear_call())
    # The Triton epilogue has the three GELUs and LayerScale, not both at once; csrc/ has them all.
    assert any("scale (LayerScale)" in r for r in reasons) == (backend == "triton")
    assert not any("activation='quick_gelu'" in r for r in reasons)
    no_act = dict(_linear_call(), activation=None)
    assert not any("scale (LayerScale)" in r for r in impls["linear"].supports(no_act))
    qkv = torch.randn(1, 4, 3 * 64)
    reasons = impls["attention"].supports(dict(qkv=qkv, num_heads=1, scale=None, q_norm=(None, None, 1e-6)))
    # Both backends' attention kernels normalize q and k as they load them.
    assert not any("q_norm/k_norm (QK-norm)" in r for r in reasons)
    call = dict(x=torch.randn(1, 3, 8, 8), weight=torch.randn(16, 3, 4, 4), bias=None,
                cls_token=torch.randn(1, 5, 16), pos_embed=torch.randn(1, 4, 16), no_embed_class=True)
    reasons = impls["patch_embed"].supports(call)
    # Both write any number of prefix rows, with or without their position embedding.
    assert not any("5 prefix tokens" in r for r in reasons)
    assert not any("no_embed_class=True" in r for r in reasons)


def test_explicit_triton_raises_with_the_reason_and_auto_falls_back_per_op(monkeypatch):
    if "triton" not in dispatch.implementations("linear"):
        pytest.skip("triton is not importable here")
    call = _linear_call()
    x, w, r, g = call["x"], call["weight"], call["residual"], call["scale"]
    with pytest.raises(BackendUnavailableError, match=r"scale \(LayerScale\) together with an activation"):
        ops.linear(x, w, residual=r, scale=g, activation="gelu", backend="triton")
    # auto on a device whose order puts triton first: the call with scale and an activation runs the
    # eager op (the same function), the calls with one of them still run triton.
    monkeypatch.setattr(dispatch, "auto_order", lambda op, device: ("triton", "eager"))
    expected = r + g * F.gelu(x @ w.t())
    torch.testing.assert_close(ops.linear(x, w, residual=r, scale=g, activation="gelu"), expected)
    base = dict(x=x, weight=w, bias=None, activation=None, residual=r)
    assert dispatch.select("linear", "auto", x.device, dict(base, scale=g)).backend == "triton"
    assert dispatch.select("linear", "auto", x.device, dict(base, activation="gelu_tanh")).backend == "triton"
    assert dispatch.select("linear", "auto", x.device, dict(base, scale=g, activation="gelu")).backend == "eager"


def test_reset_classifier_of_the_map_head_as_timms():
    tm = _timm_model("vit_base_patch16_siglip_224", dict(img_size=32, embed_dim=64, num_heads=2)).eval()
    model = vitkern.from_timm(tm, backend="eager")
    with pytest.raises(ValueError, match=r"cannot add an attention-pool head"):
        vitkern.ViT(img_size=32, embed_dim=64, depth=1, num_heads=2).reset_classifier(3, "map")
    tm.reset_classifier(5, "avg")
    model.reset_classifier(5, "avg")
    assert tm.attn_pool is None and model.attn_pool is None
    model.head.load_state_dict(tm.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), tm(x), **PARITY)
