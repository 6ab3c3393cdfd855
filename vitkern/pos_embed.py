"""2-D resampling of learned position embeddings to another patch grid (and, for
`ViT.set_input_size(patch_size=...)`, of the patch-embedding kernel to another patch size).

It sits below both `model.py` (dynamic image sizes, `set_input_size`) and `weights.py` (loading a
checkpoint made at another resolution), so neither has to import the other for it.

Three interpolations, because the checkpoints they serve were made with different ones:

- "bicubic" (default, antialiased when shrinking): timm's `resample_abs_pos_embed`, what timm does
  when it loads a checkpoint at another resolution and what `from_timm` / `load_hf` use.
- "bilinear": timm's bilinear option (`F.interpolate(mode="bilinear", align_corners=False)`,
  half-pixel centres). It is *not* what the original JAX code does.
- "jax": the original google-research/vision_transformer code, which resamples with
  `scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)`: linear interpolation with the
  corner samples aligned (the first and last rows/columns of the old grid land exactly on the
  first and last of the new one), no antialiasing. Implemented in torch; equal to scipy's result
  to float rounding (tests/test_backbone_api.py checks it against scipy).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

RESAMPLE_MODES = ("bicubic", "bilinear", "jax")

__all__ = ["RESAMPLE_MODES", "resample_pos_embed", "resample_patch_kernel", "naflex_pos_embed"]


def _check_grid(name: str, grid: Sequence[int]) -> Tuple[int, int]:
    # A torch.SymInt is a grid size under torch.export with a dynamic image size: kept symbolic
    # (int() would specialize the exported program to the example's grid).
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, (int, torch.SymInt)) for g in grid)
            or any(isinstance(g, int) and g <= 0 for g in grid)):
        raise ValueError(f"{name} must be a pair of positive ints (rows, cols), got {grid!r}")
    return tuple(g if isinstance(g, torch.SymInt) else int(g) for g in grid)  # type: ignore[return-value]


def same_grid(a: Sequence[int], b: Sequence[int]) -> bool:
    """True when the grids are known to be equal without specializing a symbolic size: under
    torch.export with a dynamic image size an unknown grid counts as different (the resampling to
    an equal grid is then the identity, up to float rounding of the interpolation weights)."""
    return statically_known_true(a[0] == b[0]) and statically_known_true(a[1] == b[1])


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: Tuple[int, int],
    old_grid: Tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample position embeddings [1, prefix + old_h * old_w, dim] to a new patch grid.

    new_grid, old_grid: (rows, cols) of patches. num_prefix_tokens: leading tokens (the class
    token) that keep their embedding unchanged. mode: "bicubic" (timm's default), "bilinear"
    (timm's bilinear, half-pixel centres) or "jax" (the original JAX repo's
    `scipy.ndimage.zoom(order=1)`, corner-aligned); see the module docstring. antialias: used by
    "bicubic" and "bilinear" when shrinking, as in timm; "jax" never antialiases (scipy does not).

    The grid part is interpolated in fp32 (fp64 for fp64 input) and cast back. Returns
    [1, prefix + new_h * new_w, dim] in pos_embed's dtype (the input itself when the grids are equal).
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
    if not isinstance(pos_embed, Tensor):
        raise TypeError(f"pos_embed must be a torch.Tensor, got {type(pos_embed).__name__}")
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, tokens, dim], got {tuple(pos_embed.shape)}")
    new_h, new_w = _check_grid("new_grid", new_grid)
    old_h, old_w = _check_grid("old_grid", old_grid)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    expected = num_prefix_tokens + old_h * old_w
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens but old_grid {(old_h, old_w)} with "
            f"{num_prefix_tokens} prefix tokens needs {expected}"
        )
    if same_grid((new_h, new_w), (old_h, old_w)):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    # interpolate has no half-precision CPU kernels; fp64 stays fp64 so the float64 oracle stays exact.
    work = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    grid = grid.to(work).reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    if mode == "jax":
        # scipy.ndimage.zoom(order=1) maps output index i to input coordinate i * (old - 1) / (new - 1)
        # (0 when new == 1): exactly bilinear with align_corners=True and no antialiasing.
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bilinear", align_corners=True)
    else:
        grid = F.interpolate(grid, size=(new_h, new_w), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_patch_kernel(weight: Tensor, new_size: Tuple[int, int]) -> Tensor:
    """The patch-embedding kernel [dim, chans, ph, pw] for another patch size [dim, chans, nh, nw].

    FlexiViT's pseudo-inverse resize (Beyer et al., 2023; timm's `resample_patch_embed`): with R the
    linear map that resizes a ph x pw patch to nh x nw (bicubic, antialiased), the new kernel w'
    is the least-squares solution of <R x, w'> = <x, w> for every patch x, i.e. w' = pinv(R^T) w,
    so a resized patch gives the token the original kernel gave the original patch. Computed in
    fp64, returned in weight's dtype on weight's device.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a patch kernel [dim, chans, ph, pw], got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    new_h, new_w = _check_grid("new_size", new_size)
    dim, chans, old_h, old_w = weight.shape
    if (new_h, new_w) == (old_h, old_w):
        return weight
    old_n = old_h * old_w
    # Row i of `resize_t` is R applied to the i-th pixel basis patch: R^T as [old_n, new_n], built on
    # the CPU in fp64 (a small matrix). A shrink along one side leaves R^T rank-deficient: its null
    # directions have singular values at fp64 rounding (~1e-15) and must be cut, not inverted.
    basis = torch.eye(old_n, dtype=torch.float64).reshape(old_n, 1, old_h, old_w)
    resize_t = F.interpolate(basis, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    solve = torch.linalg.pinv(resize_t.reshape(old_n, new_h * new_w), rtol=1e-10)  # [new_n, old_n] = pinv(R^T)
    solve = solve.to(weight.device)
    flat = weight.detach().to(torch.float64).reshape(dim * chans, old_n)
    return (flat @ solve.T).reshape(dim, chans, new_h, new_w).to(weight.dtype)


def naflex_pos_embed(pos_embed, grid: Tuple[int, int], *, ar_preserving: bool = False) -> Tensor:
    """The position embedding of one image's patch grid in a packed (NaFlex) batch, as timm's
    NaFlexEmbeds resamples it: [grid_h * grid_w, dim] row-major, in the table's dtype.

    pos_embed: a learned 2-D table [1, h, w, dim] (timm NaFlex's layout), resampled bicubic with
    antialias, half-pixel centres; or factorized (pos_embed_y [1, h, dim], pos_embed_x [1, w, dim]),
    each resampled linearly along its axis and summed. Unchanged where the grid matches the table.
    ar_preserving: resample to a square of the longer side and crop (timm's pos_embed_ar_preserving),
    so an embedding's position does not stretch with the aspect ratio.
    Interpolation runs in fp32 (fp64 for fp64 tables).
    """
    gh, gw = grid
    if isinstance(pos_embed, (tuple, list)):
        pe_y, pe_x = pos_embed
        work = torch.float64 if pe_y.dtype == torch.float64 else torch.float32

        def axis(table: Tensor, length: int) -> Tensor:  # [1, L, dim] -> [L, dim]
            if table.shape[1] == length:
                return table[0]
            return F.interpolate(table.transpose(1, 2).to(work), size=length, mode="linear",
                                 align_corners=False)[0].t().to(table.dtype)

        ly, lx = (max(gh, gw),) * 2 if ar_preserving else (gh, gw)
        ys, xs = axis(pe_y, ly)[:gh], axis(pe_x, lx)[:gw]
        return (ys[:, None, :] + xs[None, :, :]).reshape(gh * gw, -1)
    h, w = pos_embed.shape[1:3]
    if (h, w) == (gh, gw):
        return pos_embed.reshape(h * w, -1)
    size = (max(gh, gw),) * 2 if ar_preserving else (gh, gw)
    work = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    grid_embed = F.interpolate(pos_embed.permute(0, 3, 1, 2).to(work), size=size, mode="bicubic",
                               align_corners=False, antialias=True)[0, :, :gh, :gw]
    return grid_embed.flatten(1).t().to(pos_embed.dtype)
