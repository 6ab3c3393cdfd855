"""PatchDropout fused into patch_embed (issue 13): `ops.patch_embed(..., keep=)` embeds only the kept
patches (the Triton kernel gathers and multiplies just those GEMM rows), and the model hands a plain
PatchDropout's draw to it in training, keeping timm's tokens.

Oracle: the full patch embedding in float64 (a strided conv, the prefix, the position embedding),
then the gather of the kept patch rows: what timm's PatchDropout does after `_pos_embed`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, seed

import vitkern
from vitkern import dispatch, ops

PATCH = 4


def _oracle(x, w, b, prefix_tokens, pos, keep, no_embed_class):
    """[prefix; conv(x)] + pos (or pos on the patches only), then the kept patch rows gathered."""
    tokens = F.conv2d(x, w, b, stride=PATCH).flatten(2).transpose(1, 2)
    if no_embed_class and pos is not None:
        tokens = tokens + pos
    prefix = 0
    if prefix_tokens is not None:
        prefix = prefix_tokens.shape[1]
        tokens = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), tokens], 1)
    if not no_embed_class and pos is not None:
        tokens = tokens + pos
    kept = tokens[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :prefix], kept], 1)


def _inputs(prefix, no_embed_class, batch=3, dim=6, height=8, width=12):
    torch.manual_seed(seed(0))
    patches = (height // PATCH) * (width // PATCH)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(batch, 3, height, width, **f64)
    w = torch.randn(dim, 3, PATCH, PATCH, **f64) * 0.3
    b = torch.randn(dim, **f64)
    pre = torch.randn(1, prefix, dim, **f64) if prefix else None
    pos = torch.randn(1, patches if no_embed_class else prefix + patches, dim, **f64)
    return [x, w, b, pre, pos], patches


def _backends():
    names = ["eager"]
    if "triton" in dispatch.implementations("patch_embed") and not dispatch.backend_unavailable_reasons("triton"):
        names.append("triton")
    return names


# Eager in fp32 (the reference's gather), Triton in fp32 and fp16 (the kernel's kept-row gather).
CASES = [("eager", torch.float32)] + [("triton", d) for d in (torch.float32, torch.float16) if "triton" in _backends()]


@pytest.mark.parametrize("keep_kind", ["random", "repeated"])
@pytest.mark.parametrize("prefix, no_embed_class", [(0, False), (1, False), (2, True)])
@pytest.mark.parametrize("backend, dtype", CASES, ids=[f"{b}-{d}" for b, d in CASES])
def test_patch_embed_keep_against_float64(backend, dtype, prefix, no_embed_class, keep_kind):
    from conftest import TRITON_DEVICE

    device = TRITON_DEVICE if backend == "triton" else "cpu"
    tensors, patches = _inputs(prefix, no_embed_class)
    if keep_kind == "random":  # PatchDropout's draw: 3 of 6 patches, in random order
        keep = torch.stack([torch.randperm(patches)[:3] for _ in range(3)])
    else:  # an index kept twice: both tokens carry its gradient back (summed)
        keep = torch.tensor([[0, 0, 5], [2, 4, 2], [5, 1, 3]])
    present = [t for t in tensors if t is not None]
    inputs = [t.clone().requires_grad_(True) for t in present]
    low = [t.detach().to(device=device, dtype=dtype).requires_grad_(True) for t in present]

    def unpack(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in tensors]

    expected = _oracle(*unpack(inputs), keep, no_embed_class)
    x, w, b, pre, pos = unpack(low)
    out = ops.patch_embed(x, w, b, pre, pos, no_embed_class=no_embed_class, keep=keep.to(device), backend=backend)
    assert out.shape == (3, prefix + 3, 6)
    assert_close(out.cpu(), expected, dtype, name="tokens")
    dy = torch.randn_like(expected)
    grads = torch.autograd.grad(expected, inputs, dy)
    low_grads = torch.autograd.grad(out, low, dy.to(device=device, dtype=dtype))
    for name, g, ref in zip(("x", "weight", "bias", "prefix", "pos")[: len(grads)] if prefix else
                            ("x", "weight", "bias", "pos"), low_grads, grads):
        assert_close(g.cpu(), ref, dtype, scale=4.0, name=f"d {name}")


def test_keep_is_checked_by_name():
    tensors, patches = _inputs(1, False)
    x, w, b, pre, pos = (t.float() for t in tensors)
    good = torch.zeros(3, 2, dtype=torch.int64)
    for keep, error, match in [
        (good.float(), TypeError, "keep must be int64 patch indices, got torch.float32"),
        ([[0, 1]] * 3, TypeError, "keep must be a torch.Tensor"),
        (good[:2], ValueError, r"keep must have shape \(batch=3, kept\) with 1 <= kept <= 6 patches, got \(2, 2\)"),
        (torch.zeros(3, 7, dtype=torch.int64), ValueError, "got \\(3, 7\\)"),
        (torch.zeros(3, 0, dtype=torch.int64), ValueError, "got \\(3, 0\\)"),
        (torch.full((3, 2), 6), RuntimeError, r"keep's indices must be in \[0, 6\)"),
        (torch.full((3, 2), -1), RuntimeError, r"keep's indices must be in \[0, 6\)"),
    ]:
        with pytest.raises(error, match=match):
            ops.patch_embed(x, w, b, pre, pos, keep=keep, backend="eager")


def test_backends_without_keep_say_so():
    from vitkern.ops._checks import option_reasons

    call = dict(keep=torch.zeros(1, 1, dtype=torch.int64))
    assert option_reasons(call, "somebackend") == ["keep (PatchDropout's kept patches) is not in the somebackend patch_embed"]
    assert option_reasons(call, "somebackend", keep=True) == []


def _model(backend, **overrides):
    torch.manual_seed(seed(0))
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=1, num_classes=3, reg_tokens=2,
               patch_drop_rate=0.5)
    cfg.update(overrides)
    return vitkern.ViT(**cfg, backend=backend).train()


def test_model_hands_the_draw_to_the_fused_op_and_keeps_timms_tokens(monkeypatch):
    """Training with PatchDropout: the Triton backend gets `keep` (16 patches -> 8 embedded) and the
    tokens equal the eager model's, which gathers after the full embedding as timm does."""
    if "triton" not in _backends():
        pytest.skip("triton cannot run here")
    from vitkern.kernels.triton import patch_embed as tpe

    eager, fused = _model("eager"), _model("triton")
    fused.load_state_dict(eager.state_dict())
    seen = []
    real = tpe.patch_embed_fwd
    monkeypatch.setattr(tpe, "patch_embed_fwd", lambda *a: seen.append(a[-1]) or real(*a))
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(seed(5))
    expected = eager.forward_features(x)
    torch.manual_seed(seed(5))
    got = fused.forward_features(x)
    assert len(seen) == 1 and seen[0] is not None and tuple(seen[0].shape) == (2, 8)
    assert got.shape == expected.shape == (2, 3 + 8, 32)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    got.sum().backward()  # the backward runs through the scatter of the kept rows
    assert fused.pos_embed.grad is not None and fused.patch_embed.proj.weight.grad is not None
    fused.eval()
    assert fused.forward_features(x).shape == (2, 3 + 16, 32)  # eval: every patch


