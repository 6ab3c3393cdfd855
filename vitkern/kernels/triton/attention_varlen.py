"""Flash-style attention on packed variable-length sequences (NaViT/NaFlex), forward and backward.

The packed form of `attention.py`'s kernels (same numerics, same helpers, same config lists):

    qkv        [total, 3 * dim]   the images' tokens back to back, no padding; timm's column order
    cu_seqlens [num_seqs + 1]     int32 offsets: sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1]
    out        [total, dim]
    lse, delta, r_sum [heads, total]  fp32 (FlashAttention's varlen layout; r_sum: 1 / row sum of P)
    dqkv       [total, 3 * dim]

One program per (sequence, row block, head), the row block fastest as in the dense kernels; the
grid is sized by max_seqlen, and a program whose row block starts past its sequence's end computes
on masked (zero) rows and stores nothing (it still writes its zero share of the QK-norm partial
sums, so every workspace row is written by exactly one program). A program reads keys only from its
own sequence: the key loop runs over [0, len) from the sequence's first row, so no token ever sees
another image's keys, and the result for an image does not depend on the other images bit for bit.

The dense kernels are kept as they are (separate kernels rather than a VARLEN constexpr in them):
the bodies below differ only in where a program's rows start and how many there are.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import _common
from vitkern.kernels.triton.attention import (
    NormArgs, _cfg, _dot_precision, _ln_apply, _ln_backward, _ln_rows, _norm_flags, _norm_operands, _tier,
    audit_specs, configs, head_split, partial_rows,
)  # fmt: skip


@triton.jit
def _seq_bounds(CU, seq):
    """(first row in int64, length) of packed sequence `seq`."""
    start = tl.load(CU + seq)
    end = tl.load(CU + seq + 1)
    return start.to(tl.int64), end - start


@triton.jit
def _attention_varlen_fwd_kernel(
    QKV,  # [total, 3 * H * HEAD_DIM], last dim contiguous
    OUT,  # [total, H * HEAD_DIM], contiguous
    LSE,  # [H, total] fp32, contiguous
    CU,  # [num_seqs + 1] int32 offsets
    total,
    max_seqlen,
    H,
    stride_qkv_t,
    stride_out_t,
    scale,
    QW, QB, KW, KB,  # [HEAD_DIM] QK-norm weights and biases (see attention.py)
    q_eps,
    k_eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(max_seqlen, BLOCK_M)
    pid_m = pid % num_m
    pid_sh = pid // num_m
    seq = pid_sh // H
    h = pid_sh % H
    dim = H * HEAD_DIM
    start, T = _seq_bounds(CU, seq)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    d_mask = offs_d < HEAD_DIM

    # The sequence's first row in int64 on the scalar base; offsets inside a sequence stay int32.
    head = QKV + start * stride_qkv_t + h * HEAD_DIM
    q = tl.load(head + offs_m[:, None] * stride_qkv_t + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_d[None, :]
    v_ptrs = k_ptrs + dim
    if HAS_TAIL:
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt < HEAD_DIM
        qt_mask = m_mask[:, None] & dt_mask[None, :]
        q_t = tl.load(head + offs_m[:, None] * stride_qkv_t + offs_dt[None, :], mask=qt_mask, other=0.0)
        kt_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_dt[None, :]
        vt_ptrs = kt_ptrs + dim
        acc_t = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    cols_t = offs_dt if HAS_TAIL else offs_d
    if Q_NORM:
        q, q_t, _q_mean, _q_rstd = _ln_rows(q, q_t if HAS_TAIL else q, QW, QB, offs_d, cols_t, q_eps, HEAD_DIM, HAS_TAIL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n_mask = (start_n + offs_n) < T
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        if K_NORM:
            if HAS_TAIL:
                k_t = tl.load(kt_ptrs, mask=n_mask[:, None] & dt_mask[None, :], other=0.0)
            k, k_t, _, _ = _ln_rows(k, k_t if HAS_TAIL else k, KW, KB, offs_d, cols_t, k_eps, HEAD_DIM, HAS_TAIL)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_TAIL:
            kvt_mask = n_mask[:, None] & dt_mask[None, :]
            if not K_NORM:
                k_t = tl.load(kt_ptrs, mask=kvt_mask, other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
        s = s * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every sequence has at least one token (the ops layer checks), so key block 0 holds a
        # valid key and m_new is finite from the first iteration on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2((m_i - m_new) * 1.4426950408889634)
        p = tl.exp2((s - m_new[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if HAS_TAIL:
            v_t = tl.load(vt_ptrs, mask=kvt_mask, other=0.0)
            acc_t = acc_t * alpha[:, None]
            acc_t = tl.dot(p.to(v_t.dtype), v_t, acc_t, input_precision=DOT_PRECISION)
            kt_ptrs += BLOCK_N * stride_qkv_t
            vt_ptrs += BLOCK_N * stride_qkv_t
        m_i = m_new
        k_ptrs += BLOCK_N * stride_qkv_t
        v_ptrs += BLOCK_N * stride_qkv_t

    out = acc / l_i[:, None]
    o_rows = OUT + start * stride_out_t + h * HEAD_DIM + offs_m[:, None] * stride_out_t
    tl.store(o_rows + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if HAS_TAIL:
        out_t = acc_t / l_i[:, None]
        tl.store(o_rows + offs_dt[None, :], out_t.to(OUT.dtype.element_ty), mask=qt_mask)
    lse = m_i + tl.log2(l_i) * 0.6931471805599453
    tl.store(LSE + h.to(tl.int64) * total + start + offs_m, lse, mask=m_mask)


@triton.jit
def _attention_varlen_bwd_dq_kernel(
    QKV,  # [total, 3 * H * HEAD_DIM], last dim contiguous
    DOUT,  # [total, H * HEAD_DIM], last dim contiguous
    LSE,  # [H, total] fp32
    DELTA,  # [H, total] fp32; written here, read by the dK/dV kernel
    RSUM,  # [H, total] fp32: 1 / (row sum of the recomputed P); written here, read by dK/dV
    DQKV,  # [total, 3 * H * HEAD_DIM], contiguous; this kernel writes the q columns
    CU,  # [num_seqs + 1] int32
    total,
    max_seqlen,
    H,
    stride_qkv_t,
    stride_dout_t,
    stride_dqkv_t,
    scale,
    QW, QB, KW, KB,
    q_eps,
    k_eps,
    DNORM,  # [num_seqs * H * cdiv(max_seqlen, PARTIAL_ROWS), 2, HEAD_DIM] fp32 partial sums
    QSTATS,  # [H, total, 2] fp32 with Q_NORM: each q row's (mean, rstd)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(max_seqlen, BLOCK_M)
    pid_m = pid % num_m
    pid_sh = pid // num_m
    seq = pid_sh // H
    h = pid_sh % H
    dim = H * HEAD_DIM
    start, T = _seq_bounds(CU, seq)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    d_mask = offs_d[None, :] < HEAD_DIM
    q_mask = m_mask[:, None] & d_mask
    rows = offs_m[:, None]

    head = QKV + start * stride_qkv_t + h * HEAD_DIM
    do_rows = DOUT + start * stride_dout_t + h * HEAD_DIM + rows * stride_dout_t
    q = tl.load(head + rows * stride_qkv_t + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_rows + offs_d[None, :], mask=q_mask, other=0.0)
    stats = h.to(tl.int64) * total + start
    lse = tl.load(LSE + stats + offs_m, mask=m_mask, other=0.0)
    if HAS_TAIL:
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt[None, :] < HEAD_DIM
        qt_mask = m_mask[:, None] & dt_mask
        q_t = tl.load(head + rows * stride_qkv_t + offs_dt[None, :], mask=qt_mask, other=0.0)
        do_t = tl.load(do_rows + offs_dt[None, :], mask=qt_mask, other=0.0)
        dq_t = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    cols_t = offs_dt if HAS_TAIL else offs_d
    if Q_NORM:
        q, q_t, q_mean, q_rstd = _ln_rows(q, q_t if HAS_TAIL else q, QW, QB, offs_d, cols_t, q_eps, HEAD_DIM, HAS_TAIL)
        tl.store(QSTATS + (stats + offs_m) * 2, q_mean, mask=m_mask)
        tl.store(QSTATS + (stats + offs_m) * 2 + 1, q_rstd, mask=m_mask)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_sum = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    # Sweep 0 sums delta = rowsum(P * dP) and rowsum(P); sweep 1: dQ with P normalized by the
    # reciprocal row sum r_sum (stored for dK/dV): the dense dQ kernel's scheme and reasons.
    for sweep in tl.static_range(2):
        if sweep == 1:
            # Rows past the sequence end have p_sum 0: keep their (never stored) r_sum finite.
            r_sum = 1.0 / tl.where(m_mask, p_sum, 1.0)
            delta = delta * r_sum
        k_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_d[None, :]
        v_ptrs = k_ptrs + dim
        if HAS_TAIL:
            kt_ptrs = head + dim + offs_n[:, None] * stride_qkv_t + offs_dt[None, :]
            vt_ptrs = kt_ptrs + dim
        for start_n in range(0, T, BLOCK_N):
            n_mask = (start_n + offs_n) < T
            kv_mask = n_mask[:, None] & d_mask
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            if K_NORM:
                if HAS_TAIL:
                    k_t = tl.load(kt_ptrs, mask=n_mask[:, None] & dt_mask, other=0.0)
                k, k_t, _, _ = _ln_rows(k, k_t if HAS_TAIL else k, KW, KB, offs_d, cols_t, k_eps, HEAD_DIM, HAS_TAIL)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_TAIL:
                kvt_mask = n_mask[:, None] & dt_mask
                if not K_NORM:
                    k_t = tl.load(kt_ptrs, mask=kvt_mask, other=0.0)
                v_t = tl.load(vt_ptrs, mask=kvt_mask, other=0.0)
                s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
                dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
            p = tl.where(m_mask[:, None] & n_mask[None, :],
                         tl.exp2((s * scale - lse[:, None]) * 1.4426950408889634), 0.0)
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
        groups = tl.cdiv(max_seqlen, PARTIAL_ROWS)
        dq, dq_t = _ln_backward(dq, dq_t if HAS_TAIL else dq, head + rows * stride_qkv_t, m_mask, QW, offs_d, cols_t,
                                q_eps, DNORM, pid_sh * groups + pid_m * (BLOCK_M // PARTIAL_ROWS),
                                (pid_sh + 1) * groups, HEAD_DIM, HAS_TAIL, BLOCK_M, PARTIAL_ROWS)
    d_rows = DQKV + start * stride_dqkv_t + rows * stride_dqkv_t + h * HEAD_DIM
    tl.store(d_rows + offs_d[None, :], dq.to(DQKV.dtype.element_ty), mask=q_mask)
    if HAS_TAIL:
        tl.store(d_rows + offs_dt[None, :], dq_t.to(DQKV.dtype.element_ty), mask=qt_mask)


@triton.jit
def _attention_varlen_bwd_dkdv_kernel(
    QKV, DOUT, LSE, DELTA, RSUM,  # as in the dQ kernel
    DQKV,  # [total, 3 * H * HEAD_DIM], contiguous; this kernel writes the k and v columns
    CU,
    total,
    max_seqlen,
    H,
    stride_qkv_t,
    stride_dout_t,
    stride_dqkv_t,
    scale,
    QW, QB, KW, KB,
    q_eps,
    k_eps,
    DNORM,  # [num_seqs * H * cdiv(max_seqlen, PARTIAL_ROWS), 2, HEAD_DIM] fp32: k_norm's partial sums
    QSTATS,  # [H, total, 2] fp32 with Q_NORM, from the dQ kernel
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(max_seqlen, BLOCK_N)
    pid_n = pid % num_n
    pid_sh = pid // num_n
    seq = pid_sh // H
    h = pid_sh % H
    dim = H * HEAD_DIM
    start, T = _seq_bounds(CU, seq)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < T
    d_mask = offs_d[None, :] < HEAD_DIM

    head = QKV + start * stride_qkv_t + h * HEAD_DIM
    kv_off = offs_n[:, None] * stride_qkv_t + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask
    k = tl.load(head + dim + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(head + 2 * dim + kv_off, mask=kv_mask, other=0.0)
    dout_head = DOUT + start * stride_dout_t + h * HEAD_DIM
    q_ptrs = head + offs_m[:, None] * stride_qkv_t + offs_d[None, :]
    do_ptrs = dout_head + offs_m[:, None] * stride_dout_t + offs_d[None, :]
    stats = h.to(tl.int64) * total + start
    if HAS_TAIL:
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt[None, :] < HEAD_DIM
        kvt_off = offs_n[:, None] * stride_qkv_t + offs_dt[None, :]
        kvt_mask = n_mask[:, None] & dt_mask
        k_t = tl.load(head + dim + kvt_off, mask=kvt_mask, other=0.0)
        v_t = tl.load(head + 2 * dim + kvt_off, mask=kvt_mask, other=0.0)
        qt_ptrs = head + offs_m[:, None] * stride_qkv_t + offs_dt[None, :]
        dot_ptrs = dout_head + offs_m[:, None] * stride_dout_t + offs_dt[None, :]
        dk_t = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
        dv_t = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
    cols_t = offs_dt if HAS_TAIL else offs_d
    if K_NORM:
        k, k_t, _, _ = _ln_rows(k, k_t if HAS_TAIL else k, KW, KB, offs_d, cols_t, k_eps, HEAD_DIM, HAS_TAIL)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, T, BLOCK_M):
        offs_qm = start_m + offs_m
        m_mask = offs_qm < T
        q_mask = m_mask[:, None] & d_mask
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + stats + offs_qm, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + stats + offs_qm, mask=m_mask, other=0.0)
        r_sum = tl.load(RSUM + stats + offs_qm, mask=m_mask, other=0.0)
        if Q_NORM:
            q_mean = tl.load(QSTATS + (stats + offs_qm) * 2, mask=m_mask, other=0.0)
            q_rstd = tl.load(QSTATS + (stats + offs_qm) * 2 + 1, mask=m_mask, other=0.0)
            q = _ln_apply(q, q_mean, q_rstd, QW, QB, offs_d, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_TAIL:
            qt_mask = m_mask[:, None] & dt_mask
            q_t = tl.load(qt_ptrs, mask=qt_mask, other=0.0)
            if Q_NORM:
                q_t = _ln_apply(q_t, q_mean, q_rstd, QW, QB, offs_dt, HEAD_DIM)
            do_t = tl.load(dot_ptrs, mask=qt_mask, other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
        p = tl.exp2((s * scale - lse[:, None]) * 1.4426950408889634) * r_sum[:, None]  # as the dQ kernel's P
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        p_t = tl.trans(p.to(do.dtype))
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
        groups = tl.cdiv(max_seqlen, PARTIAL_ROWS)
        dk, dk_t = _ln_backward(dk, dk_t if HAS_TAIL else dk, head + dim + offs_n[:, None] * stride_qkv_t, n_mask, KW,
                                offs_d, cols_t, k_eps, DNORM, pid_sh * groups + pid_n * (BLOCK_N // PARTIAL_ROWS),
                                (pid_sh + 1) * groups, HEAD_DIM, HAS_TAIL, BLOCK_N, PARTIAL_ROWS)
    d_head = DQKV + start * stride_dqkv_t + h * HEAD_DIM
    d_off = offs_n[:, None] * stride_dqkv_t + offs_d[None, :]
    tl.store(d_head + dim + d_off, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
    tl.store(d_head + 2 * dim + d_off, dv.to(DQKV.dtype.element_ty), mask=kv_mask)
    if HAS_TAIL:
        dt_off = offs_n[:, None] * stride_dqkv_t + offs_dt[None, :]
        tl.store(d_head + dim + dt_off, dk_t.to(DQKV.dtype.element_ty), mask=kvt_mask)
        tl.store(d_head + 2 * dim + dt_off, dv_t.to(DQKV.dtype.element_ty), mask=kvt_mask)


_KERNELS = {"fwd": _attention_varlen_fwd_kernel, "dkdv": _attention_varlen_bwd_dkdv_kernel,
            "dq": _attention_varlen_bwd_dq_kernel}


# Where the packed kernel's registers differ from the dense one's: {(tier, qk_norm, kernel): configs}.
# The fp32 split tier's dQ 32 x 32 w4 s2 spills 16-44 B at head dims 80 and 96 here (the sequence
# bounds stay live) where the dense kernel's does not; 32 x 32 w8 s2, the same score tile, is clean
# on sm_80 and sm_90 at both (and spills 12 B in the dense kernel at 80 on sm_80).
_PACKED_CONFIGS = {(("fp32", 96), False, "dq"): [_cfg(32, 32, 8, 2)]}


def packed_configs(tier: Tuple[str, int], qk_norm: bool = False) -> dict:
    """{kernel: configs} of the packed kernels for `tier`: the dense lists, but for `_PACKED_CONFIGS`."""
    return {kernel: _PACKED_CONFIGS.get((tier, qk_norm, kernel), cfgs) for kernel, cfgs in configs(tier, qk_norm).items()}


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, tier: Tuple[str, int], qk_norm: bool):
    """The dense kernels' config lists (same tiles: the bodies are the same) but for the few tiles
    whose registers differ (`packed_configs`), tuned under their own names; the M bucket is total
    tokens x heads (the work, not the padding)."""
    name = f"attention_varlen.{kernel}.{tier[0]}{tier[1]}" + (".qk_norm" if qk_norm else "")
    return _common.tuned(_KERNELS[kernel], packed_configs(tier, qk_norm)[kernel], key=["HEAD_DIM"], name=name,
                         rows=lambda a: a["total"] * a["H"], prune=_common.arch_pruner)


def attention_varlen_fwd(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, scale: float,
                         q_norm: NormArgs = None, k_norm: NormArgs = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """qkv: [total, 3 * dim] fp16/bf16/fp32, stride(-1) == 1; cu_seqlens: [num_seqs + 1] int32 on
    qkv's device (validated by vitkern.ops.attention); max_seqlen >= every length.

    Returns out [total, dim] in qkv's dtype and lse [heads, total] fp32.
    """
    total, three_dim = qkv.shape
    dim = int(three_dim) // 3
    head_dim = dim // num_heads
    seqs = cu_seqlens.shape[0] - 1
    out = _common.empty((total, dim), dtype=qkv.dtype, device=qkv.device)
    lse = _common.empty((num_heads, total), dtype=torch.float32, device=qkv.device)
    qw, qb, q_eps = _norm_operands(q_norm, qkv, head_dim)
    kw, kb, k_eps = _norm_operands(k_norm, qkv, head_dim)

    def grid(meta):
        return (seqs * num_heads * triton.cdiv(max_seqlen, meta["BLOCK_M"]),)

    bd, bdt, has_tail = head_split(head_dim)
    qk_norm = q_norm is not None or k_norm is not None
    _common.launcher(_tuned("fwd", _tier(qkv.dtype, head_dim), qk_norm))[grid](
        qkv, out, lse, cu_seqlens, total, max_seqlen, num_heads, qkv.stride(0), out.stride(0),
        scale, qw, qb, kw, kb, q_eps, k_eps,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, HAS_TAIL=has_tail, DOT_PRECISION=_dot_precision(qkv.dtype),
        **_norm_flags(q_norm, k_norm),
    )  # fmt: skip
    return out, lse


def attention_varlen_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    num_heads: int, scale: float, q_norm: NormArgs = None, k_norm: NormArgs = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dout: [total, dim] (stride(-1) == 1); qkv: [total, 3 * dim]; lse: [heads, total] fp32 from
    `attention_varlen_fwd` with the same arguments.

    Returns (dqkv [total, 3 * dim] in qkv's dtype, dq_norm, dk_norm): the norms' weight and bias
    gradients as [2, head_dim] fp32, None without that norm (as `attention.attention_bwd`).
    """
    total, three_dim = qkv.shape
    dim = int(three_dim) // 3
    head_dim = dim // num_heads
    seqs = cu_seqlens.shape[0] - 1
    bd, bdt, has_tail = head_split(head_dim)
    split = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, HAS_TAIL=has_tail, **_norm_flags(q_norm, k_norm))
    precision = _dot_precision(qkv.dtype)
    delta = _common.empty((num_heads, total), dtype=torch.float32, device=qkv.device)
    r_sum = _common.empty((num_heads, total), dtype=torch.float32, device=qkv.device)
    dqkv = _common.empty((total, three_dim), dtype=qkv.dtype, device=qkv.device)
    tier = _tier(qkv.dtype, head_dim)
    qk_norm = q_norm is not None or k_norm is not None
    qw, qb, q_eps = _norm_operands(q_norm, qkv, head_dim)
    kw, kb, k_eps = _norm_operands(k_norm, qkv, head_dim)
    q_stats = delta if q_norm is None else _common.empty((num_heads, total, 2), dtype=torch.float32, device=qkv.device)

    def workspace(norm: NormArgs, rows: int) -> torch.Tensor:
        if norm is None:
            return delta  # never written without the norm
        # One block of rows per (sequence, head), sized by max_seqlen: every row is written once.
        return _common.empty((seqs * num_heads * triton.cdiv(max_seqlen, rows), 2, head_dim),
                             dtype=torch.float32, device=qkv.device)

    def args(ws: torch.Tensor) -> tuple:
        return (
            qkv, dout, lse, delta, r_sum, dqkv, cu_seqlens, total, max_seqlen, num_heads,
            qkv.stride(0), dout.stride(0), dqkv.stride(0),
            scale, qw, qb, kw, kb, q_eps, k_eps, ws, q_stats,
        )  # fmt: skip

    for kernel, block, norm in (("dq", "BLOCK_M", q_norm), ("dkdv", "BLOCK_N", k_norm)):
        rows = partial_rows(tier, kernel)
        ws = workspace(norm, rows)

        def grid(meta, block=block):
            return (seqs * num_heads * triton.cdiv(max_seqlen, meta[block]),)

        _common.launcher(_tuned(kernel, tier, qk_norm))[grid](*args(ws), **split, DOT_PRECISION=precision, PARTIAL_ROWS=rows)
        if kernel == "dq":
            dq_norm = ws.sum(0) if q_norm is not None else None
        else:
            dk_norm = ws.sum(0) if k_norm is not None else None
    return dqkv, dq_norm, dk_norm


