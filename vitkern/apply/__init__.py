"""vitkern's kernels on the models people already have: timm, Hugging Face transformers, open_clip.

    report = vitkern.apply(model)          # in place, this instance only; returns an ApplyReport
    print(report)                          # what runs fused, and why the rest was left alone
    vitkern.revert(model)                  # the original forwards, exactly

    vitkern.register_hf_attention()        # "vitkern" in transformers' AttentionInterface
    model = AutoModel.from_pretrained(name, attn_implementation="vitkern")

`apply` walks the model, finds the host libraries' vision transformers (timm's VisionTransformer and
VisionTransformerDistilled; HF's ViT, DeiT, DINOv2, DINOv2 with registers, CLIP and SigLIP vision
models and the vision towers of CLIPModel/SiglipModel; open_clip's VisionTransformer) and patches
their blocks, patch embeddings, norms and heads per instance: one file per host library
(`timm.py`, `transformers.py`, `open_clip.py`) says what and how. Nothing is copied: the fused
forwards read the model's own `Parameter`s at every call. Nothing outside the instance changes: no
class, and nothing in `torch.nn`, `timm`, `transformers` or `open_clip`, is ever assigned.

`apply` is idempotent (a second call first reverts the first) and `revert` restores every patched
method (`"forward" not in module.__dict__` again). Call it on the eager model before `torch.compile`
(a compiled module is refused, saying so); DDP/FSDP or PEFT wrapping may come before or after.
`torch.save(model)` of a patched model loads back unpatched (apply again after loading);
`torch.jit.script` and `torch.fx.symbolic_trace` need the unpatched model (`revert` first): the
fused forwards branch on the modules and dtypes they find at each call.

Note: `vitkern.apply` is this package's `apply` function, re-exported; the package itself is reached
as `from vitkern.apply import timm` (or `import vitkern.apply.timm` without `as`).
"""

from __future__ import annotations

from typing import Any, List

from torch import nn

from vitkern import dispatch
from vitkern.model import ViT
from vitkern.apply._core import (
    RECORD_ATTR, ApplyReport, Patcher, _Record, check_model, refresh_classes, revert_record, warn_empty,
)
from vitkern.apply import open_clip as _open_clip
from vitkern.apply import timm as _timm
from vitkern.apply import transformers as _transformers
from vitkern.apply.transformers import register_hf_attention

_LIBRARIES = (_timm, _transformers, _open_clip)


def apply(model: nn.Module, *, backend: str = "auto") -> ApplyReport:
    """Run `model`'s vision transformers on vitkern's fused ops, in place; returns what was done.

    model: any nn.Module containing one or more supported models (a classifier, a CLIP model, a PEFT
    or DDP wrapper...). backend: "auto" (each op picks its fastest implementation per call), or
    "eager", "triton", "cuda": every fused op then runs on that backend or raises, naming why.
    Returns an `ApplyReport`: each fused module and, for each module found but left on its host's
    code (an option vitkern does not implement: RoPE, SwiGLU, relative position bias, scaled-cosine
    attention, ...), why. A model with nothing vitkern can run gets an empty report and a warning.

    Raises (saying what to do) for a model on the meta device, a torch.compile'd module, or a call
    made while torch.compile is tracing.
    """
    check_model(model)
    if backend not in ("auto",) + dispatch.BACKENDS:  # raise here, not at the first forward
        raise ValueError(f"backend must be one of {('auto',) + dispatch.BACKENDS}, got {backend!r}")
    unavailable = dispatch.backend_unavailable_reasons(backend) if backend != "auto" else []
    if unavailable:
        raise dispatch.BackendUnavailableError(
            f"backend={backend!r} cannot run in this process:\n  - " + "\n  - ".join(unavailable))
    revert(model)  # idempotent: a second apply starts from the original forwards
    refresh_classes()
    report = ApplyReport(backend)
    record = _Record(report)
    patcher = Patcher(record, backend)
    taken: List[str] = []
    for library in _LIBRARIES:
        found = [(name, m) for name, m in library.find(model)
                 if not any(name == t or name.startswith(t + ".") for t in taken)]
        for name, m in found:
            library.apply_to(m, name, patcher, report)
            taken.append(name)
        if found and library.LIBRARY not in report.libraries:
            report.libraries.append(library.LIBRARY)
    if record.patches:
        model.__dict__[RECORD_ATTR] = record
    own = [name for name, m in model.named_modules() if isinstance(m, ViT)
           and not any(name == t or name.startswith(t + ".") for t in taken)]
    for name in own:
        report.leave(name, "vitkern's own ViT: it runs the fused ops already (its `backend` attribute picks them)")
    if not report.fused and not own:
        warn_empty(model, report)
    return report


def revert(model: nn.Module) -> bool:
    """Undo `vitkern.apply` on `model` (and on any sub-module it was applied to): every patched method
    is the host's again. Returns True when something was reverted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"vitkern.revert takes an nn.Module, got {type(model).__name__}")
    done = False
    for module in model.modules():
        done = revert_record(module) or done
    return done


def applied(model: nn.Module) -> Any:
    """The ApplyReport of the `apply` in effect on `model`, or None."""
    record = model.__dict__.get(RECORD_ATTR)
    return None if record is None else record.report


__all__ = ["apply", "revert", "applied", "ApplyReport", "register_hf_attention"]
