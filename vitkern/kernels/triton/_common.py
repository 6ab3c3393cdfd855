"""Helpers every Triton kernel file uses: output allocation (poisoned under test), the autotune
config list (one config in the interpreter), and the spec a kernel gives `vitkern.audit`.

Importing this module imports triton; the ops layer imports kernel files only when triton is
importable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1 at triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_index_compat() -> None:
    """Make the Triton interpreter's `tensor.__index__` work with NumPy >= 2.4.

    The interpreter holds every scalar (program ids, int arguments) as a shape-(1,) array, and
    `range(start, end, step)` in a kernel calls `__index__` on them. Triton 3.6 implements it as
    `int(self.handle.data)`, which NumPy 2.4 turned from a deprecation into a TypeError ("only
    0-dimensional arrays can be converted to Python scalars"), so under triton 3.6 + numpy 2.4
    every interpreted kernel with a runtime loop bound fails; Triton 3.8 squeezes the array first.
    Feature-detected, not version-parsed: the interpreter's own `__index__` is tried on a
    shape-(1,) array, and only when that raises is it wrapped to squeeze. Compiled (GPU) kernels
    never reach this code.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch_tensor is None or scope_type is None or getattr(patch_tensor, "_vitkern_compat", False):
        return

    class _Probe:
        class handle:
            data = np.array([1], dtype=np.int32)

    scope = scope_type()
    try:
        patch_tensor(tl.core.tensor, scope)
        try:
            tl.core.tensor.__index__(_Probe())
            return  # this interpreter already handles shape-(1,) scalars (Triton >= 3.8)
        except TypeError:
            pass
    finally:
        scope.restore()

    def patched(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))

    patched._vitkern_compat = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if interpreting():
    _interpreter_index_compat()


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, but filled with NaN when VITKERN_POISON_OUTPUTS=1 (the tests set it), so an
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("VITKERN_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out


def autotune_configs(configs: List[triton.Config]) -> List[triton.Config]:
    """The configs to autotune over: all of them on a GPU, the first one in the interpreter
    (which cannot benchmark several). The kernel code is the same either way; list the config
    that suits small test shapes first."""
    return configs[:1] if interpreting() else configs


@dataclass
class KernelSpec:
    """One compilable instance of a kernel, for `python -m vitkern.audit`.

    `signature` maps every non-constexpr argument to its Triton type ("*fp16", "i32", "fp32", ...);
    `constexprs` gives every tl.constexpr argument. `gemm_like` kernels must use wgmma on sm_90.
    """

    name: str
    fn: Callable[..., Any]
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    dtype: str = "fp16"
    gemm_like: bool = False
    label: str = field(default="")


def _is_fake_or_meta(value: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(value, torch.Tensor) and (is_fake(value) or value.device.type == "meta")


class _Launcher:
    """`launcher(kernel)[grid](*args)`: the one way every vitkern launcher starts a kernel.

    On a GPU it is `torch.library.wrap_triton(kernel)[grid](...)`, which launches outside tracing
    and is traced as a kernel call inside a `torch.library.triton_op` (torch.compile, opcheck).
    In the interpreter wrap_triton hands back the interpreted kernel itself, which must not run on
    the fake tensors of torch.library's fake path: there the launch is skipped (the launcher has
    already allocated its outputs, which is all the fake path needs).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            if interpreting():
                if any(_is_fake_or_meta(a) for a in (*args, *kwargs.values())):
                    return
                self.kernel[grid](*args, **kwargs)
            else:
                torch.library.wrap_triton(self.kernel)[grid](*args, **kwargs)

        return launch


def launcher(kernel: Any) -> _Launcher:
    return _Launcher(kernel)


def library_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator registering a launcher-calling function as the torch.library op `name`.

    On a GPU: `torch.library.triton_op`, so torch.compile sees the Triton kernels themselves. In
    the interpreter: an opaque `torch.library.custom_op` whose fake implementation is the same
    function (its launches are skipped on fake tensors, see `launcher`), because the interpreted
    kernels cannot be traced; the kernel code is the same either way.
    """
    if not interpreting():
        return torch.library.triton_op(name, mutates_args=())

    def register(fn: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register
