"""Flash-style multi-head self-attention on the packed QKV projection, forward and backward.

Layouts (the contract of DESIGN.md section 1, no split, permute or copy of q, k, v):

    qkv  [batch, tokens, 3 * dim]   timm's order: column c * dim + h * head_dim + j is
                                     (c = 0 q, 1 k, 2 v) of head h, feature j
    out  [batch, tokens, dim]        head h at columns h * head_dim ... (ready for the projection)
    lse  [batch, heads, tokens]      fp32 natural-log log-sum-exp of each softmax row
    dqkv [batch, tokens, 3 * dim]    same layout as qkv, consumed by the QKV projection's backward

Kernels (one program per (batch, head, row block), 1-D grid with the row block fastest so the
programs that share a head's K/V run next to each other and hit L2):

    _attention_fwd_kernel           online softmax over key blocks in fp32 on natural-log scores
                                    s = scale * q.k, p = exp2((s - max) * log2(e)); writes out and
                                    lse = max + log(sum) (the max is never rounded on the way).
    _attention_bwd_dq_kernel        per query block, run first: sweep 1 over all key blocks sums
                                    delta = rowsum(P * dP) / rowsum(P) and stores it with
                                    1 / rowsum(P) (each [batch, heads, tokens] fp32); sweep 2
                                    accumulates dQ from the row-normalized P; writes the q columns
                                    of dqkv.
    _attention_bwd_dkdv_kernel      per key block: recompute P and dP (query-major, as the forward
                                    and dQ do) from lse and 1 / rowsum(P), accumulate dV and dK over all query
                                    blocks; writes the k and v columns of dqkv. Separate from dQ
                                    so nothing is atomic: the result is deterministic.

docs/perf/attention.md ("Numerics at large logits") says why the statistics and the recomputation
are arranged this way: at logits of 1e3-1e8 a rounded lse, a delta summed from the rounded output
or a score recomputed in a different order costs whole digits of the gradient.

Any token count works: key columns past `T` get -inf scores, query rows past `T` are masked on
load and store. A power-of-two head_dim is one chunk of BLOCK_D = head_dim columns; any other is
a main chunk of BLOCK_D (the largest power of two below it) plus a masked tail chunk of BLOCK_DT
columns (HAS_TAIL), so 80 = 64 + 16 pays for 80 columns, not for the next power of two, 128
(`head_split`). Head dims that pad to the next power of two anyway (e.g. 112 = 64 + 64) stay one
masked chunk.
The probabilities of any row can be recomputed later from q, k and the saved lse (a
`return_cls_probs` kernel needs only row 0: exp(q_0 k_j * scale - lse_0)).

QK-norm (Q_NORM / K_NORM, timm's qk_norm=True): a LayerNorm over the head dim of each q (k) row,
applied to the tiles as they are loaded (see the helpers' section); the backward kernels recompute
the normalized tiles, run the LayerNorm backward in their epilogues and write the weight and bias
gradients as fp32 partial sums that the launcher adds up (docs/perf/attention.md, "QK-norm").
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import _common

LOG2E = 1.4426950408889634


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would miss the fp32 tolerance); for fp16/bf16 the
    # setting does not apply and the dot runs on tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# QK-norm (timm's qk_norm=True): a LayerNorm over the head dim of every q (k) row, applied to a
# tile as it is loaded, so no normalized copy of q or k is ever written. Statistics in fp32 over
# the whole head (main chunk + tail), two passes (mean, then the centred squares) as eager's
# LayerNorm; the normalized rows are rounded to the operand dtype as eager rounds its LayerNorm
# output, so the dots multiply what eager's matmul multiplies. The three kernels normalize with
# these same functions, so the backward recomputes the forward's operands (and its P); the dK/dV
# kernel normalizes its query tiles elementwise from the statistics the dQ kernel saved for them
# (row reductions inside its loop spilled), which reproduces the dQ kernel's tiles bit for bit.
# Without HAS_TAIL every *_t argument is a placeholder (callers pass the main chunk's) and comes
# back unchanged. Nothing but the tile itself stays live: the weight and bias are loaded where
# they are used (L1 hits) and the backward's epilogue reloads the raw rows and recomputes their
# statistics; kept live across the key or query loop they cost the backward kernels spills on sm_80.


@triton.jit
def _ln_vector(V, cols, HEAD_DIM: tl.constexpr):
    """A LayerNorm weight or bias [HEAD_DIM] at columns `cols` in fp32, 0 past the head dim (so the
    padded columns of a normalized tile stay 0)."""
    return tl.load(V + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)


@triton.jit
def _ln_sub(xf, mean, cols, HEAD_DIM: tl.constexpr):
    """xf - mean per row, 0 past the head dim. xf [R, C] fp32, mean [R]."""
    return tl.where(cols[None, :] < HEAD_DIM, xf - mean[:, None], 0.0)


@triton.jit
def _ln_centre(x, x_t, cols, cols_t, eps, HEAD_DIM: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Row statistics of a tile of head rows: x [R, BLOCK_D] at columns `cols` (+ x_t [R, BLOCK_DT]
    at `cols_t`), loaded with 0 past the head dim. Returns (xc, xc_t, mean, rstd): the centred rows
    x - mean in fp32 (0 past the head dim), the mean and rstd = 1 / sqrt(biased variance + eps)
    [R] fp32; xhat = xc * rstd."""
    xf = x.to(tl.float32)
    total = tl.sum(xf, axis=1)
    if HAS_TAIL:
        xf_t = x_t.to(tl.float32)
        total += tl.sum(xf_t, axis=1)
    mean = total / HEAD_DIM
    xc = _ln_sub(xf, mean, cols, HEAD_DIM)
    var = tl.sum(xc * xc, axis=1)
    xc_t = xc
    if HAS_TAIL:
        xc_t = _ln_sub(xf_t, mean, cols_t, HEAD_DIM)
        var += tl.sum(xc_t * xc_t, axis=1)
    rstd = 1.0 / tl.sqrt(var / HEAD_DIM + eps)
    return xc, xc_t, mean, rstd


@triton.jit
def _ln_apply(x, mean, rstd, W, B, cols, HEAD_DIM: tl.constexpr):
    """One chunk of the normalized rows from given statistics: (x - mean) * rstd * w + b in fp32,
    rounded to x's dtype. x [R, C] at columns `cols`; mean, rstd [R] fp32; W, B [HEAD_DIM]. The
    same operations as `_ln_rows`, so saved statistics reproduce its output bit for bit."""
    xc = _ln_sub(x.to(tl.float32), mean, cols, HEAD_DIM)
    y = (xc * rstd[:, None]) * _ln_vector(W, cols, HEAD_DIM)[None, :] + _ln_vector(B, cols, HEAD_DIM)[None, :]
    return y.to(x.dtype)


