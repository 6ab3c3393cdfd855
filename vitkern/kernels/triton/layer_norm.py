"""LayerNorm over the last dim, forward and backward, in Triton.

The whole row lives in registers (BLOCK_N = next power of two >= N, masked; N <= 8192 covers
every ViT width, D <= 1280), a program handles BLOCK_M rows at once so that narrow rows still
give each thread a 16-byte vector, and the statistics are computed two-pass in fp32 from the
register-resident row (no E[x^2] - E[x]^2 cancellation).

Backward: dx per row, and dweight / dbias reduced deterministically without atomics: a fixed
number of programs each walk a strided set of row blocks and write one fp32 partial row, then a
small second kernel sums the partials column-wise in a fixed order.

Launchers (called by `vitkern.ops.layer_norm` and by the fused ln_linear op; they launch through
`_common.launcher`, so they trace inside either op's `torch.library.triton_op`):

* `layer_norm_fwd(x2d, weight, bias, eps) -> (y, mean, rstd)`
* `layer_norm_stats(x2d, eps) -> (mean, rstd)`
* `layer_norm_bwd(dy2d, x2d, weight, mean, rstd) -> (dx, dweight, dbias)`
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import _common
from vitkern.kernels.triton._common import KernelSpec

# Widest row the register-resident design takes (ViT-H is 1280; 8192 leaves room for hybrids).
MAX_N = 8192
# Programs of the backward's first pass: fixed (not per device) so that the dweight/dbias
# summation order, hence the result bit pattern, depends on the shape only. 1024 programs of
# 8 warps (ViT widths) fill an H100 (132 SMs x 64 warps) in one wave; the partials they write and
# the reduction reads back (1024 x N fp32, twice) are ~5% of the backward's traffic for ViT-B at
# batch 256.
BWD_PROGRAMS = 1024
# Column tile and partial-row chunk of the dweight/dbias reduction kernel.
REDUCE_BLOCK_N = 128
REDUCE_BLOCK_G = 32


def fwd_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward/stats kernel for rows of width `n`.

    A program holds BLOCK_M x BLOCK_N = 4096 elements (fewer only when one row is wider), i.e.
    16 fp32 values per thread at 8 warps: enough bytes in flight per thread without spilling."""
    n = int(n)  # specialize a symbolic width (torch.compile, opcheck): the block size needs a number
    block_n = max(16, triton.next_power_of_2(n))
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = max(4, min(16, block_m * block_n // 512))
    return block_m, block_n, num_warps


def bwd_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward kernel: half the forward's tile, since it
    keeps x, dy, weight and two fp32 accumulators of the tile live at once; 8 elements per thread
    (32 warps at BLOCK_N=8192, where 16 warps spilled on sm_80)."""
    n = int(n)  # specialize a symbolic width (torch.compile, opcheck): the block size needs a number
    block_n = max(16, triton.next_power_of_2(n))
    block_m = max(1, min(16, 2048 // block_n))
    num_warps = max(4, min(32, block_m * block_n // 256))
    return block_m, block_n, num_warps


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # [M, N] x.dtype, row stride stride_xm, column stride 1
    Y,  # [M, N] x.dtype, contiguous (unused when not WRITE_Y)
    W,  # [N] (unused when not HAS_WEIGHT)
    B,  # [N] (unused when not HAS_BIAS)
    Mean,  # [M] fp32
    Rstd,  # [M] fp32
    M,
    N,
    stride_xm,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)
    if WRITE_Y:
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = y * w[None, :]
        if HAS_BIAS:
            b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = y + b[None, :]
        tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # [M, N] row stride stride_dym, column stride 1
    X,  # [M, N] row stride stride_xm, column stride 1
    W,  # [N] (unused when not HAS_WEIGHT)
    Mean,  # [M] fp32
    Rstd,  # [M] fp32
    DX,  # [M, N] x.dtype, contiguous
    DW_partial,  # [num_programs, N] fp32
    DB_partial,  # [num_programs, N] fp32
    M,
    N,
    stride_dym,
    stride_xm,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(pid, num_blocks, num_programs):
        # block * BLOCK_M < M + BLOCK_M fits in int32; the sum is int64 before meeting a stride.
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        # dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat)): the two projections that make
        # the normalized row's gradient orthogonal to the shift and the scale of the row.
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    out = pid.to(tl.int64) * N + cols
    tl.store(DW_partial + out, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(DB_partial + out, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    DW_partial,  # [G, N] fp32
    DB_partial,  # [G, N] fp32
    DW,  # [N] weight.dtype
    DB,  # [N] weight.dtype
    G,
    N,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_mask[None, :]
        offs = g.to(tl.int64)[:, None] * N + cols[None, :]
        dw += tl.load(DW_partial + offs, mask=mask, other=0.0)
        db += tl.load(DB_partial + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride but assume unit column stride.
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_fwd(x2d, weight, bias, eps, write_y):
    x2d = _rows_contiguous(x2d)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    m, n = x2d.shape
    device = x2d.device
    mean = _common.empty((m,), dtype=torch.float32, device=device)
    rstd = _common.empty((m,), dtype=torch.float32, device=device)
    y = _common.empty((m, n), dtype=x2d.dtype, device=device) if write_y else mean
    block_m, block_n, num_warps = fwd_config(n)
    grid = (triton.cdiv(m, block_m),)
    if m > 0:
        _common.launcher(_layer_norm_fwd_kernel)[grid](
            x2d,
            y,
            weight if weight is not None else mean,
            bias if bias is not None else mean,
            mean,
            rstd,
            m,
            n,
            x2d.stride(0),
            float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            WRITE_Y=write_y,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return y, mean, rstd


def layer_norm_fwd(
    x2d: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of each row.

    x2d: [rows, dim] fp16/bf16/fp32, unit column stride (else copied); weight, bias: [dim] or None;
    eps: added to the variance. Returns (y [rows, dim] in x2d's dtype, contiguous; mean [rows]
    fp32; rstd [rows] fp32). dim <= MAX_N.
    """
    return _launch_fwd(x2d, weight, bias, eps, True)


def layer_norm_stats(x2d: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row statistics only. x2d: [rows, dim]. Returns (mean [rows] fp32, rstd [rows] fp32),
    rstd = 1 / sqrt(var + eps) with the biased variance."""
    _, mean, rstd = _launch_fwd(x2d, None, None, eps, False)
    return mean, rstd


def layer_norm_bwd(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of y = (x - mean) * rstd * weight + bias.

    dy2d, x2d: [rows, dim] (unit column stride, else copied); weight: [dim] or None; mean, rstd:
    [rows] fp32 from `layer_norm_fwd`. Returns (dx [rows, dim] in x2d's dtype, dweight [dim],
    dbias [dim]), dweight and dbias in weight's dtype (x2d's without weight; dweight is then the
    gradient a weight of ones would get), summed over rows in fp32 in a fixed order
    (deterministic: the same bits for the same shape and values).
    """
    dy2d = _rows_contiguous(dy2d)
    x2d = _rows_contiguous(x2d)
    weight = weight.contiguous() if weight is not None else None
    m, n = x2d.shape
    device = x2d.device
    param_dtype = weight.dtype if weight is not None else x2d.dtype
    has_weight = weight is not None
    dx = _common.empty((m, n), dtype=x2d.dtype, device=device)
    dweight = _common.empty((n,), dtype=param_dtype, device=device)
    dbias = _common.empty((n,), dtype=param_dtype, device=device)
    block_m, block_n, num_warps = bwd_config(n)
    programs = max(1, min(triton.cdiv(m, block_m), BWD_PROGRAMS))
    # Zero-filled (not poisoned): with m == 0 no program runs and the sums must be 0.
    db_partial = torch.zeros((programs, n), dtype=torch.float32, device=device)
    dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=device)
    if m > 0:
        _common.launcher(_layer_norm_bwd_kernel)[(programs,)](
            dy2d,
            x2d,
            weight if has_weight else mean,
            mean,
            rstd,
            dx,
            dw_partial,
            db_partial,
            m,
            n,
            dy2d.stride(0),
            x2d.stride(0),
            HAS_WEIGHT=has_weight,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    _common.launcher(_layer_norm_bwd_reduce_kernel)[(triton.cdiv(n, REDUCE_BLOCK_N),)](
        dw_partial,
        db_partial,
        dweight,
        dbias,
        programs,
        n,
        BLOCK_G=REDUCE_BLOCK_G,
        BLOCK_N=REDUCE_BLOCK_N,
        num_warps=4,
    )
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------
# Audit: every config the launchers pick for the ViT widths (192 Ti ... 1280 H) and the widest row.

_AUDIT_WIDTHS = (192, 384, 768, 1024, 1280, MAX_N)
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _audit_specs() -> List[KernelSpec]:
    specs: List[KernelSpec] = []
    # As the runtime specializes ViT shapes (rows = batch * 197 with an even batch, widths that
    # are multiples of 16): those ints carry divisibility 16 (Triton's "i32:16" notation).
    d16 = "i32:16"
    block_ns = sorted({fwd_config(n)[1] for n in _AUDIT_WIDTHS})
    for dtype in ("fp16", "bf16", "fp32"):
        p = _PTR[dtype]
        for block_n in block_ns:
            n = block_n  # fwd_config/bwd_config depend on next_power_of_2(n) only
            bm, bn, nw = fwd_config(n)
            for has_affine, write_y, what in ((True, True, "affine"), (False, False, "stats")):
                specs.append(
                    KernelSpec(
                        name="_layer_norm_fwd_kernel",
                        fn=_layer_norm_fwd_kernel,
                        signature={
                            "X": p, "Y": p, "W": p, "B": p, "Mean": "*fp32", "Rstd": "*fp32",
                            "M": d16, "N": d16, "stride_xm": d16, "eps": "fp32",
                        },
                        constexprs=dict(HAS_WEIGHT=has_affine, HAS_BIAS=has_affine, WRITE_Y=write_y, BLOCK_M=bm, BLOCK_N=bn),
                        num_warps=nw,
                        num_stages=1,
                        dtype=dtype,
                        label=f"{what} BLOCK_M={bm} BLOCK_N={bn} warps={nw}",
                    )
                )
            bm, bn, nw = bwd_config(n)
            specs.append(
                KernelSpec(
                    name="_layer_norm_bwd_kernel",
                    fn=_layer_norm_bwd_kernel,
                    signature={
                        "DY": p, "X": p, "W": p, "Mean": "*fp32", "Rstd": "*fp32", "DX": p,
                        "DW_partial": "*fp32", "DB_partial": "*fp32",
                        "M": d16, "N": d16, "stride_dym": d16, "stride_xm": d16,
                    },
                    constexprs=dict(HAS_WEIGHT=True, BLOCK_M=bm, BLOCK_N=bn),
                    num_warps=nw,
                    num_stages=1,
                    dtype=dtype,
                    label=f"BLOCK_M={bm} BLOCK_N={bn} warps={nw}",
                )
            )
        specs.append(
            KernelSpec(
                name="_layer_norm_bwd_reduce_kernel",
                fn=_layer_norm_bwd_reduce_kernel,
                signature={"DW_partial": "*fp32", "DB_partial": "*fp32", "DW": p, "DB": p, "G": d16, "N": d16},
                constexprs=dict(BLOCK_G=REDUCE_BLOCK_G, BLOCK_N=REDUCE_BLOCK_N),
                num_warps=4,
                num_stages=1,
                dtype=dtype,
                label=f"BLOCK_G={REDUCE_BLOCK_G} BLOCK_N={REDUCE_BLOCK_N}",
            )
        )
    return specs


AUDIT_SPECS: List[KernelSpec] = _audit_specs()
