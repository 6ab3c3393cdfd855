"""Tiled GEMM with fused epilogues for `vitkern.ops.linear`, and the pieces `ln_linear` reuses.

Forward: y[M, N] = act(x[M, K] @ w[N, K]^T + bias) + residual, one kernel; the epilogue works on the
fp32 accumulator and rounds once when storing. With GELU, when a backward will follow, the epilogue
also stores dact = GELU'(pre) [M, N] (in the input dtype): recomputing the pre-activation would cost
a whole GEMM, and storing GELU' rather than pre turns the backward's activation derivative into
one multiply per loaded element (see docs/perf/linear.md).

Backward, with dy' = dy * dact when the forward had GELU (else dy' = dy):
  * dx = dy' @ w: the forward kernel with no epilogue, w read through swapped strides, and dy'
    formed as the A tile is loaded (SCALE_A), so dy' is never written to memory;
  * `_linear_bwd_dw_kernel`: dw = dy'^T @ x reading dy, dact and x through strides (no transposed
    copy); the programs of the first output-column tile also sum their dy'^T tiles, which gives
    db = sum_rows(dy') deterministically (no atomics, no extra pass over dy).

Index arithmetic: row offsets are int64 before they meet a stride (M * N exceeds 2^31 at batch 4096
of ViT-B); reduction offsets and the K loop's pointer step BLOCK_K * stride stay int32 (an int64
copy spilled tiles), so the launchers copy an operand whose reduction stride could wrap them (a
view's stride past 2^31 / BLOCK_K, e.g. 2^27) to a contiguous one first.
Autotuning is keyed on (N, K) and the epilogue flags, never on M (the batch).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import _common

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), tanh GELU
_QUICK_GELU = tl.constexpr(1.702)  # QuickGELU's x * sigmoid(1.702 x)

# ACT_KIND (the activation when ACT_GELU is set): the GELU family of the fc1 epilogue. A constexpr
# that is not part of the autotuning keys: the three cost the same few FLOPs per element on the
# accumulator, so the tile tuned for exact GELU serves the other two (and the tuning tables' keys
# stay as they are).
ACT_KINDS = {"gelu": 0, "gelu_tanh": 1, "quick_gelu": 2}


def act_flags(activation: Optional[str]) -> Tuple[bool, int]:
    """(ACT_GELU, ACT_KIND) of an `activation` name (None: no activation)."""
    return activation is not None, ACT_KINDS.get(activation, 0)


# ---------------------------------------------------------------------------------------------
# Shared @triton.jit helpers (ln_linear's kernels call them too)


@triton.jit
def _normal_cdf(z):
    """Phi(z) of fp32 z, through the exact erf: GELU(z) = z Phi(z), GELU'(z) = Phi(z) + z phi(z)."""
    return 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))


@triton.jit
def _activation(acc, ACT_KIND: tl.constexpr):
    """(act(acc), act'(acc)) of fp32 acc: exact GELU (0), tanh GELU (1) or QuickGELU (2)."""
    if ACT_KIND == 0:
        cdf = _normal_cdf(acc)  # one erf serves both GELU and its derivative
        return acc * cdf, cdf + acc * _INV_SQRT_2PI * tl.exp(-0.5 * acc * acc)
    elif ACT_KIND == 1:
        # tanh(u) = 2 sigmoid(2u) - 1: no tanh in every Triton's tl.math; saturates to +-1 cleanly.
        # Tensor first in each product: constexpr * tensor would stay a constexpr wrapper.
        u = (acc + 0.044715 * acc * acc * acc) * _SQRT_2_OVER_PI
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = (1.0 + 3.0 * 0.044715 * acc * acc) * _SQRT_2_OVER_PI
        return 0.5 * acc * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * acc * (1.0 - t * t) * du
    else:
        # act' = sig + 1.702 x sig (1 - sig) = sig + 1.702 (y - y sig) with y = x sig: reusing y
        # keeps one fewer fp32 tile live (the literal form spilled the 128 x 64 tile on sm_80).
        sig = tl.sigmoid(acc * _QUICK_GELU)
        y = acc * sig
        return y, sig + (y - y * sig) * _QUICK_GELU