@triton.jit
def _ln_rows(x, x_t, W, B, cols, cols_t, eps, HEAD_DIM: tl.constexpr, HAS_TAIL: tl.constexpr):
    """LayerNorm of a tile of head rows (see `_ln_centre`) with weight W and bias B [HEAD_DIM]:
    (x - mean) * rstd * w + b in fp32, rounded to x's dtype. Returns (y, y_t, mean, rstd)."""
    _, _, mean, rstd = _ln_centre(x, x_t, cols, cols_t, eps, HEAD_DIM, HAS_TAIL)
    y = _ln_apply(x, mean, rstd, W, B, cols, HEAD_DIM)
    y_t = x_t
    if HAS_TAIL:
        y_t = _ln_apply(x_t, mean, rstd, W, B, cols_t, HEAD_DIM)
    return y, y_t, mean, rstd


@triton.jit
def _ln_store_partials(WS, ws_row0, ws_end, g, xhat, rows_valid, cols, HEAD_DIM: tl.constexpr,
                       BLOCK: tl.constexpr, PARTIAL_ROWS: tl.constexpr):
    """This program's share of the weight and bias gradients: for each group of PARTIAL_ROWS of its
    BLOCK rows (valid rows only), the column sums of g * xhat and of g, stored as workspace rows
    ws_row0, ws_row0 + 1, ... (those below ws_end) of WS [rows, 2, HEAD_DIM] fp32.

    Groups of a fixed size, not one row per program, so the workspace layout does not depend on the
    config: every row is written by exactly one program of any config (the autotuner's trial runs
    leave nothing stale), and the launcher sums the rows in torch (deterministic, nothing atomic).
    """
    group = tl.arange(0, BLOCK) // PARTIAL_ROWS
    col_mask = cols < HEAD_DIM
    for j in tl.static_range(BLOCK // PARTIAL_ROWS):
        g_j = tl.where((rows_valid & (group == j))[:, None], g, 0.0)
        row = ws_row0 + j
        ws = WS + row.to(tl.int64) * (2 * HEAD_DIM)
        mask = col_mask & (row < ws_end)
        tl.store(ws + cols, tl.sum(g_j * xhat, axis=0), mask=mask)
        tl.store(ws + HEAD_DIM + cols, tl.sum(g_j, axis=0), mask=mask)


@triton.jit
def _ln_backward(g, g_t, X_rows, rows_valid, W, cols, cols_t, eps, WS, ws_row0, ws_end,
                 HEAD_DIM: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK: tl.constexpr, PARTIAL_ROWS: tl.constexpr):
    """LayerNorm backward in a backward kernel's epilogue, for the program's BLOCK complete rows.

    g [BLOCK, BLOCK_D] (+ g_t [BLOCK, BLOCK_DT]) fp32: the gradient w.r.t. the normalized rows;
    X_rows [BLOCK, 1]: pointers to the raw rows, reloaded (the program read them: an L2 hit) and
    centred again by `_ln_centre`; W: the weight [HEAD_DIM]. Returns (dx, dx_t) fp32,
    dx = rstd * (g w - mean(g w) - xhat * mean(g w xhat)) with the means over the head dim, and
    writes the weight/bias partial sums (`_ln_store_partials`).
    """
    mask = rows_valid[:, None] & (cols[None, :] < HEAD_DIM)
    x = tl.load(X_rows + cols[None, :], mask=mask, other=0.0)
    x_t = x
    if HAS_TAIL:
        x_t = tl.load(X_rows + cols_t[None, :], mask=rows_valid[:, None] & (cols_t[None, :] < HEAD_DIM), other=0.0)
    xc, xc_t, _, rstd = _ln_centre(x, x_t, cols, cols_t, eps, HEAD_DIM, HAS_TAIL)
    rstd = rstd[:, None]
    xhat = xc * rstd
    gw = g * _ln_vector(W, cols, HEAD_DIM)[None, :]
    dot_sum = tl.sum(gw * xhat, axis=1)
    g_sum = tl.sum(gw, axis=1)
    if HAS_TAIL:
        xhat_t = xc_t * rstd
        gw_t = g_t * _ln_vector(W, cols_t, HEAD_DIM)[None, :]
        dot_sum += tl.sum(gw_t * xhat_t, axis=1)
        g_sum += tl.sum(gw_t, axis=1)
    c_dot = (dot_sum / HEAD_DIM)[:, None]
    c_g = (g_sum / HEAD_DIM)[:, None]
    dx = rstd * (gw - c_g - xhat * c_dot)
    _ln_store_partials(WS, ws_row0, ws_end, g, xhat, rows_valid, cols, HEAD_DIM, BLOCK, PARTIAL_ROWS)
    dx_t = g_t
    if HAS_TAIL:
        dx_t = rstd * (gw_t - c_g - xhat_t * c_dot)
        _ln_store_partials(WS, ws_row0, ws_end, g_t, xhat_t, rows_valid, cols_t, HEAD_DIM, BLOCK, PARTIAL_ROWS)
    return dx, dx_t


# --------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attention_fwd_kernel(
    QKV,  # [B, T, 3 * H * HEAD_DIM], last dim contiguous
    OUT,  # [B, T, H * HEAD_DIM], contiguous
    LSE,  # [B, H, T] fp32, contiguous
    T,
    H,
    stride_qkv_b,
    stride_qkv_t,
    stride_out_b,
    stride_out_t,
    scale,  # multiplies q.k: the softmax works on natural-log scores (see the module docstring)
    QW,  # [HEAD_DIM] q_norm weight in qkv's dtype (read only with Q_NORM; ones stand in for none)
    QB,  # [HEAD_DIM] q_norm bias (zeros stand in for none)
    KW,  # [HEAD_DIM] k_norm weight (read only with K_NORM)
    KB,  # [HEAD_DIM] k_norm bias
    q_eps,
    k_eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_NORM: tl.constexpr,  # QK-norm: LayerNorm q (k) rows over the head dim as they are loaded
    K_NORM: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    dim = H * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    d_mask = offs_d < HEAD_DIM

    # The batch offset is the one that passes 2^31 (B * T * 3D); it is added in int64 to the
    # scalar base, and offsets inside one sample (< T * 3D) stay int32 so the per-element address
    # math is cheap. The ops layer refuses samples whose own extent passes 2^31.
    head = QKV + b * stride_qkv_b + h * HEAD_DIM
    q = tl.load(head + offs_m[:, None] * stride_qkv_t + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_d[None, :]
    v_ptrs = k_ptrs + dim
    if HAS_TAIL:
        # Columns BLOCK_D.. of the head as a second, narrow chunk: every product over the head dim
        # is main + tail, so a head of 80 pays for 64 + 16 columns instead of 128.
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt < HEAD_DIM
        qt_mask = m_mask[:, None] & dt_mask[None, :]
        q_t = tl.load(head + offs_m[:, None] * stride_qkv_t + offs_dt[None, :], mask=qt_mask, other=0.0)
        kt_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_dt[None, :]
        vt_ptrs = kt_ptrs + dim
        acc_t = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    cols_t = offs_dt if HAS_TAIL else offs_d  # the tail's columns (a placeholder without one)
    if Q_NORM:
        q, q_t, _q_mean, _q_rstd = _ln_rows(q, q_t if HAS_TAIL else q, QW, QB, offs_d, cols_t, q_eps, HEAD_DIM, HAS_TAIL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n_mask = (start_n + offs_n) < T
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if K_NORM:
            if HAS_TAIL:  # the row statistics need the whole head before the first dot
                k_t = tl.load(kt_ptrs, mask=n_mask[:, None] & dt_mask[None, :], other=0.0)
            k, k_t, _, _ = _ln_rows(k, k_t if HAS_TAIL else k, KW, KB, offs_d, cols_t, k_eps, HEAD_DIM, HAS_TAIL)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_TAIL:
            kvt_mask = n_mask[:, None] & dt_mask[None, :]
            if not K_NORM:
                k_t = tl.load(kt_ptrs, mask=kvt_mask, other=0.0)  # [BLOCK_N, BLOCK_DT]
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
        s = s * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # The first key block always holds key 0, so m_new is finite from the first iteration on
        # and exp2(m_i - m_new) never sees (-inf) - (-inf). s - m_new is exact for every score
        # that matters (Sterbenz), so log2(e) multiplies a small exact difference.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2((m_i - m_new) * 1.4426950408889634)
        p = tl.exp2((s - m_new[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if HAS_TAIL:
            v_t = tl.load(vt_ptrs, mask=kvt_mask, other=0.0)  # [BLOCK_N, BLOCK_DT]
            acc_t = acc_t * alpha[:, None]
            acc_t = tl.dot(p.to(v_t.dtype), v_t, acc_t, input_precision=DOT_PRECISION)
            kt_ptrs += BLOCK_N * stride_qkv_t
            vt_ptrs += BLOCK_N * stride_qkv_t
        m_i = m_new
        k_ptrs += BLOCK_N * stride_qkv_t
        v_ptrs += BLOCK_N * stride_qkv_t

    out = acc / l_i[:, None]
    o_rows = OUT + b * stride_out_b + h * HEAD_DIM + offs_m[:, None] * stride_out_t
    tl.store(o_rows + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if HAS_TAIL:
        out_t = acc_t / l_i[:, None]
        tl.store(o_rows + offs_dt[None, :], out_t.to(OUT.dtype.element_ty), mask=qt_mask)
    # Natural-log LSE = max + log(sum): no rounding of the (possibly huge) max on the way, so a
    # row whose sum is 1 (one dominant key) saves its max exactly and the backward's
    # exp(s - lse) reproduces p = 1 bit for bit.
    lse = m_i + tl.log2(l_i) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_mask)


# --------------------------------------------------------------------------------------------
# Backward. Both kernels recompute the score tile S = q k^T [BLOCK_M, BLOCK_N] and dP = dO v^T
# [BLOCK_M, BLOCK_N] with the same dots in the same orientation as the forward (main chunk, then
# tail), so at large logits the recomputed P = exp(S * scale - lse) is the forward's bit for bit
# (a row with one dominant key gets p = 1 exactly) and the two kernels see the same dP. dQ runs
# first and computes delta = rowsum(P * dP) from its own P and dP (not from the rounded output):
# where one key dominates a row, dP - delta then cancels exactly, as in eager PyTorch, instead of
# leaving a rounding residue of |dO| |v| that the large k or q multiply into dK and dQ.


@triton.jit
def _attention_bwd_dq_kernel(
    QKV,  # [B, T, 3 * H * HEAD_DIM], last dim contiguous
    DOUT,  # [B, T, H * HEAD_DIM], last dim contiguous
    LSE,  # [B, H, T] fp32, contiguous
    DELTA,  # [B, H, T] fp32, contiguous; written here, read by the dK/dV kernel
    RSUM,  # [B, H, T] fp32, contiguous: 1 / (row sum of the recomputed P); written here, read by dK/dV
    DQKV,  # [B, T, 3 * H * HEAD_DIM], contiguous; this kernel writes the q columns
    T,
    H,
    stride_qkv_b,
    stride_qkv_t,
    stride_dout_b,
    stride_dout_t,
    stride_dqkv_b,
    stride_dqkv_t,
    scale,
    QW,  # [HEAD_DIM] q_norm weight in qkv's dtype (read only with Q_NORM; ones stand in for none)
    QB,  # [HEAD_DIM] q_norm bias (zeros stand in for none)
    KW,  # [HEAD_DIM] k_norm weight (read only with K_NORM)
    KB,  # [HEAD_DIM] k_norm bias
    q_eps,
    k_eps,
    DNORM,  # [B * H * cdiv(T, PARTIAL_ROWS), 2, HEAD_DIM] fp32: q_norm's (dQ) / k_norm's (dK/dV) partial sums
    QSTATS,  # [B, H, T, 2] fp32 with Q_NORM: each q row's (mean, rstd), written by dQ, read by dK/dV
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_NORM: tl.constexpr,  # QK-norm: LayerNorm q (k) rows over the head dim as they are loaded
    K_NORM: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr,  # rows per workspace row of DNORM; divides the row block
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    dim = H * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    d_mask = offs_d[None, :] < HEAD_DIM
    q_mask = m_mask[:, None] & d_mask
    rows = offs_m[:, None]

    head = QKV + b * stride_qkv_b + h * HEAD_DIM
    q = tl.load(head + rows * stride_qkv_t + offs_d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DOUT + b * stride_dout_b + h * HEAD_DIM + rows * stride_dout_t + offs_d[None, :], mask=q_mask, other=0.0)
    stats = pid_bh.to(tl.int64) * T
    # Query rows past T are computed on zeros and never stored; their statistics only need to be finite.
    lse = tl.load(LSE + stats + offs_m, mask=m_mask, other=0.0)
    if HAS_TAIL:
        # The head's columns past BLOCK_D (see the forward).
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt[None, :] < HEAD_DIM
        qt_mask = m_mask[:, None] & dt_mask
        q_t = tl.load(head + rows * stride_qkv_t + offs_dt[None, :], mask=qt_mask, other=0.0)  # [BLOCK_M, BLOCK_DT]
        do_rows = DOUT + b * stride_dout_b + h * HEAD_DIM + rows * stride_dout_t
        do_t = tl.load(do_rows + offs_dt[None, :], mask=qt_mask, other=0.0)
        dq_t = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    cols_t = offs_dt if HAS_TAIL else offs_d  # the tail's columns (a placeholder without one)
    if Q_NORM:
        q, q_t, q_mean, q_rstd = _ln_rows(q, q_t if HAS_TAIL else q, QW, QB, offs_d, cols_t, q_eps, HEAD_DIM, HAS_TAIL)
        # For the dK/dV kernel, which then normalizes its query tiles elementwise: no row
        # reductions in its loop (they spilled there), and the same q tiles as here, bit for bit.
        tl.store(QSTATS + (stats + offs_m) * 2, q_mean, mask=m_mask)
        tl.store(QSTATS + (stats + offs_m) * 2 + 1, q_rstd, mask=m_mask)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_sum = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    # Sweep 0 sums delta = rowsum(P * dP) over all keys; sweep 1 uses it: dS = P * (dP - delta).
    # The extra sweep costs two of the kernel's three dots per key block (S and dP again) and
    # replaces a separate pass that read out and dout from memory.
    for sweep in tl.static_range(2):
        if sweep == 1:
            # The recomputed row exp(s - lse) sums to 1 only up to the rounding of lse: half an ulp
            # of |lse| (2^-24 |logit|), a common factor of the whole row of 5e-4 at a logit of 1e4,
            # where near-tied rows then carried 3.5x plain torch's error into dQ, dK and dV. Both
            # backward kernels multiply P by the row's reciprocal sum r_sum (stored for dK/dV), so
            # the P they use is normalized to fp32 rounding, as torch's softmax is; delta is its
            # P-weighted mean of dP. Only the backward's workspace grows (4 bytes per row), not
            # what the forward saves.
            r_sum = 1.0 / p_sum
            delta = delta * r_sum
        k_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_d[None, :]
        v_ptrs = k_ptrs + dim
        if HAS_TAIL:
            kt_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_dt[None, :]
            vt_ptrs = kt_ptrs + dim
        for start_n in range(0, T, BLOCK_N):
            n_mask = (start_n + offs_n) < T
            kv_mask = n_mask[:, None] & d_mask
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            if K_NORM:
                if HAS_TAIL:
                    k_t = tl.load(kt_ptrs, mask=n_mask[:, None] & dt_mask, other=0.0)
                k, k_t, _, _ = _ln_rows(k, k_t if HAS_TAIL else k, KW, KB, offs_d, cols_t, k_eps, HEAD_DIM, HAS_TAIL)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_TAIL:
                kvt_mask = n_mask[:, None] & dt_mask
                if not K_NORM:
                    k_t = tl.load(kt_ptrs, mask=kvt_mask, other=0.0)  # [BLOCK_N, BLOCK_DT]
                v_t = tl.load(vt_ptrs, mask=kvt_mask, other=0.0)
                s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
                dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
            # Zero-filled keys past T would score 0, not -inf: mask them out of P.
            p = tl.where(n_mask[None, :], tl.exp2((s * scale - lse[:, None]) * 1.4426950408889634), 0.0)
            if sweep == 1:
                p = p * r_sum[:, None]
            if sweep == 0:
                delta += tl.sum(p * dp, axis=1)
                p_sum += tl.sum(p, axis=1)
            else:
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
                if HAS_TAIL:
                    dq_t = tl.dot(ds.to(k_t.dtype), k_t, dq_t, input_precision=DOT_PRECISION)
            if HAS_TAIL:
                kt_ptrs += BLOCK_N * stride_qkv_t
                vt_ptrs += BLOCK_N * stride_qkv_t
            k_ptrs += BLOCK_N * stride_qkv_t
            v_ptrs += BLOCK_N * stride_qkv_t

    tl.store(DELTA + stats + offs_m, delta, mask=m_mask)
    tl.store(RSUM + stats + offs_m, r_sum, mask=m_mask)
    dq = dq * scale
    if HAS_TAIL:
        dq_t = dq_t * scale
    if Q_NORM:
        # dq is the gradient w.r.t. the normalized rows (scale included): back through the LayerNorm.
        groups = tl.cdiv(T, PARTIAL_ROWS)
        dq, dq_t = _ln_backward(dq, dq_t if HAS_TAIL else dq, head + rows * stride_qkv_t, m_mask, QW, offs_d, cols_t,
                                q_eps, DNORM, pid_bh * groups + pid_m * (BLOCK_M // PARTIAL_ROWS),
                                (pid_bh + 1) * groups, HEAD_DIM, HAS_TAIL, BLOCK_M, PARTIAL_ROWS)
    d_rows = DQKV + b * stride_dqkv_b + rows * stride_dqkv_t + h * HEAD_DIM
    tl.store(d_rows + offs_d[None, :], dq.to(DQKV.dtype.element_ty), mask=q_mask)
    if HAS_TAIL:
        tl.store(d_rows + offs_dt[None, :], dq_t.to(DQKV.dtype.element_ty), mask=qt_mask)


@triton.jit
def _attention_bwd_dkdv_kernel(
    QKV,  # [B, T, 3 * H * HEAD_DIM], last dim contiguous
    DOUT,  # [B, T, H * HEAD_DIM], last dim contiguous
    LSE,  # [B, H, T] fp32, contiguous
    DELTA,  # [B, H, T] fp32, contiguous, from the dQ kernel
    RSUM,  # [B, H, T] fp32, contiguous, from the dQ kernel: 1 / (row sum of the recomputed P)
    DQKV,  # [B, T, 3 * H * HEAD_DIM], contiguous; this kernel writes the k and v columns
    T,
    H,
    stride_qkv_b,
    stride_qkv_t,
    stride_dout_b,
    stride_dout_t,
    stride_dqkv_b,
    stride_dqkv_t,
    scale,
    QW,  # [HEAD_DIM] q_norm weight in qkv's dtype (read only with Q_NORM; ones stand in for none)
    QB,  # [HEAD_DIM] q_norm bias (zeros stand in for none)
    KW,  # [HEAD_DIM] k_norm weight (read only with K_NORM)
    KB,  # [HEAD_DIM] k_norm bias
    q_eps,
    k_eps,
    DNORM,  # [B * H * cdiv(T, PARTIAL_ROWS), 2, HEAD_DIM] fp32: q_norm's (dQ) / k_norm's (dK/dV) partial sums
    QSTATS,  # [B, H, T, 2] fp32 with Q_NORM: each q row's (mean, rstd), written by dQ, read by dK/dV
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_NORM: tl.constexpr,  # QK-norm: LayerNorm q (k) rows over the head dim as they are loaded
    K_NORM: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr,  # rows per workspace row of DNORM; divides the row block
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(T, BLOCK_N)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    dim = H * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < T
    d_mask = offs_d[None, :] < HEAD_DIM

    head = QKV + b * stride_qkv_b + h * HEAD_DIM
    kv_off = offs_n[:, None] * stride_qkv_t + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask
    k = tl.load(head + dim + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(head + 2 * dim + kv_off, mask=kv_mask, other=0.0)
    q_ptrs = head + offs_m[:, None] * stride_qkv_t + offs_d[None, :]
    do_ptrs = DOUT + b * stride_dout_b + h * HEAD_DIM + offs_m[:, None] * stride_dout_t + offs_d[None, :]
    stats = pid_bh.to(tl.int64) * T
    if HAS_TAIL:
        # The head's columns past BLOCK_D (see the forward): a second, narrow chunk of every
        # operand and accumulator with a head-dim axis.
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt[None, :] < HEAD_DIM
        kvt_off = offs_n[:, None] * stride_qkv_t + offs_dt[None, :]
        kvt_mask = n_mask[:, None] & dt_mask
        k_t = tl.load(head + dim + kvt_off, mask=kvt_mask, other=0.0)  # [BLOCK_N, BLOCK_DT]
        v_t = tl.load(head + 2 * dim + kvt_off, mask=kvt_mask, other=0.0)
        qt_ptrs = head + offs_m[:, None] * stride_qkv_t + offs_dt[None, :]
        dot_ptrs = DOUT + b * stride_dout_b + h * HEAD_DIM + offs_m[:, None] * stride_dout_t + offs_dt[None, :]
        dk_t = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
        dv_t = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
    cols_t = offs_dt if HAS_TAIL else offs_d  # the tail's columns (a placeholder without one)
    if K_NORM:
        k, k_t, _, _ = _ln_rows(k, k_t if HAS_TAIL else k, KW, KB, offs_d, cols_t, k_eps, HEAD_DIM, HAS_TAIL)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, T, BLOCK_M):
        offs_qm = start_m + offs_m
        m_mask = offs_qm < T
        q_mask = m_mask[:, None] & d_mask
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + stats + offs_qm, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + stats + offs_qm, mask=m_mask, other=0.0)
        r_sum = tl.load(RSUM + stats + offs_qm, mask=m_mask, other=0.0)
        if Q_NORM:
            # The dQ kernel's statistics of these rows (0 past T: those rows are masked out of P).
            q_mean = tl.load(QSTATS + (stats + offs_qm) * 2, mask=m_mask, other=0.0)
            q_rstd = tl.load(QSTATS + (stats + offs_qm) * 2 + 1, mask=m_mask, other=0.0)
            q = _ln_apply(q, q_mean, q_rstd, QW, QB, offs_d, HEAD_DIM)
        # Query-major tiles [BLOCK_M, BLOCK_N], as the forward and the dQ kernel compute them (see
        # above), transposed only after rounding to the operand dtype. Rows and columns past T are
        # zeroed so they add nothing to the valid key rows.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_TAIL:
            qt_mask = m_mask[:, None] & dt_mask
            q_t = tl.load(qt_ptrs, mask=qt_mask, other=0.0)  # [BLOCK_M, BLOCK_DT]
            if Q_NORM:
                q_t = _ln_apply(q_t, q_mean, q_rstd, QW, QB, offs_dt, HEAD_DIM)
            do_t = tl.load(dot_ptrs, mask=qt_mask, other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
        # Normalized by the dQ kernel's reciprocal row sum, as there (bit for bit the same P).
        p = tl.exp2((s * scale - lse[:, None]) * 1.4426950408889634) * r_sum[:, None]
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        p_t = tl.trans(p.to(do.dtype))  # [BLOCK_N, BLOCK_M]
        ds_t = tl.trans(ds.to(q.dtype))
        dv = tl.dot(p_t, do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if HAS_TAIL:
            dv_t = tl.dot(p_t, do_t, dv_t, input_precision=DOT_PRECISION)
            dk_t = tl.dot(ds_t, q_t, dk_t, input_precision=DOT_PRECISION)
            qt_ptrs += BLOCK_M * stride_qkv_t
            dot_ptrs += BLOCK_M * stride_dout_t
        q_ptrs += BLOCK_M * stride_qkv_t
        do_ptrs += BLOCK_M * stride_dout_t

    dk = dk * scale
    if HAS_TAIL:
        dk_t = dk_t * scale
    if K_NORM:
        # dk is the gradient w.r.t. the normalized rows (scale included): back through the LayerNorm.
        groups = tl.cdiv(T, PARTIAL_ROWS)
        dk, dk_t = _ln_backward(dk, dk_t if HAS_TAIL else dk, head + dim + offs_n[:, None] * stride_qkv_t, n_mask, KW, offs_d, cols_t,
                                k_eps, DNORM, pid_bh * groups + pid_n * (BLOCK_N // PARTIAL_ROWS),
                                (pid_bh + 1) * groups, HEAD_DIM, HAS_TAIL, BLOCK_N, PARTIAL_ROWS)
    d_head = DQKV + b * stride_dqkv_b + h * HEAD_DIM
    d_off = offs_n[:, None] * stride_dqkv_t + offs_d[None, :]
    tl.store(d_head + dim + d_off, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
    tl.store(d_head + 2 * dim + d_off, dv.to(DQKV.dtype.element_ty), mask=kv_mask)
    if HAS_TAIL:
        dt_off = offs_n[:, None] * stride_dqkv_t + offs_dt[None, :]
        tl.store(d_head + dim + dt_off, dk_t.to(DQKV.dtype.element_ty), mask=kvt_mask)
        tl.store(d_head + 2 * dim + dt_off, dv_t.to(DQKV.dtype.element_ty), mask=kvt_mask)


# --------------------------------------------------------------------------------------------
# Configs. Tiles are chosen for ViT's short sequences (T = 197 at 224 px, 577 at 384 px): a head's
# whole K and V (197 x 64 x 2 x 2 B = 50 KB) is smaller than one SM's shared memory, so the loops
# are short (4 blocks of 64) and what matters is the padding waste of the last block and the
# register budget, not deep pipelining. One list per tier (16-bit or fp32 operands x the padded head
# width the kernel computes on: <= 64, <= 96 (the split 64 + 16 and 64 + 32) or 128), so every config
# the autotuner may pick compiles without spills on sm_80 and sm_90 (vitkern.audit checks each, at
# the widest head of each tier). The first config of a list is the one the interpreter runs, and
# within a tier the first fwd, dq and dkdv configs share (BLOCK_M, BLOCK_N): the interpreter's dot
# is numpy's matmul, whose rounding depends on the tile shape, and the backward must recompute the
# forward's scores bit for bit (see the backward's comment; a test checks the lists).
# Autotune keys: token count and head size, and (`_common.tuned`) the M bucket of batch x heads.


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# {(operand kind, padded head size): {kernel: configs}}; BLOCK_M tiles queries, BLOCK_N keys.
CONFIGS = {
    # The query-major dK/dV (two 16-bit tile transposes per step) needs 8 warps at 64 x 64 on sm_80;
    # its 4-warp 64 x 64 and 64 x 128 tiles spill there, as does the 4-warp 64 x 64 forward.
    ("half", 64): {
        "fwd": [_cfg(64, 64, 8, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 3), _cfg(128, 32, 4, 3)],
        "dkdv": [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 64, 4, 3)],
        "dq": [_cfg(64, 64, 4, 2), _cfg(64, 32, 4, 3), _cfg(128, 64, 8, 2)],
    },
    # Split heads 65-96 (64 + 16, 64 + 32): sm_80 is the limit, where ptxas keeps the tail tiles
    # live next to the main ones. With the two-sweep dQ and the query-major dK/dV only 16-key
    # tiles of dK/dV compile without spills on both archs (64 x 32 spills on sm_90, 32 x 64 on
    # sm_80), so 64 x 16 is the tier's shared score tile; dQ's 64-key tiles spill at 96.
    ("half", 96): {
        "fwd": [_cfg(64, 16, 4, 3), _cfg(64, 32, 4, 3), _cfg(64, 64, 8, 2), _cfg(128, 32, 8, 3)],
        "dkdv": [_cfg(64, 16, 4, 2)],
        "dq": [_cfg(64, 16, 4, 2), _cfg(64, 32, 4, 3), _cfg(64, 16, 8, 2)],
    },
    # Padded to 128 (head dims 97-128): 8 warps for the 64-row tiles (the 4-warp dQ tiles and the
    # 64 x 32 dK/dV tile spill on sm_80), and no 32-key dK/dV tile as the first (its M = 32 dots
    # cannot use wgmma).
    ("half", 128): {
        "fwd": [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 3), _cfg(128, 32, 8, 3)],
        "dkdv": [_cfg(64, 64, 8, 2), _cfg(32, 64, 8, 2)],
        "dq": [_cfg(64, 64, 8, 2)],
    },
    # fp32 operands run exact FMA dots (no tensor cores): small tiles, a correctness path, whose
    # spills ptxas decides unpredictably with the tile shape (each list is what audits clean). dQ's
    # 32 x 32 takes 8 warps: with 4 the packed kernel (attention_varlen.py, same lists) spills 8 B
    # on sm_90.
    ("fp32", 64): {
        "fwd": [_cfg(32, 32, 4, 2), _cfg(64, 32, 8, 2)],
        "dkdv": [_cfg(32, 32, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 64, 8, 2)],
        "dq": [_cfg(32, 32, 8, 1), _cfg(64, 32, 8, 2)],
    },
    # dK/dV 32 x 32 w8 (the tier's shared score tile in the interpreter) spills 8 B at head dim 96
    # on sm_90: it runs on the other archs only, and 32 x 16 w8 (0 spills at head dims 80 and 96 on
    # sm_80 and sm_90) everywhere (`_common.not_on`; docs/perf/attention.md).
    ("fp32", 96): {
        "fwd": [_cfg(32, 32, 4, 2), _cfg(32, 32, 8, 2)],
        "dkdv": [_common.not_on(_cfg(32, 32, 8, 2), 90), _cfg(32, 16, 8, 2)],
        "dq": [_cfg(32, 32, 4, 2)],
    },
    # Audited at head dim 128 itself: 16 x 32 is the only dK/dV tile that does not spill, and the
    # 16 x 32 forward spills 1.1 KB on sm_90, so this tier alone has no shared score tile (in the
    # interpreter its fp32 gradients at large logits are not bitwise-consistent; see the test).
    ("fp32", 128): {
        "fwd": [_cfg(32, 32, 8, 2)],
        "dkdv": [_cfg(16, 32, 4, 2)],
        "dq": [_cfg(32, 32, 8, 2)],
    },
}

# QK-norm (Q_NORM and/or K_NORM): the LayerNorm of the q or k tile takes it through registers (the
# plain kernels feed the dots from shared memory), and with it most of the plain lists' tiles spill;
# so do nearly all pipelined (num_stages = 2) tiles, hence one stage throughout. These lists are
# audited with both norms on (the widest variant) and keep the interpreter's shared score tile,
# except ("fp32", 128) as in the plain lists. Tuned separately (their own names), so a plain launch
# never inherits a QK-norm tile or the reverse. The split tier's dK/dV is per arch: every 64-row
# tile tried spills at head dim 80 on sm_80 (64 x 16 w4: 8 B), and the 32-row tiles that do not
# cannot use wgmma on sm_90 (M = 32 dots), so sm_90 runs 64 x 16 w4 and the others 32 x 16 w8
# (0 spills on both archs at head dims 80 and 96; `_common.not_on`, docs/perf/attention.md).
# Since the backward normalizes P by its row sum (one more [BLOCK_M] vector live), three tiles
# spill a little (8-20 B) on one arch and run on the other only: tier 128's dK/dV 64 x 32 (sm_90)
# and dQ 64 x 16 (sm_80, which runs 32 x 16 w8 instead: its M = 32 dots cannot use wgmma on
# sm_90), and the fp32 dK/dV 16 x 32 (sm_80).
CONFIGS_QK_NORM = {
    ("half", 64): {
        "fwd": [_cfg(64, 64, 8, 1), _cfg(64, 32, 8, 1), _cfg(128, 64, 8, 1)],
        "dkdv": [_cfg(64, 64, 8, 1), _cfg(64, 32, 8, 1)],
        "dq": [_cfg(64, 64, 8, 1), _cfg(64, 32, 8, 1), _cfg(64, 64, 4, 1)],
    },
    ("half", 96): {
        "fwd": [_cfg(64, 16, 8, 1), _cfg(64, 32, 8, 1)],
        "dkdv": [_common.not_on(_cfg(64, 16, 4, 1), 80, 86, 87, 89), _common.not_on(_cfg(32, 16, 8, 1), 90)],
        "dq": [_cfg(64, 16, 8, 1), _cfg(64, 32, 8, 1)],
    },
    ("half", 128): {
        "fwd": [_cfg(64, 16, 8, 1), _cfg(64, 64, 8, 1)],
        "dkdv": [_cfg(64, 16, 8, 1), _common.not_on(_cfg(64, 32, 8, 1), 90)],
        "dq": [_common.not_on(_cfg(64, 16, 8, 1), 80, 86, 87, 89), _common.not_on(_cfg(32, 16, 8, 1), 90)],
    },
    ("fp32", 64): {
        "fwd": [_cfg(32, 32, 8, 1), _cfg(16, 32, 4, 1)],
        "dkdv": [_cfg(32, 32, 8, 1), _common.not_on(_cfg(16, 32, 8, 1), 80, 86, 87, 89)],
        "dq": [_cfg(32, 32, 8, 1)],
    },
    ("fp32", 96): {
        "fwd": [_cfg(16, 16, 4, 1), _cfg(32, 32, 8, 1)],
        "dkdv": [_cfg(16, 16, 4, 1)],
        "dq": [_cfg(16, 16, 4, 1), _cfg(32, 32, 8, 1)],
    },
    ("fp32", 128): {
        "fwd": [_cfg(32, 32, 8, 1)],
        "dkdv": [_cfg(16, 32, 8, 1)],
        "dq": [_cfg(16, 16, 8, 1)],
    },
}
_KERNELS = {"fwd": _attention_fwd_kernel, "dkdv": _attention_bwd_dkdv_kernel, "dq": _attention_bwd_dq_kernel}


def configs(tier: Tuple[str, int], qk_norm: bool = False) -> Dict[str, List[triton.Config]]:
    """{kernel: configs} of `tier`, for the plain kernels or the QK-norm variants."""
    return (CONFIGS_QK_NORM if qk_norm else CONFIGS)[tier]


def _tier(dtype: torch.dtype, head_dim: int) -> Tuple[str, int]:
    bd, bdt, has_tail = head_split(head_dim)
    padded = bd + (bdt if has_tail else 0)
    width = 64 if padded <= 64 else 96 if padded <= 96 else 128
    return ("fp32" if dtype == torch.float32 else "half", width)


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, tier: Tuple[str, int], qk_norm: bool = False):
    """The tuned launcher of `kernel` for `tier` (with `qk_norm`: of its QK-norm variants), built on
    first use (nothing at import); its M bucket is the number of (batch, head) pairs."""
    name = f"attention.{kernel}.{tier[0]}{tier[1]}" + (".qk_norm" if qk_norm else "")
    return _common.tuned(_KERNELS[kernel], configs(tier, qk_norm)[kernel], key=["T", "HEAD_DIM"], name=name,
                         rows=lambda a: a["QKV"].shape[0] * a["H"], prune=_common.arch_pruner)


def _launchable(kernel: str, tier: Tuple[str, int], qk_norm: bool):
    # The plain call keeps _tuned's two-argument form (tests spy on it).
    return _tuned(kernel, tier, True) if qk_norm else _tuned(kernel, tier)


@functools.lru_cache(maxsize=None)
def head_split(head_dim: int) -> Tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_DT, HAS_TAIL): how the kernels tile the head dim.

    A power of two (at least 16, tl.dot's minimum) is one chunk. Otherwise a main chunk of the
    largest power of two below head_dim plus a tail of the next power of two (>= 16) covering the
    rest, when that pads less than the next power of two: 80 -> (64, 16), 96 -> (64, 32). Where it
    would not (112 -> 64 + 64, 24 -> 16 + 16), a second chunk only adds dots, so the head stays one
    masked chunk of the next power of two and BLOCK_DT is 0.
    """
    whole = max(16, triton.next_power_of_2(head_dim))
    if whole == head_dim or head_dim < 16:
        return whole, 0, False
    main = whole // 2
    tail = max(16, triton.next_power_of_2(head_dim - main))
    if main + tail >= whole:
        return whole, 0, False
    return main, tail, True


# --------------------------------------------------------------------------------------------
# Launchers: validate nothing (vitkern.ops.attention did), allocate, grid, launch (through
# _common.launcher: traceable inside triton_op on a GPU, skipped on fake tensors in the interpreter).


NormArgs = Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]]


def _norm_operands(norm: NormArgs, qkv: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(weight, bias, eps) of a QK-norm as kernel arguments: ones and zeros [head_dim] in qkv's dtype
    stand in for an absent weight or bias; for a norm that is off, qkv itself (never read)."""
    if norm is None:
        return qkv, qkv, 0.0
    weight, bias, eps = norm
    # The kernels read the vectors with a unit stride.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if weight is None:
        weight = torch.ones(head_dim, dtype=qkv.dtype, device=qkv.device)
    if bias is None:
        bias = torch.zeros(head_dim, dtype=qkv.dtype, device=qkv.device)
    return weight, bias, float(eps)


def _norm_flags(q_norm: NormArgs, k_norm: NormArgs) -> dict:
    return dict(Q_NORM=q_norm is not None, K_NORM=k_norm is not None)


def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float,
                  q_norm: NormArgs = None, k_norm: NormArgs = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """qkv: [batch, tokens, 3 * dim] fp16/bf16/fp32 with stride(-1) == 1; q_norm, k_norm: QK-norm,
    None or (weight [head_dim] or None, bias [head_dim] or None, eps), tensors in qkv's dtype.

    Returns out [batch, tokens, dim] in qkv's dtype and lse [batch, heads, tokens] fp32.
    """
    b, t, three_dim = qkv.shape
    # The head size is a constexpr: specialize it (int) even when torch.compile traces shapes symbolically.
    dim = int(three_dim) // 3
    head_dim = dim // num_heads
    out = _common.empty((b, t, dim), dtype=qkv.dtype, device=qkv.device)
    lse = _common.empty((b, num_heads, t), dtype=torch.float32, device=qkv.device)
    qw, qb, q_eps = _norm_operands(q_norm, qkv, head_dim)
    kw, kb, k_eps = _norm_operands(k_norm, qkv, head_dim)

    def grid(meta):
        return (b * num_heads * triton.cdiv(t, meta["BLOCK_M"]),)

    bd, bdt, has_tail = head_split(head_dim)
    qk_norm = q_norm is not None or k_norm is not None
    _common.launcher(_launchable("fwd", _tier(qkv.dtype, head_dim), qk_norm))[grid](
        qkv, out, lse, t, num_heads,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        scale, qw, qb, kw, kb, q_eps, k_eps,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, HAS_TAIL=has_tail, DOT_PRECISION=_dot_precision(qkv.dtype),
        **_norm_flags(q_norm, k_norm),
    )  # fmt: skip
    return out, lse


def partial_rows(tier: Tuple[str, int], kernel: str) -> int:
    """Rows per workspace row of the norm's partial sums in backward `kernel` ("dq": query rows,
    "dkdv": key rows): the smallest row block among the tier's QK-norm configs, so it divides
    every one (all powers of two)."""
    block = "BLOCK_M" if kernel == "dq" else "BLOCK_N"
    return min(c.kwargs[block] for c in CONFIGS_QK_NORM[tier][kernel])


def attention_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float,
    q_norm: NormArgs = None, k_norm: NormArgs = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dout: [batch, tokens, dim] (stride(-1) == 1); qkv: [batch, tokens, 3 * dim] (stride(-1) == 1);
    lse: [batch, heads, tokens] fp32 contiguous, from `attention_fwd` with the same q_norm, k_norm.

    Returns (dqkv, dq_norm, dk_norm): dqkv [batch, tokens, 3 * dim] contiguous, in qkv's dtype
    (through the QK-norm when there is one); dq_norm (dk_norm) [2, head_dim] fp32, the gradients of
    q_norm's (k_norm's) weight and bias (rows 0 and 1; for an absent weight or bias, the gradient
    it would have), None without that norm. The dQ kernel runs first: it writes delta
    [batch, heads, tokens] fp32 (rowsum(P * dP)), which the dK/dV kernel reads. With a norm, each
    backward kernel writes fp32 partial sums of the norm's gradients over fixed groups of rows to a
    workspace [batch * heads * groups, 2, head_dim], summed here.
    """
    b, t, three_dim = qkv.shape
    # The head size is a constexpr: specialize it (int) even when torch.compile traces shapes symbolically.
    dim = int(three_dim) // 3
    head_dim = dim // num_heads
    bd, bdt, has_tail = head_split(head_dim)
    split = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, HAS_TAIL=has_tail, **_norm_flags(q_norm, k_norm))
    precision = _dot_precision(qkv.dtype)
    delta = _common.empty((b, num_heads, t), dtype=torch.float32, device=qkv.device)
    r_sum = _common.empty((b, num_heads, t), dtype=torch.float32, device=qkv.device)
    dqkv = _common.empty((b, t, three_dim), dtype=qkv.dtype, device=qkv.device)
    tier = _tier(qkv.dtype, head_dim)
    qk_norm = q_norm is not None or k_norm is not None
    qw, qb, q_eps = _norm_operands(q_norm, qkv, head_dim)
    kw, kb, k_eps = _norm_operands(k_norm, qkv, head_dim)

    # Each q row's (mean, rstd), from the dQ kernel to the dK/dV kernel.
    q_stats = delta if q_norm is None else _common.empty((b, num_heads, t, 2), dtype=torch.float32, device=qkv.device)

    def workspace(norm: NormArgs, rows: int) -> torch.Tensor:
        if norm is None:
            return delta  # never written without the norm
        return _common.empty((b * num_heads * triton.cdiv(t, rows), 2, head_dim), dtype=torch.float32, device=qkv.device)

    def args(ws: torch.Tensor) -> tuple:
        return (
            qkv, dout, lse, delta, r_sum, dqkv, t, num_heads,
            qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1),
            scale, qw, qb, kw, kb, q_eps, k_eps, ws, q_stats,
        )  # fmt: skip

    def dq_grid(meta):
        return (b * num_heads * triton.cdiv(t, meta["BLOCK_M"]),)

    dq_rows = partial_rows(tier, "dq")
    dq_ws = workspace(q_norm, dq_rows)
    _common.launcher(_launchable("dq", tier, qk_norm))[dq_grid](*args(dq_ws), **split, DOT_PRECISION=precision, PARTIAL_ROWS=dq_rows)

    def dkdv_grid(meta):
        return (b * num_heads * triton.cdiv(t, meta["BLOCK_N"]),)

    dk_rows = partial_rows(tier, "dkdv")
    dk_ws = workspace(k_norm, dk_rows)
    _common.launcher(_launchable("dkdv", tier, qk_norm))[dkdv_grid](*args(dk_ws), **split, DOT_PRECISION=precision, PARTIAL_ROWS=dk_rows)
    dq_norm = dq_ws.sum(0) if q_norm is not None else None
    dk_norm = dk_ws.sum(0) if k_norm is not None else None
    return dqkv, dq_norm, dk_norm


# --------------------------------------------------------------------------------------------
# AOT specs for `python -m vitkern.audit`: every kernel x every config of its tier x dtype, at
# ViT-B/16's head size 64, at 80 (ViT-H/14, split 64 + 16), at 96 (64 + 32, the widest of the split
# tier) and at 128 (the one tier-128 head of a ViT), each plain and with QK-norm on q and k (the
# variant with the most live registers; its specs are named "<kernel>[qk_norm]", so
# `--one-per-kernel` compiles both variants). At run time Triton marks
# 16-byte-aligned pointers and ints divisible by 16 (all strides of contiguous ViT tensors: 3D and
# D are multiples of 16); the specs type the strides "i32:16" so the audit compiles the same
# specialization, without which loads are not vectorized and the register counts would describe a
# different kernel.

_AUDIT_HEAD_DIMS = (64, 80, 96, 128)
_AUDIT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _spec(name, fn, signature, constexprs, **kwargs) -> _common.KernelSpec:
    return _common.KernelSpec(name, fn, signature, constexprs, **kwargs)


def _dense_signatures(ptr: str, params: dict) -> Tuple[dict, dict]:
    """The forward's and the backward kernels' non-constexpr arguments, typed for the audit."""

    def strides(*names: str) -> dict:
        # "i32:16": the strides of contiguous ViT tensors (3D, D, T*3D, T*D) are multiples of 16.
        return {f"stride_{n}_{a}": "i32:16" for n in names for a in ("b", "t")}

    ints = {"T": "i32", "H": "i32"}
    fwd = {"QKV": ptr, "OUT": ptr, "LSE": "*fp32", **ints, **strides("qkv", "out"), "scale": "fp32", **params}
    bwd = {"QKV": ptr, "DOUT": ptr, "LSE": "*fp32", "DELTA": "*fp32", "RSUM": "*fp32", "DQKV": ptr, **ints,
           **strides("qkv", "dout", "dqkv"), "scale": "fp32", **params, "DNORM": "*fp32", "QSTATS": "*fp32"}  # fmt: skip
    return fwd, bwd


def audit_specs(kernels: dict, signatures: Callable[[str, dict], Tuple[dict, dict]],
                config_lists: Optional[Callable[..., Dict[str, List[triton.Config]]]] = None,
                ) -> List[_common.KernelSpec]:
    """Every kernel of `kernels` ({"fwd", "dkdv", "dq"}) x config x dtype x head size x QK-norm;
    `signatures(ptr, qk_norm_params)` types their arguments, `config_lists(tier, qk_norm)` gives the
    configs (default: `configs`; the packed kernels share this with their own)."""
    config_lists = config_lists or configs
    specs: List[_common.KernelSpec] = []
    for qk_norm in (False, True):
        norm = {"Q_NORM": qk_norm, "K_NORM": qk_norm}
        for dtype, torch_dtype in _AUDIT_DTYPES.items():
            ptr = f"*{dtype}"
            precision = _dot_precision(torch_dtype)
            params = {"QW": ptr, "QB": ptr, "KW": ptr, "KB": ptr, "q_eps": "fp32", "k_eps": "fp32"}
            fwd_sig, bwd_sig = signatures(ptr, params)
            for head_dim in _AUDIT_HEAD_DIMS:
                bd, bdt, has_tail = head_split(head_dim)
                shape = {"HEAD_DIM": head_dim, "BLOCK_D": bd, "BLOCK_DT": bdt, "HAS_TAIL": has_tail}
                tier = _tier(torch_dtype, head_dim)
                for kernel, sig in (("fwd", fwd_sig), ("dkdv", bwd_sig), ("dq", bwd_sig)):
                    fn = kernels[kernel]
                    extra = dict(norm) if kernel == "fwd" else {**norm, "PARTIAL_ROWS": partial_rows(tier, kernel)}
                    for cfg in config_lists(tier, qk_norm)[kernel]:
                        kw = cfg.kwargs
                        specs.append(_spec(
                            fn.__name__ + ("[qk_norm]" if qk_norm else ""), fn, sig,
                            {**shape, **kw, "DOT_PRECISION": precision, **extra},
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages, dtype=dtype, gemm_like=True,
                            not_on=_common.excluded_archs(cfg),
                            label=f"d{head_dim} M{kw['BLOCK_M']} N{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}",
                        ))  # fmt: skip
    return specs


AUDIT_SPECS: List[_common.KernelSpec] = audit_specs(_KERNELS, _dense_signatures)

__all__ = ["attention_fwd", "attention_bwd", "head_split", "AUDIT_SPECS", "LOG2E"]
