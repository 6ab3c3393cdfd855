"""Checkpoint conversion: timm, Hugging Face transformers, the original JAX .npz files, and the
2-D resampling of position embeddings when a checkpoint's resolution differs from the model's.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

RESAMPLE_MODES = ("bicubic", "bilinear")


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: Tuple[int, int],
    old_grid: Tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample position embeddings [1, prefix + old_h * old_w, dim] to a new patch grid.

    The prefix tokens (class token) keep their embedding; the grid part is interpolated in 2-D in
    fp32 and cast back. `mode="bicubic", antialias=True` matches timm; `mode="bilinear",
    antialias=False` matches the original JAX code's `scipy.ndimage.zoom`-free resize closely.
    Returns [1, prefix + new_h * new_w, dim] in pos_embed's dtype.
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, tokens, dim], got {tuple(pos_embed.shape)}")
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    expected = num_prefix_tokens + old_h * old_w
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens but old_grid {tuple(old_grid)} with "
            f"{num_prefix_tokens} prefix tokens needs {expected}"
        )
    if (new_h, new_w) == (old_h, old_w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_h, new_w), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
