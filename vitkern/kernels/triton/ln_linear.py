"""LayerNorm fused into the GEMM for `vitkern.ops.ln_linear` (LN1 + QKV, LN2 + fc1 + GELU).

Design (a) of issue 3: a per-row statistics pass (`layer_norm_stats` of the LayerNorm family:
mean and rstd in fp32, 8 bytes per row), then the GEMM normalizes each A tile as it loads it,
(x - mean) * rstd * gamma + beta, rounded to the input dtype (exactly what eager PyTorch feeds
its GEMM), so the normalized activations never travel through HBM. The epilogue (bias, exact
GELU, and dact = GELU'(pre) saved for the backward when one follows) is `linear`'s.

Backward, with dh = dy * dact when the forward had GELU (else dy), formed as tiles are loaded:
  * dLN = dh @ W: `linear`'s dx GEMM;
  * `_ln_linear_bwd_dw_kernel`: dW = dh^T @ LN(x), normalizing the x tile on load from x, mean,
    rstd, gamma and beta (LN(x) is recomputed rather than stored: x re-read instead of LN(x)
    written and read back), with db = sum_rows(dh) fused as in `linear`;
  * dx, dgamma, dbeta: the LayerNorm family's `layer_norm_bwd` on dLN.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import _common
from vitkern.kernels.triton.layer_norm import layer_norm_bwd, layer_norm_stats
from vitkern.kernels.triton.linear import (
    _TC_TILES,
    _F32_TILES,
    _TRITON_DTYPE,
    F32_CONFIGS,
    GROUP_M,
    TC_CONFIGS,
    _dot_acc,
    _epilogue_store,
    _grouped_tile,
    _configs,
    _scaled_load,
    _spec,
    act_flags,
    is_f32,
    linear_bwd_dx,
    tiles_grid,
)


@triton.jit
def _ln_linear_fwd_kernel(
    x_ptr,      # [M, D] any strides
    mean_ptr,   # [M] fp32
    rstd_ptr,   # [M] fp32
    gamma_ptr,  # [D]
    beta_ptr,   # [D]
    w_ptr,      # [N, D] any strides
    bias_ptr,   # [N]; read only if HAS_BIAS
    dact_ptr,   # [M, N] contiguous, out: act'(pre-activation); written only if ACT_GELU and SAVE_DACT
    y_ptr,      # [M, N] contiguous, out
    M, N, D,
    stride_xm, stride_xd, stride_wn, stride_wd,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, SAVE_DACT: tl.constexpr, IEEE: tl.constexpr,
    ACT_KIND: tl.constexpr,  # linear.ACT_KINDS: exact GELU, tanh GELU, QuickGELU
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # int64 offsets and steps along D: a weight view's column stride past 2^31 / BLOCK_K would wrap
    # BLOCK_K * stride in int32. (linear's kernels keep int32 and copy such an operand in the launcher
    # instead, because int64 spilled a linear tile; these tiles audit with 0 spills in int64.)
    offs_k = tl.arange(0, BLOCK_K)  # int32 for the masks; int64 where it meets a stride
    step_xd = tl.cast(stride_xd, tl.int64) * BLOCK_K
    step_wd = tl.cast(stride_wd, tl.int64) * BLOCK_K
    m_ok = offs_m < M
    n_ok = offs_n < N
    mean = tl.load(mean_ptr + offs_m, mask=m_ok, other=0.0)
    rstd = tl.load(rstd_ptr + offs_m, mask=m_ok, other=0.0)
    x_ptrs = x_ptr + (offs_m.to(tl.int64) * stride_xm)[:, None] + (offs_k.to(tl.int64) * stride_xd)[None, :]
    w_ptrs = w_ptr + (offs_k.to(tl.int64) * stride_wd)[:, None] + (offs_n.to(tl.int64) * stride_wn)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        # Masked columns get gamma = beta = 0, hence a = 0: they add nothing to the dot.
        a = ((x - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot_acc(a, b, acc, IEEE)
        x_ptrs += step_xd
        w_ptrs += step_wd
    _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, y_ptr, 0, 0, dact_ptr, y_ptr, y_ptr,
                    HAS_BIAS, ACT_GELU, False, SAVE_DACT, ACT_KIND, False)


@triton.jit
def _ln_dw_mainloop(
    dy_ptr, dact_ptr, x_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, offs_r, offs_c, N, D, M,
    stride_dym, stride_dyn, stride_xm, stride_xd,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    SCALE_A: tl.constexpr, IEEE: tl.constexpr, ROWSUM: tl.constexpr,
):
    """acc[n, d] = sum_m dh[m, n] LN(x)[m, d] over all rows m in fp32, dh = dy * dact with
    SCALE_A (else dy), and with ROWSUM also rowsum[n] = sum_m dh[m, n]."""
    # int64 offsets and steps along the rows: dy's or x's row stride past 2^31 / BLOCK_L would wrap
    # BLOCK_L * stride in int32.
    offs_l = tl.arange(0, BLOCK_L)  # int32 for the masks; int64 where it meets a stride
    step_dym = tl.cast(stride_dym, tl.int64) * BLOCK_L
    step_xm = tl.cast(stride_xm, tl.int64) * BLOCK_L
    r_ok = offs_r < N
    c_ok = offs_c < D
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    a_offs = (offs_r.to(tl.int64) * stride_dyn)[:, None] + (offs_l.to(tl.int64) * stride_dym)[None, :]
    a_ptrs = dy_ptr + a_offs
    s_ptrs = dact_ptr + a_offs
    b_ptrs = x_ptr + (offs_l.to(tl.int64) * stride_xm)[:, None] + (offs_c.to(tl.int64) * stride_xd)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for l0 in range(0, M, BLOCK_L):
        l_ok = offs_l < M - l0
        a = _scaled_load(a_ptrs, s_ptrs, r_ok[:, None] & l_ok[None, :], SCALE_A)
        x = tl.load(b_ptrs, mask=l_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + l0 + offs_l, mask=l_ok, other=0.0)
        rstd = tl.load(rstd_ptr + l0 + offs_l, mask=l_ok, other=0.0)
        # Rows past M would normalize to beta; a is 0 there, but zero them for clarity of the sum.
        b = (x - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        b = tl.where(l_ok[:, None], b, 0.0).to(x_ptr.dtype.element_ty)
        acc = _dot_acc(a, b, acc, IEEE)
        if ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += step_dym
        if SCALE_A:
            s_ptrs += step_dym
        b_ptrs += step_xm
    return acc, rowsum


@triton.jit
def _ln_linear_bwd_dw_kernel(
    dy_ptr,     # [M, N] any strides
    dact_ptr,   # [M, N] with dy's strides: dh = dy * dact, only if SCALE_A (else dh = dy)
    x_ptr,      # [M, D] any strides (the LayerNorm's input)
    mean_ptr,   # [M] fp32
    rstd_ptr,   # [M] fp32
    gamma_ptr,  # [D]
    beta_ptr,   # [D]
    dw_ptr,     # [N, D] contiguous, out
    db_ptr,     # [N], out; written only if HAS_DB
    N, D, M,
    stride_dym, stride_dyn, stride_xm, stride_xd,
    SCALE_A: tl.constexpr, HAS_DB: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile [BLOCK_M rows of N, BLOCK_N cols of D], reduction over the M tokens in steps of
    # BLOCK_K (meta-parameter names follow the output tile so `linear`'s configs apply).
    pid_r, pid_c = _grouped_tile(tl.program_id(0), N, D, BLOCK_M, BLOCK_N, GROUP_M)
    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_DB:
        if pid_c == 0:
            acc, db = _ln_dw_mainloop(dy_ptr, dact_ptr, x_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, offs_r, offs_c,
                                      N, D, M, stride_dym, stride_dyn, stride_xm, stride_xd,
                                      BLOCK_M, BLOCK_N, BLOCK_K, SCALE_A, IEEE, True)
            tl.store(db_ptr + offs_r, db.to(db_ptr.dtype.element_ty), mask=offs_r < N)
        else:
            acc, _ = _ln_dw_mainloop(dy_ptr, dact_ptr, x_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, offs_r, offs_c,
                                     N, D, M, stride_dym, stride_dyn, stride_xm, stride_xd,
                                     BLOCK_M, BLOCK_N, BLOCK_K, SCALE_A, IEEE, False)
    else:
        acc, _ = _ln_dw_mainloop(dy_ptr, dact_ptr, x_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, offs_r, offs_c,
                                 N, D, M, stride_dym, stride_dyn, stride_xm, stride_xd,
                                 BLOCK_M, BLOCK_N, BLOCK_K, SCALE_A, IEEE, False)
    mask = (offs_r < N)[:, None] & (offs_c < D)[None, :]
    tl.store(dw_ptr + (offs_r.to(tl.int64) * D)[:, None] + offs_c[None, :], acc.to(dw_ptr.dtype.element_ty), mask=mask)


_FWD_KEY = ["N", "D", "HAS_BIAS", "ACT_GELU", "SAVE_DACT"]
_ln_linear_fwd_tc = _common.tuned(_ln_linear_fwd_kernel, TC_CONFIGS, key=_FWD_KEY, name="ln_linear.fwd_tc", rows="M")
# fp32 (exact FMA dots, a parity path): the 128 x 64 tile spills 12 bytes on sm_80 with the
# normalize + GELU epilogue, so the forward keeps the 64 x 64 one only.
_FWD_F32_TILES = _F32_TILES[:1]
_ln_linear_fwd_f32 = _common.tuned(
    _ln_linear_fwd_kernel, _configs(_FWD_F32_TILES), key=_FWD_KEY, name="ln_linear.fwd_f32", rows="M"
)
# The dW kernel holds two fp32 operand tiles besides the accumulator (dy * dact and the normalized
# x), so it steps the reduction by 32, not 64 (at 64 the 128 x 128 and 64 x 128 tiles spill on
# sm_80 with GELU); one more stage keeps as many bytes in flight.
_DW_TC_TILES = [(bm, bn, 32, w, 4) for bm, bn, _, w, _ in _TC_TILES]
_DW_KEY = ["N", "D", "SCALE_A", "HAS_DB"]
_ln_linear_bwd_dw_tc = _common.tuned(
    _ln_linear_bwd_dw_kernel, _configs(_DW_TC_TILES), key=_DW_KEY, name="ln_linear.dw_tc", rows="M"
)
_ln_linear_bwd_dw_f32 = _common.tuned(_ln_linear_bwd_dw_kernel, F32_CONFIGS, key=_DW_KEY, name="ln_linear.dw_f32", rows="M")


# ---------------------------------------------------------------------------------------------
# Design (b), for measurement against (a): the LayerNorm folded into the GEMM.
#   y = rstd * (x @ W'^T - mean * colsum(W')) + c,  W' = W diag(gamma),  c = W beta + b,
# with the row's sum and sum of squares accumulated from the x tiles the K loop already loads
# (K = D is the whole row): no statistics pass, and x goes to the MMA unmodified.


@triton.jit
def _ln_linear_fold_weight_kernel(
    w_ptr,       # [N, D] any strides
    gamma_ptr,   # [D]
    beta_ptr,    # [D]
    bias_ptr,    # [N]; read only if HAS_BIAS
    wg_ptr,      # [N, D] contiguous, out: W diag(gamma) in W's dtype
    colsum_ptr,  # [N] fp32, out: row sums of the rounded W diag(gamma)
    c_ptr,       # [N] fp32, out: W beta + bias
    N, D, stride_wn, stride_wd,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        mask = n_ok[:, None] & d_ok[None, :]
        w = tl.load(w_ptr + (offs_n.to(tl.int64) * stride_wn)[:, None] + ((d0 + offs_d).to(tl.int64) * stride_wd)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + d0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + d0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        wg = (w * gamma[None, :]).to(wg_ptr.dtype.element_ty)
        tl.store(wg_ptr + (offs_n.to(tl.int64) * D)[:, None] + (d0 + offs_d)[None, :], wg, mask=mask)
        # The sum of the rounded values, so that mean * colsum cancels exactly what the GEMM adds.
        colsum += tl.sum(wg.to(tl.float32), axis=1)
        c += tl.sum(w * beta[None, :], axis=1)
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(colsum_ptr + offs_n, colsum, mask=n_ok)
    tl.store(c_ptr + offs_n, c, mask=n_ok)


@triton.jit
def _ln_linear_fold_fwd_kernel(
    x_ptr,       # [M, D] any strides
    wg_ptr,      # [N, D] any strides: W diag(gamma)
    colsum_ptr,  # [N] fp32
    c_ptr,       # [N] fp32: W beta + bias
    mean_ptr,    # [M] fp32, out (written by the programs of the first column tile)
    rstd_ptr,    # [M] fp32, out (idem)
    dact_ptr,    # [M, N] contiguous, out: act'(pre-activation); written only if ACT_GELU and SAVE_DACT
    y_ptr,       # [M, N] contiguous, out
    M, N, D, eps,
    stride_xm, stride_xd, stride_wn, stride_wd,
    ACT_GELU: tl.constexpr, SAVE_DACT: tl.constexpr, IEEE: tl.constexpr,
    ACT_KIND: tl.constexpr,  # linear.ACT_KINDS
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)  # int64 offsets and steps along D, as above
    step_xd = tl.cast(stride_xd, tl.int64) * BLOCK_K
    step_wd = tl.cast(stride_wd, tl.int64) * BLOCK_K
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + (offs_m.to(tl.int64) * stride_xm)[:, None] + (offs_k.to(tl.int64) * stride_xd)[None, :]
    w_ptrs = wg_ptr + (offs_k.to(tl.int64) * stride_wd)[:, None] + (offs_n.to(tl.int64) * stride_wn)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot_acc(x, w, acc, IEEE)
        xf = x.to(tl.float32)
        row_sum += tl.sum(xf, axis=1)
        row_sq += tl.sum(xf * xf, axis=1)
        x_ptrs += step_xd
        w_ptrs += step_wd
    mean = row_sum / D
    # E[x^2] - mean^2 in fp32: loses digits only when |mean| / std exceeds ~10^3 (clamped at 0).
    var = tl.maximum(row_sq / D - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    if pid_n == 0:
        tl.store(mean_ptr + offs_m, mean, mask=m_ok)
        tl.store(rstd_ptr + offs_m, rstd, mask=m_ok)
    colsum = tl.load(colsum_ptr + offs_n, mask=n_ok, other=0.0)
    c = tl.load(c_ptr + offs_n, mask=n_ok, other=0.0)
    acc = rstd[:, None] * (acc - mean[:, None] * colsum[None, :]) + c[None, :]
    # bias is already in c: the shared epilogue adds no bias and no residual here.
    _epilogue_store(acc, offs_m, offs_n, M, N, c_ptr, y_ptr, 0, 0, dact_ptr, y_ptr, y_ptr,
                    False, ACT_GELU, False, SAVE_DACT, ACT_KIND, False)


_FOLD_KEY = ["N", "D", "ACT_GELU", "SAVE_DACT"]
_ln_linear_fold_fwd_tc = _common.tuned(
    _ln_linear_fold_fwd_kernel, TC_CONFIGS, key=_FOLD_KEY, name="ln_linear.fold_fwd_tc", rows="M"
)
_ln_linear_fold_fwd_f32 = _common.tuned(
    _ln_linear_fold_fwd_kernel, _configs(_FWD_F32_TILES), key=_FOLD_KEY, name="ln_linear.fold_fwd_f32", rows="M"
)
FOLD_WEIGHT_BLOCK_N = 32
FOLD_WEIGHT_BLOCK_D = 64


# ---------------------------------------------------------------------------------------------
# Launchers (inputs already validated by vitkern.ops.ln_linear)


def ln_linear_fwd(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], eps: float, activation: Optional[str], save_dact: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(LayerNorm(x) @ weight^T + bias).

    x: [M, D] (unit column stride; any row stride); ln_weight, ln_bias: [D]; weight: [N, D];
    bias: [N] or None; all one dtype. Returns (y [M, N] contiguous in x's dtype, mean [M] fp32,
    rstd [M] fp32, dact), dact = act'(pre-activation) [M, N] when there is an activation ("gelu",
    "gelu_tanh", "quick_gelu") and save_dact, else an empty [0] tensor.
    """
    M, D = x.shape
    N = weight.shape[0]
    gelu, act_kind = act_flags(activation)
    keep = gelu and save_dact
    mean, rstd = layer_norm_stats(x, eps)
    y = _common.empty((M, N), dtype=x.dtype, device=x.device)
    dact = _common.empty((M, N) if keep else (0,), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, mean, rstd, dact
    kernel = _ln_linear_fwd_f32 if is_f32(x.dtype) else _ln_linear_fwd_tc
    _common.launcher(kernel)[tiles_grid(M, N)](
        x, mean, rstd, ln_weight, ln_bias, weight, bias if bias is not None else y, dact if keep else y, y,
        M, N, D,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, ACT_GELU=gelu, SAVE_DACT=keep, IEEE=is_f32(x.dtype), ACT_KIND=act_kind,
    )
    return y, mean, rstd, dact


def ln_linear_fwd_folded(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], eps: float, activation: Optional[str], save_dact: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Design (b): same contract and outputs as `ln_linear_fwd` (y, mean, rstd, dact), computed
    with the LayerNorm folded into the GEMM (see `_ln_linear_fold_fwd_kernel`). Two launches: the
    weight fold (N x D, once per call) and the GEMM; no statistics pass over x."""
    M, D = x.shape
    N = weight.shape[0]
    gelu, act_kind = act_flags(activation)
    keep = gelu and save_dact
    dev = x.device
    y = _common.empty((M, N), dtype=x.dtype, device=dev)
    dact = _common.empty((M, N) if keep else (0,), dtype=x.dtype, device=dev)
    mean = _common.empty((M,), dtype=torch.float32, device=dev)
    rstd = _common.empty((M,), dtype=torch.float32, device=dev)
    wg = _common.empty((N, D), dtype=weight.dtype, device=dev)
    colsum = _common.empty((N,), dtype=torch.float32, device=dev)
    c = _common.empty((N,), dtype=torch.float32, device=dev)
    if N == 0:
        return y, mean, rstd, dact
    _common.launcher(_ln_linear_fold_weight_kernel)[(triton.cdiv(N, FOLD_WEIGHT_BLOCK_N),)](
        weight, ln_weight, ln_bias, bias if bias is not None else c, wg, colsum, c,
        N, D, weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, BLOCK_N=FOLD_WEIGHT_BLOCK_N, BLOCK_D=FOLD_WEIGHT_BLOCK_D, num_warps=4,
    )
    if M == 0:
        return y, mean, rstd, dact
    kernel = _ln_linear_fold_fwd_f32 if is_f32(x.dtype) else _ln_linear_fold_fwd_tc
    _common.launcher(kernel)[tiles_grid(M, N)](
        x, wg, colsum, c, mean, rstd, dact if keep else y, y,
        M, N, D, float(eps),
        x.stride(0), x.stride(1), wg.stride(0), wg.stride(1),
        ACT_GELU=gelu, SAVE_DACT=keep, IEEE=is_f32(x.dtype), ACT_KIND=act_kind,
    )
    return y, mean, rstd, dact


FWD_DESIGNS = ("normalize", "fold")


def fwd_design() -> str:
    """Which forward `ln_linear_forward` runs: "normalize" (design (a), the default) or "fold"
    (design (b)), from VITKERN_LN_LINEAR_DESIGN, read at each call so a benchmark can compare."""
    design = os.environ.get("VITKERN_LN_LINEAR_DESIGN", "normalize").strip().lower() or "normalize"
    if design not in FWD_DESIGNS:
        raise ValueError(f"VITKERN_LN_LINEAR_DESIGN must be one of {FWD_DESIGNS}, got {design!r}")
    return design


def ln_linear_forward(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], eps: float, activation: Optional[str], save_dact: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ln_linear_fwd` or `ln_linear_fwd_folded`, as `fwd_design()` says (same contract)."""
    fwd = ln_linear_fwd_folded if fwd_design() == "fold" else ln_linear_fwd
    return fwd(x, ln_weight, ln_bias, weight, bias, eps, activation, save_dact)


def ln_linear_bwd_dw(
    dy: torch.Tensor, dact: Optional[torch.Tensor], x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, has_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """dw = dh^T @ LayerNorm(x) (recomputed on load) and db = dh summed over rows, dh = dy * dact
    (dy when dact is None).

    dy: [M, N]; dact: [M, N] with dy's strides, or None; x: [M, D]; mean, rstd: [M] fp32;
    ln_weight, ln_bias: [D]. Returns (dw [N, D] contiguous, db [N] or an empty [0] tensor when not
    has_bias), in dy's dtype."""
    M, N = dy.shape
    D = x.shape[1]
    dw = _common.empty((N, D), dtype=dy.dtype, device=dy.device)
    db = _common.empty((N,) if has_bias else (0,), dtype=dy.dtype, device=dy.device)
    if N == 0:
        return dw, db
    kernel = _ln_linear_bwd_dw_f32 if is_f32(dy.dtype) else _ln_linear_bwd_dw_tc
    _common.launcher(kernel)[tiles_grid(N, D)](
        dy, dact if dact is not None else dy, x, mean, rstd, ln_weight, ln_bias, dw, db if has_bias else dw,
        N, D, M,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        SCALE_A=dact is not None, HAS_DB=has_bias, IEEE=is_f32(dy.dtype),
    )
    return dw, db


def ln_linear_bwd(
    dy: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, dact: torch.Tensor, activation: Optional[str], has_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ln_linear_fwd.

    dy: [M, N] (contiguous with an activation); x: [M, D] (unit column stride); ln_weight,
    ln_bias: [D]; weight: [N, D]; mean, rstd: [M] fp32 and dact [M, N] from ln_linear_fwd. Returns
    (dx [M, D], dln_weight [D], dln_bias [D], dweight [N, D], dbias [N] or an empty [0] tensor
    when not has_bias), all in x's dtype.
    """
    scale = dact if activation is not None else None
    dln = linear_bwd_dx(dy, weight, scale)
    dw, db = ln_linear_bwd_dw(dy, scale, x, mean, rstd, ln_weight, ln_bias, has_bias)
    dx, dgamma, dbeta = layer_norm_bwd(dln, x, ln_weight, mean, rstd)
    return dx, dgamma, dbeta, dw, db


# ---------------------------------------------------------------------------------------------
# Audit specs: every kernel x every config x dtype. As in linear.py, unit strides are constants
# and the "i32:16" ints are what Triton's run-time specialization marks for contiguous ViT-B/16
# operands (D = 768, N = 2304 / 3072: multiples of 16).


def _audit_specs() -> List["_common.KernelSpec"]:
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = _TRITON_DTYPE[dtype]
        ieee = dtype == torch.float32

        def tile_meta(bm, bn, bk, warps, stages):
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M)
            common = dict(num_warps=warps, num_stages=stages, dtype=t, gemm_like=True)
            return meta, common, f"{bm}x{bn}x{bk} w{warps} s{stages}"

        for tile in _FWD_F32_TILES if ieee else _TC_TILES:
            meta, common, cfg = tile_meta(*tile)
            for flags, what in (
                (dict(HAS_BIAS=True, ACT_GELU=True, SAVE_DACT=True, ACT_KIND=0), "LN2+fc1: bias+gelu+dact"),
                (dict(HAS_BIAS=True, ACT_GELU=True, SAVE_DACT=True, ACT_KIND=1), "LN2+fc1: bias+gelu_tanh+dact"),
                (dict(HAS_BIAS=True, ACT_GELU=True, SAVE_DACT=True, ACT_KIND=2), "LN2+fc1: bias+quick_gelu+dact"),
                (dict(HAS_BIAS=True, ACT_GELU=False, SAVE_DACT=False, ACT_KIND=0), "LN1+qkv: bias"),
            ):
                sig = {"x_ptr": f"*{t}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "gamma_ptr": f"*{t}",
                       "beta_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "dact_ptr": f"*{t}",
                       "y_ptr": f"*{t}", "M": "i32", "N": "i32", "D": "i32", "stride_xm": "i32", "stride_wn": "i32"}
                specs.append(_spec("_ln_linear_fwd_kernel", _ln_linear_fwd_kernel, sig,
                                   dict(flags, IEEE=ieee, stride_xd=1, stride_wd=1, **meta),
                                   ("N", "D", "stride_xm", "stride_wn"), label=f"{cfg} {what}", **common))
        for tile in _F32_TILES if ieee else _DW_TC_TILES:
            meta, common, cfg = tile_meta(*tile)
            sig = {"dy_ptr": f"*{t}", "dact_ptr": f"*{t}", "x_ptr": f"*{t}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                   "gamma_ptr": f"*{t}", "beta_ptr": f"*{t}", "dw_ptr": f"*{t}", "db_ptr": f"*{t}",
                   "N": "i32", "D": "i32", "M": "i32", "stride_dym": "i32", "stride_xm": "i32"}
            for scale, what in ((True, "fc1 dw+db (dy*dact)"), (False, "qkv dw+db")):
                specs.append(_spec("_ln_linear_bwd_dw_kernel", _ln_linear_bwd_dw_kernel, sig,
                                   dict(SCALE_A=scale, HAS_DB=True, IEEE=ieee, stride_dyn=1, stride_xd=1, **meta),
                                   ("N", "D", "stride_dym", "stride_xm"), label=f"{cfg} {what}", **common))
        for tile in _FWD_F32_TILES if ieee else _TC_TILES:
            meta, common, cfg = tile_meta(*tile)
            for flags, what in ((dict(ACT_GELU=True, SAVE_DACT=True, ACT_KIND=0), "fc1: gelu+dact"),
                                (dict(ACT_GELU=False, SAVE_DACT=False, ACT_KIND=0), "qkv")):
                sig = {"x_ptr": f"*{t}", "wg_ptr": f"*{t}", "colsum_ptr": "*fp32", "c_ptr": "*fp32",
                       "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dact_ptr": f"*{t}", "y_ptr": f"*{t}",
                       "M": "i32", "N": "i32", "D": "i32", "eps": "fp32", "stride_xm": "i32", "stride_wn": "i32"}
                specs.append(_spec("_ln_linear_fold_fwd_kernel", _ln_linear_fold_fwd_kernel, sig,
                                   dict(flags, IEEE=ieee, stride_xd=1, stride_wd=1, **meta),
                                   ("N", "D", "stride_xm", "stride_wn"), label=f"{cfg} fold {what}", **common))
        sig = {"w_ptr": f"*{t}", "gamma_ptr": f"*{t}", "beta_ptr": f"*{t}", "bias_ptr": f"*{t}", "wg_ptr": f"*{t}",
               "colsum_ptr": "*fp32", "c_ptr": "*fp32", "N": "i32", "D": "i32", "stride_wn": "i32"}
        specs.append(_spec("_ln_linear_fold_weight_kernel", _ln_linear_fold_weight_kernel, sig,
                           dict(HAS_BIAS=True, BLOCK_N=FOLD_WEIGHT_BLOCK_N, BLOCK_D=FOLD_WEIGHT_BLOCK_D, stride_wd=1),
                           ("N", "D", "stride_wn"), num_warps=4, num_stages=1, dtype=t, gemm_like=False,
                           label=f"BLOCK_N {FOLD_WEIGHT_BLOCK_N} BLOCK_D {FOLD_WEIGHT_BLOCK_D}"))
    return specs


AUDIT_SPECS: List[_common.KernelSpec] = _audit_specs()
