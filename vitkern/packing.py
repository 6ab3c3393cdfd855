"""Packed variable-resolution batches (NaViT/NaFlex): images of any size and aspect ratio as one
sequence of patches without padding, and back.

    pack(images, patch_size, max_patches=None) -> Packed
    unpack(packed) -> list of images [C, H, W]

A `Packed` batch holds the patches [total_patches, P * P * C] of every image back to back (each
image's grid row-major), the per-image grids, the (y, x) coordinate of every patch, and the int32
offsets `cu_seqlens` that `vitkern.ops.attention` and `vitkern.ops.patch_embed` take. The patch
layout is timm NaFlex's default (channels last: (py, px, c) within a patch, channel fastest), so a
timm NaFlexViT's linear patch projection reads these patches unchanged.

With a max_patches budget each image is resized, keeping its aspect ratio, to the largest size
whose patch grid fits the budget, each side a multiple of the patch (the rule of timm's NaFlex
transforms and SigLIP 2; images smaller than the budget are enlarged to it). Without one, an image
whose sides are not multiples of the patch is zero-padded at the bottom and right (timm's
dynamic_img_pad), and `unpack` crops the padding away again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

PatchSize = Union[int, Tuple[int, int]]


@dataclass
class Packed:
    """A packed batch of `num_images` images.

    patches: [total_patches, ph * pw * C] in the images' dtype, (py, px, c) order within a patch.
    grids: [num_images, 2] int64, each image's (grid_h, grid_w).
    coords: [total_patches, 2] int64, each patch's (y, x) in its image's grid (timm's patch_coord).
    cu_seqlens: [num_images + 1] int32 offsets of each image's patches; max_seqlen the largest grid.
    patch_size: (ph, pw); channels: C; sizes: each image's (H, W) before padding, after any resize.
    """

    patches: Tensor
    grids: Tensor
    coords: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    patch_size: Tuple[int, int]
    channels: int
    sizes: List[Tuple[int, int]]

    @property
    def num_images(self) -> int:
        return self.grids.shape[0]

    @property
    def grid_list(self) -> List[Tuple[int, int]]:
        """Each image's (grid_h, grid_w) as host ints, from `sizes` (no device read)."""
        ph, pw = self.patch_size
        return [(-(-h // ph), -(-w // pw)) for h, w in self.sizes]

    def token_seqlens(self, num_prefix_tokens: int = 0) -> "SeqLens":
        """`token_cu_seqlens` as a validated `SeqLens`, built from host ints: the packed model hands
        it to every layer's attention, which then reads nothing back from the device."""
        return SeqLens.from_lengths([gh * gw + num_prefix_tokens for gh, gw in self.grid_list],
                                    self.cu_seqlens.device)

    def token_cu_seqlens(self, num_prefix_tokens: int = 0) -> Tuple[Tensor, int]:
        """(cu_seqlens int32 [num_images + 1], max_seqlen) of the token sequences once each image
        gets `num_prefix_tokens` class/register tokens in front of its patches."""
        lengths = (self.grids[:, 0] * self.grids[:, 1]) + num_prefix_tokens
        cu = torch.zeros(self.num_images + 1, dtype=torch.int32, device=self.cu_seqlens.device)
        cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        return cu, int(lengths.max()) if self.num_images else 0

    def to(self, *args, **kwargs) -> "Packed":
        """The patches moved/cast as Tensor.to; the index tensors follow the device only."""
        patches = self.patches.to(*args, **kwargs)
        dev = patches.device
        return Packed(patches, self.grids.to(dev), self.coords.to(dev), self.cu_seqlens.to(dev), self.max_seqlen,
                      self.patch_size, self.channels, list(self.sizes))


@dataclass(frozen=True)
class SeqLens:
    """Offsets of packed sequences already known to be valid (FlashAttention's varlen convention),
    with their host-side lengths: `vitkern.ops.attention(cu_seqlens=SeqLens)` trusts them and skips
    the host read (one GPU sync) it does to validate a plain int32 tensor, so a packed model
    validates once per batch, not once per layer.

    cu_seqlens: int32 [num_seqs + 1] on the device; lengths: each sequence's tokens (host ints, all
    >= 1); max_seqlen: max(lengths); total: sum(lengths). Build with `from_lengths` (valid by
    construction) or `validated` (checks a device tensor once); do not construct directly.
    """

    cu_seqlens: Tensor
    lengths: Tuple[int, ...]
    max_seqlen: int
    total: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: Union[str, torch.device, None] = None) -> "SeqLens":
        """From host lengths (each a positive int): one host-to-device copy, no device read."""
        lengths = tuple(lengths)
        if not lengths or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
            raise ValueError(f"lengths must be a non-empty sequence of positive ints, got {lengths!r}"[:300])
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32).to(device if device is not None else "cpu", non_blocking=True)
        return cls(cu, lengths, max(lengths), offsets[-1])

    @classmethod
    def validated(cls, cu_seqlens: Tensor, max_seqlen: Optional[int] = None) -> "SeqLens":
        """From a device tensor, validated once (one host read) as `ops.attention` validates it."""
        from vitkern.ops._checks import check_cu_seqlens

        if isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 1:
            total = int(cu_seqlens[-1])
        else:
            total = -1  # check_cu_seqlens names what is wrong
        cu, longest = check_cu_seqlens(cu_seqlens, max_seqlen, total, cu_seqlens.device)
        offsets = cu.tolist()
        return cls(cu, tuple(e - s for s, e in zip(offsets[:-1], offsets[1:])), longest, total)

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)


def _pair(patch_size: PatchSize) -> Tuple[int, int]:
    if isinstance(patch_size, int) and not isinstance(patch_size, bool) and patch_size > 0:
        return patch_size, patch_size
    if (isinstance(patch_size, (tuple, list)) and len(patch_size) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch_size)):
        return int(patch_size[0]), int(patch_size[1])
    raise ValueError(f"patch_size must be a positive int or (ph, pw), got {patch_size!r}")


