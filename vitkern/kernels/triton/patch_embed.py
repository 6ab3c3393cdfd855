"""Patch embedding (eq. 1 of the paper) as one implicit GEMM, forward and backward, in Triton.

Forward: tokens[b, prefix + p, :] = patches(x)[b, p, :] @ W^T + bias + pos_embed[prefix + p] with
M = batch * patches, N = dim, K = chans * ph * pw. The A tile is gathered straight from the image
(im2col inside the operand load; K ordered (c, i, j) like the Conv2d weight [dim, chans, ph, pw]
flattened), so no patch tensor is ever written; the epilogue adds bias and position embedding and
writes the token row. The prefix rows (class, distillation, register tokens: cls_token[j] +
pos_embed[j], or cls_token[j] alone with no_embed_class, whose pos_embed covers the patches only)
are written by extra programs of the same launch (the last cdiv(batch * prefix, BLOCK_M) row blocks
of the grid).

Backward (the gradients are what autograd would compute for the eager reference):
* dW [dim, K] = dtokens_patches^T @ patches(x): a GEMM whose reduction runs over M, with the same
  gather for the B operand; split over M into a fixed number of fp32 partials (the output is
  only dim x K, too few tiles to fill a GPU) and then summed in a fixed order (deterministic).
* S [tokens, dim] = sum over batch of dtokens (fp32, one program per column block, a fixed-order
  loop over the batch): dpos = S (its patch rows with no_embed_class), dcls = S's prefix rows, dbias =
  column sum of S's patch rows.
* dx (only when asked) = dtokens_patches @ W, scattered into the image layout: patches do not
  overlap and tile the image, so every pixel is written exactly once.

Index arithmetic that meets a stride is int64 (batch 4096 of ViT-B: the image alone is ~2^31
elements and the tokens more).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import _common
from vitkern.kernels.triton._common import KernelSpec

# Most fp32 partials of dW: the split over M is min(DW_MAX_SPLITS, cdiv(M, DW_ROWS_PER_SPLIT)),
# a function of the shape only (deterministic). ViT-B/16 at batch 256: M = 50176 -> 7 splits x
# 36 output tiles of 128 x 128 = 252 programs (about two waves on 132 SMs) and 7 x 2.4 MB of
# partials, small next to the 77 MB of dtokens and the 77 MB image the GEMM reads.
DW_MAX_SPLITS = 8
DW_ROWS_PER_SPLIT = 8192
SUM_BLOCK_R = 4
SUM_BLOCK_L = 512
DPOS_BLOCK = 1024

# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first suits the small test
# shapes and is the only one the interpreter runs. Rows of 16 or more elements along K per patch
# row (pw >= 8 in fp16) give 16-byte gathers; the tiles are the usual wgmma-friendly sizes.
_GEMM_TILES = [
    # 8 warps: with 4, fp32's exact (FMA) dot spilled on sm_80 (audit).
    (64, 64, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
# dW tiles (BLOCK_N, BLOCK_K, BLOCK_M [the reduction step], num_warps, num_stages).
_DW_TILES = [
    (64, 64, 32, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
]


# Pipelined operand buffers must fit the smallest target's shared memory (sm_80: 163 KiB per block).
SMEM_BUDGET = 160 * 1024


def smem_estimate(kind: str, meta: dict, stages: int, elem_bytes: int) -> int:
    """Bytes of the pipelined operand buffers of a tile: per stage, both operands' slices along
    the reduction dim (fwd: K; dx: N, the embedding dim; dw: M, the patch rows)."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    per_stage = {"fwd": (bm + bn) * bk, "dx": (bm + bk) * bn, "dw": (bn + bk) * bm}[kind]
    return stages * per_stage * elem_bytes


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        # fp32 doubles a tile's bytes: drop the tiles that would not fit (keep one regardless).
        elem = next(v for v in named_args.values() if isinstance(v, torch.Tensor)).element_size()
        kept = [c for c in configs if smem_estimate(kind, c.kwargs, c.num_stages, elem) <= SMEM_BUDGET]
        return kept or configs[:1]

    return prune


def _gemm_configs():
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s) for m, n, k, w, s in _GEMM_TILES]


def _dw_configs():
    return [triton.Config(dict(BLOCK_N=n, BLOCK_K=k, BLOCK_M=m), num_warps=w, num_stages=s) for n, k, m, w, s in _DW_TILES]


