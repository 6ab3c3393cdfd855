"""Input validation shared by the op families: errors that name the argument, expected vs. actual.

`check_*` raise for input no backend can take; `fused_backend_reasons` lists why a fused
(Triton or CUDA) backend cannot take a call, for `dispatch` to report or skip.
"""

from __future__ import annotations

from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> Tensor:
    """`value` must be a floating-point tensor of `ndim` (or at least `min_ndim`) dims."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {value.dim()} (shape {tuple(value.shape)})")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got {value.dim()} (shape {tuple(value.shape)})")
    return value


def check_shape(name: str, value: Optional[Tensor], expected: Sequence[int], what: str = "") -> None:
    """`value` (if given) must have shape `expected`; `what` explains where the expectation comes from."""
    if value is None:
        return
    check_tensor(name, value)
    if tuple(value.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{hint}, got {tuple(value.shape)}")


def check_same_device(call: Mapping[str, object]) -> None:
    """Every tensor among `call`'s values must be on one device (non-tensor values are ignored)."""
    named = [(n, t) for n, t in call.items() if isinstance(t, Tensor)]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must share a device")


def check_same_dtype(call: Mapping[str, object]) -> None:
    """Every tensor among `call`'s values must have the first one's dtype (that of x, or qkv).

    Every backend refuses a mix with the same message: the fused kernels read all operands in one
    dtype, and eager PyTorch would otherwise promote (an fp32 bias made an fp16 x's output fp32) or
    fail inside a matmul with a message naming neither argument."""
    named = [(n, t) for n, t in call.items() if isinstance(t, Tensor)]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} is {t.dtype} but {first_name} is {first.dtype}: vitkern's ops need inputs and weights "
                f"in one dtype on every backend (cast the model with .to(dtype), or {first_name} with .to({t.dtype}))"
            )


def check_activation(activation: Optional[str]) -> None:
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")


def fused_backend_reasons(
    call: Mapping[str, object],
    *,
    dtypes: Iterable[torch.dtype],
    allow_cpu: bool,
    backend: str,
) -> List[str]:
    """Why a fused backend cannot take the tensors among `call`'s values: an unsupported dtype, the
    device (non-tensor values are ignored). A mix of dtypes never gets here: `check_same_dtype`
    refuses it for every backend before dispatch."""
    reasons: List[str] = []
    named = [(n, t) for n, t in call.items() if isinstance(t, Tensor)]
    first_name, first = named[0]
    dtypes = tuple(dtypes)
    if first.dtype not in dtypes:
        reasons.append(f"{first_name} is {first.dtype}; the {backend} backend supports {', '.join(map(str, dtypes))}")
    if first.device.type != "cuda" and not allow_cpu:
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on the CPU)" if backend == "triton" else ""
        reasons.append(f"{first_name} is on {first.device}; the {backend} backend needs CUDA tensors{hint}")
    return reasons


def leading_numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n