def size_for_budget(hw: Tuple[int, int], patch_size: PatchSize, max_patches: int) -> Tuple[int, int]:
    """The (H, W) an image of size `hw` is resized to under a budget of `max_patches` patches: the
    largest scale r whose sides, rounded up to multiples of the patch, give at most max_patches
    patches (each side at least one patch); aspect ratio kept up to that rounding."""
    ph, pw = _pair(patch_size)
    if not isinstance(max_patches, int) or isinstance(max_patches, bool) or max_patches < 1:
        raise ValueError(f"max_patches must be None or a positive int, got {max_patches!r}")
    h, w = hw

    def grid(r: float) -> Tuple[int, int]:
        return max(1, math.ceil(h * r / ph)), max(1, math.ceil(w * r / pw))

    def fits(r: float) -> bool:
        gh, gw = grid(r)
        return gh * gw <= max_patches

    # The patch count only grows with r: bisect on a log scale for the largest r that fits.
    lo, hi = 1e-6, 1.0
    while fits(hi):
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    gh, gw = grid(lo)
    return gh * ph, gw * pw


def _check_image(i: int, image: object, channels: Optional[int], patch: Tuple[int, int], budget: bool) -> Tensor:
    if not isinstance(image, Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"images[{i}] must be a tensor [C, H, W], got {shape}")
    if not image.is_floating_point():
        raise TypeError(f"images[{i}] must be a floating-point tensor, got {image.dtype}")
    if channels is not None and image.shape[0] != channels:
        raise ValueError(f"images[{i}] has {image.shape[0]} channels but images[0] has {channels}; all images must share C")
    h, w = image.shape[1:]
    if not budget and (h < patch[0] or w < patch[1]):
        raise ValueError(f"images[{i}] is {h}x{w}, smaller than one patch {patch[0]}x{patch[1]}: "
                         "no patch can be cut from it (give max_patches to resize it, or upsample it)")
    if h == 0 or w == 0:
        raise ValueError(f"images[{i}] is empty ({h}x{w})")
    return image


def pack(images: Sequence[Tensor], patch_size: PatchSize, max_patches: Optional[int] = None) -> Packed:
    """Cut every image into patches and pack them back to back (see the module docstring).

    images: a non-empty sequence of [C, H, W] floating-point tensors on one device, any H and W
    (each at least one patch without max_patches); patch_size: int or (ph, pw); max_patches: the
    per-image patch budget (None: native resolution, sides padded up to multiples of the patch).
    Returns a `Packed` batch.
    """
    patch = _pair(patch_size)
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of [C, H, W] tensors, got {type(images).__name__}")
    channels = None
    rows, grids, coords, sizes = [], [], [], []
    for i, image in enumerate(images):
        image = _check_image(i, image, channels, patch, max_patches is not None)
        channels = image.shape[0]
        if image.device != images[0].device:
            raise ValueError(f"images[{i}] is on {image.device} but images[0] is on {images[0].device}")
        if max_patches is not None:
            target = size_for_budget(tuple(image.shape[1:]), patch, max_patches)
            if target != tuple(image.shape[1:]):
                image = F.interpolate(image[None].float(), size=target, mode="bilinear", align_corners=False,
                                      antialias=True)[0].to(image.dtype)
        h, w = image.shape[1:]
        sizes.append((h, w))
        pad_h, pad_w = (-h) % patch[0], (-w) % patch[1]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
        gh, gw = image.shape[1] // patch[0], image.shape[2] // patch[1]
        # [C, gh, ph, gw, pw] -> [gh, gw, ph, pw, C]: grid row-major, channel fastest in a patch.
        cut = image.reshape(channels, gh, patch[0], gw, patch[1]).permute(1, 3, 2, 4, 0)
        rows.append(cut.reshape(gh * gw, patch[0] * patch[1] * channels))
        grids.append((gh, gw))
        yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coords.append(torch.stack([yy.flatten(), xx.flatten()], dim=1))
    device = images[0].device
    lengths = [gh * gw for gh, gw in grids]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return Packed(
        patches=torch.cat(rows), grids=torch.tensor(grids, dtype=torch.int64, device=device),
        coords=torch.cat(coords).to(device), cu_seqlens=cu, max_seqlen=max(lengths), patch_size=patch,
        channels=channels, sizes=sizes,
    )  # fmt: skip


def unpack(packed: Packed) -> List[Tensor]:
    """The inverse of `pack`: each image [C, H, W] from its patches, padding cropped (the images
    as packed: resized ones at their resized size)."""
    ph, pw = packed.patch_size
    c = packed.channels
    out = []
    offsets = packed.cu_seqlens.tolist()
    for (gh, gw), (h, w), s in zip(packed.grids.tolist(), packed.sizes, offsets[:-1]):
        rows = packed.patches[s:s + gh * gw]
        image = rows.reshape(gh, gw, ph, pw, c).permute(4, 0, 2, 1, 3).reshape(c, gh * ph, gw * pw)
        out.append(image[:, :h, :w])
    return out


__all__ = ["Packed", "SeqLens", "pack", "unpack", "size_for_budget"]
