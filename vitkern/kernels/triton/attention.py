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
                                    delta = rowsum(P * dP) / rowsum(P) and stores it
                                    [batch, heads, tokens] fp32; sweep 2 accumulates dQ; writes the
                                    q columns of dqkv.
    _attention_bwd_dkdv_kernel      per key block: recompute P and dP (query-major, as the forward
                                    and dQ do) from lse, accumulate dV and dK over all query
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
"""

from __future__ import annotations

import functools
from typing import List, Tuple

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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n_mask = (start_n + offs_n) < T
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_TAIL:
            kvt_mask = n_mask[:, None] & dt_mask[None, :]
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Sweep 0 sums delta = rowsum(P * dP) over all keys; sweep 1 uses it: dS = P * (dP - delta).
    # The extra sweep costs two of the kernel's three dots per key block (S and dP again) and
    # replaces a separate pass that read out and dout from memory.
    for sweep in tl.static_range(2):
        if sweep == 1:
            # The recomputed row sums to 1 only up to the rounding of lse (|lse| ulp, relative:
            # 6e-5 at a logit of 1000). That common factor cancels from dS only if delta is the
            # P-weighted mean of dP, so divide by the row's own sum.
            delta = delta / p_sum
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
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_TAIL:
                kvt_mask = n_mask[:, None] & dt_mask
                k_t = tl.load(kt_ptrs, mask=kvt_mask, other=0.0)  # [BLOCK_N, BLOCK_DT]
                v_t = tl.load(vt_ptrs, mask=kvt_mask, other=0.0)
                s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
                dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
            # Zero-filled keys past T would score 0, not -inf: mask them out of P.
            p = tl.where(n_mask[None, :], tl.exp2((s * scale - lse[:, None]) * 1.4426950408889634), 0.0)
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
    dq = dq * scale
    d_rows = DQKV + b * stride_dqkv_b + rows * stride_dqkv_t + h * HEAD_DIM
    tl.store(d_rows + offs_d[None, :], dq.to(DQKV.dtype.element_ty), mask=q_mask)
    if HAS_TAIL:
        dq_t = dq_t * scale
        tl.store(d_rows + offs_dt[None, :], dq_t.to(DQKV.dtype.element_ty), mask=qt_mask)


@triton.jit
def _attention_bwd_dkdv_kernel(
    QKV,  # [B, T, 3 * H * HEAD_DIM], last dim contiguous
    DOUT,  # [B, T, H * HEAD_DIM], last dim contiguous
    LSE,  # [B, H, T] fp32, contiguous
    DELTA,  # [B, H, T] fp32, contiguous, from the dQ kernel
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
        # Query-major tiles [BLOCK_M, BLOCK_N], as the forward and the dQ kernel compute them (see
        # above), transposed only after rounding to the operand dtype. Rows and columns past T are
        # zeroed so they add nothing to the valid key rows.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_TAIL:
            qt_mask = m_mask[:, None] & dt_mask
            q_t = tl.load(qt_ptrs, mask=qt_mask, other=0.0)  # [BLOCK_M, BLOCK_DT]
            do_t = tl.load(dot_ptrs, mask=qt_mask, other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
        p = tl.exp2((s * scale - lse[:, None]) * 1.4426950408889634)
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
    d_head = DQKV + b * stride_dqkv_b + h * HEAD_DIM
    d_off = offs_n[:, None] * stride_dqkv_t + offs_d[None, :]
    tl.store(d_head + dim + d_off, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
    tl.store(d_head + 2 * dim + d_off, dv.to(DQKV.dtype.element_ty), mask=kv_mask)
    if HAS_TAIL:
        dk_t = dk_t * scale
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
    # spills ptxas decides unpredictably with the tile shape (each list is what audits clean).
    ("fp32", 64): {
        "fwd": [_cfg(32, 32, 4, 2), _cfg(64, 32, 8, 2)],
        "dkdv": [_cfg(32, 32, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 64, 8, 2)],
        "dq": [_cfg(32, 32, 4, 1), _cfg(64, 32, 8, 2)],
    },
    # dK/dV 32 x 32 w8 spills 16 B at head dim 96 on sm_90 (and every other 32- or 16-row tile
    # tried spills somewhere in this tier): kept as the least bad, see docs/perf/attention.md.
    ("fp32", 96): {
        "fwd": [_cfg(32, 32, 4, 2), _cfg(32, 32, 8, 2)],
        "dkdv": [_cfg(32, 32, 8, 2)],
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
_KERNELS = {"fwd": _attention_fwd_kernel, "dkdv": _attention_bwd_dkdv_kernel, "dq": _attention_bwd_dq_kernel}


def _tier(dtype: torch.dtype, head_dim: int) -> Tuple[str, int]:
    bd, bdt, has_tail = head_split(head_dim)
    padded = bd + (bdt if has_tail else 0)
    width = 64 if padded <= 64 else 96 if padded <= 96 else 128
    return ("fp32" if dtype == torch.float32 else "half", width)


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, tier: Tuple[str, int]):
    """The tuned launcher of `kernel` for `tier`, built on first use (nothing at import); its M
    bucket is the number of (batch, head) pairs."""
    return _common.tuned(_KERNELS[kernel], CONFIGS[tier][kernel], key=["T", "HEAD_DIM"],
                         name=f"attention.{kernel}.{tier[0]}{tier[1]}", rows=lambda a: a["QKV"].shape[0] * a["H"])


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


def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """qkv: [batch, tokens, 3 * dim] fp16/bf16/fp32 with stride(-1) == 1.

    Returns out [batch, tokens, dim] in qkv's dtype and lse [batch, heads, tokens] fp32.
    """
    b, t, three_dim = qkv.shape
    # The head size is a constexpr: specialize it (int) even when torch.compile traces shapes symbolically.
    dim = int(three_dim) // 3
    head_dim = dim // num_heads
    out = _common.empty((b, t, dim), dtype=qkv.dtype, device=qkv.device)
    lse = _common.empty((b, num_heads, t), dtype=torch.float32, device=qkv.device)

    def grid(meta):
        return (b * num_heads * triton.cdiv(t, meta["BLOCK_M"]),)

    bd, bdt, has_tail = head_split(head_dim)
    _common.launcher(_tuned("fwd", _tier(qkv.dtype, head_dim)))[grid](
        qkv, out, lse, t, num_heads,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        scale,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, HAS_TAIL=has_tail, DOT_PRECISION=_dot_precision(qkv.dtype),
    )  # fmt: skip
    return out, lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """dout: [batch, tokens, dim] (stride(-1) == 1); qkv: [batch, tokens, 3 * dim] (stride(-1) == 1);
    lse: [batch, heads, tokens] fp32 contiguous, from `attention_fwd`.

    Returns dqkv [batch, tokens, 3 * dim] contiguous, in qkv's dtype. The dQ kernel runs first: it
    writes delta [batch, heads, tokens] fp32 (rowsum(P * dP)), which the dK/dV kernel reads.
    """
    b, t, three_dim = qkv.shape
    # The head size is a constexpr: specialize it (int) even when torch.compile traces shapes symbolically.
    dim = int(three_dim) // 3
    head_dim = dim // num_heads
    bd, bdt, has_tail = head_split(head_dim)
    split = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, HAS_TAIL=has_tail)
    precision = _dot_precision(qkv.dtype)
    delta = _common.empty((b, num_heads, t), dtype=torch.float32, device=qkv.device)
    dqkv = _common.empty((b, t, three_dim), dtype=qkv.dtype, device=qkv.device)
    tier = _tier(qkv.dtype, head_dim)
    args = (
        qkv, dout, lse, delta, dqkv, t, num_heads,
        qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1),
        scale,
    )  # fmt: skip

    def dq_grid(meta):
        return (b * num_heads * triton.cdiv(t, meta["BLOCK_M"]),)

    _common.launcher(_tuned("dq", tier))[dq_grid](*args, **split, DOT_PRECISION=precision)

    def dkdv_grid(meta):
        return (b * num_heads * triton.cdiv(t, meta["BLOCK_N"]),)

    _common.launcher(_tuned("dkdv", tier))[dkdv_grid](*args, **split, DOT_PRECISION=precision)
    return dqkv


# --------------------------------------------------------------------------------------------
# AOT specs for `python -m vitkern.audit`: every kernel x every config of its tier x dtype, at
# ViT-B/16's head size 64, at 80 (ViT-H/14, split 64 + 16), at 96 (64 + 32, the widest of the split
# tier) and at 128 (the one tier-128 head of a ViT). At run time Triton marks
# 16-byte-aligned pointers and ints divisible by 16 (all strides of contiguous ViT tensors: 3D and
# D are multiples of 16); the specs type the strides "i32:16" so the audit compiles the same
# specialization, without which loads are not vectorized and the register counts would describe a
# different kernel.

_AUDIT_HEAD_DIMS = (64, 80, 96, 128)
_AUDIT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _spec(name, fn, signature, constexprs, **kwargs) -> _common.KernelSpec:
    return _common.KernelSpec(name, fn, signature, constexprs, **kwargs)


def _specs() -> List[_common.KernelSpec]:
    specs: List[_common.KernelSpec] = []
    ints = {"T": "i32", "H": "i32"}

    def strides(*names: str) -> dict:
        # "i32:16": the strides of contiguous ViT tensors (3D, D, T*3D, T*D) are multiples of 16.
        return {f"stride_{n}_{a}": "i32:16" for n in names for a in ("b", "t")}

    for dtype, torch_dtype in _AUDIT_DTYPES.items():
        ptr = f"*{dtype}"
        precision = _dot_precision(torch_dtype)
        for head_dim in _AUDIT_HEAD_DIMS:
            bd, bdt, has_tail = head_split(head_dim)
            shape = {"HEAD_DIM": head_dim, "BLOCK_D": bd, "BLOCK_DT": bdt, "HAS_TAIL": has_tail}
            tier = _tier(torch_dtype, head_dim)
            fwd_sig = {"QKV": ptr, "OUT": ptr, "LSE": "*fp32", **ints, **strides("qkv", "out"), "scale": "fp32"}
            bwd_sig = {"QKV": ptr, "DOUT": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQKV": ptr, **ints,
                       **strides("qkv", "dout", "dqkv"), "scale": "fp32"}  # fmt: skip
            for kernel, sig in (("fwd", fwd_sig), ("dkdv", bwd_sig), ("dq", bwd_sig)):
                fn = _KERNELS[kernel]
                for cfg in CONFIGS[tier][kernel]:
                    kw = cfg.kwargs
                    specs.append(_spec(
                        fn.__name__, fn, sig, {**shape, **kw, "DOT_PRECISION": precision},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, dtype=dtype, gemm_like=True,
                        label=f"d{head_dim} M{kw['BLOCK_M']} N{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}",
                    ))  # fmt: skip
    return specs


AUDIT_SPECS: List[_common.KernelSpec] = _specs()

__all__ = ["attention_fwd", "attention_bwd", "head_split", "AUDIT_SPECS", "LOG2E"]
