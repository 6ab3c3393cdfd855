"""Fused when it is safe, correct always: when a block may run its fused ops, and the fused calls
for plain and LoRA linears.

A vitkern `Block` fuses LayerNorm into the next projection and the residual add into the GEMM
epilogue, reading the sub-modules' weights instead of calling them. That is timm's computation
only while the sub-modules are the ones vitkern built: exact `nn.Linear` / `nn.LayerNorm` /
`nn.Identity` / `nn.Dropout` types (a parametrized module has another class), with no forward,
pre-forward or backward hook on them and no global module hook. Anything else (a swapped module, a
wrapper, a hook) makes the block call its sub-modules as timm's Block does, so hooks fire with
timm's tensors and wrappers see timm's inputs.

The one wrapper worth fusing is a PEFT LoRA layer (`peft.tuners.lora.layer.Linear`) without
dropout: the base weight runs through the fused op and the low-rank term s * (x A^T) B^T is added
through the `linear` op's residual epilogue (`run_linear`, `run_ln_linear` say what that costs).

The decision is a cached plan per block (`Block._plan`, built by `Block._make_plan`), checked per
call against `plan_key()` and the classes of the fused modules:

* hook registration: every module or global hook is registered through a
  `torch.utils.hooks.RemovableHandle`, whose class counter `next_id` grows with each one, so a
  new hook anywhere invalidates every plan (a plan that called modules is rebuilt on the next
  call anyway, so a removed hook brings the fused path back);
* module swaps: `Block`, `Attention` and `Mlp` count assignments and deletions of sub-modules
  (`WatchesSwaps`), which is how PEFT, `merge_and_unload` and hand surgery replace a layer;
* parametrizations change a module's class, which the per-call class check sees;
* pickling (`torch.save(model)`, `copy.deepcopy`) drops the plan (`Block.__getstate__`), and the
  key holds a token unique to this process (`_PROCESS`): counters restart in a new process, so a
  plan made elsewhere could otherwise meet a key equal to its own and skip a hook registered there.

The plan holds decisions about classes and hooks only, never a module's configuration: every
setting the fused path uses (LayerNorm eps and affine tensors, GELU's `approximate`, Dropout p,
DropPath's drop_prob, the training flag, LayerScale's gamma, Attention's scale, heads and
attn_drop, the linears' tensors) is read from the module on each call, so changing one after a
forward changes the next forward exactly as it would in timm (tests/test_dropin_surgery.py
mutates each of them).

Per call that is one tuple comparison and eleven `type()` checks per block (the six fused leaves,
the activation, LayerScale and QK-norm slots), instead of reading four
hook dicts of every sub-module (measured in tests/test_dropin_surgery.py). `_apply` (`.to()`,
`.half()`) needs no invalidation: the plan holds modules, never their tensors. Under
`torch.compile` the plan is recomputed at trace time instead (dynamo then guards on what it read),
so the compiled graph carries no check at all.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.utils.hooks import RemovableHandle

from vitkern import ops, reference

# --------------------------------------------------------------------------------------------
# Plain modules


def has_hooks(module: nn.Module) -> bool:
    """True when `module` has a forward, pre-forward or backward hook, or a global module hook is
    set: hooks only its __call__ runs."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    ) or global_hooks_registered()


def global_hooks_registered() -> bool:
    """True when a global module hook (torch.nn.modules.module.register_module_forward_hook etc.)
    is set: it fires on every sub-module call, which a fused op would skip."""
    m = _torch_module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks or m._global_backward_pre_hooks)


def is_plain(module: object, cls: type) -> bool:
    """`module` is exactly a `cls` (not a subclass, not parametrized) with no hooks."""
    return type(module) is cls and not has_hooks(module)


def is_plain_layer_norm(module: object) -> bool:
    # The parameters are read from _parameters: under a torch.fx trace, attribute access would
    # record graph nodes for a decision that is not part of the computation.
    if not is_plain(module, nn.LayerNorm):
        return False
    params = module._parameters
    return params.get("weight") is not None and params.get("bias") is not None


