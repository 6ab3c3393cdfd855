"""The NaFlex Vision Transformer on packed batches (NaViT / SigLIP 2 / timm's `NaFlexVit`).

    model = vitkern.NaFlexViT(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000)
    # or: model = vitkern.from_timm(timm_naflexvit_model)        (timm's state_dict keys, unchanged)
    packed = vitkern.pack(images, 16, max_patches=256)            # any sizes and aspect ratios
    logits = model(packed)                                        # [num_images, num_classes]

Every image of the batch lives in one sequence of tokens [total_tokens, dim], its prefix tokens
then its patches, with no padding anywhere: the blocks are vitkern's fused `Block`s (ln_linear,
attention with cu_seqlens, linear + residual); only attention sees the image boundaries, through
a `SeqLens` validated once per batch. Pooling (class token, average of the patch tokens, or the
attention-pool latent) is per image on the packed output. In training, `patch_drop_rate` keeps a
random max(1, int(n * (1 - rate))) of each image's n patch tokens (NaViT's token dropping) and
recomputes the sequence offsets.

The parameters have the names of timm's NaFlexVit (`embeds.proj`, `embeds.cls_token`,
`embeds.reg_token`, `embeds.pos_embed` or `embeds.pos_embed_y` / `pos_embed_x`, `norm_pre`,
`blocks.N.*` as timm's ViT Block, `norm`, `attn_pool.*`, `fc_norm`, `head`).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitkern import fusion, ops
from vitkern.config import to_2tuple
from vitkern.model import ACT_LAYERS, Attention, AttentionPoolLatent, Block, Mlp, _built_on_device
from vitkern.packing import Packed, SeqLens

GLOBAL_POOLS = ("token", "avg", "map", "")
POS_EMBEDS = ("learned", "factorized", "none")


class NaFlexEmbeds(nn.Module):
    """timm's NaFlexEmbeds (linear projection of pre-extracted patches): `proj` Linear(ph * pw * C,
    dim), `cls_token` [1, 1, dim], `reg_token` [1, reg, dim], and a learned `pos_embed` [1, h, w, dim]
    or factorized `pos_embed_y` [1, h, dim] + `pos_embed_x` [1, w, dim], resampled to each image's
    grid. forward: a `Packed` batch -> tokens [total_tokens, dim], each image's prefix tokens then
    its patch tokens (one `ops.patch_embed` call)."""

    def __init__(self, patch_size: Tuple[int, int], in_chans: int, embed_dim: int, *, bias: bool = True,
                 class_token: bool = False, reg_tokens: int = 0, pos_embed: str = "learned",
                 pos_embed_grid_size: Tuple[int, int] = (16, 16), pos_embed_ar_preserving: bool = False,
                 pos_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.pos_embed_ar_preserving = pos_embed_ar_preserving
        self.proj = nn.Linear(patch_size[0] * patch_size[1] * in_chans, embed_dim, bias=bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        h, w = pos_embed_grid_size
        self.pos_embed_type = pos_embed
        self.pos_embed = nn.Parameter(torch.zeros(1, h, w, embed_dim)) if pos_embed == "learned" else None
        self.pos_embed_y = nn.Parameter(torch.zeros(1, h, embed_dim)) if pos_embed == "factorized" else None
        self.pos_embed_x = nn.Parameter(torch.zeros(1, w, embed_dim)) if pos_embed == "factorized" else None
        self.norm = nn.Identity()  # timm's slot (embed_norm_layer=None): same module tree
        self.pos_drop = nn.Dropout(pos_drop_rate)

    def prefix_tokens(self) -> Optional[Tensor]:
        parts = [t for t in (self.cls_token, self.reg_token) if t is not None]
        return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def position_table(self):
        if self.pos_embed_type == "factorized":
            return (self.pos_embed_y, self.pos_embed_x)
        return self.pos_embed

    def forward(self, packed: Packed, backend: str = "auto") -> Tensor:
        if packed.patches.shape[1] != self.proj.in_features:
            raise ValueError(f"packed.patches must have {self.proj.in_features} features per patch (patch "
                             f"{self.patch_size}, {self.in_chans} channels, channels last), got {packed.patches.shape[1]}")
        x = ops.patch_embed(packed.patches, self.proj.weight, self.proj.bias, self.prefix_tokens(),
                            self.position_table(), grids=packed.grid_list,
                            pos_embed_ar_preserving=self.pos_embed_ar_preserving, backend=backend)
        return self.pos_drop(x)


class PackedLayout:
    """Host-built index tensors of a packed token sequence (made once per batch, reused by every
    pooling): `seqlens` (SeqLens), the row of each image's first token `first` [n] int64, the rows of
    the patch tokens `patch_rows` [patch_tokens] int64 and the image of each of them `patch_image`
    [patch_tokens] int64, and the patch tokens per image `patch_counts` [n] (host ints)."""

    def __init__(self, lengths: Sequence[int], num_prefix_tokens: int, device: torch.device) -> None:
        self.seqlens = SeqLens.from_lengths(lengths, device)
        self.num_prefix_tokens = num_prefix_tokens
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        self.patch_counts = [n - num_prefix_tokens for n in lengths]
        rows, image = [], []
        for i, (s, n) in enumerate(zip(starts, lengths)):
            rows.append(torch.arange(s + num_prefix_tokens, s + n))
            image.append(torch.full((n - num_prefix_tokens,), i, dtype=torch.int64))
        self.first = torch.tensor(starts, dtype=torch.int64).to(device, non_blocking=True)
        self.patch_rows = torch.cat(rows).to(device, non_blocking=True)
        self.patch_image = torch.cat(image).to(device, non_blocking=True)

    @property
    def num_images(self) -> int:
        return self.seqlens.num_seqs


def drop_patch_tokens(x: Tensor, layout: PackedLayout, keep_rate: float,
                      generator: Optional[torch.Generator] = None) -> Tuple[Tensor, PackedLayout]:
    """NaViT's token dropping on a packed sequence: each image keeps its prefix tokens and a random
    max(1, int(n * keep_rate)) of its n patch tokens (in their packed order).
    x: [total_tokens, dim] -> ([kept_tokens, dim], the new layout). Drawn on the host (torch's CPU
    generator): the kept counts set the new offsets, which must be known without a device read."""
    p = layout.num_prefix_tokens
    rows, lengths, start = [], [], 0
    for n in layout.seqlens.lengths:
        patches = n - p
        kept = max(1, int(patches * keep_rate))
        choice = torch.randperm(patches, generator=generator)[:kept].sort().values
        rows.append(torch.arange(start, start + p))
        rows.append(choice + start + p)
        lengths.append(p + kept)
        start += n
    index = torch.cat(rows).to(x.device, non_blocking=True)
    return x.index_select(0, index), PackedLayout(lengths, p, x.device)


def pool_packed(x: Tensor, layout: PackedLayout, pool: str) -> Tensor:
    """Per-image pooling of packed tokens x [total_tokens, dim] -> [num_images, dim]: "token" the
    image's first token, "avg" the mean of its patch tokens (prefix excluded, as timm's default);
    "" is refused (there is no per-image [tokens, dim] tensor to return in a packed batch)."""
    if pool == "token":
        return x.index_select(0, layout.first)
    if pool == "avg":
        patches = x.index_select(0, layout.patch_rows)
        sums = x.new_zeros((layout.num_images, x.shape[1])).index_add_(0, layout.patch_image, patches)
        counts = torch.tensor(layout.patch_counts, dtype=x.dtype).to(x.device, non_blocking=True)
        return sums / counts[:, None]
    raise ValueError(f"pool must be 'token' or 'avg' for packed tokens, got {pool!r}")


def packed_latent_attention(q: Tensor, kv: Tensor, image: Tensor, num_images: int, num_heads: int,
                            scale: float) -> Tensor:
    """The attention-pool head's attention on packed tokens: one latent query per image over that
    image's tokens only. q: [1, dim] (the projected latent, shared); kv: [tokens, 2 * dim] in timm's
    (2, heads, head_dim) order; image: [tokens] int64, each token's image. Scores and softmax in
    fp32 (fp64 for fp64), a softmax per image and head by segment reductions.
    Returns [num_images, dim] in q's dtype."""
    dim = q.shape[-1]
    head_dim = dim // num_heads
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = kv.unflatten(-1, (2, num_heads, head_dim)).unbind(1)  # [tokens, heads, head_dim]
    scores = (k.to(stats) * q.reshape(1, num_heads, head_dim).to(stats)).sum(-1) * scale  # [tokens, heads]
    seg = image[:, None].expand_as(scores)
    # The per-image max only shifts the exponent (softmax is invariant to it): no gradient needed.
    peak = scores.new_full((num_images, num_heads), float("-inf")).scatter_reduce(
        0, seg, scores.detach(), "amax", include_self=True)
    e = (scores - peak.index_select(0, image)).exp()
    denom = scores.new_zeros((num_images, num_heads)).index_add_(0, image, e)
    weighted = (e[..., None] * v.to(stats))
    out = weighted.new_zeros((num_images, num_heads, head_dim)).index_add_(0, image, weighted)
    return (out / denom[..., None]).reshape(num_images, dim).to(q.dtype)


