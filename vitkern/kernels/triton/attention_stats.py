"""Attention statistics for inspection, recomputed from q, k and the forward's log-sum-exp.

The fused attention forward never holds the [tokens, tokens] probabilities; it saves the fp32
log-sum-exp of every softmax row. Any row of the probabilities is then one dot product and one
exp away: p_ij = exp(scale * q_i . k_j - lse_i). These kernels do that second, forward-only pass:

    qkv   [batch, tokens, 3 * dim]   timm's packed layout (column c * dim + h * head_dim + j)
    lse   [batch, heads, tokens]     fp32 natural-log log-sum-exp of each softmax row

    _attention_stats_rows_kernel    one program per (batch, head, query block):
        rows   [batch, heads, prefix, tokens] fp32  the prefix (class/register) tokens' rows of p
        dist   [batch, heads, query blocks] fp32    per block, sum over its patch queries i and
                                                    patch keys j of p_ij * ||pos_i - pos_j|| (pixels)
      With no distance asked for, only the query blocks that hold prefix rows run (a few programs:
      the class-token maps cost about 1/tokens of an attention forward).
    _attention_stats_full_kernel    one program per (batch, query block, key block), heads looped
        full   [batch, tokens, tokens] fp32          the probabilities fused over heads (mean, max
                                                    or min: attention rollout's head fusions)
      Launched only when the full matrix is asked for.

Patch token i (i >= prefix) sits at grid row (i - prefix) // grid_w, column (i - prefix) % grid_w;
distances scale the grid steps by the patch height and width. Nothing is atomic: every output
element or partial sum has one writer, so the results are deterministic.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import _common

LOG2E = 1.4426950408889634


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would miss the fp32 tolerance of the probabilities).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _probs_tile(q, head, lse2, offs_m, offs_n, T, stride_qkv_t, dim, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """p [BLOCK_M, BLOCK_N] fp32 for queries offs_m (q already loaded) and keys offs_n of one head;
    zero outside [0, T) x [0, T) so sums over the tile need no further mask."""
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < T
    k = tl.load(head + dim + offs_n[:, None] * stride_qkv_t + offs_d[None, :],
                mask=n_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    return tl.where((offs_m < T)[:, None] & n_mask[None, :], p, 0.0)


@triton.jit
def _attention_stats_rows_kernel(
    QKV,  # [B, T, 3 * H * HEAD_DIM], last dim contiguous
    LSE,  # [B, H, T] fp32, contiguous
    ROWS,  # [B, H, P, T] fp32, contiguous (unused when not STORE_ROWS)
    DIST,  # [B, H, NUM_M] fp32, contiguous (unused when not WANT_DIST)
    T,
    H,
    P,  # prefix tokens (class, registers) before the patch tokens
    NUM_M,  # query blocks per (batch, head) this launch covers
    GRID_W,  # patch grid width (1 when no distance is asked for)
    patch_h,  # pixels per grid row / column step
    patch_w,
    stride_qkv_b,
    stride_qkv_t,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_ROWS: tl.constexpr,
    WANT_DIST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % NUM_M
    pid_bh = pid // NUM_M
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    dim = H * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    # As in the attention kernels: the batch offset in int64, offsets inside a sample in int32.
    head = QKV + b * stride_qkv_b + h * HEAD_DIM
    q = tl.load(head + offs_m[:, None] * stride_qkv_t + offs_d[None, :],
                mask=m_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, BLOCK_D]
    stats = pid_bh.to(tl.int64) * T
    lse2 = tl.load(LSE + stats + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634

    # Grid coordinates of the query patches; prefix rows get -1 and are masked out of the distance.
    # Pixel coordinates per query row and (in the loop) per key column, so that a (query, key) pair
    # costs two subtractions, the norm and one FMA (no integer division per pair).
    q_patch = m_mask & (offs_m >= P)
    qi = tl.where(q_patch, offs_m - P, 0)
    q_y = (qi // GRID_W).to(tl.float32) * patch_h
    q_x = (qi % GRID_W).to(tl.float32) * patch_w
    row_store = (offs_m < P)[:, None]
    rows_base = ROWS + pid_bh.to(tl.int64) * P * T + offs_m[:, None] * T
    dist_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        p = _probs_tile(q, head, lse2, offs_m, offs_n, T, stride_qkv_t, dim, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION)
        if STORE_ROWS:
            tl.store(rows_base + offs_n[None, :], p, mask=row_store & (offs_n < T)[None, :])
        if WANT_DIST:
            k_patch = (offs_n < T) & (offs_n >= P)
            kj = tl.where(k_patch, offs_n - P, 0)
            dy = q_y[:, None] - ((kj // GRID_W).to(tl.float32) * patch_h)[None, :]
            dx = q_x[:, None] - ((kj % GRID_W).to(tl.float32) * patch_w)[None, :]
            # Prefix queries and keys are dropped without renormalizing the patch rows (the
            # definition of mean attention distance the usual implementations share).
            keep = q_patch[:, None] & k_patch[None, :]
            dist_acc += tl.sum(tl.where(keep, p * tl.sqrt(dy * dy + dx * dx), 0.0), axis=1)
    if WANT_DIST:
        tl.store(DIST + pid_bh.to(tl.int64) * NUM_M + pid_m, tl.sum(dist_acc, axis=0))


@triton.jit
def _attention_stats_full_kernel(
    QKV,  # [B, T, 3 * H * HEAD_DIM], last dim contiguous
    LSE,  # [B, H, T] fp32, contiguous
    FULL,  # [B, T, T] fp32, contiguous
    T,
    H,
    stride_qkv_b,
    stride_qkv_t,
    qk_scale,  # scale * log2(e)
    inv_heads,  # 1 / H
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FUSION: tl.constexpr,  # 1 mean, 2 max, 3 min over heads
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(T, BLOCK_N)
    pid_n = pid % num_n
    pid_m = (pid // num_n) % num_m
    b = (pid // (num_n * num_m)).to(tl.int64)
    dim = H * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    q_mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    if FUSION == 3:
        acc = tl.full([BLOCK_M, BLOCK_N], float("inf"), dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # probabilities are >= 0: max starts at 0
    # Heads inside the program: the fusion is plain fp32 arithmetic with one writer per element.
    for h in range(0, H):
        head = QKV + b * stride_qkv_b + h * HEAD_DIM
        q = tl.load(head + offs_m[:, None] * stride_qkv_t + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        p = _probs_tile(q, head, lse2, offs_m, offs_n, T, stride_qkv_t, dim, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION)
        if FUSION == 1:
            acc += p
        elif FUSION == 2:
            acc = tl.maximum(acc, p)
        else:
            acc = tl.minimum(acc, p)
    if FUSION == 1:
        acc = acc * inv_heads
    out = FULL + b * T * T + offs_m[:, None] * T + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & (offs_n < T)[None, :])


# --------------------------------------------------------------------------------------------
# Tiles. The rows-only launch covers the prefix rows (usually one): 16 query rows (tl.dot's
# smallest M) keep its padding small. The distance pass touches every (query, key) pair once, like
# the attention forward's QK^T, with the forward's 64 x 64 tile (32 x 32 for fp32's FMA dots). Head
# dims are one masked chunk of the next power of two (>= 16): the stats pass has no PV product, so
# the padding of head dim 80 costs only the QK^T dot.


def _tiles(kind: str, dtype: torch.dtype, block_d: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of `kind` ("rows", "dist" or "full") for `dtype` and the padded
    head width. Audited: no spills on sm_80/sm_90 (16-bit 64 x 64 tiles take 8 warps at width 128,
    where 4 warps sit at sm_80's 255 registers; fp32's full tile is 16 x 32 there)."""
    if dtype == torch.float32:
        return {"rows": (16, 64, 4), "dist": (32, 32, 4), "full": (32, 32, 4) if block_d <= 64 else (16, 32, 4)}[kind]
    wide = 8 if block_d > 64 else 4
    return {"rows": (16, 64, 4), "dist": (64, 64, wide), "full": (64, 64, wide)}[kind]


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def attention_stats(
    qkv: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    scale: float,
    num_prefix_tokens: int,
    grid: Optional[Tuple[int, int]],
    patch_size: Tuple[float, float],
    full: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv: [batch, tokens, 3 * dim] fp16/bf16/fp32, stride(-1) == 1; lse: [batch, heads, tokens]
    fp32 contiguous (the attention forward's).

    Returns, all fp32: rows [batch, heads, num_prefix_tokens, tokens]; distance [batch, heads], the
    mean over query patches of sum_j p_ij d_ij in pixels (shape [0] when `grid` is None); full
    [batch, tokens, tokens] fused over heads, full = 1 mean, 2 max, 3 min (shape [0] when full = 0).
    """
    b, t, three_dim = qkv.shape
    dim = int(three_dim) // 3
    head_dim = dim // num_heads
    bd = block_d(head_dim)
    precision = _dot_precision(qkv.dtype)
    p = num_prefix_tokens
    want_dist = grid is not None
    rows = _common.empty((b, num_heads, p, t), dtype=torch.float32, device=qkv.device)

    tile = "dist" if want_dist else "rows"
    bm, bn, warps = _tiles(tile, qkv.dtype, bd)
    num_m = triton.cdiv(t, bm) if want_dist else triton.cdiv(p, bm)
    partial = _common.empty((b, num_heads, num_m) if want_dist else (0,), dtype=torch.float32, device=qkv.device)
    if num_m > 0:
        grid_w = grid[1] if want_dist else 1
        _common.launcher(_attention_stats_rows_kernel)[(b * num_heads * num_m,)](
            qkv, lse, rows, partial, t, num_heads, p, num_m, grid_w,
            float(patch_size[0]), float(patch_size[1]),
            qkv.stride(0), qkv.stride(1), scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, STORE_ROWS=p > 0, WANT_DIST=want_dist,
            DOT_PRECISION=precision, num_warps=warps,
        )  # fmt: skip
    if want_dist:
        # The few per-block partial sums (<= tokens / 64 of them) -> the mean over query patches.
        distance = partial.sum(dim=-1) / max(t - p, 1)
    else:
        distance = partial
    if full:
        out = _common.empty((b, t, t), dtype=torch.float32, device=qkv.device)
        fm, fn, fwarps = _tiles("full", qkv.dtype, bd)
        launch = (b * triton.cdiv(t, fm) * triton.cdiv(t, fn),)
        _common.launcher(_attention_stats_full_kernel)[launch](
            qkv, lse, out, t, num_heads, qkv.stride(0), qkv.stride(1), scale * LOG2E, 1.0 / num_heads,
            HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=fm, BLOCK_N=fn, FUSION=full, DOT_PRECISION=precision,
            num_warps=fwarps,
        )  # fmt: skip
    else:
        out = _common.empty((0,), dtype=torch.float32, device=qkv.device)
    return rows, distance, out


# --------------------------------------------------------------------------------------------
# AOT specs for `python -m vitkern.audit`: each kernel x tile x dtype at head dims 64 (ViT-B) and
# 80 (ViT-H/14, padded to 128 here). Strides typed "i32:16" as the runtime specializes them for
# contiguous ViT tensors (3D and T*3D are multiples of 16).

_AUDIT_HEAD_DIMS = (64, 80)
_AUDIT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _specs() -> List[_common.KernelSpec]:
    specs: List[_common.KernelSpec] = []
    strides = {"stride_qkv_b": "i32:16", "stride_qkv_t": "i32:16"}
    for dtype, torch_dtype in _AUDIT_DTYPES.items():
        ptr = f"*{dtype}"
        precision = _dot_precision(torch_dtype)
        for head_dim in _AUDIT_HEAD_DIMS:
            shape = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "DOT_PRECISION": precision}
            rows_sig = {"QKV": ptr, "LSE": "*fp32", "ROWS": "*fp32", "DIST": "*fp32", "T": "i32", "H": "i32",
                        "P": "i32", "NUM_M": "i32", "GRID_W": "i32", "patch_h": "fp32", "patch_w": "fp32",
                        **strides, "qk_scale": "fp32"}  # fmt: skip
            for tile, want_dist in (("rows", False), ("dist", True)):
                bm, bn, warps = _tiles(tile, torch_dtype, block_d(head_dim))
                specs.append(_common.KernelSpec(
                    "_attention_stats_rows_kernel", _attention_stats_rows_kernel, rows_sig,
                    {**shape, "BLOCK_M": bm, "BLOCK_N": bn, "STORE_ROWS": True, "WANT_DIST": want_dist},
                    num_warps=warps, num_stages=1, dtype=dtype,
                    # 16-row tiles cannot use wgmma (64 rows per warp group); the distance tile must.
                    gemm_like=bm >= 64, label=f"{tile} d{head_dim} M{bm} N{bn} w{warps}",
                ))  # fmt: skip
            full_sig = {"QKV": ptr, "LSE": "*fp32", "FULL": "*fp32", "T": "i32", "H": "i32", **strides,
                        "qk_scale": "fp32", "inv_heads": "fp32"}  # fmt: skip
            bm, bn, warps = _tiles("full", torch_dtype, block_d(head_dim))
            specs.append(_common.KernelSpec(
                "_attention_stats_full_kernel", _attention_stats_full_kernel, full_sig,
                {**shape, "BLOCK_M": bm, "BLOCK_N": bn, "FUSION": 1}, num_warps=warps, num_stages=1, dtype=dtype,
                gemm_like=bm >= 64, label=f"full d{head_dim} M{bm} N{bn} w{warps}",
            ))  # fmt: skip
    return specs


AUDIT_SPECS: List[_common.KernelSpec] = _specs()

__all__ = ["attention_stats", "block_d", "AUDIT_SPECS", "LOG2E"]
