"""Masked patch prediction (the paper's section 4.6): self-supervised pre-training of a ViT.

Half of the patch embeddings are corrupted (`corrupt` = 0.5); of those, 80% are replaced by a
learnable mask embedding, 10% by a random other patch embedding (from anywhere in the batch) and
10% are kept as they are. The model then predicts, from each corrupted patch's output token, the
patch's mean colour quantized to 3 bits per channel: 8 x 8 x 8 = 512 classes.

The wrapper reuses the ViT's own pieces, so the pre-trained weights are the ViT's state_dict
(timm names) and fine-tune with the classification recipe unchanged. It relies on these `ViT`
internals (vitkern/model.py): `patch_embed(x)` (patch tokens [batch, patches, dim] without class
token or position embedding), `cls_token`, `pos_embed`, `pos_drop`, `blocks`, `norm`,
`grad_checkpointing`, `num_prefix_tokens`, `patch_embed.grid_size` / `patch_size`, `backend`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitkern import ops


def mpp_targets(images: Tensor, patch_size: int, mean: Sequence[float], std: Sequence[float], bits: int = 3) -> Tensor:
    """The class of each patch's mean colour, quantized to `bits` bits per channel.

    images: [batch, 3, H, W] normalized as the model sees them (pixel = image * std + mean, in
    [0, 1]); H and W multiples of patch_size. Returns int64 [batch, patches] (patches in row-major
    grid order, as `PatchEmbed` emits them) with values r * 2^(2 bits) + g * 2^bits + b, where
    each channel's level is floor(mean * 2^bits) clamped to [0, 2^bits - 1].
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [batch, 3, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images' height and width {(h, w)} must be multiples of patch_size={patch_size}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    pixels = images.float() * std_t + mean_t
    colour = F.avg_pool2d(pixels, patch_size)  # [batch, 3, H/p, W/p], fp32
    levels = 2 ** bits
    q = (colour * levels).floor().clamp_(0, levels - 1).long()
    cls = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]  # [batch, H/p, W/p]
    return cls.reshape(b, -1)


def corruption_plan(batch: int, patches: int, corrupt: float, mask: float, random: float,
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Which patches to corrupt and how: (corrupted, masked, replaced) bool [batch, patches].

    Each patch is corrupted with probability `corrupt`; a corrupted one is masked with
    probability `mask`, replaced by another patch with probability `random`, else kept.
    Drawn on the CPU from `generator`, so the plan is the same on any device.
    """
    u = torch.rand(batch, patches, generator=generator)
    v = torch.rand(batch, patches, generator=generator)
    corrupted = u < corrupt
    masked = corrupted & (v < mask)
    replaced = corrupted & (v >= mask) & (v < mask + random)
    return corrupted, masked, replaced


class MaskedPatchPrediction(nn.Module):
    """A ViT with the MPP corruption on its patch embeddings and a 512-way colour head per token.

    forward(images [batch, 3, H, W], generator) -> (logits float [batch, patches, 2^(3 bits)],
    corrupted bool [batch, patches]); `loss(images, generator)` adds the targets and returns the
    mean cross-entropy over the corrupted patches. The ViT should be built with num_classes=0 (its
    head is not used; unused parameters would stall DDP's gradient reduction).
    """

    def __init__(self, vit: nn.Module, *, corrupt: float = 0.5, mask: float = 0.8, random: float = 0.1,
                 bits: int = 3, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        if vit.num_prefix_tokens != 1 or vit.cls_token is None:
            raise ValueError("MaskedPatchPrediction needs a ViT with a class token and no other prefix tokens "
                             f"(class_token=True, reg_tokens=0), got {vit.num_prefix_tokens} prefix tokens")
        # The embedding below is the paper's plain one; refuse the timm options it does not reproduce
        # rather than train a different model silently.
        unsupported = [name for name, active in (
            ("no_embed_class", bool(getattr(vit, "no_embed_class", False))),
            ("pre_norm", not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity)),
            ("patch_drop_rate", not isinstance(getattr(vit, "patch_drop", nn.Identity()), nn.Identity)),
            ("norm on patch_embed", not isinstance(getattr(vit.patch_embed, "norm", nn.Identity()), nn.Identity)),
        ) if active]
        if unsupported:
            raise ValueError(f"MaskedPatchPrediction does not implement these ViT options: {', '.join(unsupported)}")
        self.vit = vit
        self.corrupt, self.mask, self.random, self.bits = corrupt, mask, random, bits
        self.mean, self.std = tuple(mean), tuple(std)
        dim = vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Linear(dim, 2 ** (3 * bits))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def corrupt_tokens(self, tokens: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """tokens [batch, patches, dim] -> (corrupted tokens, corrupted bool [batch, patches])."""
        b, n, d = tokens.shape
        corrupted, masked, replaced = corruption_plan(b, n, self.corrupt, self.mask, self.random, generator)
        # A replacement is another patch of the batch: draw from the b*n - 1 others, skipping itself.
        flat_index = torch.arange(b * n).view(b, n)
        other = torch.randint(0, max(b * n - 1, 1), (b, n), generator=generator)
        other = other + (other >= flat_index).long()
        other = other.clamp_(max=b * n - 1)
        dev = tokens.device
        donors = tokens.reshape(b * n, d)[other.to(dev).view(-1)].view(b, n, d)
        out = torch.where(replaced.to(dev)[..., None], donors, tokens)
        out = torch.where(masked.to(dev)[..., None], self.mask_token.to(tokens.dtype).expand(b, n, d), out)
        return out, corrupted.to(dev)

    def forward(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        vit = self.vit
        tokens, corrupted = self.corrupt_tokens(vit.patch_embed(images), generator)
        grid = (images.shape[-2] // vit.patch_embed.patch_size[0], images.shape[-1] // vit.patch_embed.patch_size[1])
        if grid != tuple(vit.patch_embed.grid_size):
            raise ValueError(f"images give a patch grid {grid}; the model is built for {vit.patch_embed.grid_size}")
        cls = vit.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        z = vit.pos_drop(torch.cat([cls, tokens], dim=1) + vit.pos_embed.to(tokens.dtype))
        for blk in vit.blocks:
            if vit.grad_checkpointing and torch.is_grad_enabled():
                z = checkpoint(blk, z, use_reentrant=False)
            else:
                z = blk(z)
        if isinstance(vit.norm, nn.LayerNorm):
            z = ops.layer_norm(z, vit.norm.weight, vit.norm.bias, vit.norm.eps, backend=vit.backend)
        return self.head(z[:, vit.num_prefix_tokens:]).float(), corrupted

    def targets(self, images: Tensor) -> Tensor:
        """The colour class of every patch: int64 [batch, patches]."""
        return mpp_targets(images, self.vit.patch_embed.patch_size[0], self.mean, self.std, self.bits)