def is_plain_gelu(module: object) -> bool:
    return is_plain(module, nn.GELU) and module.approximate == "none"


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (timm's act_layer="quick_gelu")."""

    def forward(self, x: Tensor) -> Tensor:
        return reference.quick_gelu(x)


def _activate(x: Tensor, activation: Optional[str]) -> Tensor:
    """x through the named activation as the modules compute it (torch's GELU kernels, timm's
    QuickGELU formula): for the paths where it runs outside the fused epilogue."""
    if activation is None:
        return x
    if activation == "quick_gelu":
        return reference.quick_gelu(x)
    return F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")


_GELU_EPILOGUES = {"none": "gelu", "tanh": "gelu_tanh"}


def activation_of(module: object) -> Optional[str]:
    """The epilogue activation a plain activation module computes ("gelu", "gelu_tanh",
    "quick_gelu"), or None when it is anything else (then it is called as a module)."""
    if is_plain(module, nn.GELU) or is_plain(module, QuickGELU):
        return epilogue_activation(module)
    return None


def epilogue_activation(module: object) -> Optional[str]:
    """`activation_of` for a module whose class and hooks a plan has already checked: read on every
    call, since GELU's `approximate` can change after the plan was made."""
    if type(module) is nn.GELU:
        return _GELU_EPILOGUES.get(module.approximate)
    return "quick_gelu" if type(module) is QuickGELU else None


def is_plain_dropout(module: object) -> bool:
    return is_plain(module, nn.Dropout)


# --------------------------------------------------------------------------------------------
# Plan invalidation

_SWAPS = [0]  # bumped by every sub-module assignment or deletion in a WatchesSwaps module


class _ProcessToken:
    """Equal only to itself: a plan key made in another process (or unpickled) never matches."""

    __slots__ = ()

    def __reduce__(self):
        return (_ProcessToken, ())  # unpickled as a new token, equal to nothing of this process


_PROCESS = _ProcessToken()


def plan_key() -> Tuple[object, int, int]:
    """Changes whenever a hook is registered anywhere or a sub-module of a block is swapped; never
    equal to a key made in another process."""
    return (_PROCESS, RemovableHandle.next_id, _SWAPS[0])


class WatchesSwaps:
    """Mixin for the nn.Modules whose sub-modules a block fuses: a sub-module assigned, replaced
    or deleted invalidates the cached fusion plans (see the module docstring)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, nn.Module) or name in self.__dict__.get("_modules", ()):
            _SWAPS[0] += 1
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get("_modules", ()):
            _SWAPS[0] += 1
        super().__delattr__(name)

    def add_module(self, name: str, module: Optional[nn.Module]) -> None:
        _SWAPS[0] += 1
        super().add_module(name, module)


# --------------------------------------------------------------------------------------------
# Linears: plain nn.Linear or PEFT LoRA

PLAIN = "plain"
LORA = "lora"


def _peft_lora_linear_class() -> Optional[type]:
    # Only when PEFT is already imported (a model cannot hold its layers otherwise): vitkern does
    # not depend on peft.
    layer = sys.modules.get("peft.tuners.lora.layer")
    return getattr(layer, "Linear", None)


def linear_kind(module: object) -> Optional[str]:
    """PLAIN for a plain nn.Linear, LORA for a hook-free PEFT LoRA Linear, else None (call it)."""
    if is_plain(module, nn.Linear):
        return PLAIN
    lora_cls = _peft_lora_linear_class()
    if lora_cls is not None and type(module) is lora_cls and not has_hooks(module):
        return LORA
    return None


class Adapter(NamedTuple):
    """One active LoRA adapter: the term scaling * (x @ a^T) @ b^T (+ scaling * b_bias)."""

    a: Tensor  # [rank, in_features]
    b: Tensor  # [out_features, rank]
    b_bias: Optional[Tensor]  # [out_features] (PEFT's lora_bias=True) or None
    scaling: float


class LinearCall(NamedTuple):
    """What a fused op needs of a linear: the base weight [out, in], bias [out] or None, and the
    active LoRA adapters (empty for a plain or merged layer)."""

    weight: Tensor
    bias: Optional[Tensor]
    adapters: Tuple[Adapter, ...]


def _is_identity_dropout(module: object) -> bool:
    if is_plain(module, nn.Identity):
        return True
    return is_plain_dropout(module) and (module.p == 0.0 or not module.training)


def _lora_call(layer) -> Optional[LinearCall]:
    """The LoRA layer's computation as a LinearCall, or None when a fused op cannot reproduce its
    forward exactly (dropout, DoRA and other variants, hooks inside, mixed dtypes, or a merged
    layer with adapters disabled, whose forward unmerges)."""
    base = layer.base_layer
    if not is_plain(base, nn.Linear):
        return None
    if layer.disable_adapters:
        return None if layer.merged else LinearCall(base.weight, base.bias, ())
    if layer.merged:  # PEFT then runs the base layer alone: the adapters are in its weight
        return LinearCall(base.weight, base.bias, ())
    variants = getattr(layer, "lora_variant", {})
    use_dora = getattr(layer, "use_dora", {})
    adapters = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue  # PEFT skips it too
        if name in variants or use_dora.get(name, False):
            return None
        a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        if not (is_plain(a, nn.Linear) and is_plain(b, nn.Linear)) or a.bias is not None:
            return None
        if not _is_identity_dropout(dropout):
            return None
        dtypes = {m._parameters["weight"].dtype for m in (base, a, b)}  # (not traced by torch.fx)
        if len(dtypes) != 1:
            return None  # PEFT casts x to the adapter's dtype and back; keep its exact rounding
        scaling = layer.scaling[name]
        if not isinstance(scaling, (int, float)):
            return None
        adapters.append(Adapter(a.weight, b.weight, b.bias, float(scaling)))
    return LinearCall(base.weight, base.bias, tuple(adapters))


def linear_call(module, kind: Optional[str]) -> Optional[LinearCall]:
    """The LinearCall of a module of known `kind` (see `linear_kind`), or None to call the module."""
    if kind == PLAIN:
        return LinearCall(module.weight, module.bias, ())
    if kind == LORA:
        return _lora_call(module)
    return None


def _low_rank(x: Tensor, adapters: Tuple[Adapter, ...], residual: Optional[Tensor], backend: str) -> Optional[Tensor]:
    """residual + sum of the adapters' terms, each a rank-r GEMM pair whose add is the second
    GEMM's residual epilogue."""
    for ad in adapters:
        u = ops.linear(x, ad.a, backend=backend)  # [..., rank]
        b_bias = ad.b_bias * ad.scaling if ad.b_bias is not None else None
        residual = ops.linear(u, ad.b * ad.scaling, b_bias, residual=residual, backend=backend)
    return residual


def run_linear(
    call: LinearCall, x: Tensor, *, activation: Optional[str] = None, residual: Optional[Tensor] = None,
    scale: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    """residual + scale * act(x @ weight^T + bias + LoRA terms) through `ops.linear`.

    x: [..., in]; residual: [..., out] or None; scale: LayerScale's gamma [out] or None. Without
    activation or scale the LoRA terms ride in the residual epilogue: two rank-r GEMMs per adapter
    and one extra [..., out] read and write. With an activation or a scale they must enter before
    them, which the op's epilogue applies first: the base GEMM then adds them as its residual and
    the activation, scale and skip connection run as separate elementwise ops.
    """
    if not call.adapters:
        return ops.linear(x, call.weight, call.bias, activation=activation, residual=residual, scale=scale,
                          backend=backend)
    if activation is None and scale is None:
        low = _low_rank(x, call.adapters, residual, backend)
        return ops.linear(x, call.weight, call.bias, residual=low, backend=backend)
    pre = ops.linear(x, call.weight, call.bias, residual=_low_rank(x, call.adapters, None, backend), backend=backend)
    out = _activate(pre, activation)
    if scale is not None:
        out = out * scale
    return out if residual is None else out + residual


def run_ln_linear(
    norm: nn.LayerNorm, call: LinearCall, x: Tensor, *, activation: Optional[str] = None, backend: str = "auto"
) -> Tensor:
    """act(LayerNorm(x) @ weight^T + bias + LoRA terms) through `ops.ln_linear`.

    x: [..., dim] -> [..., out]. The LoRA input is the normalized x, which only the fused op
    holds: one more `ln_linear` per adapter onto its rank-r A (it re-reads x and recomputes the
    fp32 row statistics: one [..., dim] read and an r-wide GEMM) gives u = LN(x) A^T, and the
    rank-r B GEMM adds s * u B^T to the base op's output as its residual (one [..., out] read and
    write). With GELU the base op runs without its activation epilogue and GELU follows as a
    separate elementwise op (the terms must enter before it).
    activation: None or one of vitkern.reference.ACTIVATIONS.
    """
    eps = norm.eps
    if not call.adapters:
        return ops.ln_linear(x, norm.weight, norm.bias, call.weight, call.bias, eps=eps, activation=activation,
                             backend=backend)
    pre = ops.ln_linear(x, norm.weight, norm.bias, call.weight, call.bias, eps=eps, backend=backend)
    for ad in call.adapters:
        u = ops.ln_linear(x, norm.weight, norm.bias, ad.a, eps=eps, backend=backend)  # [..., rank]
        b_bias = ad.b_bias * ad.scaling if ad.b_bias is not None else None
        pre = ops.linear(u, ad.b * ad.scaling, b_bias, residual=pre, backend=backend)
    return _activate(pre, activation)


def call_linear(module: nn.Module, x: Tensor, *, backend: str = "auto") -> Tensor:
    """`module(x)`, through the fused op when the module is a plain or LoRA linear."""
    call = linear_call(module, linear_kind(module))
    return module(x) if call is None else run_linear(call, x, backend=backend)


def call_norm(module: nn.Module, x: Tensor, *, backend: str = "auto") -> Tensor:
    """`module(x)`, through `ops.layer_norm` when it is a plain LayerNorm."""
    if is_plain_layer_norm(module):
        return ops.layer_norm(x, module.weight, module.bias, module.eps, backend=backend)
    return module(x)


def is_plain_patch_conv(module: object) -> bool:
    """A plain nn.Conv2d that cuts whole patches (stride == kernel, no padding, dilation or groups):
    what `ops.patch_embed` computes."""
    return (
        is_plain(module, nn.Conv2d) and module.stride == module.kernel_size and module.padding == (0, 0)
        and module.dilation == (1, 1) and module.groups == 1
    )
