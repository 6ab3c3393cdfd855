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


ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu")  # = vitkern.reference.ACTIVATIONS


def check_activation(activation: Optional[str]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_norm_args(name: str, value: object, dim: int, like: Tensor) -> Optional[Tuple[Optional[Tensor], Optional[Tensor], float]]:
    """`value` (QK-norm arguments) must be None or (weight [dim] or None, bias [dim] or None, eps > 0)
    with the tensors on like's device and in its dtype; returns it with eps as a float."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise TypeError(f"{name} must be None or a tuple (weight, bias, eps), got {type(value).__name__} {value!r}"[:200])
    weight, bias, eps = value
    for part, t in (("weight", weight), ("bias", bias)):
        check_shape(f"{name}'s {part}", t, (dim,), "head_dim")
        if t is not None and (t.device != like.device or t.dtype != like.dtype):
            raise TypeError(f"{name}'s {part} is {t.dtype} on {t.device}; it must match qkv: {like.dtype} on {like.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{name}'s eps must be a positive float, got {eps!r}")
    return (weight, bias, float(eps))


def check_keep(keep: object, batch: int, patches: int, device: torch.device) -> Tensor:
    """PatchDropout's kept patches: an int64 tensor [batch, kept], 1 <= kept <= patches, on `device`,
    every index in [0, patches). The values are checked without a host sync (torch._assert_async:
    an error on the CPU at once, a device-side assert on a GPU), and not while torch.compile traces."""
    if not isinstance(keep, Tensor):
        raise TypeError(f"keep must be a torch.Tensor of int64 patch indices, got {type(keep).__name__}")
    if keep.dtype != torch.int64:
        raise TypeError(f"keep must be int64 patch indices, got {keep.dtype}")
    if keep.dim() != 2 or keep.shape[0] != batch or not 1 <= keep.shape[1] <= patches:
        raise ValueError(f"keep must have shape (batch={batch}, kept) with 1 <= kept <= {patches} patches, "
                         f"got {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"keep is on {keep.device} but x is on {device}; all inputs must share a device")
    if keep.numel() and not torch.compiler.is_compiling():
        torch._assert_async(((keep >= 0) & (keep < patches)).all(), f"keep's indices must be in [0, {patches})")
    return keep


def check_cu_seqlens(cu_seqlens: object, max_seqlen: object, total: int, device: torch.device) -> Tuple[Tensor, int]:
    """Packed-sequence offsets (FlashAttention's varlen convention): cu_seqlens an int32 tensor
    [num_seqs + 1] on `device`, cu_seqlens[0] == 0, strictly increasing (no zero-length sequence),
    cu_seqlens[-1] == total (the packed tokens); max_seqlen None (computed) or an int >= every
    length. Returns (cu_seqlens, max_seqlen).

    The values are read on the host once (num_seqs + 1 ints): the launch grid needs max_seqlen,
    and a bad offset would otherwise make a kernel read another image's rows silently. Not while
    torch.compile traces (then max_seqlen must be given)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (FlashAttention's varlen convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D [num_seqs + 1] with at least one sequence, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but qkv is on {device}; both must share a device")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen <= 0):
        raise ValueError(f"max_seqlen must be None or a positive int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            raise ValueError("max_seqlen must be given under torch.compile (cu_seqlens cannot be read while tracing)")
        return cu_seqlens, int(max_seqlen)
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens {total} (qkv.shape[0]), got cu_seqlens[-1] = {offsets[-1]}")
    lengths = [e - s for s, e in zip(offsets[:-1], offsets[1:])]
    bad = next((i for i, n in enumerate(lengths) if n <= 0), None)
    if bad is not None:
        kind = "a zero-length sequence" if lengths[bad] == 0 else "not sorted"
        raise ValueError(f"cu_seqlens must be strictly increasing (every sequence at least one token), got "
                         f"cu_seqlens[{bad}] = {offsets[bad]} and cu_seqlens[{bad + 1}] = {offsets[bad + 1]}: {kind}")
    longest = max(lengths)
    if max_seqlen is None:
        max_seqlen = longest
    elif longest > max_seqlen:
        i = lengths.index(longest)
        raise ValueError(f"max_seqlen = {max_seqlen} but sequence {i} has {longest} tokens "
                         f"(cu_seqlens[{i}:{i + 2}] = {offsets[i:i + 2]}); max_seqlen must be >= every length")
    return cu_seqlens, int(max_seqlen)


def option_reasons(
    call: Mapping[str, object],
    backend: str,
    *,
    activations: Sequence[Optional[str]] = (None, "gelu"),
    scale: bool = False,
    qk_norm: bool = False,
    max_prefix_tokens: int = 1,
    no_embed_class: bool = False,
    keep: bool = False,
    varlen: bool = False,
) -> List[str]:
    """Why a backend's kernels lack an option of the ViT family that `call` uses (the options ride
    in the call only when set): an activation, LayerScale `scale`, QK-norm, more prefix tokens than
    the kernel writes, position embeddings that skip the prefix, PatchDropout's kept patches. Empty
    when the kernels have them."""
    reasons: List[str] = []
    activation = call.get("activation")
    if activation not in activations:
        reasons.append(f"activation={activation!r}; the {backend} kernels fuse {tuple(a for a in activations if a)} only")
    if isinstance(call.get("scale"), Tensor) and not scale:  # linear's LayerScale (attention's scale is a float)
        reasons.append(f"scale (LayerScale) is not in the {backend} linear epilogue")
    if (call.get("q_norm") is not None or call.get("k_norm") is not None) and not qk_norm:
        reasons.append(f"q_norm/k_norm (QK-norm) is not in the {backend} attention kernels")
    prefix = call.get("cls_token")
    if isinstance(prefix, Tensor) and prefix.shape[1] > max_prefix_tokens:
        reasons.append(f"{prefix.shape[1]} prefix tokens (cls_token {tuple(prefix.shape)}); the {backend} "
                       f"patch_embed writes at most {max_prefix_tokens}")
    if call.get("no_embed_class") and not no_embed_class:
        reasons.append(f"no_embed_class=True (pos_embed without the prefix tokens) is not in the {backend} patch_embed")
    if call.get("keep") is not None and not keep:
        reasons.append(f"keep (PatchDropout's kept patches) is not in the {backend} patch_embed")
    if call.get("cu_seqlens") is not None and not varlen:
        reasons.append(f"cu_seqlens (packed variable-length sequences) is not in the {backend} attention kernels")
    return reasons


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