@triton.jit
def _patch_offset(b, p, GW, PH: tl.constexpr, PW: tl.constexpr, stride_b, stride_h, stride_w):
    """Offset (int64) of the top-left pixel of patch p of image b in a tensor with the given
    batch/row/col strides."""
    py = p // GW
    px = p % GW
    return b.to(tl.int64) * stride_b + (py * PH).to(tl.int64) * stride_h + (px * PW).to(tl.int64) * stride_w


@triton.jit
def _patch_rows(offs_m, P, GW, PH: tl.constexpr, PW: tl.constexpr, stride_b, stride_h, stride_w):
    """For GEMM rows m = b * P + p: (image index b, patch index p, offset of the patch's top-left
    pixel in a tensor with the given batch/row/col strides, int64)."""
    b = offs_m // P
    p = offs_m % P
    return b, p, _patch_offset(b, p, GW, PH, PW, stride_b, stride_h, stride_w)


@triton.jit
def _patch_cols(offs_k, PH: tl.constexpr, PW: tl.constexpr, stride_c, stride_h, stride_w):
    """For GEMM columns k = (c * PH + i) * PW + j: the pixel's offset inside its patch (int64)."""
    c = offs_k // (PH * PW)
    r = offs_k % (PH * PW)
    i = r // PW
    j = r % PW
    return c.to(tl.int64) * stride_c + i.to(tl.int64) * stride_h + j.to(tl.int64) * stride_w