def test_model_keeps_timms_order_when_pos_drop_draws_first():
    """pos_drop_rate > 0 draws its mask before PatchDropout's draw: the model then gathers after
    the embedding (timm's order), so the same seed gives timm's tokens."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed(0))
    tm = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32,
                           num_heads=2, depth=1, num_classes=3, patch_drop_rate=0.5, pos_drop_rate=0.3).train()
    model = vitkern.from_timm(tm, backend="eager").train()
    assert not model._patch_drop_fuses()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(seed(9))
    theirs = tm.forward_features(x)
    torch.manual_seed(seed(9))
    ours = model.forward_features(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    model.pos_drop.p = 0.0
    assert model._patch_drop_fuses()
    model.patch_drop.register_forward_hook(lambda *a: None)  # a hook: the module must run as a module
    assert not model._patch_drop_fuses()



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def test_cuda_patch_embed_keep_against_float64(where, dtype, monkeypatch):
    """The CUDA backend: the full embedding by csrc/, then the kept rows gathered (and scattered back)."""
    from test_cuda_ops import _use_emulated_extension, _use_gpu_extension

    device = _use_gpu_extension() if where == "cuda" else _use_emulated_extension(monkeypatch)
    tensors, patches = _inputs(2, True)
    keep = torch.tensor([[0, 0, 5], [2, 4, 1], [5, 1, 3]])  # one index twice: its gradient sums
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    low = [t.detach().to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]
    expected = _oracle(*inputs, keep, True)
    out = ops.patch_embed(*low, no_embed_class=True, keep=keep.to(device), backend="cuda")
    assert_close(out.cpu(), expected, dtype, name="tokens")
    dy = torch.randn_like(expected)
    for name, g, ref in zip(("x", "weight", "bias", "prefix", "pos"), torch.autograd.grad(out, low, dy.to(device, dtype)),
                            torch.autograd.grad(expected, inputs, dy)):
        assert_close(g.cpu(), ref, dtype, scale=4.0, name=f"d {name}")