# --------------------------------------------------------------------------------------------
# AOT specs for `python -m vitkern.audit`: the dense kernels' grid (attention.py: every config x
# dtype x head size 64/80/96/128 x QK-norm) with the packed kernels' arguments. The row strides
# of contiguous packed tensors (3D, D) are multiples of 16; total and max_seqlen are any ints.


def _varlen_signatures(ptr: str, params: dict) -> Tuple[dict, dict]:
    ints = {"CU": "*i32", "total": "i32", "max_seqlen": "i32", "H": "i32"}
    fwd = {"QKV": ptr, "OUT": ptr, "LSE": "*fp32", **ints, "stride_qkv_t": "i32:16", "stride_out_t": "i32:16",
           "scale": "fp32", **params}
    bwd = {"QKV": ptr, "DOUT": ptr, "LSE": "*fp32", "DELTA": "*fp32", "RSUM": "*fp32", "DQKV": ptr, **ints,
           "stride_qkv_t": "i32:16", "stride_dout_t": "i32:16", "stride_dqkv_t": "i32:16", "scale": "fp32", **params,
           "DNORM": "*fp32", "QSTATS": "*fp32"}  # fmt: skip
    return fwd, bwd


AUDIT_SPECS: List[_common.KernelSpec] = audit_specs(_KERNELS, _varlen_signatures, packed_configs)

__all__ = ["attention_varlen_fwd", "attention_varlen_bwd", "AUDIT_SPECS"]
