"""vitkern.reference is the oracle every backend is compared against, so it is checked on its own:
in float64, against torch's (and timm's) independent implementations, within a few float64 ulps of
the values' magnitude. The operand ranges are where each setting matters: activations over their
curved range, LayerNorm rows whose variance is comparable to eps. Each of these tests kills a
mutant of scripts/mutants.py that every other test let through (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkern import reference

EPS64 = torch.finfo(torch.float64).eps


def _randn(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


def _quick_gelu_timm(x):
    from timm.layers.activations import quick_gelu

    return quick_gelu(x)


@pytest.mark.parametrize("name, theirs", [
    ("gelu", lambda x: F.gelu(x)),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("quick_gelu", _quick_gelu_timm),
])
def test_activations_match_torch_in_float64(name, theirs):
    x = _randn(4096, scale=3.0)  # |x| up to ~12: the curved part and both tails
    ours = getattr(reference, name)(x)
    # Each side is a handful (< 8) of float64 operations on values of magnitude <= |x|: each
    # rounds by at most eps relative, so they agree within 8 eps |x| (a rounded constant, e.g.
    # 0.0447 for 0.044715, is off by ~1e-5 |x|^3).
    bound = 8 * EPS64 * x.abs().clamp_min(1.0)
    assert ((ours - theirs(x)).abs() <= bound).all()


@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch_in_float64(eps, affine):
    dim = 64
    x = _randn(3, 5, dim, scale=0.3, seed=1) + _randn(3, 5, 1, seed=2)  # variance ~0.09: eps=0.5 dominates it
    w, b = (_randn(dim, seed=3), _randn(dim, seed=4)) if affine else (None, None)
    ours = reference.layer_norm(x, w, b, eps)
    theirs = F.layer_norm(x, (dim,), w, b, eps)
    # The mean and variance sum `dim` terms (relative error <= dim eps each); the output is about
    # |w| * |x - mean| / sqrt(var + eps) + |b|.
    bound = 4 * dim * EPS64 * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() <= bound
    mean, rstd = reference.layer_norm_stats(x, eps)
    assert torch.allclose(rstd, 1 / torch.sqrt(x.var(-1, unbiased=False) + eps), rtol=4 * dim * EPS64, atol=0)
