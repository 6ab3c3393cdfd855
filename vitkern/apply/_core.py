"""What every host library shares: the per-instance patch record, the report, the "is this sub-module
still plain" checks and the fused forwards of single modules (LayerNorm, Linear, activation).

How a module is patched. `patch(module, fn, ...)` stores `types.MethodType(fn, module)` in the
instance's `__dict__` under "forward" (or another method name: open_clip's `_embeds`). `nn.Module.__call__`
looks `self.forward` up on the instance first, so that one module runs `fn`, and nothing else does: no
class, no `torch.nn`, `timm`, `transformers` or `open_clip` attribute is ever assigned. The module keeps
its own `__call__`, so its hooks, `torch.utils.checkpoint` / HF gradient checkpointing and `torch.compile`
see it as before; its parameters are read at call time (`module.weight`), so the fused forward uses the
very `Parameter` objects of the model: `.to()`, `.half()`, optimizers, DDP/FSDP wrappers, `state_dict`
and `save_pretrained` see nothing new. `copy.deepcopy` rebinds the method to the copy (EMA models).

What was there before (an instance attribute of the same name, usually none) is kept in a `_Record` on
the root module, and `revert` puts it back; the backend rides on the instance as `_vitkern_backend`.

Plain sub-modules. A fused forward reads the weights of its children instead of calling them; that is
the host's computation only while each child is the host's own class, with no hook, no parametrization
(another class) and no forward of its own set on the instance by someone else. `plain()` checks exactly
that, per call (a few `type()` and dict checks: hooks added or modules swapped after `apply`, e.g. by
PEFT, are seen on the next call). A child that is not plain is called as a module, as the host would.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import fusion, ops

RECORD_ATTR = "_vitkern_apply_record"
BACKEND_ATTR = "_vitkern_backend"


class _Missing:
    """The sentinel for "no instance attribute before apply": one object, also across pickling and
    deepcopy (a record travels with a saved or copied model)."""

    def __reduce__(self) -> str:
        return "_MISSING"

    def __repr__(self) -> str:
        return "<no instance attribute>"


_MISSING = _Missing()


# --------------------------------------------------------------------------------------------
# The report


class ApplyReport:
    """What `vitkern.apply` did to one model: the modules now running on vitkern's ops and, for every
    module it found but left on its host's code, why.

    fused: [(module name, what runs fused)], left: [(module name, why it was left alone)], both in
    `model.named_modules()` order; libraries: the host libraries whose models were found; backend: the
    `backend=` the fused forwards pass to the ops. `str(report)` is a readable table; an empty report
    (`not report.fused`) means nothing in the model could run on vitkern.

    Decisions taken per call (a hook added after `apply`, `output_attentions=True`, an attention mask,
    dropout in training) are not in the report: the module then calls its sub-modules as the host does
    for that call (see each library's module docstring).
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.fused: List[Tuple[str, str]] = []
        self.left: List[Tuple[str, str]] = []
        self.libraries: List[str] = []

    def fuse(self, name: str, what: str) -> None:
        self.fused.append((name or "<model>", what))

    def leave(self, name: str, why: str) -> None:
        self.left.append((name or "<model>", why))

    def __bool__(self) -> bool:
        return bool(self.fused)

    def __len__(self) -> int:
        return len(self.fused)

    def __repr__(self) -> str:
        return (f"ApplyReport(backend={self.backend!r}, libraries={self.libraries}, fused={len(self.fused)} modules, "
                f"left={len(self.left)} modules)")

    def __str__(self) -> str:
        lines = [f"vitkern.apply (backend={self.backend!r}; {', '.join(self.libraries) or 'no supported library'}): "
                 f"{len(self.fused)} modules fused, {len(self.left)} left on their own code"]
        if self.fused:
            lines.append("fused:")
            lines += [f"  {name}: {what}" for name, what in self.fused]
        if self.left:
            lines.append("left alone:")
            lines += [f"  {name}: {why}" for name, why in self.left]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Patching and reverting


class _Record:
    """Kept on the root module (a plain attribute: not a sub-module, not in state_dict): every
    (module, method name, previous instance attribute or _MISSING) patched, and the report."""

    def __init__(self, report: ApplyReport) -> None:
        self.patches: List[Tuple[nn.Module, str, Any]] = []
        self.report = report


def fused_forward(fn: Optional[Callable] = None, *, method: str = "forward") -> Callable:
    """Marks `fn` as one of vitkern's fused forwards (plain() accepts a child running one), to be
    bound as the instance's `method`. Its __name__ becomes `method`: a bound method pickles as
    getattr(module, __name__), so `torch.save(model)` of a patched model stores a reference to the
    host's method, and the loaded model comes back unpatched instead of failing to load (the
    qualified name, which tracebacks and profilers show, stays vitkern's)."""
    def mark(f: Callable) -> Callable:
        f._vitkern_fused = True
        f.__name__ = method
        return f

    return mark(fn) if fn is not None else mark


def is_ours(method: Any) -> bool:
    return getattr(getattr(method, "__func__", None), "_vitkern_fused", False)


def _is_class_default(module: nn.Module, name: str, value: Any) -> bool:
    """`value` is the class's own method bound to `module` (what a pickled patched model gets back on
    unpickling, since a bound method pickles as getattr(module, name)): the same as no attribute."""
    own = getattr(type(module), name, None)
    return getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is own


class Patcher:
    """Collects the patches of one `apply` call into its record."""

    def __init__(self, record: _Record, backend: str) -> None:
        self.record = record
        self.backend = backend
        self.done: set = set()  # id(module, name): a module reached twice is patched once

    def patch(self, module: nn.Module, fn: Callable, name: str = "forward") -> bool:
        key = (id(module), name)
        if key in self.done:
            return True
        self.done.add(key)
        old = module.__dict__.get(name, _MISSING)
        if old is not _MISSING and _is_class_default(module, name, old):
            old = _MISSING
        if old is not _MISSING and not is_ours(old):
            # Someone set this instance's forward already (another patcher, a debugging hook): theirs
            # would be silently replaced, so this module stays as it is (and `apply_to` reports it).
            self.done.discard(key)
            return False
        module.__dict__[name] = types.MethodType(fn, module)
        module.__dict__[BACKEND_ATTR] = self.backend
        self.record.patches.append((module, name, old))
        return True


def revert_record(root: nn.Module) -> bool:
    """Undo the record kept on `root` (if any); True when there was one."""
    record = root.__dict__.pop(RECORD_ATTR, None)
    if record is None:
        return False
    foreign = []
    for module, name, old in reversed(record.patches):
        current = module.__dict__.get(name, _MISSING)
        if current is not _MISSING and _is_class_default(module, name, current):
            current = _MISSING  # an unpickled copy: the method came back as the class's own
        if current is not _MISSING and not is_ours(current):
            foreign.append(f"{type(module).__name__}.{name}")
            continue
        if old is _MISSING:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = old
        module.__dict__.pop(BACKEND_ATTR, None)
    if foreign:
        warnings.warn(f"vitkern.revert: {len(foreign)} methods were replaced by someone else after vitkern.apply "
                      f"and were left as they are: {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}",
                      stacklevel=3)
    return True


FOREIGN = "has an instance-level forward set by other code (not vitkern's): left as it is"


def backend_of(module: nn.Module) -> str:
    return module.__dict__.get(BACKEND_ATTR, "auto")


def original(module: nn.Module, name: str = "forward") -> Callable:
    """The host's own method `name` of `module` (its class's), bound: the unfused path."""
    return getattr(type(module), name).__get__(module, type(module))


# --------------------------------------------------------------------------------------------
# Plain sub-modules


def no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def own_forward(module: nn.Module) -> bool:
    """No instance-level forward, or one of vitkern's fused forwards (which compute the same)."""
    f = module.__dict__.get("forward")
    return f is None or is_ours(f)


def plain(module: Any, classes: Tuple[type, ...]) -> bool:
    """`module` is exactly one of `classes` (no subclass, no parametrization), with no hook and no
    foreign instance forward: its computation is its class's, so a fused op may read its weights."""
    return type(module) in classes and no_hooks(module) and own_forward(module)


def plain_identity(module: Any) -> bool:
    return module is None or plain(module, (nn.Identity,))


def inactive_dropout(module: Any, training: bool) -> bool:
    """A plain nn.Dropout (or Identity, or None) that is the identity in this call."""
    if plain_identity(module):
        return True
    return plain(module, (nn.Dropout,)) and (module.p == 0.0 or not training)


# Classes recognised by name in the host libraries, gathered (eagerly, by `refresh_classes`, which
# `apply` calls) from the modules already imported: the fused forwards read these tables, which
# torch.compile traces as constants.
_TABLES: Dict[str, Any] = {"layer_norm": (nn.LayerNorm,), "activations": {}}

# Activation classes computing one of the ops' activations (up to rounding), by qualified name.
_ACTIVATIONS = {
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.QuickGELU": "quick_gelu",
    "open_clip.transformer.QuickGELU": "quick_gelu",
    "transformers.activations.QuickGELUActivation": "quick_gelu",
    "transformers.activations.GELUActivation": "gelu",  # when its .act is F.gelu (not the Python formula)
    "transformers.activations.GELUTanh": "gelu_tanh",  # when its .act is F.gelu(approximate="tanh")
    "transformers.activations.NewGELUActivation": "gelu_tanh",  # the same tanh formula, written out
}


def refresh_classes() -> None:
    """Gather the LayerNorm and activation classes of the host libraries imported so far.

    LayerNorms whose forward is F.layer_norm over the last dim (with at most a cast back to the input
    dtype, which the op's output has anyway): torch's, timm's (unless its fast-norm path is on),
    open_clip's LayerNorm and LayerNormFp32 (the latter normalizes in fp32: the op's statistics are)."""
    classes = [nn.LayerNorm]
    timm_norm = sys.modules.get("timm.layers.norm")
    if timm_norm is not None:
        classes.append(timm_norm.LayerNorm)
    oc = sys.modules.get("open_clip.transformer")
    if oc is not None:
        classes += [oc.LayerNorm, oc.LayerNormFp32]
    _TABLES["layer_norm"] = tuple(classes)
    acts: Dict[type, str] = {nn.GELU: "gelu", fusion.QuickGELU: "quick_gelu"}
    for qualified_name, name in _ACTIVATIONS.items():
        module_name, _, cls_name = qualified_name.rpartition(".")
        module = sys.modules.get(module_name)
        cls = getattr(module, cls_name, None) if module is not None else None
        if isinstance(cls, type):
            acts[cls] = name
    _TABLES["activations"] = acts


def layer_norm_classes() -> Tuple[type, ...]:
    return _TABLES["layer_norm"]


def plain_layer_norm(module: Any) -> bool:
    return (plain(module, layer_norm_classes()) and len(module.normalized_shape) == 1
            and not getattr(module, "_fast_norm", False))


def ln_args(module: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor], float]:
    return module.weight, module.bias, module.eps


