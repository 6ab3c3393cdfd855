"""Shared helpers of tests/test_apply_*.py (vitkern.apply on timm, transformers and open_clip models).

Every check compares a patched model with an unpatched deep copy of it: outputs and the gradient of
every parameter (and of the image) of one fixed random projection of all outputs. fp32 results must
agree to 1e-5 of the compared tensor's largest magnitude (the two run the same math in different
orders: fused epilogues, one GEMM for Q, K and V). `OpCounter` shows the fused path ran, not a fallback.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import vitkern
import vitkern.ops

FP32_TOL = 1e-5
OPS = ("patch_embed", "layer_norm", "ln_linear", "attention", "linear")


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Every parameter moved off its initialization (zero biases, constant LayerScale...), so each one
    matters to the output; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return model.eval()


def tensors_of(out: Any, prefix: str = "out") -> List[Tuple[str, Tensor]]:
    """(name, tensor) of every tensor in a model output: a tensor, a tuple/list, a dict or ModelOutput."""
    if isinstance(out, Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return [item for k, v in out.items() for item in tensors_of(v, f"{prefix}.{k}")]
    if isinstance(out, (tuple, list)):
        return [item for i, v in enumerate(out) for item in tensors_of(v, f"{prefix}[{i}]")]
    return []


def run(model: nn.Module, x: Tensor, call: Optional[Callable] = None, backward: bool = True):
    """(outputs {name: tensor}, image gradient, {param name: grad}) of call(model, x) (default model(x));
    the backward pass is of a fixed random projection of every floating-point output."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(backward and x.is_floating_point())
    out = (call or (lambda m, t: m(t)))(model, x)
    named = tensors_of(out)
    grads: Dict[str, Optional[Tensor]] = {}
    xgrad = None
    if backward:
        g = torch.Generator().manual_seed(1)
        loss = 0
        for _, t in named:
            if t.is_floating_point() and t.requires_grad:
                loss = loss + (t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
        loss.backward()
        xgrad = x.grad
        # (a torch.compile'd module names its parameters "_orig_mod.<name>")
        grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}
    return {n: t.detach() for n, t in named}, xgrad, grads


def assert_close(actual: Tensor, expected: Tensor, what: str, tol: float = FP32_TOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def assert_same_results(got, want, tol: float = FP32_TOL, grads: bool = True) -> None:
    """Outputs, image gradient and every parameter gradient of two `run` results agree."""
    out, xgrad, pgrads = got
    out_ref, xgrad_ref, pgrads_ref = want
    assert list(out) == list(out_ref), f"output fields differ: {list(out)} vs {list(out_ref)}"
    for name, t in out_ref.items():
        assert_close(out[name], t, name, tol)
    if not grads:
        return
    if xgrad_ref is not None:
        assert_close(xgrad, xgrad_ref, "d image", tol)
    assert list(pgrads) == list(pgrads_ref)
    for name, g in pgrads_ref.items():
        if g is None:
            assert pgrads[name] is None, f"{name}: a gradient where the unpatched model has none"
            continue
        assert pgrads[name] is not None, f"{name}: no gradient (the unpatched model has one)"
        assert_close(pgrads[name], g, f"d {name}", tol)


def compare(model: nn.Module, x: Tensor, *, backend: str = "eager", call: Optional[Callable] = None,
            tol: float = FP32_TOL, grads: bool = True) -> Tuple[vitkern.ApplyReport, nn.Module]:
    """Patch a deep copy of `model`, then hold its outputs and gradients to the unpatched model's."""
    patched = copy.deepcopy(model)
    report = vitkern.apply(patched, backend=backend)
    want = run(model, x, call, grads)
    got = run(patched, x, call, grads)
    assert_same_results(got, want, tol, grads)
    return report, patched


class OpCounter:
    """Counts the calls of vitkern's public ops (monkeypatched on vitkern.ops, where every fused
    forward looks them up)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts = dict.fromkeys(OPS, 0)
        for name in OPS:
            real = getattr(vitkern.ops, name)

            def counted(*args, _name=name, _real=real, **kwargs):
                self.counts[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(vitkern.ops, name, counted)

    def reset(self) -> None:
        for k in self.counts:
            self.counts[k] = 0


def class_snapshot(classes: Iterable[type]) -> Dict[type, Dict[str, Any]]:
    return {cls: dict(vars(cls)) for cls in classes}


def assert_classes_untouched(snapshot: Dict[type, Dict[str, Any]]) -> None:
    """Every attribute of every class is the very object it was (apply never assigns into a class)."""
    for cls, attrs in snapshot.items():
        now = dict(vars(cls))
        assert now.keys() == attrs.keys(), f"{cls.__qualname__}: attributes added/removed: {now.keys() ^ attrs.keys()}"
        for k, v in attrs.items():
            assert now[k] is v, f"{cls.__module__}.{cls.__qualname__}.{k} was replaced"


def instance_patches(model: nn.Module) -> List[str]:
    """Names of the modules with an instance-level method set by vitkern."""
    return [name for name, m in model.named_modules()
            if any(k in m.__dict__ for k in ("forward", "_embeds", "_vitkern_backend"))]


def assert_reverted(model: nn.Module) -> None:
    assert instance_patches(model) == [], f"still patched after revert: {instance_patches(model)[:5]}"
    for m in model.modules():
        assert m.forward.__func__ is type(m).forward