@triton.jit
def _grouped_tile(pid, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_R: tl.constexpr):
    """(row tile, column tile) of program `pid` over an R x C output, visiting GROUP_R row tiles
    column by column so that the programs running together share their A rows and B columns in L2."""
    tiles_r = tl.cdiv(R, BLOCK_R)
    tiles_c = tl.cdiv(C, BLOCK_C)
    per_group = GROUP_R * tiles_c
    group = pid // per_group
    first_r = group * GROUP_R
    rows_here = tl.minimum(tiles_r - first_r, GROUP_R)
    local = pid - group * per_group
    return first_r + local % rows_here, local // rows_here


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs get exact fp32 products (not TF32); fp16/bf16 take the tensor-core path.
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _scaled_load(a_ptrs, s_ptrs, mask, SCALE_A: tl.constexpr):
    """A tile, times the matching tile of S (elementwise, in fp32, rounded back) when SCALE_A."""
    a = tl.load(a_ptrs, mask=mask, other=0.0)
    if SCALE_A:
        s = tl.load(s_ptrs, mask=mask, other=0.0)
        a = (a.to(tl.float32) * s.to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def _mainloop(
    a_ptr, s_ptr, b_ptr, offs_r, offs_c, R, C, L,
    stride_ar, stride_al, stride_bl, stride_bc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    SCALE_A: tl.constexpr, IEEE: tl.constexpr, ROWSUM: tl.constexpr,
):
    """acc[r, c] = sum_l A'[r, l] B[l, c] in fp32 for one tile, A' = A (or A * S with SCALE_A; S
    has A's strides), A and B addressed through strides; with ROWSUM also rowsum[r] = sum_l A'[r, l]
    in fp32 (else zeros)."""
    # Reduction offsets stay int32 (an int64 copy of them spilled some tiles): the launchers make an
    # operand contiguous first when its reduction stride times BLOCK_L could pass 2^31
    # (`reduction_stride_fits`), so l * stride and BLOCK_L * stride never wrap here.
    offs_l = tl.arange(0, BLOCK_L)
    a_offs = (offs_r.to(tl.int64) * stride_ar)[:, None] + (offs_l * stride_al)[None, :]
    a_ptrs = a_ptr + a_offs
    s_ptrs = s_ptr + a_offs
    b_ptrs = b_ptr + (offs_l * stride_bl)[:, None] + (offs_c.to(tl.int64) * stride_bc)[None, :]
    r_ok = offs_r < R
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        l_ok = offs_l < L - l0
        a = _scaled_load(a_ptrs, s_ptrs, r_ok[:, None] & l_ok[None, :], SCALE_A)
        b = tl.load(b_ptrs, mask=l_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot_acc(a, b, acc, IEEE)
        if ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_L * stride_al
        if SCALE_A:
            s_ptrs += BLOCK_L * stride_al
        b_ptrs += BLOCK_L * stride_bl
    return acc, rowsum


@triton.jit
def _epilogue_store(
    acc, offs_m, offs_n, M, N,
    bias_ptr, res_ptr, stride_rm, stride_rn, dact_ptr, y_ptr, scale_ptr,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, SAVE_DACT: tl.constexpr,
    ACT_KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """y = residual + scale * act(acc + bias) on the fp32 accumulator, one rounding at the store.
    With an activation (ACT_GELU; ACT_KIND picks exact GELU, tanh GELU or QuickGELU) and SAVE_DACT
    also dact = act'(acc + bias); with LayerScale's per-column scale [N] (HAS_SCALE, never together
    with an activation) and SAVE_DACT, dact is the unscaled branch acc + bias instead: the backward's
    dscale = sum_rows(dy * branch) needs it, and it would otherwise cost a GEMM. dact and y are
    contiguous [M, N]; the residual is read through its strides."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)
    out_offs = (rows * N)[:, None] + offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT_GELU:
        acc, dact = _activation(acc, ACT_KIND)
        if SAVE_DACT:
            tl.store(dact_ptr + out_offs, dact.to(dact_ptr.dtype.element_ty), mask=mask)
    if HAS_SCALE:
        if SAVE_DACT:
            tl.store(dact_ptr + out_offs, acc.to(dact_ptr.dtype.element_ty), mask=mask)
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + (rows * stride_rm)[:, None] + (offs_n * stride_rn)[None, :], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _linear_fwd_kernel(
    x_ptr,     # [M, K] any strides
    xs_ptr,    # [M, K] with x's strides; x is multiplied by it on load, only if SCALE_A
    w_ptr,     # [N, K] any strides (B[k, n] = w[n, k])
    bias_ptr,  # [N]; read only if HAS_BIAS
    res_ptr,   # [M, N] any strides; read only if HAS_RES
    dact_ptr,  # [M, N] contiguous, out: act'(pre-activation); written only if ACT_GELU and SAVE_DACT
    y_ptr,     # [M, N] contiguous, out
    scale_ptr,  # [N] LayerScale gamma; read only if HAS_SCALE (then dact_ptr gets the unscaled branch)
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
    SCALE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, SAVE_DACT: tl.constexpr,
    ACT_KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _ = _mainloop(x_ptr, xs_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                       BLOCK_M, BLOCK_N, BLOCK_K, SCALE_A, IEEE, False)
    _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, stride_rm, stride_rn, dact_ptr, y_ptr, scale_ptr,
                    HAS_BIAS, ACT_GELU, HAS_RES, SAVE_DACT, ACT_KIND, HAS_SCALE)


@triton.jit
def _linear_bwd_dw_kernel(
    dy_ptr,    # [M, N] any strides
    dact_ptr,  # [M, N] with dy's strides: dy' = dy * dact, only if SCALE_A (else dy' = dy)
    x_ptr,     # [M, K] any strides
    dw_ptr,    # [N, K] contiguous, out
    db_ptr,    # [N], out; written only if HAS_DB
    N, K, M,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    SCALE_A: tl.constexpr, HAS_DB: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile [BLOCK_M rows of N, BLOCK_N cols of K]; the reduction runs over the M tokens in
    # steps of BLOCK_K. (Meta-parameter names follow the output tile so the configs are shared.)
    pid_r, pid_c = _grouped_tile(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    # Two loop copies rather than a branch inside one loop, so each stays a plain pipelined loop.
    if HAS_DB:
        if pid_c == 0:
            acc, db = _mainloop(dy_ptr, dact_ptr, x_ptr, offs_r, offs_c, N, K, M, stride_dyn, stride_dym, stride_xm, stride_xk,
                                BLOCK_M, BLOCK_N, BLOCK_K, SCALE_A, IEEE, True)
            tl.store(db_ptr + offs_r, db.to(db_ptr.dtype.element_ty), mask=offs_r < N)
        else:
            acc, _ = _mainloop(dy_ptr, dact_ptr, x_ptr, offs_r, offs_c, N, K, M, stride_dyn, stride_dym, stride_xm, stride_xk,
                               BLOCK_M, BLOCK_N, BLOCK_K, SCALE_A, IEEE, False)
    else:
        acc, _ = _mainloop(dy_ptr, dact_ptr, x_ptr, offs_r, offs_c, N, K, M, stride_dyn, stride_dym, stride_xm, stride_xk,
                           BLOCK_M, BLOCK_N, BLOCK_K, SCALE_A, IEEE, False)
    mask = (offs_r < N)[:, None] & (offs_c < K)[None, :]
    tl.store(dw_ptr + (offs_r.to(tl.int64) * K)[:, None] + offs_c[None, :], acc.to(dw_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configs and autotuned entry points

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The first entry is the one the interpreter
# runs (small, so the tests cross tile edges); the others are the usual Hopper/Ampere GEMM tiles.
# 128 x 256 is left out: with the GELU epilogue it spills on sm_80 and sm_90 (ptxas -v).
_TC_TILES = [
    (64, 64, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]
# Exact fp32 dots run on the CUDA cores (FMA): smaller tiles keep the operands in registers.
_F32_TILES = [
    (64, 64, 16, 4, 2),
    (128, 64, 16, 8, 2),
]
GROUP_M = 8


def _configs(tiles) -> List[triton.Config]:
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


# Every config (the launch keeps the first in the interpreter); the tuning key adds the M bucket.
TC_CONFIGS = _configs(_TC_TILES)
F32_CONFIGS = _configs(_F32_TILES)

_FWD_KEY = ["N", "K", "SCALE_A", "HAS_BIAS", "ACT_GELU", "HAS_RES", "SAVE_DACT"]
_linear_fwd_tc = _common.tuned(_linear_fwd_kernel, TC_CONFIGS, key=_FWD_KEY, name="linear.fwd_tc", rows="M")
_linear_fwd_f32 = _common.tuned(_linear_fwd_kernel, F32_CONFIGS, key=_FWD_KEY, name="linear.fwd_f32", rows="M")
_DW_KEY = ["N", "K", "SCALE_A", "HAS_DB"]
_linear_bwd_dw_tc = _common.tuned(_linear_bwd_dw_kernel, TC_CONFIGS, key=_DW_KEY, name="linear.dw_tc", rows="M")
_linear_bwd_dw_f32 = _common.tuned(_linear_bwd_dw_kernel, F32_CONFIGS, key=_DW_KEY, name="linear.dw_f32", rows="M")


def is_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def tiles_grid(rows: int, cols: int):
    """Grid for a kernel whose program id enumerates BLOCK_M x BLOCK_N tiles of a rows x cols output."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)




# ---------------------------------------------------------------------------------------------
# Launchers (inputs already validated by vitkern.ops.linear)


# Every config's reduction block (BLOCK_K) is at most this; the kernels keep reduction offsets and
# the K loop's pointer step (BLOCK_K * stride) in int32, so a stride of 2^31 / this or more is copied
# to a contiguous operand first (a view's stride, e.g. 2^27: never a ViT path, but never a wrap).
_MAX_BLOCK_L = 256
_INT32_MAX = 2**31 - 1


def reduction_stride_fits(*strides: int) -> bool:
    """True when every reduction stride times the largest reduction block stays in int32."""
    return all(abs(st) * _MAX_BLOCK_L <= _INT32_MAX for st in strides)


def _with_reduction_stride(t: torch.Tensor, dim: int, *tied: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """(t, *tied), made contiguous together when t's stride along the reduction `dim` is too large
    for the kernels' int32 offsets (tied tensors are read with t's strides, so they follow t)."""
    if reduction_stride_fits(t.stride(dim)):
        return (t, *tied)
    out = (t.contiguous(), *(u.contiguous() if u is not None else None for u in tied))
    if not reduction_stride_fits(out[0].stride(dim)):
        raise ValueError(f"linear: a stride of {out[0].stride(dim)} along the reduction dimension exceeds what the "
                         f"Triton kernels address in int32 ({_INT32_MAX} / {_MAX_BLOCK_L}) even when contiguous")
    return out


def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
    activation: Optional[str], save_dact: bool = True, scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """y = residual + scale * act(x @ weight^T + bias).

    x: [M, K]; weight: [N, K]; bias: [N] or None; residual: [M, N] or None (any strides);
    activation: None, "gelu", "gelu_tanh" or "quick_gelu"; scale: LayerScale's gamma [N] or None,
    only without an activation. All one dtype. Returns (y [M, N], dact), both contiguous in x's
    dtype; with save_dact (a backward will follow) dact is act'(pre-activation) [M, N] with an
    activation, the unscaled branch x @ weight^T + bias [M, N] with a scale, else an empty [0] tensor.
    """
    if scale is not None and activation is not None:
        raise ValueError("linear_fwd: scale (LayerScale) with an activation is not fused; apply one of them outside")
    M, K = x.shape
    N = weight.shape[0]
    gelu, act_kind = act_flags(activation)
    keep = (gelu or scale is not None) and save_dact
    y = _common.empty((M, N), dtype=x.dtype, device=x.device)
    dact = _common.empty((M, N) if keep else (0,), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, dact
    res = residual if residual is not None else y
    (x,) = _with_reduction_stride(x, 1)
    (weight,) = _with_reduction_stride(weight, 1)
    kernel = _linear_fwd_f32 if is_f32(x.dtype) else _linear_fwd_tc
    _common.launcher(kernel)[tiles_grid(M, N)](
        x, x, weight, bias if bias is not None else y, res, dact if keep else y, y,
        scale if scale is not None else y,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), res.stride(0), res.stride(1),
        SCALE_A=False, HAS_BIAS=bias is not None, ACT_GELU=gelu, HAS_RES=residual is not None, SAVE_DACT=keep,
        ACT_KIND=act_kind, HAS_SCALE=scale is not None, IEEE=is_f32(x.dtype),
    )
    return y, dact


def linear_bwd_dx(dy: torch.Tensor, weight: torch.Tensor, dact: Optional[torch.Tensor]) -> torch.Tensor:
    """dx = (dy * dact) @ weight (dy @ weight when dact is None).

    dy: [M, N] (any strides); dact: [M, N] with dy's strides, or None; weight: [N, K].
    Returns [M, K] contiguous in dy's dtype."""
    M, N = dy.shape
    K = weight.shape[1]
    dx = _common.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return dx
    dy, dact = _with_reduction_stride(dy, 1, dact)
    (weight,) = _with_reduction_stride(weight, 0)
    kernel = _linear_fwd_f32 if is_f32(dy.dtype) else _linear_fwd_tc
    # The forward kernel computes x @ w^T with w read as w[n, k]; passing weight's strides swapped
    # makes it read weight^T, i.e. compute dy @ weight with no copy.
    _common.launcher(kernel)[tiles_grid(M, K)](
        dy, dact if dact is not None else dy, weight, dx, dx, dx, dx, dx,
        M, K, N,
        dy.stride(0), dy.stride(1), weight.stride(1), weight.stride(0), 0, 0,
        SCALE_A=dact is not None, HAS_BIAS=False, ACT_GELU=False, HAS_RES=False, SAVE_DACT=False,
        ACT_KIND=0, HAS_SCALE=False, IEEE=is_f32(dy.dtype),
    )
    return dx


def linear_bwd_dw(
    dy: torch.Tensor, dact: Optional[torch.Tensor], x: torch.Tensor, has_bias: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """dw = dy'^T @ x and db = dy' summed over rows (fp32 accumulation), dy' = dy * dact (dy when
    dact is None).

    dy: [M, N]; dact: [M, N] with dy's strides, or None; x: [M, K] (any strides, one dtype).
    Returns (dw [N, K] contiguous, db [N], or an empty [0] tensor when not has_bias), in dy's dtype.
    """
    M, N = dy.shape
    K = x.shape[1]
    dw = _common.empty((N, K), dtype=dy.dtype, device=dy.device)
    db = _common.empty((N,) if has_bias else (0,), dtype=dy.dtype, device=dy.device)
    if N == 0:
        return dw, db
    if K == 0:
        # No dw tile exists to carry the bias reduction.
        if has_bias:
            db = _bias_grad(dy, dact)
        return dw, db
    dy, dact = _with_reduction_stride(dy, 0, dact)
    (x,) = _with_reduction_stride(x, 0)
    kernel = _linear_bwd_dw_f32 if is_f32(dy.dtype) else _linear_bwd_dw_tc
    _common.launcher(kernel)[tiles_grid(N, K)](
        dy, dact if dact is not None else dy, x, dw, db if has_bias else dw,
        N, K, M,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        SCALE_A=dact is not None, HAS_DB=has_bias, IEEE=is_f32(dy.dtype),
    )
    return dw, db


def _bias_grad(dy: torch.Tensor, dact: Optional[torch.Tensor]) -> torch.Tensor:
    # Only for calls that need db but no dw tile (frozen weight, or K == 0): not a ViT path.
    dyp = dy.float() if dact is None else dy.float() * dact.float()
    return dyp.sum(0).to(dy.dtype)


def linear_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dact: torch.Tensor, activation: Optional[str],
    has_bias: bool, need_dx: bool = True, need_dw: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of linear_fwd with respect to x, weight and bias (the residual's is dy itself).

    dy: [M, N] (contiguous with an activation); x: [M, K]; weight: [N, K]; dact: the forward's
    act'(pre-activation) [M, N] (contiguous) when there is an activation. Returns
    (dx [M, K], dw [N, K], db [N]); a gradient not asked for (need_dx, need_dw, has_bias) is an
    empty [0] tensor.
    """
    scale = dact if activation is not None else None
    empty = lambda: _common.empty((0,), dtype=dy.dtype, device=dy.device)  # noqa: E731
    dx = linear_bwd_dx(dy, weight, scale) if need_dx else empty()
    if need_dw:
        dw, db = linear_bwd_dw(dy, scale, x, has_bias)
    else:
        dw = empty()
        db = _bias_grad(dy, scale) if has_bias else empty()
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Audit specs: every kernel x every config the launchers can pick x dtype, with the two ViT
# epilogues. At run time Triton specializes unit strides to constants and marks pointers and ints
# divisible by 16; the specs do the same for contiguous ViT-B/16 operands (N, K in 768, 2304,
# 3072: multiples of 16): unit strides are constexpr 1 and the 16-divisible ints are typed
# "i32:16" (vitkern.audit's convention; pointers it marks itself). Without that nothing is
# vectorized or pipelined and the 128-wide tiles spill, unlike the kernels that really run.

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(name, fn, signature, constexprs, divisible, **kwargs) -> "_common.KernelSpec":
    signature = {n: (f"{t}:16" if n in divisible else t) for n, t in signature.items()}
    return _common.KernelSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, **kwargs)


def _audit_specs() -> List["_common.KernelSpec"]:
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = _TRITON_DTYPE[dtype]
        ieee = dtype == torch.float32
        for bm, bn, bk, warps, stages in (_F32_TILES if ieee else _TC_TILES):
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M)
            cfg = f"{bm}x{bn}x{bk} w{warps} s{stages}"
            common = dict(num_warps=warps, num_stages=stages, dtype=t, gemm_like=True)
            # fc1 (bias + GELU, GELU' saved), proj/fc2 (bias + residual), and the backward's dx
            # GEMM: the same kernel, weight's strides swapped, dy * GELU' formed on load.
            for flags, what in (
                (dict(SCALE_A=False, HAS_BIAS=True, ACT_GELU=True, HAS_RES=False, SAVE_DACT=True, ACT_KIND=0,
                      HAS_SCALE=False), "fc1: bias+gelu+dact"),
                (dict(SCALE_A=False, HAS_BIAS=True, ACT_GELU=True, HAS_RES=False, SAVE_DACT=True, ACT_KIND=1,
                      HAS_SCALE=False), "fc1: bias+gelu_tanh+dact"),
                (dict(SCALE_A=False, HAS_BIAS=True, ACT_GELU=True, HAS_RES=False, SAVE_DACT=True, ACT_KIND=2,
                      HAS_SCALE=False), "fc1: bias+quick_gelu+dact"),
                (dict(SCALE_A=False, HAS_BIAS=True, ACT_GELU=False, HAS_RES=True, SAVE_DACT=False, ACT_KIND=0,
                      HAS_SCALE=False), "proj/fc2: bias+residual"),
                (dict(SCALE_A=False, HAS_BIAS=True, ACT_GELU=False, HAS_RES=True, SAVE_DACT=True, ACT_KIND=0,
                      HAS_SCALE=True), "proj/fc2: bias+layerscale+residual+branch"),
                (dict(SCALE_A=True, HAS_BIAS=False, ACT_GELU=False, HAS_RES=False, SAVE_DACT=False, ACT_KIND=0,
                      HAS_SCALE=False), "dx: (dy*dact) @ w"),
            ):
                dx = flags["SCALE_A"]
                unit = dict(stride_xk=1, stride_wn=1, stride_rm=0, stride_rn=0) if dx else dict(stride_xk=1, stride_wk=1, stride_rn=1)
                sig = {"x_ptr": f"*{t}", "xs_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "res_ptr": f"*{t}",
                       "dact_ptr": f"*{t}", "y_ptr": f"*{t}", "scale_ptr": f"*{t}", "M": "i32", "N": "i32", "K": "i32",
                       "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32", "stride_wk": "i32",
                       "stride_rm": "i32", "stride_rn": "i32"}
                for n in unit:
                    del sig[n]
                specs.append(_spec("_linear_fwd_kernel", _linear_fwd_kernel, sig,
                                   dict(flags, IEEE=ieee, **unit, **meta),
                                   ("N", "K", "stride_xm", "stride_wn", "stride_wk", "stride_rm"),
                                   label=f"{cfg} {what}", **common))
            sig = {"dy_ptr": f"*{t}", "dact_ptr": f"*{t}", "x_ptr": f"*{t}", "dw_ptr": f"*{t}", "db_ptr": f"*{t}",
                   "N": "i32", "K": "i32", "M": "i32", "stride_dym": "i32", "stride_xm": "i32"}
            for scale in (True, False):
                specs.append(_spec("_linear_bwd_dw_kernel", _linear_bwd_dw_kernel, sig,
                                   dict(SCALE_A=scale, HAS_DB=True, IEEE=ieee, stride_dyn=1, stride_xk=1, **meta),
                                   ("N", "K", "stride_dym", "stride_xm"),
                                   label=f"{cfg} dw+db{' (dy*dact)' if scale else ''}", **common))
    return specs


AUDIT_SPECS: List[_common.KernelSpec] = _audit_specs()
