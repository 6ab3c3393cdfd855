"""Attention statistics for inspection: the probabilities' prefix rows, mean attention distance, the
head-averaged matrix, from the packed QKV projection and the attention forward's log-sum-exp.

    attention_stats(qkv, lse, num_heads, *, scale=None, num_prefix_tokens=1, grid=None,
                    patch_size=1, full=False, backend="auto") -> AttentionStats
    attention_with_stats(qkv, num_heads, *, scale=None, ..., backend="auto") -> (out, AttentionStats)

A sibling of `vitkern.ops.attention`, forward only: the fused forward never holds the [tokens,
tokens] probabilities, but it saves lse [batch, heads, tokens] (fp32), so p_ij = exp(scale q_i.k_j -
lse_i) is recomputed for exactly the rows asked for (vitkern/kernels/triton/attention_stats.py,
csrc/attention_stats.cu). `attention_with_stats` runs the same attention forward kernel as
`vitkern.ops.attention` on the same backend (so `out` is the same tensor, bit for bit) and hands its
lse to the statistics pass. validate -> dispatch -> implementation (eager, triton, cuda).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from vitkern import dispatch, reference
from vitkern.ops import _autocast, _cuda
from vitkern.ops._checks import check_tensor, fused_backend_reasons
from vitkern.ops.attention import attention as _attention


class AttentionStats(NamedTuple):
    """What `attention_stats` returns, fp32 (fp64 for fp64 input on the eager backend):

    prefix_probs: [batch, heads, num_prefix_tokens, tokens], the softmax rows of the prefix
        (class, register) tokens; prefix_probs[:, :, 0] is the class token's attention map.
    distance: [batch, heads] mean attention distance in pixels (paper fig. 7 right): the mean over
        query patches i of sum_j p_ij ||pos_i - pos_j||, keys j over patches only, no
        renormalization; None unless `grid` was given.
    full: [batch, tokens, tokens] the probabilities fused over heads (mean unless `full` named "max"
        or "min"); None unless `full` was asked for.
    """

    prefix_probs: Tensor
    distance: Optional[Tensor]
    full: Optional[Tensor]


PatchSize = Union[float, Sequence[float]]
FUSIONS = {"mean": 1, "max": 2, "min": 3}  # the `full` codes of the kernels' schema (0: not asked for)


def _full_code(full: object) -> int:
    if full is False or full is None:
        return 0
    if full is True:
        return FUSIONS["mean"]
    if isinstance(full, str) and full in FUSIONS:
        return FUSIONS[full]
    raise ValueError(f"full must be False, True (= 'mean'), 'mean', 'max' or 'min', got {full!r}")


def _check_qkv(qkv: object, num_heads: object) -> Tuple[int, int, int]:
    """(batch, tokens, head_dim) of a valid packed qkv; raises naming the argument otherwise."""
    check_tensor("qkv", qkv, ndim=3)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    three_dim = qkv.shape[-1]
    if three_dim % 3 != 0:
        raise ValueError(f"qkv's last dim must be 3 * dim (packed q, k, v), got {three_dim}, not a multiple of 3")
    if (three_dim // 3) % num_heads != 0:
        raise ValueError(f"dim = qkv.shape[-1] / 3 = {three_dim // 3} must be divisible by num_heads = {num_heads}")
    if qkv.shape[0] == 0 or qkv.shape[1] == 0:
        raise ValueError(f"qkv must have at least one batch element and one token, got shape {tuple(qkv.shape)}")
    return qkv.shape[0], qkv.shape[1], three_dim // 3 // num_heads


def _check_options(tokens: int, num_prefix_tokens: object, grid: object, patch_size: object) -> Tuple[int, Optional[Tuple[int, int]], Tuple[float, float]]:
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or not 0 <= num_prefix_tokens <= tokens:
        raise ValueError(f"num_prefix_tokens must be an int in [0, tokens={tokens}], got {num_prefix_tokens!r}")
    if grid is not None:
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
            raise ValueError(f"grid must be (grid_h, grid_w) of positive ints or None, got {grid!r}")
        if grid[0] * grid[1] != tokens - num_prefix_tokens:
            raise ValueError(
                f"grid {tuple(grid)} has {grid[0] * grid[1]} patches but qkv has tokens - num_prefix_tokens = "
                f"{tokens} - {num_prefix_tokens} = {tokens - num_prefix_tokens}"
            )
        grid = (int(grid[0]), int(grid[1]))
    if isinstance(patch_size, (int, float)) and not isinstance(patch_size, bool):
        patch = (float(patch_size), float(patch_size))
    elif isinstance(patch_size, (tuple, list)) and len(patch_size) == 2 and all(isinstance(p, (int, float)) for p in patch_size):
        patch = (float(patch_size[0]), float(patch_size[1]))
    else:
        raise TypeError(f"patch_size must be a number or (height, width), got {patch_size!r}")
    if not (patch[0] > 0 and patch[1] > 0):
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    return num_prefix_tokens, grid, patch


def attention_stats(
    qkv: Tensor,
    lse: Optional[Tensor],
    num_heads: int,
    *,
    scale: Optional[float] = None,
    num_prefix_tokens: int = 1,
    grid: Optional[Tuple[int, int]] = None,
    patch_size: PatchSize = 1,
    full: Union[bool, str] = False,
    backend: str = "auto",
    cu_seqlens: Optional[Tensor] = None,
) -> AttentionStats:
    """Statistics of softmax(q k^T * scale) per head, without the [tokens, tokens] matrix unless
    `full`.

    qkv: [batch, tokens, 3 * dim] (timm's packed order); lse: [batch, heads, tokens] fp32, the
    natural-log log-sum-exp of each softmax row that the attention forward saved (None: run that
    forward here first; `attention_with_stats` shares it instead). num_prefix_tokens: the class and
    register tokens before the patches (their rows are returned). grid: (grid_h, grid_w) of the
    patch tokens, row-major; with it the mean attention distance is computed, in units of
    patch_size (pixels per grid step; a number or (height, width)). full: also return the
    probabilities [batch, tokens, tokens] fused over heads: True or "mean" averages them, "max" and
    "min" take the elementwise extreme (attention rollout's head fusions). See `AttentionStats`.

    Packed sequences (cu_seqlens: int32 [num_seqs + 1], as `vitkern.ops.attention` takes them):
    qkv is [total_tokens, 3 * dim], lse [heads, total_tokens] fp32 or None, grid None or one
    (grid_h, grid_w) per image; returns a list with one AttentionStats per image (batch 1), each
    over that image's own tokens only.
    """
    amp = _autocast.amp_dtype(qkv)
    if amp is not None:  # the attention's operands in the autocast dtype, as vitkern.ops.attention reads them
        with _autocast.disabled(qkv):
            return attention_stats(_autocast.cast(qkv, amp), lse, num_heads, scale=scale,
                                   num_prefix_tokens=num_prefix_tokens, grid=grid, patch_size=patch_size, full=full,
                                   backend=backend, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        return _packed_stats(qkv, lse, num_heads, scale, num_prefix_tokens, grid, patch_size, full, backend, cu_seqlens)
    b, t, _ = _check_qkv(qkv, num_heads)
    prefix, grid, patch = _check_options(t, num_prefix_tokens, grid, patch_size)
    full = _full_code(full)
    scale = None if scale is None else float(scale)
    if lse is None:
        _, lse = _forward_with_lse(qkv, num_heads, scale, backend)
    check_tensor("lse", lse, ndim=3)
    if tuple(lse.shape) != (b, num_heads, t):
        raise ValueError(f"lse must have shape [batch, heads, tokens] = {(b, num_heads, t)}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32 and not (qkv.dtype == torch.float64 and lse.dtype == torch.float64):
        raise TypeError(f"lse must be float32 (the forward's softmax statistics), got {lse.dtype}")
    if lse.device != qkv.device:
        raise ValueError(f"lse is on {lse.device} but qkv is on {qkv.device}; both must share a device")
    call = dict(qkv=qkv, lse=lse, num_heads=num_heads, scale=scale, num_prefix_tokens=prefix, grid=grid,
                patch_size=patch, full=full)  # fmt: skip
    impl = dispatch.select("attention_stats", backend, qkv.device, call)
    return impl.fn(**call)


def attention_with_stats(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Optional[float] = None,
    num_prefix_tokens: int = 1,
    grid: Optional[Tuple[int, int]] = None,
    patch_size: PatchSize = 1,
    full: Union[bool, str] = False,
    backend: str = "auto",
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, AttentionStats]:
    """`vitkern.ops.attention(qkv, num_heads, scale=scale, backend=backend)` and the statistics of
    its probabilities (`attention_stats`, same options) from the lse that forward saved.

    Returns (out [batch, tokens, dim] in qkv's dtype, AttentionStats). `out` comes from the same
    kernel `vitkern.ops.attention` runs on the same backend. With autograd recording (qkv requires
    grad), `out` is `vitkern.ops.attention`'s, differentiable, and the statistics come from a
    second, gradient-free forward.
    Packed sequences (cu_seqlens): qkv [total_tokens, 3 * dim] -> (out [total_tokens, dim], a list
    of one AttentionStats per image), as `attention_stats` with cu_seqlens.
    """
    amp = _autocast.amp_dtype(qkv)
    if amp is not None:  # as vitkern.ops.attention under autocast: operands and out in the autocast dtype
        with _autocast.disabled(qkv):
            return attention_with_stats(_autocast.cast(qkv, amp), num_heads, scale=scale,
                                        num_prefix_tokens=num_prefix_tokens, grid=grid, patch_size=patch_size,
                                        full=full, backend=backend, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        out = _attention(qkv, num_heads, scale=scale, cu_seqlens=cu_seqlens, backend=backend)
        with torch.no_grad():
            stats = _packed_stats(qkv.detach(), None, num_heads, scale, num_prefix_tokens, grid, patch_size, full,
                                  backend, cu_seqlens)
        return out, stats
    b, t, _ = _check_qkv(qkv, num_heads)
    _check_options(t, num_prefix_tokens, grid, patch_size)
    _full_code(full)
    scale = None if scale is None else float(scale)
    if torch.is_grad_enabled() and qkv.requires_grad:
        out = _attention(qkv, num_heads, scale=scale, backend=backend)
        with torch.no_grad():
            _, lse = _forward_with_lse(qkv.detach(), num_heads, scale, backend)
        qkv_stats = qkv.detach()
    else:
        out, lse = _forward_with_lse(qkv, num_heads, scale, backend)
        qkv_stats = qkv
    stats_backend = _stats_backend(backend, qkv_stats, lse, num_heads, scale, num_prefix_tokens, grid, patch_size, full)
    stats = attention_stats(qkv_stats, lse, num_heads, scale=scale, num_prefix_tokens=num_prefix_tokens, grid=grid,
                            patch_size=patch_size, full=full, backend=stats_backend)  # fmt: skip
    return out, stats


def _packed_stats(qkv, lse, num_heads, scale, num_prefix_tokens, grid, patch_size, full, backend,
                  cu_seqlens) -> List[AttentionStats]:
    """`attention_stats` per image of a packed batch: each image's rows of qkv (and lse) as a batch
    of one, so every map covers that image's tokens only."""
    from vitkern.ops._checks import check_cu_seqlens

    check_tensor("qkv", qkv)
    if qkv.dim() != 2:
        raise ValueError(f"with cu_seqlens, qkv must be packed [total_tokens, 3 * dim] (2 dims), got shape {tuple(qkv.shape)}")
    cu_seqlens, _ = check_cu_seqlens(cu_seqlens, None, qkv.shape[0], qkv.device)
    bounds = reference._bounds(cu_seqlens)
    if lse is not None:
        check_tensor("lse", lse, ndim=2)
        if tuple(lse.shape) != (num_heads, qkv.shape[0]):
            raise ValueError(f"with cu_seqlens, lse must have shape [heads, total_tokens] = {(num_heads, qkv.shape[0])}, "
                             f"got {tuple(lse.shape)}")
    if grid is None:
        grids = [None] * len(bounds)
    elif isinstance(grid, (list, tuple)) and len(grid) == len(bounds) and all(isinstance(g, (list, tuple)) for g in grid):
        grids = list(grid)
    else:
        raise ValueError(f"with cu_seqlens, grid must be None or one (grid_h, grid_w) per image ({len(bounds)}), got {grid!r}"[:300])
    return [
        attention_stats(qkv[s:e].unsqueeze(0), None if lse is None else lse[:, s:e].unsqueeze(0), num_heads,
                        scale=scale, num_prefix_tokens=num_prefix_tokens, grid=None if g is None else tuple(g),
                        patch_size=patch_size, full=full, backend=backend)
        for (s, e), g in zip(bounds, grids)
    ]


# --------------------------------------------------------------------------------------------
# The attention forward with its lse, per backend


def _default_scale(qkv: Tensor, num_heads: int, scale: Optional[float]) -> float:
    return (qkv.shape[-1] // 3 // num_heads) ** -0.5 if scale is None else float(scale)


def _attention_backend(qkv: Tensor, num_heads: int, scale: Optional[float], backend: str) -> str:
    """The backend `vitkern.ops.attention` runs this call on."""
    call = dict(qkv=qkv, num_heads=num_heads, scale=scale)
    return dispatch.select("attention", backend, qkv.device, call).backend


def _forward_with_lse(qkv: Tensor, num_heads: int, scale: Optional[float], backend: str) -> Tuple[Tensor, Tensor]:
    """(out [batch, tokens, dim], lse [batch, heads, tokens] fp32) from the forward kernel that
    `vitkern.ops.attention` uses for this call (its registered forward op, which returns both)."""
    chosen = _attention_backend(qkv, num_heads, scale, backend)
    s = _default_scale(qkv, num_heads, scale)
    if chosen == "triton":
        fwd = _library_op("vitkern", "attention_fwd")
        if fwd is not None:
            return fwd(qkv if qkv.stride(-1) == 1 else qkv.contiguous(), num_heads, s)
    elif chosen == "cuda":
        if not _cuda._READY:
            _cuda._ensure_loaded()
        fwd = _library_op(_cuda.OPS_NAMESPACE, "cuda_attention_fwd")
        if fwd is not None:
            return fwd(qkv, num_heads, s)
    elif chosen == "eager":
        return reference.attention(qkv, num_heads, scale=scale), _eager_lse(qkv, num_heads, s)
    # A backend whose forward op is not reachable under its known name: its public output and an
    # eager lse (correct, only slower).
    return _attention(qkv, num_heads, scale=scale, backend=chosen), _eager_lse(qkv, num_heads, s)


def _library_op(namespace: str, name: str):
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def _stats_backend(backend, qkv, lse, num_heads, scale, prefix, grid, patch_size, full) -> str:
    """The attention's own backend when it can run the statistics too, else the automatic choice."""
    chosen = _attention_backend(qkv, num_heads, scale, backend)
    impl = dispatch.implementations("attention_stats").get(chosen)
    _, grid, patch = _check_options(qkv.shape[1], prefix, grid, patch_size)
    call = dict(qkv=qkv, lse=lse, num_heads=num_heads, scale=scale, num_prefix_tokens=prefix, grid=grid,
                patch_size=patch, full=_full_code(full))  # fmt: skip
    if impl is not None and not impl.not_supported_reasons(call):
        return chosen
    return backend


# --------------------------------------------------------------------------------------------
# Eager: the readable definition (also the oracle's shape of the computation)


def _acc_dtype(qkv: Tensor) -> torch.dtype:
    return torch.float64 if qkv.dtype == torch.float64 else torch.float32


def _scores(qkv: Tensor, num_heads: int, scale: float) -> Tensor:
    """scale * q k^T per head, [batch, heads, tokens, tokens] in fp32 (fp64 for fp64)."""
    b, t, three_dim = qkv.shape
    head_dim = three_dim // 3 // num_heads
    q, k = qkv.reshape(b, t, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)[:2].to(_acc_dtype(qkv)).unbind(0)
    return (q @ k.transpose(-2, -1)) * scale


def _eager_lse(qkv: Tensor, num_heads: int, scale: float) -> Tensor:
    return torch.logsumexp(_scores(qkv, num_heads, scale), dim=-1).to(torch.float32 if qkv.dtype != torch.float64 else torch.float64)


def patch_distances(grid: Tuple[int, int], patch_size: Tuple[float, float], *, device=None, dtype=torch.float32) -> Tensor:
    """||pos_i - pos_j|| in pixels between the patches of a row-major grid: [patches, patches]."""
    rows = torch.arange(grid[0], device=device, dtype=dtype).repeat_interleave(grid[1]) * patch_size[0]
    cols = torch.arange(grid[1], device=device, dtype=dtype).repeat(grid[0]) * patch_size[1]
    return torch.sqrt((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2)


def _attention_stats_eager(qkv, lse, num_heads, scale, num_prefix_tokens, grid, patch_size, full) -> AttentionStats:
    s = _default_scale(qkv, num_heads, scale)
    probs = torch.exp(_scores(qkv, num_heads, s) - lse.to(_acc_dtype(qkv))[..., None])  # [b, h, t, t]
    p = num_prefix_tokens
    distance = None
    if grid is not None:
        d = patch_distances(grid, patch_size, device=qkv.device, dtype=probs.dtype)
        distance = (probs[:, :, p:, p:] * d).sum(-1).mean(-1)
    fused = None
    if full:
        fused = {1: lambda: probs.mean(dim=1), 2: lambda: probs.amax(dim=1), 3: lambda: probs.amin(dim=1)}[full]()
    return AttentionStats(probs[:, :, :p].contiguous(), distance, fused)


dispatch.register("attention_stats", "eager", _attention_stats_eager)
# torch's fused ops have no statistics kernel: the eager statistics (fp32 throughout) serve it.
dispatch.register("attention_stats", "torch", _attention_stats_eager)


def _as_stats(rows: Tensor, distance: Tensor, full: Tensor, want_dist: bool, want_full: bool) -> AttentionStats:
    return AttentionStats(rows, distance if want_dist else None, full if want_full else None)


def _fused_reasons(call, *, dtypes, allow_cpu: bool, backend: str) -> List[str]:
    # Only qkv's dtype decides (lse is fp32 by contract).
    return fused_backend_reasons({"qkv": call["qkv"]}, dtypes=dtypes, allow_cpu=allow_cpu, backend=backend)


def _flat_args(call) -> tuple:
    grid = call["grid"] or (0, 0)
    s = _default_scale(call["qkv"], call["num_heads"], call["scale"])
    return (call["num_heads"], s, call["num_prefix_tokens"], grid[0], grid[1], call["patch_size"][0],
            call["patch_size"][1], call["full"])  # fmt: skip


# --------------------------------------------------------------------------------------------
# Triton

if dispatch.triton_importable():
    from vitkern.kernels.triton import _common
    from vitkern.kernels.triton import attention_stats as _triton_stats

    TRITON_MAX_HEAD_DIM = 128  # q and k tiles of one head stay in registers

    @_common.library_op("vitkern::attention_stats")
    def attention_stats_op(
        qkv: Tensor, lse: Tensor, num_heads: int, scale: float, num_prefix_tokens: int, grid_h: int, grid_w: int,
        patch_h: float, patch_w: float, full: int,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """qkv: [batch, tokens, 3 * dim] (stride(-1) == 1); lse: [batch, heads, tokens] fp32
        contiguous -> (rows [batch, heads, num_prefix_tokens, tokens], distance [batch, heads] or
        [0] when grid_h == 0, full [batch, tokens, tokens] fused over heads (full: 1 mean, 2 max,
        3 min) or [0] when full == 0), fp32."""
        grid = (grid_h, grid_w) if grid_h > 0 else None
        return _triton_stats.attention_stats(qkv, lse, num_heads, scale, num_prefix_tokens, grid, (patch_h, patch_w), full)

    def _attention_stats_triton(qkv, lse, num_heads, scale, num_prefix_tokens, grid, patch_size, full) -> AttentionStats:
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        call = dict(qkv=qkv, num_heads=num_heads, scale=scale, grid=grid, patch_size=patch_size, full=full,
                    num_prefix_tokens=num_prefix_tokens)  # fmt: skip
        rows, dist, mat = torch.ops.vitkern.attention_stats(qkv, lse.contiguous(), *_flat_args(call))
        return _as_stats(rows, dist, mat, grid is not None, full)

    def _attention_stats_triton_reasons(call) -> List[str]:
        reasons = _fused_reasons(call, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                 allow_cpu=dispatch.triton_interpret(), backend="triton")  # fmt: skip
        qkv = call["qkv"]
        head_dim = qkv.shape[-1] // 3 // call["num_heads"]
        if head_dim > TRITON_MAX_HEAD_DIM:
            reasons.append(f"head_dim = {head_dim}; the triton attention statistics support head_dim <= {TRITON_MAX_HEAD_DIM}")
        if (qkv.shape[1] - 1) * abs(qkv.stride(1)) + qkv.shape[2] >= 2**31:
            reasons.append("one sample of qkv spans >= 2**31 elements; the triton kernels index inside a sample in int32")
        return reasons

    dispatch.register("attention_stats", "triton", _attention_stats_triton, supports=_attention_stats_triton_reasons)


# --------------------------------------------------------------------------------------------
# CUDA (csrc/attention_stats.cu, torch layer csrc/attention_stats_bindings.cpp)

CUDA_MAX_HEAD_DIM = 128  # csrc/attention_stats.cu stages one head's q and k rows in shared memory (fp32)
_CUDA_FAKES_DONE: set = set()


def _register_cuda_fake() -> None:
    ns = _cuda.OPS_NAMESPACE
    if ns in _CUDA_FAKES_DONE:
        return

    @torch.library.register_fake(f"{ns}::cuda_attention_stats")
    def _(qkv, lse, num_heads, scale, num_prefix_tokens, grid_h, grid_w, patch_h, patch_w, full):
        b, t, _ = qkv.shape
        f32 = torch.float32
        rows = qkv.new_empty((b, num_heads, num_prefix_tokens, t), dtype=f32)
        dist = qkv.new_empty((b, num_heads) if grid_h > 0 else (0,), dtype=f32)
        mat = qkv.new_empty((b, t, t) if full else (0,), dtype=f32)
        return rows, dist, mat

    _CUDA_FAKES_DONE.add(ns)


def _attention_stats_cuda(qkv, lse, num_heads, scale, num_prefix_tokens, grid, patch_size, full) -> AttentionStats:
    if not _cuda._READY:
        _cuda._ensure_loaded()
    _register_cuda_fake()
    call = dict(qkv=qkv, num_heads=num_heads, scale=scale, grid=grid, patch_size=patch_size, full=full,
                num_prefix_tokens=num_prefix_tokens)  # fmt: skip
    rows, dist, mat = _cuda._ops().cuda_attention_stats(qkv, lse.contiguous(), *_flat_args(call))
    return _as_stats(rows, dist, mat, grid is not None, full)


def _attention_stats_cuda_reasons(call) -> List[str]:
    reasons = _fused_reasons(call, dtypes=_cuda.DTYPES, allow_cpu=_cuda.ACCEPTS_CPU, backend="cuda")
    qkv = call["qkv"]
    head_dim = qkv.shape[-1] // 3 // call["num_heads"]
    if head_dim > CUDA_MAX_HEAD_DIM:
        reasons.append(f"head_dim = {head_dim}; the cuda attention statistics support head_dim <= {CUDA_MAX_HEAD_DIM}")
    if qkv.stride(-1) != 1:
        reasons.append(f"qkv has strides {tuple(qkv.stride())}; the cuda attention statistics need a contiguous last dim")
    return reasons


dispatch.register("attention_stats", "cuda", _attention_stats_cuda, supports=_attention_stats_cuda_reasons)

__all__ = ["AttentionStats", "attention_stats", "attention_with_stats", "patch_distances"]