@_common.tuned(configs=_gemm_configs(), key=["N", "K", "PH", "PW"], name="patch_embed.fwd", rows="M", prune=_pruner("fwd"))
@triton.jit
def _patch_embed_fwd_kernel(
    X,  # [B, C, H, W] image, strides stride_x*
    Wt,  # [N, K] weight (Conv2d [N, C, PH, PW] flattened), contiguous
    Bias,  # [N] (unused when not HAS_BIAS)
    Cls,  # [NPRE, N] prefix tokens, contiguous (unused when not HAS_CLS)
    Pos,  # [T, N] or, without POS_PREFIX, [P, N], contiguous (unused when not HAS_POS)
    Out,  # [B, T, N] contiguous, x.dtype
    Keep,  # [B, KEPT] int64, contiguous: the patches each image keeps (PatchDropout; unused when not HAS_KEEP)
    B,
    M,  # B * KEPT: the GEMM's rows
    P,  # patches per image
    KEPT,  # patch tokens per image written (P without HAS_KEEP)
    GW,  # patches per image row
    T,  # tokens per image = NPRE + KEPT
    NPRE,  # prefix tokens per image (0 without HAS_CLS)
    N,
    K,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CLS: tl.constexpr,
    HAS_POS: tl.constexpr,
    POS_PREFIX: tl.constexpr,  # pos_embed has rows for the prefix tokens (timm's default; not no_embed_class)
    HAS_KEEP: tl.constexpr,  # PatchDropout: GEMM row b * KEPT + j is patch Keep[b, j], token NPRE + j
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # N varies fastest: the programs that run together share one M block, so each image tile is
    # read from HBM once and served from L2 to the other N-block programs (the weight, 1.2 MB
    # for ViT-B, stays in L2 throughout). M-major order would re-read the image per N block.
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n_blocks
    pid_n = pid % num_n_blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    if pid_m < num_m_blocks:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        if HAS_KEEP:
            # The dropped patches are never gathered or multiplied: the GEMM has B * KEPT rows.
            b = offs_m // KEPT
            j = offs_m % KEPT
            p = tl.load(Keep + offs_m, mask=m_mask, other=0).to(tl.int32)
            row_off = _patch_offset(b, p, GW, PH, PW, stride_xb, stride_xh, stride_xw)
        else:
            b, p, row_off = _patch_rows(offs_m, P, GW, PH, PW, stride_xb, stride_xh, stride_xw)
            j = p
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            col_off = _patch_cols(offs_k, PH, PW, stride_xc, stride_xh, stride_xw)
            a = tl.load(X + row_off[:, None] + col_off[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(
                Wt + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if HAS_CLS:
            tok = j + NPRE  # the prefix tokens are rows 0 .. NPRE - 1 of each image's token block
        else:
            tok = j
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_POS:
            # The position embedding of the patch itself (p), wherever its token lands (j).
            if POS_PREFIX:
                pos_row = p + NPRE
            else:
                pos_row = p
            pos = tl.load(Pos + pos_row[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0.0)
            acc += pos.to(tl.float32)
        out_row = b.to(tl.int64) * T + tok
        tl.store(Out + out_row[:, None] * N + offs_n[None, :], acc.to(Out.dtype.element_ty), mask=mask)
    else:
        if HAS_CLS:
            # One row per (image, prefix token): r = b * NPRE + j.
            offs_r = (pid_m - num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            r_mask = offs_r < B * NPRE
            j = offs_r % NPRE
            mask = r_mask[:, None] & n_mask[None, :]
            val = tl.load(Cls + j[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_POS:
                if POS_PREFIX:
                    val += tl.load(Pos + j[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            out_row = (offs_r // NPRE).to(tl.int64) * T + j
            tl.store(Out + out_row[:, None] * N + offs_n[None, :], val.to(Out.dtype.element_ty), mask=mask)


@_common.tuned(configs=_gemm_configs(), key=["N", "K", "PH", "PW"], name="patch_embed.dx", rows="M", prune=_pruner("dx"))
@triton.jit
def _patch_embed_bwd_dx_kernel(
    DT,  # [B, T, N] dtokens, contiguous
    Wt,  # [N, K] weight, contiguous
    DX,  # [B, C, H, W] x.dtype, strides stride_d*
    M,  # B * P
    P,
    GW,
    T,
    N,
    K,
    stride_db,
    stride_dc,
    stride_dh,
    stride_dw,
    PH: tl.constexpr,
    PW: tl.constexpr,
    PREFIX: tl.constexpr,  # prefix tokens per image (class, distillation, registers)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Tiles over (M, K) here: BLOCK_N is the reduction step over the embedding dim. K varies
    # fastest so that the dtokens rows of one M block are read from HBM once (see the forward).
    pid = tl.program_id(0)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k_blocks
    pid_k = pid % num_k_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    b, p, row_off = _patch_rows(offs_m, P, GW, PH, PW, stride_db, stride_dh, stride_dw)
    dt_row = (b.to(tl.int64) * T + p + PREFIX) * N
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dt = tl.load(DT + dt_row[:, None] + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(
            Wt + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
        )
        acc = tl.dot(dt, w, acc, input_precision=DOT_PRECISION)
    col_off = _patch_cols(offs_k, PH, PW, stride_dc, stride_dh, stride_dw)
    tl.store(
        DX + row_off[:, None] + col_off[None, :], acc.to(DX.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :]
    )


@_common.tuned(configs=_dw_configs(), key=["N", "K", "PH", "PW"], name="patch_embed.dw", rows="M", prune=_pruner("dw"))
@triton.jit
def _patch_embed_bwd_dw_kernel(
    DT,  # [B, T, N] dtokens, contiguous
    X,  # [B, C, H, W] image, strides stride_x*
    DWp,  # [SPLITS, N, K] fp32 partials
    M,  # B * P
    P,
    GW,
    T,
    N,
    K,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    PH: tl.constexpr,
    PW: tl.constexpr,
    PREFIX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    col_off = _patch_cols(offs_k, PH, PW, stride_xc, stride_xh, stride_xw)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for mb in range(split, tl.cdiv(M, BLOCK_M), splits):
        offs_m = tl.arange(0, BLOCK_M) + mb * BLOCK_M
        m_mask = offs_m < M
        b, p, row_off = _patch_rows(offs_m, P, GW, PH, PW, stride_xb, stride_xh, stride_xw)
        dt_row = (b.to(tl.int64) * T + p + PREFIX) * N
        dt_t = tl.load(DT + dt_row[None, :] + offs_n[:, None], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        a = tl.load(X + row_off[:, None] + col_off[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dt_t, a, acc, input_precision=DOT_PRECISION)
    out = (split.to(tl.int64) * N + offs_n[:, None]) * K + offs_k[None, :]
    tl.store(DWp + out, acc, mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def _patch_embed_bwd_dpos_kernel(
    DT,  # [B, T * N] dtokens, contiguous
    S,  # [T * N] fp32: sum over the batch
    B,
    L,  # T * N
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # Advance a pointer per image: b * L would overflow int32 for large batches.
    ptrs = DT + offs
    for _ in range(0, B):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += L
    tl.store(S + offs, acc, mask=mask)


@triton.jit
def _patch_embed_bwd_sum_kernel(
    Src,  # [R, L] fp32, contiguous
    Dst,  # [L], Dst's dtype
    R,
    L,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Column sums in a fixed order: the dW split reduction and dbias from the batch sums.
    offs_l = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = offs_l < L
    acc = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < R)[:, None] & l_mask[None, :]
        acc += tl.load(Src + offs_r.to(tl.int64)[:, None] * L + offs_l[None, :], mask=mask, other=0.0)
    tl.store(Dst + offs_l, tl.sum(acc, axis=0).to(Dst.dtype.element_ty), mask=l_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (no TF32) so fp32 matches the fp64 oracle to ~1e-6.
    return "ieee" if dtype == torch.float32 else "tf32"


def dw_splits(m: int) -> int:
    return max(1, min(DW_MAX_SPLITS, triton.cdiv(m, DW_ROWS_PER_SPLIT)))


def _geometry(x: torch.Tensor, weight: torch.Tensor, num_prefix: int):
    batch, _, height, width = x.shape
    dim, chans, ph, pw = weight.shape
    gh, gw = height // ph, width // pw
    patches = gh * gw
    tokens = patches + num_prefix
    return batch, dim, chans, ph, pw, gw, patches, tokens, chans * ph * pw


def patch_embed_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    cls_token: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    no_embed_class: bool = False,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """tokens = [cls_token; patches(x) @ weight^T + bias] + pos_embed.

    x: [batch, chans, H, W] (any strides; H, W multiples of the patch); weight: [dim, chans, ph,
    pw]; bias: [dim] or None; cls_token: the prefix tokens [1, prefix, dim] or None; pos_embed:
    [1, prefix + patches, dim], with no_embed_class [1, patches, dim] (added to the patch rows
    only), or None; all one dtype (fp16/bf16/fp32). keep (PatchDropout): [batch, kept] int64
    indices in [0, patches): only those patches are embedded, in that order, each with its own
    position embedding. Returns [batch, tokens, dim] in x's dtype, tokens = prefix + (kept or
    (H / ph) * (W / pw)).
    """
    has_cls = cls_token is not None
    num_prefix = cls_token.shape[1] if has_cls else 0
    # The small operands are indexed as dense rows (no-ops when already contiguous).
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    cls_token = cls_token.contiguous() if has_cls else None
    pos_embed = pos_embed.contiguous() if pos_embed is not None else None
    batch, dim, chans, ph, pw, gw, patches, tokens, k = _geometry(x, weight, num_prefix)
    kept = patches
    if keep is not None:
        keep = keep.contiguous()
        kept = keep.shape[1]
        tokens = num_prefix + kept
    out = _common.empty((batch, tokens, dim), dtype=x.dtype, device=x.device)
    m = batch * kept
    if batch == 0 or dim == 0:
        return out

    def grid(meta):
        rows = triton.cdiv(m, meta["BLOCK_M"]) + (triton.cdiv(batch * num_prefix, meta["BLOCK_M"]) if has_cls else 0)
        return (rows * triton.cdiv(dim, meta["BLOCK_N"]),)

    _common.launcher(_patch_embed_fwd_kernel)[grid](
        x,
        weight,
        bias if bias is not None else weight,
        cls_token if has_cls else weight,
        pos_embed if pos_embed is not None else weight,
        out,
        keep if keep is not None else out,
        batch,
        m,
        patches,
        kept,
        gw,
        tokens,
        num_prefix,
        dim,
        k,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        x.stride(3),
        PH=ph,
        PW=pw,
        HAS_BIAS=bias is not None,
        HAS_CLS=has_cls,
        HAS_POS=pos_embed is not None,
        POS_PREFIX=not no_embed_class,
        HAS_KEEP=keep is not None,
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return out


def patch_embed_bwd(
    dtokens: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_cls: bool,
    compute_dx: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `patch_embed_fwd`.

    dtokens: [batch, prefix + patches, dim] in x's dtype; x, weight: as in the forward; has_cls:
    whether prefix tokens lead (their number is dtokens' token count minus the patches);
    compute_dx: whether to compute dx. Returns (dx [batch, chans, H, W] contiguous (a [0]-shaped
    tensor when not compute_dx), dweight [dim, chans, ph, pw], dbias [dim], dpos [1, tokens, dim]),
    the last three in weight's dtype. dpos is the batch sum of dtokens, so the prefix tokens'
    gradient is dpos[:, :prefix] (and pos_embed's under no_embed_class dpos[:, prefix:]). Sums are
    fp32 in a fixed order.
    """
    weight = weight.contiguous()
    dtokens = dtokens.contiguous()
    patches = (x.shape[2] // weight.shape[2]) * (x.shape[3] // weight.shape[3])
    prefix = dtokens.shape[1] - patches
    if (prefix > 0) != bool(has_cls) or prefix < 0:
        raise ValueError(f"dtokens has {dtokens.shape[1]} tokens for {patches} patches, which does not fit has_cls={has_cls}")
    batch, dim, chans, ph, pw, gw, patches, tokens, k = _geometry(x, weight, prefix)
    m = batch * patches
    device = x.device
    precision = _dot_precision(x.dtype)

    dx = _common.empty(tuple(x.shape) if compute_dx else (0,), dtype=x.dtype, device=device)
    if compute_dx and m > 0:
        def grid_dx(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

        _common.launcher(_patch_embed_bwd_dx_kernel)[grid_dx](
            dtokens, weight, dx, m, patches, gw, tokens, dim, k,
            dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3),
            PH=ph, PW=pw, PREFIX=prefix, DOT_PRECISION=precision,
        )

    splits = dw_splits(m)
    # Zero-filled: with batch == 0 no program runs and the sums must be 0.
    dw_partial = torch.zeros((splits, dim, k), dtype=torch.float32, device=device)
    if m > 0:
        def grid_dw(meta):
            return (triton.cdiv(dim, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]), splits)

        _common.launcher(_patch_embed_bwd_dw_kernel)[grid_dw](
            dtokens, x, dw_partial, m, patches, gw, tokens, dim, k,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            PH=ph, PW=pw, PREFIX=prefix, DOT_PRECISION=precision,
        )
    dweight = _common.empty(tuple(weight.shape), dtype=weight.dtype, device=device)
    _common.launcher(_patch_embed_bwd_sum_kernel)[(triton.cdiv(dim * k, SUM_BLOCK_L),)](
        dw_partial, dweight, splits, dim * k, BLOCK_R=SUM_BLOCK_R, BLOCK_L=SUM_BLOCK_L, num_warps=4
    )

    batch_sum = torch.zeros((tokens, dim), dtype=torch.float32, device=device)
    if batch > 0:
        _common.launcher(_patch_embed_bwd_dpos_kernel)[(triton.cdiv(tokens * dim, DPOS_BLOCK),)](
            dtokens, batch_sum, batch, tokens * dim, BLOCK=DPOS_BLOCK, num_warps=4
        )
    dpos = batch_sum.to(weight.dtype).unsqueeze(0)
    dbias = _common.empty((dim,), dtype=weight.dtype, device=device)
    _common.launcher(_patch_embed_bwd_sum_kernel)[(triton.cdiv(dim, SUM_BLOCK_L),)](
        batch_sum[prefix:], dbias, patches, dim, BLOCK_R=SUM_BLOCK_R, BLOCK_L=SUM_BLOCK_L, num_warps=4
    )
    return dx, dweight, dbias, dpos


# --------------------------------------------------------------------------------------------
# Audit: every config x dtype of each kernel at ViT-B/16 (patch 16, dim 768); the GEMMs are
# gemm_like (fp16/bf16 must use wgmma on sm_90).

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_PREC = {"fp16": "tf32", "bf16": "tf32", "fp32": "ieee"}


def _audit_specs() -> List[KernelSpec]:
    specs: List[KernelSpec] = []
    # As the runtime specializes ViT-B/16 at batch 256 (B=256, M=50176, N=K=768, a contiguous
    # 224x224 image): multiples of 16 carry divisibility 16 ("i32:16"), unit strides become
    # constexpr 1; P=196, GW=14 and T=197 do not divide by 16.
    i32, d16 = "i32", "i32:16"
    geometry = {"M": d16, "P": i32, "GW": i32, "T": i32, "N": d16, "K": d16}
    for dtype in ("fp16", "bf16", "fp32"):
        p = _PTR[dtype]
        elem = 4 if dtype == "fp32" else 2
        common = dict(PH=16, PW=16, DOT_PRECISION=_PREC[dtype])
        gemms = [
            ("fwd", _patch_embed_fwd_kernel, _GEMM_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
             {"X": p, "Wt": p, "Bias": p, "Cls": p, "Pos": p, "Out": p, "Keep": p, "B": d16, **geometry,
              "KEPT": i32, "stride_xb": d16, "stride_xc": d16, "stride_xh": d16},
             dict(stride_xw=1, HAS_BIAS=True, HAS_CLS=True, HAS_POS=True, POS_PREFIX=True, HAS_KEEP=False, NPRE=1)),
            # DINOv2 with registers / DeiT III: several prefix rows (a run-time count), pos_embed on the patches only.
            ("fwd", _patch_embed_fwd_kernel, _GEMM_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
             {"X": p, "Wt": p, "Bias": p, "Cls": p, "Pos": p, "Out": p, "Keep": p, "B": d16, **geometry, "NPRE": i32,
              "KEPT": i32, "stride_xb": d16, "stride_xc": d16, "stride_xh": d16},
             dict(stride_xw=1, HAS_BIAS=True, HAS_CLS=True, HAS_POS=True, POS_PREFIX=False, HAS_KEEP=False)),
            # PatchDropout in training (keep 98 of 196 patches): the kept rows' indices are loaded per GEMM row.
            ("fwd", _patch_embed_fwd_kernel, _GEMM_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
             {"X": p, "Wt": p, "Bias": p, "Cls": p, "Pos": p, "Out": p, "Keep": "*i64", "B": d16, **geometry,
              "KEPT": i32, "stride_xb": d16, "stride_xc": d16, "stride_xh": d16},
             dict(stride_xw=1, HAS_BIAS=True, HAS_CLS=True, HAS_POS=True, POS_PREFIX=True, HAS_KEEP=True, NPRE=1)),
            ("dx", _patch_embed_bwd_dx_kernel, _GEMM_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
             {"DT": p, "Wt": p, "DX": p, **geometry, "stride_db": d16, "stride_dc": d16, "stride_dh": d16},
             dict(stride_dw=1, PREFIX=1)),
            ("dw", _patch_embed_bwd_dw_kernel, _DW_TILES, ("BLOCK_N", "BLOCK_K", "BLOCK_M"),
             {"DT": p, "X": p, "DWp": "*fp32", **geometry, "stride_xb": d16, "stride_xc": d16, "stride_xh": d16},
             dict(stride_xw=1, PREFIX=1)),
        ]
        for kind, kernel, tiles, names, signature, extra in gemms:
            for tile in tiles:
                meta = dict(zip(names, tile[:3]))
                num_warps, num_stages = tile[3], tile[4]
                if smem_estimate(kind, meta, num_stages, elem) > SMEM_BUDGET:
                    continue  # pruned at launch for this dtype (_pruner), never compiled
                specs.append(
                    KernelSpec(
                        name=kernel.fn.__name__,
                        fn=kernel.fn,
                        signature=dict(signature),
                        constexprs={**extra, **common, **meta},
                        num_warps=num_warps,
                        num_stages=num_stages,
                        dtype=dtype,
                        gemm_like=True,
                        label=" ".join(f"{k}={v}" for k, v in meta.items()) + f" warps={num_warps} stages={num_stages}"
                        + (" prefix rows, no_embed_class" if extra.get("POS_PREFIX") is False else "")
                        + (" kept patches (PatchDropout)" if extra.get("HAS_KEEP") else ""),
                    )
                )
        specs.append(
            KernelSpec(
                name="_patch_embed_bwd_dpos_kernel",
                fn=_patch_embed_bwd_dpos_kernel,
                signature={"DT": p, "S": "*fp32", "B": d16, "L": d16},
                constexprs=dict(BLOCK=DPOS_BLOCK),
                num_warps=4, num_stages=1, dtype=dtype, label=f"BLOCK={DPOS_BLOCK}",
            )
        )
        specs.append(
            KernelSpec(
                name="_patch_embed_bwd_sum_kernel",
                fn=_patch_embed_bwd_sum_kernel,
                signature={"Src": "*fp32", "Dst": p, "R": i32, "L": d16},
                constexprs=dict(BLOCK_R=SUM_BLOCK_R, BLOCK_L=SUM_BLOCK_L),
                num_warps=4, num_stages=1, dtype=dtype, label=f"BLOCK_R={SUM_BLOCK_R} BLOCK_L={SUM_BLOCK_L}",
            )
        )
    return specs


AUDIT_SPECS: List[KernelSpec] = _audit_specs()
