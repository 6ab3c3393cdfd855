"""torch.autocast for vitkern's ops: timm's numbers and dtypes under the same autocast.

Each public op asks `amp_dtype(t)` first. Off autocast (the common case) that is one call and
nothing changes. Under `torch.autocast(device, dtype)` the op applies the policy torch's autocast
applies to the modules timm calls, then runs itself with autocast off, so nothing below casts a
second time (the eager oracle's fp32 upcasts stay fp32, a fused kernel sees one dtype):

* patch embedding, LN + linear, linear, attention (the matmul-like ops, torch's "lower precision"
  list: conv2d, linear, SDPA): floating-point inputs are cast to the autocast dtype, accumulation
  stays fp32 inside every backend, LayerNorm statistics and the softmax stay fp32;
* what timm adds outside those ops keeps timm's dtype: the position embedding and prefix tokens of
  the patch embedding, the LayerScale and skip connection of a projection. With fp32 parameters
  that is timm's fp32 residual stream (bf16 branch + fp32 stream = fp32), so `forward_features`
  is fp32 and the logits of the head's Linear are in the autocast dtype, as timm's. The fused
  epilogue then takes the GEMM alone and the add runs as one torch op; when stream and branch share
  the autocast dtype (a model cast with .half()/.bfloat16()) the whole op stays fused;
* LayerNorm alone follows torch's per-device rule: fp32 on CUDA (layer_norm is in autocast's fp32
  list there), the input's dtype on the CPU (there it is not cast).

The casts are ordinary differentiable `Tensor.to` calls: parameters stay fp32 and their gradients
arrive in fp32, torch.compile and torch.export trace them as they trace autocast's own casts, and
each weight is cast once per use, as autocast casts it for F.linear. Float64 tensors are left alone
(autocast never casts float64), so a float64 call stays exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Device types whose autocast state torch keeps and vitkern's ops can run on.
_DEVICE_TYPES = ("cpu", "cuda")


def amp_dtype(t: object) -> Optional[torch.dtype]:
    """The dtype torch.autocast asks of matmul-like ops on t's device, or None when autocast is
    off there (or t is not a tensor on a device with an autocast state)."""
    if not isinstance(t, Tensor):
        return None
    device_type = t.device.type
    if device_type not in _DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in `dtype` as autocast casts: floating-point tensors other than float64; None passes."""
    if t is None or not t.is_floating_point() or t.dtype == dtype or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def promoted(dtype: torch.dtype, *tensors: Optional[Tensor]) -> torch.dtype:
    """`dtype` promoted with the dtypes of the given tensors (torch's type promotion; None skipped)."""
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def disabled(t: Tensor):
    """A context in which autocast is off for t's device (the op runs in the dtypes it was given)."""
    return torch.autocast(t.device.type, enabled=False)


def backend_for(op: str, backend: str, call: dict) -> str:
    """`backend`, or "auto" when it was named but cannot take this call: under autocast the dtype
    of a call is autocast's choice, not the caller's (an fp32 LayerNorm of the residual stream on a
    backend with 16-bit kernels only), so the best backend that can take it runs it instead."""
    from vitkern import dispatch

    name = dispatch.requested_backend(backend)
    if name == "auto":
        return backend
    impl = dispatch.implementations(op).get(name)
    if impl is None or impl.not_supported_reasons(call):
        return "auto"
    return backend


def layer_norm_dtype(x: Tensor) -> torch.dtype:
    """The dtype torch's autocast gives F.layer_norm of x: fp32 on CUDA (its fp32 list), x's own
    dtype elsewhere (not cast on the CPU)."""
    if x.device.type == "cuda" and x.dtype != torch.float64:
        return torch.float32
    return x.dtype