def linear_classes() -> Tuple[type, ...]:
    # nn.MultiheadAttention's out_proj is NonDynamicallyQuantizableLinear: nn.Linear's forward.
    return (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def plain_linear(module: Any) -> bool:
    return plain(module, linear_classes())


def linear_call(module: Any) -> Optional[fusion.LinearCall]:
    """The weights a fused op needs of a plain nn.Linear or a hook-free PEFT LoRA Linear (the
    adapters ride in the op's epilogue: vitkern.fusion), or None to call the module."""
    if plain_linear(module):
        return fusion.LinearCall(module.weight, module.bias, ())
    if fusion.linear_kind(module) == fusion.LORA and own_forward(module) and own_forward(module.base_layer):
        return fusion.linear_call(module, fusion.LORA)
    return None


def dtype_ok(x: Tensor, *params: Optional[Tensor]) -> bool:
    """The ops take one dtype: the input's and the parameters' agree (or autocast decides)."""
    if torch.is_autocast_enabled(x.device.type):
        return True
    return all(p is None or p.dtype == x.dtype for p in params)


# --------------------------------------------------------------------------------------------
# Activations: module -> the ops' activation name


def _is_partial_of(fn: Any, target: Callable, **kw: Any) -> bool:
    return isinstance(fn, functools.partial) and fn.func is target and not fn.args and fn.keywords == kw


def activation_name(module: Any) -> Optional[str]:
    """"gelu", "gelu_tanh" or "quick_gelu" for a hook-free activation module of torch, timm, HF,
    open_clip or vitkern computing exactly that (up to rounding), else None (then it is called)."""
    if not (isinstance(module, nn.Module) and no_hooks(module) and own_forward(module)):
        return None
    cls = type(module)
    if cls is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    name = _TABLES["activations"].get(cls)
    if name is not None and cls.__module__ == "transformers.activations":
        act = getattr(module, "act", None)
        if cls.__name__ == "GELUActivation" and act is not F.gelu:
            return None
        if cls.__name__ == "GELUTanh" and not _is_partial_of(act, F.gelu, approximate="tanh"):
            return None
    return name


# --------------------------------------------------------------------------------------------
# Fused forwards of single modules (the leaves every library shares)


@fused_forward
def layer_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    """LayerNorm over the last dim through `ops.layer_norm` (fp32 statistics)."""
    weight, bias = self.weight, self.bias
    if len(self.normalized_shape) == 1 and x.shape[-1] == self.normalized_shape[0] and dtype_ok(x, weight, bias) \
            and not getattr(self, "_fast_norm", False):
        return ops.layer_norm(x, weight, bias, self.eps, backend=backend_of(self))
    return original(self)(x)


@fused_forward
def linear_forward(self: nn.Module, x: Tensor) -> Tensor:
    """x @ weight^T + bias through `ops.linear`."""
    if x.dim() >= 1 and x.shape[-1] == self.in_features and dtype_ok(x, self.weight, self.bias):
        return ops.linear(x, self.weight, self.bias, backend=backend_of(self))
    return original(self)(x)


def run_linear(module: nn.Module, x: Tensor, backend: str, *, activation: Optional[str] = None,
               residual: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """residual + scale * act(module(x)): fused when `module` is a plain (or LoRA) linear, else the
    module is called and the epilogue runs as torch ops."""
    call = linear_call(module)
    if call is not None and dtype_ok(x, call.weight, call.bias):
        return fusion.run_linear(call, x, activation=activation, residual=residual, scale=scale, backend=backend)
    y = module(x)
    if activation is not None:
        y = fusion._activate(y, activation)
    if scale is not None:
        y = y * scale
    return y if residual is None else residual + y


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_model(model: Any) -> None:
    """Refuse what `apply` cannot patch, saying what to do instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"vitkern.apply takes an nn.Module, got {type(model).__name__}")
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "vitkern.apply was called while torch.compile is tracing. Patch the model once, before compiling: "
            "vitkern.apply(model); compiled = torch.compile(model)")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise TypeError(
            "vitkern.apply got a torch.compile'd module (OptimizedModule): its graphs were traced from the unpatched "
            "forwards. Apply to the original model first, then compile: vitkern.apply(model._orig_mod) and "
            "torch.compile(model._orig_mod) again (or vitkern.apply(model); model = torch.compile(model))")
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(
            f"the model's tensors are on the meta device ({len(meta)} of them, e.g. {meta[0]!r}): it has no weights "
            "yet. "
            "Load them first (from_pretrained, model.to_empty(device=...) + load_state_dict, or "
            "load_state_dict(..., assign=True)), then call vitkern.apply(model)")


def warn_empty(model: nn.Module, report: ApplyReport) -> None:
    why = f" Found but left alone: {'; '.join(f'{n}: {w}' for n, w in report.left[:4])}." if report.left else ""
    warnings.warn(
        f"vitkern.apply found nothing it can run in {type(model).__name__}: it supports timm's VisionTransformer "
        f"(and VisionTransformerDistilled), Hugging Face ViT/DeiT/DINOv2 (with registers)/CLIP/SigLIP vision models "
        f"and open_clip's VisionTransformer.{why} The model is unchanged.", stacklevel=3)
