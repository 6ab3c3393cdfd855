"""vitkern.dispatch: available_backends(), explicit vs. automatic selection, the VITKERN_BACKEND
override, and the errors that give every reason a backend cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkern
from vitkern import BackendUnavailableError, dispatch, ops

REPO = Path(__file__).resolve().parents[1]


def test_available_backends_shape():
    backends = vitkern.available_backends()
    assert list(backends) == ["eager", "triton", "cuda", "torch"]
    for name, value in backends.items():
        assert isinstance(value, tuple) and len(value) == 2, name
        usable, reasons = value
        assert isinstance(usable, bool) and isinstance(reasons, list), name
        assert all(isinstance(r, str) and r for r in reasons), name
        # Usable exactly when there is no reason against it.
        assert usable == (not reasons), name
    assert backends["eager"] == (True, [])
    assert backends["torch"] == (True, [])
    if not torch.cuda.is_available():
        usable, reasons = backends["cuda"]
        assert not usable and any("no CUDA device is visible" in r for r in reasons)


def test_auto_runs_torchs_fused_ops_on_cpu():
    """The CPU default is torch's own fused ops (the "torch" backend), not the float64 oracle; the
    oracle ("eager") stays behind it for a call torch's ops cannot take."""
    call = dict(x=torch.randn(2, 8), weight=torch.randn(4, 8), bias=None, activation=None, residual=None)
    assert dispatch.auto_order("linear", torch.device("cpu")) == ("torch", "eager")
    assert dispatch.select("linear", "auto", torch.device("cpu"), call).backend == "torch"
    assert vitkern.auto_backends("cpu") == {op: "torch" for op in dispatch.OPS}
    assert dispatch.PREDICTED_ORDER[-2:] == ("torch", "eager")


def test_explicit_backend_that_cannot_run_lists_every_reason():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(BackendUnavailableError) as info:
        ops.linear(x, w, backend="cuda")
    message = str(info.value)
    assert message.startswith("backend='cuda' cannot run vitkern.ops.linear here:")
    assert "\n  - " in message
    assert isinstance(info.value, RuntimeError)


def test_vitkern_backend_env_override(monkeypatch):
    monkeypatch.setenv("VITKERN_BACKEND", "eager")
    assert dispatch.requested_backend("auto") == "eager"
    assert dispatch.requested_backend("cuda") == "cuda"  # an explicit argument wins over the environment
    monkeypatch.setenv("VITKERN_BACKEND", " AUTO ")
    assert dispatch.requested_backend("auto") == "auto"
    monkeypatch.setenv("VITKERN_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"VITKERN_BACKEND must be one of .* got 'tpu'"):
        ops.linear(torch.randn(2, 8), torch.randn(4, 8))
    # The environment's choice is explicit: a backend that cannot run the call raises, never falls back.
    monkeypatch.setenv("VITKERN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        ops.linear(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        vitkern.ViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)(torch.randn(1, 3, 16, 16))
    monkeypatch.delenv("VITKERN_BACKEND")
    assert ops.linear(torch.randn(2, 8), torch.randn(4, 8)).shape == (2, 4)


def test_vitkern_backend_env_selects_triton_when_it_can(monkeypatch):
    if "triton" not in dispatch.implementations("linear") or dispatch.backend_unavailable_reasons("triton"):
        pytest.skip("the Triton linear is not registered or Triton cannot run here")
    monkeypatch.setenv("VITKERN_BACKEND", "triton")
    x = torch.randn(4, 16, device="cuda" if torch.cuda.is_available() else "cpu")
    w = torch.randn(8, 16, device=x.device)
    call = dict(x=x, weight=w, bias=None, activation=None, residual=None)
    assert dispatch.select("linear", "auto", x.device, call).backend == "triton"


def test_register_validates_names():
    with pytest.raises(ValueError, match=r"unknown op 'conv3d'"):
        dispatch.register("conv3d", "eager", lambda **kw: None)
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        dispatch.register("linear", "tpu", lambda **kw: None)
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        dispatch.backend_unavailable_reasons("tpu")


def test_implementation_reports_backend_reasons_before_call_reasons():
    impl = dispatch.Implementation("linear", "cuda", fn=lambda **kw: None, supports=lambda call: ["call-level reason"])
    reasons = impl.not_supported_reasons({})
    if dispatch.backend_unavailable_reasons("cuda"):
        assert reasons == dispatch.backend_unavailable_reasons("cuda")
    else:
        assert reasons == ["call-level reason"]


def test_every_op_has_an_eager_implementation():
    for op in dispatch.OPS:
        assert "eager" in dispatch.implementations(op), op


# --------------------------------------------------------------------------------------------
# A machine without a usable Triton backend: no GPU and no TRITON_INTERPRET, in a fresh process

_PROBE = r"""
import json, torch, vitkern
out = {"available": vitkern.available_backends()["triton"], "construct": None, "forward": None}
try:
    model = vitkern.ViT(backend="triton", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
except Exception as exc:
    out["construct"] = [type(exc).__name__, str(exc)]
else:
    try:
        model(torch.randn(1, 3, 16, 16))
    except Exception as exc:
        out["forward"] = [type(exc).__name__, str(exc)]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def no_triton_probe():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VITKERN_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a machine that has one
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr
    return json.loads(line[-1][len("RESULT"):])


def test_triton_unavailable_without_gpu_or_interpreter(no_triton_probe):
    usable, reasons = no_triton_probe["available"]
    assert not usable
    assert any("TRITON_INTERPRET" in r or "not installed" in r or "importing triton failed" in r for r in reasons), reasons


def test_vit_backend_triton_raises_with_the_reason(no_triton_probe):
    error = no_triton_probe["construct"] or no_triton_probe["forward"]
    assert error is not None, "ViT(backend='triton') ran without a usable Triton backend"
    kind, message = error
    assert kind == "BackendUnavailableError", error
    assert "triton" in message
    assert "TRITON_INTERPRET" in message or "not installed" in message or "no triton implementation" in message, message


def test_vit_backend_triton_fails_when_built(no_triton_probe):
    # Fail when asked, not at the first forward.
    assert no_triton_probe["construct"] is not None
    kind, message = no_triton_probe["construct"]
    assert kind == "BackendUnavailableError" and "TRITON_INTERPRET" in message