class NaFlexViT(nn.Module):
    """A Vision Transformer on packed variable-resolution batches, a drop-in for timm's NaFlexVit
    (state-dict keys and math of its NaFlex path; see the module docstring).

    Arguments have the names of timm's NaFlexVitCfg: patch_size, in_chans, num_classes, embed_dim,
    depth, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values (LayerScale), class_token,
    reg_tokens, pos_embed ("learned", "factorized", "none"), pos_embed_grid_size,
    pos_embed_ar_preserving, global_pool ("map" default, "token", "avg", ""), fc_norm (None: for
    "avg"), final_norm, pre_norm, act_layer ("gelu", "gelu_tanh", "quick_gelu"), norm_eps,
    attn_pool_num_heads, attn_pool_mlp_ratio, the dropout rates, patch_drop_rate (NaViT's
    per-image token dropping in training), and backend.

    forward(packed): a `vitkern.Packed` batch of n images -> logits [n, num_classes] (pooled
    features [n, embed_dim] when num_classes == 0); global_pool="" returns the packed tokens
    [total_tokens, embed_dim] instead.
    """

    @_built_on_device
    def __init__(
        self,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: Optional[float] = None,
        class_token: bool = False,
        reg_tokens: int = 0,
        pos_embed: str = "learned",
        pos_embed_grid_size: Tuple[int, int] = (16, 16),
        pos_embed_ar_preserving: bool = False,
        global_pool: str = "map",
        fc_norm: Optional[bool] = None,
        final_norm: bool = True,
        pre_norm: bool = False,
        act_layer: Optional[str] = None,
        norm_eps: float = 1e-6,
        attn_pool_num_heads: Optional[int] = None,
        attn_pool_mlp_ratio: Optional[float] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True (timm's rule)")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if act_layer not in (None,) + ACT_LAYERS:
            raise ValueError(f"act_layer must be None or one of {ACT_LAYERS}, got {act_layer!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads: embed_dim={embed_dim}, num_heads={num_heads}")
        if not 0.0 <= patch_drop_rate < 1.0:
            raise ValueError(f"patch_drop_rate must be in [0, 1), got {patch_drop_rate!r}")
        patch = to_2tuple(patch_size, "patch_size")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.patch_size = patch
        self.patch_drop_rate = patch_drop_rate
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = False
        mlp_hidden = int(embed_dim * mlp_ratio)
        self.embeds = NaFlexEmbeds(patch, in_chans, embed_dim, bias=not pre_norm, class_token=class_token,
                                   reg_tokens=reg_tokens, pos_embed=pos_embed,
                                   pos_embed_grid_size=tuple(pos_embed_grid_size),
                                   pos_embed_ar_preserving=pos_embed_ar_preserving, pos_drop_rate=pos_drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_hidden, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rates[i], norm_eps=norm_eps, qk_norm=qk_norm,
                  init_values=init_values, act_layer=act_layer)
            for i in range(depth)
        ])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = (AttentionPoolLatent(embed_dim, attn_pool_num_heads or num_heads,
                                              int(embed_dim * (attn_pool_mlp_ratio or mlp_ratio)), norm_eps, act_layer)
                          if global_pool == "map" else None)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.backend = backend
        self.init_weights()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        from vitkern import dispatch
        from vitkern.config import ViTConfig
        from vitkern.dispatch import BackendUnavailableError

        ViTConfig(backend=value)  # validates the name
        if value != "auto":
            reasons = dispatch.backend_unavailable_reasons(value)
            if reasons:
                raise BackendUnavailableError(f"backend={value!r} cannot run here:\n  - " + "\n  - ".join(reasons))
        self._backend = value
        for module in self.modules():
            if isinstance(module, (Block, Attention, AttentionPoolLatent, Mlp)):
                module.backend = value

    def init_weights(self) -> None:
        """timm's defaults: trunc_normal(0.02) Linear weights, zero biases, normal(0.02) position
        tables, normal(1e-6) prefix tokens, the latent at its dim ** -0.5."""
        e = self.embeds
        for t in (e.pos_embed, e.pos_embed_y, e.pos_embed_x):
            if t is not None:
                nn.init.normal_(t, std=0.02)
        for t in (e.cls_token, e.reg_token):
            if t is not None:
                nn.init.normal_(t, std=1e-6)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.attn_pool.latent_dim ** -0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        return {"embeds.pos_embed", "embeds.pos_embed_y", "embeds.pos_embed_x", "embeds.cls_token", "embeds.reg_token"}

    # ----------------------------------------------------------------------------------------
    def forward_features(self, packed: Packed) -> Tuple[Tensor, PackedLayout]:
        """A packed batch -> (normalized tokens [total_tokens, embed_dim], their layout). In training
        with patch_drop_rate > 0 each image keeps a random fraction of its patch tokens."""
        if not isinstance(packed, Packed):
            raise TypeError(f"packed must be a vitkern.Packed batch (vitkern.pack(images, patch_size)), got "
                            f"{type(packed).__name__}")
        if tuple(packed.patch_size) != self.patch_size:
            raise ValueError(f"packed.patch_size must be the model's {self.patch_size}, got {tuple(packed.patch_size)}")
        if self.training and self.drop_path_rate > 0:
            raise NotImplementedError("drop_path_rate > 0 in training on packed batches (stochastic depth per image "
                                      "inside a packed sequence) is not implemented; build with drop_path_rate=0")
        lengths = [gh * gw + self.num_prefix_tokens for gh, gw in packed.grid_list]
        layout = PackedLayout(lengths, self.num_prefix_tokens, packed.patches.device)  # validated once per batch
        x = self.embeds(packed, backend=self.backend)
        if self.training and self.patch_drop_rate > 0:
            x, layout = drop_patch_tokens(x, layout, 1.0 - self.patch_drop_rate)
        if not fusion.is_plain(self.norm_pre, nn.Identity):
            x = fusion.call_norm(self.norm_pre, x, backend=self.backend)
        seq = layout.seqlens
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, seq, use_reentrant=False)
            else:
                x = blk(x, seq)
        if not fusion.is_plain(self.norm, nn.Identity):
            x = fusion.call_norm(self.norm, x, backend=self.backend)
        return x, layout

    def forward_head(self, x: Tensor, layout: PackedLayout, pre_logits: bool = False) -> Tensor:
        """Packed tokens [total_tokens, embed_dim] -> per-image logits [num_images, num_classes]."""
        if self.attn_pool is not None:
            y = self._attn_pool(x, layout)
        else:
            y = pool_packed(x, layout, self.global_pool)
        if not fusion.is_plain(self.fc_norm, nn.Identity):
            y = fusion.call_norm(self.fc_norm, y, backend=self.backend)
        y = self.head_drop(y)
        return y if pre_logits else self.head(y)

    def _attn_pool(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """timm's AttentionPoolLatent per image over its patch tokens (prefix excluded, as timm's
        pool_include_prefix=False): the same sub-modules as the padded model's."""
        pool, backend = self.attn_pool, self.backend
        patches = x.index_select(0, layout.patch_rows)
        q = fusion.call_linear(pool.q, pool.latent[0], backend=backend)  # [1, dim]: one latent for all images
        kv = fusion.call_linear(pool.kv, patches, backend=backend)
        a = packed_latent_attention(q, kv, layout.patch_image, layout.num_images, pool.num_heads, pool.scale)
        y = pool.proj_drop(fusion.call_linear(pool.proj, a, backend=backend))
        return y + pool.mlp(fusion.call_norm(pool.norm, y, backend=backend))

    def forward(self, packed: Packed) -> Tensor:
        x, layout = self.forward_features(packed)
        if self.global_pool == "":
            return x
        return self.forward_head(x, layout)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


# --------------------------------------------------------------------------------------------
# timm's NaFlexVit -> NaFlexViT


def to_padded(packed: Packed, length: Optional[int] = None) -> Dict[str, Tensor]:
    """A packed batch in timm's padded NaFlex form (what its NaFlex collator gives): patches
    [n, length, features], patch_coord [n, length, 2] int64 and patch_valid [n, length] bool, each
    image's patches first, zeros after; length defaults to the longest image's patch count."""
    grids = packed.grid_list
    counts = [gh * gw for gh, gw in grids]
    length = max(counts) if length is None else length
    if length < max(counts):
        raise ValueError(f"length must be >= the longest image's {max(counts)} patches, got {length}")
    n, feats = len(counts), packed.patches.shape[1]
    patches = packed.patches.new_zeros((n, length, feats))
    coord = torch.zeros((n, length, 2), dtype=torch.int64, device=packed.patches.device)
    valid = torch.zeros((n, length), dtype=torch.bool, device=packed.patches.device)
    start = 0
    for i, c in enumerate(counts):
        patches[i, :c] = packed.patches[start:start + c]
        coord[i, :c] = packed.coords[start:start + c]
        valid[i, :c] = True
        start += c
    return dict(patches=patches, patch_coord=coord, patch_valid=valid)


def _naflex_refusals(tm: nn.Module) -> List[str]:
    """Every option of timm NaFlexVit `tm` that NaFlexViT does not implement."""
    from timm.layers import Mlp as TimmMlp
    from timm.layers.attention import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock

    from vitkern.weights import _act_layer_name

    why: List[str] = []

    def plain_ln(m: Any) -> bool:
        return (isinstance(m, nn.LayerNorm) and type(m).__name__ == "LayerNorm" and m.elementwise_affine
                and m.bias is not None and len(m.normalized_shape) == 1)

    def ident(m: Any) -> bool:
        return m is None or isinstance(m, nn.Identity)

    e = tm.embeds
    if getattr(tm, "rope", None) is not None:
        why.append("rope_type (rotary position embeddings)")
    if not e.is_linear:
        why.append("embed_proj_type='conv' (vitkern's packed model takes pre-extracted patches: 'linear')")
    if not getattr(e, "channels_last", True):
        why.append("patchify_channels_last=False (vitkern.pack cuts channels-last patches)")
    if e.norm_input is not None:
        why.append("input_norm_layer (a norm on the raw patches)")
    if not ident(e.norm):
        why.append("embed_norm_layer (a norm after the patch projection)")
    if e.pos_embed_type != "none":
        if e.pos_embed_use_grid_sample:
            why.append("pos_embed_use_grid_sample=True (vitkern resamples by interpolation per grid)")
        if e.pos_embed_type == "learned" and e.pos_embed_interp_mode != "bicubic":
            why.append(f"pos_embed_interp_mode={e.pos_embed_interp_mode!r} (vitkern: 'bicubic')")
        if e.pos_embed_type == "learned" and not e.pos_embed_antialias:
            why.append("pos_embed_antialias=False")
        if e.pos_embed_align_corners:
            why.append("pos_embed_align_corners=True")
    if not ident(tm.norm_pre) and not plain_ln(tm.norm_pre):
        why.append(f"norm_pre is {type(tm.norm_pre).__name__}, not LayerNorm")
    if (e.proj.bias is None) != (not ident(tm.norm_pre)):
        why.append("a patch projection whose bias does not follow timm's pre_norm rule (bias exactly when pre_norm=False)")
    if tm.global_pool not in GLOBAL_POOLS:
        why.append(f"global_pool={tm.global_pool!r} (vitkern: {GLOBAL_POOLS})")
    if tm.pool_include_prefix:
        why.append("pool_include_prefix=True")
    for name in ("norm", "fc_norm"):
        m = getattr(tm, name)
        if not ident(m) and not plain_ln(m):
            why.append(f"{name} is {type(m).__name__}, not LayerNorm (norm_layer)")
    if not isinstance(tm.head, (nn.Linear, nn.Identity)):
        why.append(f"head is {type(tm.head).__name__}, not Linear")
    ap = tm.attn_pool
    if ap is not None:
        mlp = getattr(ap, "mlp", None)
        if (type(ap).__name__ != "AttentionPoolLatent" or ap.latent_len != 1 or ap.pos_embed is not None
                or ap.pool != "token" or not ident(ap.q_norm) or not ident(ap.k_norm) or not plain_ln(ap.norm)
                or type(mlp) is not TimmMlp or _act_layer_name(mlp.act) is None):
            why.append("an attention-pool head other than timm's default (one latent, no pos_embed or qk_norm, "
                       "LayerNorm, a GELU-family Mlp)")
    eps = {m.eps for m in tm.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        why.append(f"LayerNorms with different eps {sorted(eps)}")
    seen: Dict[str, List[int]] = {}
    kinds = set()
    for i, blk in enumerate(tm.blocks):
        def note(msg: str) -> None:
            seen.setdefault(msg, []).append(i)
        if type(blk) is not TimmBlock:
            note(f"blocks.* is {type(blk).__name__} (attn_type / swiglu_mlp / attn_gated / num_kv_heads / "
                 "block_fn: vitkern has timm's ViT Block)")
            continue
        attn, mlp = blk.attn, blk.mlp
        if not (plain_ln(blk.norm1) and plain_ln(blk.norm2)):
            note("blocks.*.norm1/norm2 are not LayerNorm (norm_layer)")
        if type(attn) is not TimmAttention:
            note(f"blocks.*.attn is {type(attn).__name__} (attn_layer)")
        else:
            if not ident(getattr(attn, "norm", None)):
                note("scale_attn_inner_norm=True (blocks.*.attn.norm)")
            if attn.proj.bias is None:
                note("proj_bias=False")
            if ident(attn.q_norm) != ident(attn.k_norm) or not (ident(attn.q_norm) or
                                                                (plain_ln(attn.q_norm) and plain_ln(attn.k_norm))):
                note("a qk_norm other than LayerNorm on both q and k")
            if getattr(attn, "gate", None) is not None:
                note("attn_gated=True")
            kinds.add(("heads", attn.num_heads))
            kinds.add(("qkv_bias", attn.qkv.bias is not None))
            kinds.add(("qk_norm", not ident(attn.q_norm)))
        if type(mlp) is not TimmMlp:
            note(f"blocks.*.mlp is {type(mlp).__name__} (mlp_layer / swiglu_mlp)")
        else:
            if _act_layer_name(mlp.act) is None:
                note(f"act_layer {type(mlp.act).__name__} (vitkern: GELU, tanh GELU, QuickGELU)")
            if not ident(getattr(mlp, "norm", None)):
                note("scale_mlp_norm=True (blocks.*.mlp.norm)")
            if mlp.fc1.bias is None or mlp.fc2.bias is None:
                note("proj_bias=False (MLP)")
            kinds.add(("mlp", mlp.fc1.out_features))
            kinds.add(("act", _act_layer_name(mlp.act)))
        kinds.add(("ls", type(blk.ls1).__name__))
    for msg, idx in seen.items():
        why.append(f"{msg} [blocks {idx[0]}-{idx[-1]}]" if len(idx) > 1 else f"{msg} [block {idx[0]}]")
    for what in ("heads", "qkv_bias", "qk_norm", "mlp", "act", "ls"):
        values = {v for k, v in kinds if k == what}
        if len(values) > 1:
            why.append(f"blocks with different {what} {sorted(map(str, values))}")
    return why


def naflex_from_timm(timm_model: nn.Module, **overrides: Any) -> NaFlexViT:
    """A `NaFlexViT` with the architecture and weights of a timm `NaFlexVit` (state dict unchanged).
    overrides: backend, num_classes (a fresh head), global_pool ("token"/"avg"/"map" as built,
    or ""), patch_drop_rate and the dropout rates. Raises NotImplementedError naming every timm
    option vitkern does not implement (RoPE, EVA blocks, SwiGLU, conv patch embedding, grid_sample
    position embeddings, ...)."""
    from vitkern.weights import _act_layer_name, _load_checked, _match_source

    why = _naflex_refusals(timm_model)
    if why:
        raise NotImplementedError(f"vitkern cannot convert this timm {type(timm_model).__name__}: it uses\n  - "
                                  + "\n  - ".join(why))
    allowed = ("backend", "num_classes", "global_pool", "patch_drop_rate", "drop_rate", "pos_drop_rate",
               "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
    refused = sorted(set(overrides) - set(allowed))
    if refused:
        raise ValueError(f"from_timm cannot override {refused} of a NaFlexVit; overridable: {list(allowed)}")
    tm = timm_model
    e, blk = tm.embeds, tm.blocks[0]
    pos = e.pos_embed_type
    grid = tuple(e.pos_embed.shape[1:3]) if pos == "learned" else (
        (e.pos_embed_y.shape[1], e.pos_embed_x.shape[1]) if pos == "factorized" else (1, 1))
    ap = tm.attn_pool
    act = _act_layer_name(blk.mlp.act)
    patch_drop = getattr(tm, "patch_drop", None)
    args = dict(
        patch_size=tuple(e.patch_size), in_chans=e.in_chans, num_classes=tm.num_classes, embed_dim=tm.embed_dim,
        depth=len(tm.blocks), num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / tm.embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None, qk_norm=not isinstance(blk.attn.q_norm, nn.Identity),
        init_values=float(blk.ls1.gamma.detach().flatten()[0]) if type(blk.ls1).__name__ == "LayerScale" else None,
        class_token=e.cls_token is not None, reg_tokens=e.num_reg_tokens, pos_embed=pos, pos_embed_grid_size=grid,
        pos_embed_ar_preserving=bool(e.pos_embed_ar_preserving), global_pool=tm.global_pool,
        fc_norm=isinstance(tm.fc_norm, nn.LayerNorm),
        final_norm=not (isinstance(tm.norm, nn.Identity) and isinstance(tm.fc_norm, nn.Identity)),
        pre_norm=not isinstance(tm.norm_pre, nn.Identity), act_layer=None if act == "gelu" else act,
        norm_eps=blk.norm1.eps, attn_pool_num_heads=ap.num_heads if ap is not None else None,
        attn_pool_mlp_ratio=ap.mlp.fc1.out_features / tm.embed_dim if ap is not None else None,
        drop_rate=tm.head_drop.p, pos_drop_rate=e.pos_drop.p, proj_drop_rate=blk.attn.proj_drop.p,
        attn_drop_rate=blk.attn.attn_drop.p, drop_path_rate=float(getattr(tm.blocks[-1].drop_path1, "drop_prob", 0.0)),
        patch_drop_rate=float(getattr(patch_drop, "prob", 0.0)) if patch_drop is not None else 0.0,
    )
    args.update(overrides)
    model = NaFlexViT(**args)
    state = dict(tm.state_dict())
    if args["num_classes"] != tm.num_classes:
        for key in ("head.weight", "head.bias"):
            state.pop(key, None)
            if key in model.state_dict():
                state[key] = model.state_dict()[key]
    _load_checked(model, state, source="timm NaFlexVit")
    model.pretrained_cfg = copy.deepcopy(dict(getattr(tm, "pretrained_cfg", None) or {}))
    return _match_source(model, next(tm.parameters(), None), tm.training)


__all__ = ["NaFlexViT", "NaFlexEmbeds", "PackedLayout", "naflex_from_timm", "to_padded", "pool_packed",
           "drop_patch_tokens", "packed_latent_attention"]
