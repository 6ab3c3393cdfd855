"""The Vision Transformer as `nn.Module`s with timm's parameter names.

`ViT.state_dict()` has exactly the keys of timm's `VisionTransformer` (`patch_embed.proj.*`,
`cls_token`, `pos_embed`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`,
`norm.*` or `fc_norm.*`, `head.*`), so timm checkpoints load unchanged. The modules own the
parameters; every computation goes through `vitkern.ops`, which dispatches to eager PyTorch,
Triton or CUDA kernels. A block is five fused ops:

    qkv = ln_linear(x, norm1, qkv)                  [B, T, D] -> [B, T, 3D]
    x   = linear(attention(qkv), proj, residual=x)  [B, T, 3D] -> [B, T, D] -> [B, T, D]
    h   = ln_linear(x, norm2, fc1, gelu)            [B, T, D] -> [B, T, 4D]
    x   = linear(h, fc2, residual=x)                [B, T, 4D] -> [B, T, D]

Dropout and stochastic depth (training only) are applied between the ops; when they are active
the residual add runs outside the GEMM, because it must add the dropped-out branch.

The sub-modules are timm's (names and placeholders such as `ls1`, `attn.q_norm`, `mlp.act`), and
the fused ops run only while they are the plain ones built here: a hook, a swapped or wrapped
module, a subclass or a parametrization makes the block call them in timm's order instead, PEFT
LoRA layers excepted (`vitkern.fusion` decides and says what invalidates its cached plan).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from inspect import Parameter
from inspect import signature as inspect_signature
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitkern import dispatch, fusion, ops, reference
from vitkern.config import ViTConfig, to_2tuple
from vitkern.dispatch import BackendUnavailableError
from vitkern.features import Indices, take_indices
from vitkern.pos_embed import resample_patch_kernel, resample_pos_embed, same_grid


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `drop_prob`."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return _drop_path(x, self.drop_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _drop_path(x: Tensor, drop_prob: float) -> Tensor:
    """x [batch, ...] with each sample's branch zeroed with probability drop_prob (else scaled up)."""
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class LayerScale(nn.Module):
    """timm's LayerScale: x * gamma, gamma [dim] initialized to `init_values` (DINOv2, DeiT III).
    A plain Block multiplies gamma in the epilogue of the branch's last linear instead of calling it."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class PatchDropout(nn.Module):
    """timm's PatchDropout (training only): keep a random max(1, int(patches * (1 - prob))) of the
    patch tokens of each image, in random order, and every prefix token; eval is the identity.

    It draws exactly as timm's does (torch.randn(batch, patches) on the tokens' device, argsorted),
    so under one seed the two keep the same tokens."""

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_drop_rate must be in [0, 1), got {prob!r}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        """x [batch, prefix + patches, dim] -> [batch, prefix + kept, dim]."""
        if not self.training or self.prob == 0.0:
            return x
        return _patch_dropout(x, self.prob, self.num_prefix_tokens)

    def draw_keep(self, batch: int, patches: int, device: torch.device) -> Tensor:
        """The patches each image keeps, [batch, kept] int64, drawn as `forward` draws them (the
        model hands them to the patch_embed op, which then embeds only those)."""
        return _draw_keep(batch, patches, self.prob, device)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"


def _draw_keep(batch: int, patches: int, prob: float, device: torch.device) -> Tensor:
    """timm's draw: max(1, int(patches * (1 - prob))) patches per image in random order, from
    torch.randn(batch, patches) argsorted."""
    keep = max(1, int(patches * (1.0 - prob)))
    return torch.argsort(torch.randn(batch, patches, device=device), dim=-1)[:, :keep]


def _patch_dropout(x: Tensor, prob: float, num_prefix_tokens: int) -> Tensor:
    keep = _draw_keep(x.shape[0], x.shape[1] - num_prefix_tokens, prob, x.device)
    return reference.keep_patch_tokens(x, keep, num_prefix_tokens)


class PatchEmbed(nn.Module):
    """Image (or a hybrid backbone's feature map) -> patch tokens, as a strided Conv2d `proj`.

    With `backbone`, images go through it first and `proj` runs on its feature map
    [batch, feature_dim, H', W'] (the paper's hybrid; patch size 1 by default). `forward` returns
    timm's format: [batch, patches, dim], or [batch, grid_h, grid_w, dim] under dynamic_img_size
    (timm's output_fmt="NHWC", which lets the model resample pos_embed to the grid).
    """

    def __init__(
        self,
        img_size: Tuple[int, int],
        patch_size: Tuple[int, int],
        in_chans: int,
        embed_dim: int,
        *,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        backbone: Optional[nn.Module] = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.backbone = backbone
        feature_chans, feature_size = in_chans, img_size
        if backbone is not None:
            feature_chans, feature_size = _probe_backbone(backbone, in_chans, img_size)
        self.feature_size = feature_size
        # timm sizes pos_embed by the whole patches of img_size, also under dynamic_img_pad (a padded
        # input then has a larger grid, which dynamic_img_size resamples to).
        self.grid_size = (feature_size[0] // patch_size[0], feature_size[1] // patch_size[1])
        if self.grid_size[0] == 0 or self.grid_size[1] == 0:
            raise ValueError(f"patch_size {patch_size} is larger than the {'feature map' if backbone else 'image'} {feature_size}")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(feature_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.output_fmt = "NHWC" if dynamic_img_size else "NLC"
        self.norm = nn.Identity()  # timm's PatchEmbed has one (norm_layer=None): same module tree

    def prepare(self, x: Tensor) -> Tensor:
        """Validate the image, run the hybrid backbone, pad to whole patches: -> [batch, chans, H, W]."""
        x = _checked_image(x, self.in_chans, self.img_size, self.dynamic_img_size)
        if self.backbone is not None:
            x = self.backbone(x)
            if isinstance(x, (list, tuple)):
                x = x[-1]  # timm's feature extractors return every stage; the last is the map
        return _padded_to_patches(x, self.patch_size, self.dynamic_img_pad)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens without class token or position embedding, in timm's format: [batch, patches, dim],
        or [batch, grid_h, grid_w, dim] under dynamic_img_size. A `proj` that is not a plain
        patch Conv2d (or has hooks) is called as a module, as timm does."""
        x = self.prepare(x)
        if fusion.is_plain_patch_conv(self.proj):
            tokens = ops.patch_embed(x, self.proj.weight, self.proj.bias, backend=_backend_of(self))
            if self.output_fmt == "NHWC":
                tokens = tokens.unflatten(1, (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]))
        else:
            y = self.proj(x)
            tokens = y.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else y.flatten(2).transpose(1, 2)
        return tokens if fusion.is_plain(self.norm, nn.Identity) else self.norm(tokens)


# Shape-dependent steps as functions of their own: torch.fx records each as one node (torch.fx.wrap
# below) instead of tracing Python branches on shapes it cannot know, and they run when the traced
# module runs, so a traced model validates its input as the model does.


def _checked_image(x: Tensor, in_chans: int, img_size: Tuple[int, int], dynamic_img_size: bool) -> Tensor:
    """x itself, once it is an image batch [batch, in_chans, H, W] of the model's size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch [batch, chans, height, width], got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"x must have in_chans={in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    height, width = x.shape[-2:]
    if not dynamic_img_size and (height, width) != tuple(img_size):
        raise ValueError(
            f"x's height and width must equal img_size={tuple(img_size)}, got {(height, width)} "
            "(build the model with dynamic_img_size=True to accept other sizes)"
        )
    return x


def _padded_to_patches(x: Tensor, patch_size: Tuple[int, int], dynamic_img_pad: bool) -> Tensor:
    """x [batch, chans, H, W] zero-padded at the bottom and right to whole patches (dynamic_img_pad)."""
    ph, pw = patch_size
    height, width = x.shape[-2:]
    if height % ph or width % pw:
        if not dynamic_img_pad:
            raise ValueError(
                f"x's height and width {(height, width)} must be multiples of patch_size={tuple(patch_size)} "
                "(build the model with dynamic_img_pad=True to pad)"
            )
        x = F.pad(x, (0, (pw - width % pw) % pw, 0, (ph - height % ph) % ph))
    return x


def _position_embedding(
    pos_embed: Tensor, image: Tensor, patch_size: Tuple[int, int], grid_size: Tuple[int, int],
    num_prefix_tokens: int, dynamic_img_size: bool,
) -> Tensor:
    """pos_embed [1, prefix + gh * gw, dim] for the patch grid of `image` [batch, chans, H, W]
    (resampled in 2-D when it differs from the built grid, under dynamic_img_size)."""
    grid = (image.shape[-2] // patch_size[0], image.shape[-1] // patch_size[1])
    return _pos_embed_for_grid(pos_embed, grid, grid_size, num_prefix_tokens, dynamic_img_size)


def _pos_embed_for_grid(pos_embed, grid, grid_size, num_prefix_tokens, dynamic_img_size) -> Tensor:
    if same_grid(grid, grid_size):
        return pos_embed
    if not dynamic_img_size:
        raise ValueError(f"the patch grid {tuple(grid)} differs from the model's {tuple(grid_size)}")
    return resample_pos_embed(pos_embed, tuple(grid), tuple(grid_size), num_prefix_tokens)


def _add_prefix_and_position(
    tokens: Tensor, prefix: Optional[Tensor], pos_embed: Tensor, grid_size: Tuple[int, int],
    num_prefix_tokens: int, dynamic_img_size: bool, no_embed_class: bool = False,
) -> Tensor:
    """timm's `_pos_embed` after a patch_embed module: tokens [batch, patches, dim] or
    [batch, gh, gw, dim] -> [prefix; tokens] + pos_embed, [batch, prefix + patches, dim]
    (with no_embed_class pos_embed is added to the patch tokens before the prefix is prepended).
    num_prefix_tokens: the prefix rows of pos_embed (0 with no_embed_class)."""
    grid = tuple(grid_size)
    if tokens.dim() == 4:
        grid = (tokens.shape[1], tokens.shape[2])
        tokens = tokens.flatten(1, 2)
    pos = _pos_embed_for_grid(pos_embed, grid, grid_size, num_prefix_tokens, dynamic_img_size)
    if no_embed_class:
        tokens = tokens + pos
    if prefix is not None:
        tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    return tokens if no_embed_class else tokens + pos


def _attention_with_dropout(qkv: Tensor, num_heads: int, p: float, scale: float) -> Tensor:
    """Attention with dropout on the probabilities, by torch's SDPA as in timm (training only):
    qkv [batch, tokens, 3 dim] -> [batch, tokens, dim]."""
    b, t, three_dim = qkv.shape
    q, k, v = qkv.reshape(b, t, 3, num_heads, three_dim // 3 // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
    return out.transpose(1, 2).reshape(b, t, -1)


def _packed_attention_with_dropout(qkv: Tensor, cu_seqlens: Any, num_heads: int, p: float, scale: float) -> Tensor:
    """`_attention_with_dropout` on packed sequences, one sequence at a time (training only):
    qkv [total_tokens, 3 dim] -> [total_tokens, dim]."""
    lengths = getattr(cu_seqlens, "lengths", None)
    if lengths is None:
        offsets = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(offsets[:-1], offsets[1:])]
    return torch.cat([_attention_with_dropout(part[None], num_heads, p, scale)[0]
                      for part in qkv.split(list(lengths))])


for _leaf in ("_drop_path", "_checked_image", "_padded_to_patches", "_position_embedding", "_add_prefix_and_position",
              "_attention_with_dropout", "_patch_dropout", "_draw_keep"):
    torch.fx.wrap(_leaf)


def _probe_backbone(backbone: nn.Module, in_chans: int, img_size: Tuple[int, int]) -> Tuple[int, Tuple[int, int]]:
    """(channels, (H', W')) of the backbone's feature map, from one dummy forward, as timm does."""
    was_training = backbone.training
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    try:
        backbone.eval()
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_chans, *img_size, device=device, dtype=dtype))
    finally:
        backbone.train(was_training)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if not isinstance(out, Tensor) or out.dim() != 4:
        raise ValueError(
            "hybrid_backbone must map [batch, chans, H, W] images to a feature map [batch, C', H', W'], "
            f"got {type(out).__name__} {tuple(out.shape) if isinstance(out, Tensor) else ''}"
        )
    return out.shape[1], (out.shape[2], out.shape[3])


# vitkern.inspect.capture's requests, per thread ({Attention: request}): a capture in one thread
# neither sees nor alters a forward of the same model in another thread.
_CAPTURES = threading.local()


def capture_requests() -> Dict[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """This thread's {Attention module: request} (filled and emptied by vitkern.inspect.capture):
    `Attention.core` calls request(attn, qkv) in place of its attention."""
    requests = getattr(_CAPTURES, "requests", None)
    if requests is None:
        requests = _CAPTURES.requests = {}
    return requests


class Attention(fusion.WatchesSwaps, nn.Module):
    """Multi-head self-attention with timm's parameters and sub-modules: `qkv` Linear(dim, 3 dim),
    `q_norm`, `k_norm` (LayerNorm(head_dim) with qk_norm, else Identity), `norm` (Identity),
    `proj` Linear(dim, dim), `proj_drop`.

    `forward(x)` takes the already normalized tokens [batch, tokens, dim], as timm's does; a plain
    `Block` calls `core` itself to fuse LN1 into the QKV projection and the residual into `proj`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 qk_norm: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads: dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qk_norm_args(self) -> Optional[Tuple[Any, Any]]:
        """(q_norm, k_norm) as `ops.attention` arguments ((weight, bias, eps) or None each) while both
        are plain (an Identity or a plain LayerNorm), else None: they must be called as modules."""
        args = []
        for norm in (self.q_norm, self.k_norm):
            if fusion.is_plain(norm, nn.Identity):
                args.append(None)
            elif fusion.is_plain_layer_norm(norm):
                args.append((norm.weight, norm.bias, norm.eps))
            else:
                return None
        return args[0], args[1]

    def _normalized_qk(self, qkv: Tensor) -> Tensor:
        """qkv [batch, tokens, 3 dim] with q_norm and k_norm applied as modules (timm normalizes
        q and k as [batch, heads, tokens, head_dim]), repacked for the op."""
        if fusion.is_plain(self.q_norm, nn.Identity) and fusion.is_plain(self.k_norm, nn.Identity):
            return qkv
        if qkv.dim() == 2:  # packed [total_tokens, 3 dim]: the norms act on head_dim, any layout
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(1)
            return torch.stack((self.q_norm(q), self.k_norm(k), v), dim=1).flatten(1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.stack((self.q_norm(q), self.k_norm(k), v)).permute(1, 3, 0, 2, 4).flatten(2)

    def core(self, qkv: Tensor, cu_seqlens: Any = None) -> Tensor:
        """Packed qkv [batch, tokens, 3 dim] (before q_norm / k_norm) -> [batch, tokens, dim],
        before the output projection. Plain QK-norm LayerNorms run inside the attention op.
        With cu_seqlens (a `vitkern.packing.SeqLens` or int32 offsets): packed sequences, qkv
        [total_tokens, 3 dim] -> [total_tokens, dim], block-diagonal (`ops.attention`)."""
        requests = getattr(_CAPTURES, "requests", None)
        request = requests.get(self) if requests else None
        norms = self.qk_norm_args()
        if request is not None and cu_seqlens is not None:
            raise NotImplementedError("vitkern.inspect's attention capture takes [batch, tokens, dim] batches, not packed ones")
        if request is not None or norms is None or (self.training and self.attn_drop > 0):
            qkv = self._normalized_qk(qkv)
            if request is not None:  # set by vitkern.inspect.capture: the same attention, statistics recorded
                return request(self, qkv)
            norms = (None, None)
        if self.training and self.attn_drop > 0:
            # Attention dropout is a training-only regularizer the fused kernels do not implement;
            # torch's SDPA applies it on the probabilities exactly as timm does.
            if cu_seqlens is not None:
                return _packed_attention_with_dropout(qkv, cu_seqlens, self.num_heads, self.attn_drop, self.scale)
            return _attention_with_dropout(qkv, self.num_heads, self.attn_drop, self.scale)
        q_norm, k_norm = norms
        return ops.attention(qkv, self.num_heads, scale=self.scale, q_norm=q_norm, k_norm=k_norm,
                             cu_seqlens=cu_seqlens, backend=_backend_of(self))

    def forward(self, x: Tensor, cu_seqlens: Any = None) -> Tensor:
        """timm's order: qkv -> q_norm, k_norm -> attention -> norm -> proj -> proj_drop; each
        sub-module that is not plain (or LoRA for the linears) is called as a module. With
        cu_seqlens, x is packed [total_tokens, dim] (see `core`)."""
        backend = _backend_of(self)
        qkv = fusion.call_linear(self.qkv, x, backend=backend)
        a = self.core(qkv, cu_seqlens)
        if not fusion.is_plain(self.norm, nn.Identity):
            a = self.norm(a)
        return self.proj_drop(fusion.call_linear(self.proj, a, backend=backend))


ACT_LAYERS = ("gelu", "gelu_tanh", "quick_gelu")


def make_act_layer(act_layer: Optional[str]) -> nn.Module:
    """timm's act_layer names -> the module: exact GELU (None, "gelu"), tanh GELU ("gelu_tanh",
    SigLIP) or QuickGELU ("quick_gelu", OpenAI CLIP)."""
    if act_layer in (None, "gelu"):
        return nn.GELU()
    if act_layer == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if act_layer == "quick_gelu":
        return fusion.QuickGELU()
    raise ValueError(f"act_layer must be None or one of {ACT_LAYERS}, got {act_layer!r}")


class Mlp(fusion.WatchesSwaps, nn.Module):
    """fc1 -> act (GELU, tanh GELU or QuickGELU) -> drop1 -> norm (Identity) -> fc2 -> drop2, with timm's names."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0,
                 act_layer: Optional[str] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = make_act_layer(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_features] -> [..., in_features]; the activation rides in fc1's epilogue while
        fc1 is a plain or LoRA linear and `act` a plain GELU / tanh GELU / QuickGELU, else each
        sub-module is called."""
        backend = _backend_of(self)
        fc1 = fusion.linear_call(self.fc1, fusion.linear_kind(self.fc1))
        activation = fusion.activation_of(self.act)
        if fc1 is not None and activation is not None:
            h = fusion.run_linear(fc1, x, activation=activation, backend=backend)
        else:
            h = self.act(self.fc1(x) if fc1 is None else fusion.run_linear(fc1, x, backend=backend))
        h = self.drop1(h)
        if not fusion.is_plain(self.norm, nn.Identity):
            h = self.norm(h)
        return self.drop2(fusion.call_linear(self.fc2, h, backend=backend))


class AttentionPoolLatent(fusion.WatchesSwaps, nn.Module):
    """timm's attention-pool head (global_pool="map", SigLIP): one learned latent query attends over
    the patch tokens, then proj and a residual MLP; timm's names `latent`, `q`, `kv`, `q_norm`,
    `k_norm`, `proj`, `proj_drop`, `norm`, `mlp`.

    forward: tokens [batch, tokens, dim] -> pooled [batch, dim]. The linears, the norm and the MLP
    run through vitkern's ops; the attention itself (one query row per image: nothing for a tiled
    kernel to tile) is `vitkern.reference.latent_attention`, eager, fp32 softmax.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, norm_eps: float = 1e-6,
                 act_layer: Optional[str] = None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads: dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.pool = "token"
        self.latent_len = 1
        self.latent_dim = dim
        self.latent = nn.Parameter(torch.zeros(1, self.latent_len, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden_dim, act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        backend = _backend_of(self)
        # The latent query is the same for every image: project it once, then broadcast.
        q = fusion.call_linear(self.q, self.latent, backend=backend).expand(x.shape[0], -1, -1)
        kv = fusion.call_linear(self.kv, x, backend=backend)  # [batch, tokens, 2 dim]
        if not (fusion.is_plain(self.q_norm, nn.Identity) and fusion.is_plain(self.k_norm, nn.Identity)):
            q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)
            k, v = kv.unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(2)
            kv = torch.stack((self.k_norm(k), v), dim=2).flatten(2)
        a = reference.latent_attention(q, kv, self.num_heads, scale=self.scale)
        y = self.proj_drop(fusion.call_linear(self.proj, a, backend=backend))
        y = y + self.mlp(fusion.call_norm(self.norm, y, backend=backend))
        return y[:, 0] if self.pool == "token" else y.mean(1)


class _BlockPlan(NamedTuple):
    """What a Block may fuse (see vitkern.fusion): valid while `key` equals fusion.plan_key() and the
    fused leaf modules still have the classes in `types`."""

    key: Tuple[object, int, int]
    leaves: Tuple[nn.Module, ...]
    types: Tuple[type, ...]
    attn: bool  # LN1 + QKV, attention, proj + residual as fused ops
    qkv: Optional[str]  # fusion.PLAIN or fusion.LORA
    proj: Optional[str]
    mlp: bool  # LN2 + fc1 + activation, fc2 + residual as fused ops
    fc1: Optional[str]
    fc2: Optional[str]
    act: Optional[str]  # the activation when the plan was made; calls read the module's current one


class Block(fusion.WatchesSwaps, nn.Module):
    """Pre-norm transformer block (paper eqs. 2-3) with timm's sub-modules: five fused ops while they
    are the plain modules vitkern built, timm's module calls otherwise.

    forward: x [batch, tokens, dim] -> [batch, tokens, dim] in x's dtype. Each half (attention,
    MLP) runs fused while its sub-modules (norm, linears, `ls*` (Identity or LayerScale, whose gamma
    rides in the residual epilogue), `q_norm`, `k_norm` (Identity or LayerNorm, applied inside the
    attention op), `norm`, the activation, the dropouts, `drop_path*`) are of vitkern's exact types with no hooks, and
    no global module hook is set; a PEFT LoRA linear without dropout stays fused (the low-rank term
    rides in the epilogue). Otherwise that half calls the sub-modules as timm's Block does:
    `x + drop_path(ls(attn(norm1(x))))`, still through vitkern's ops for every plain piece.

    The decision is cached in `_plan` (see vitkern.fusion for what invalidates it and why): on an
    unmodified model a call costs one key comparison and eleven class checks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        *,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        qk_norm: bool = False,
        init_values: Optional[float] = None,
        act_layer: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, qk_norm=qk_norm, norm_eps=norm_eps)
        # timm's LayerScale slots: Identity unless init_values is given.
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden_dim, proj_drop, act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)
        self._plan: Optional[_BlockPlan] = None

    def __getstate__(self) -> Dict[str, Any]:
        # A plan is valid in the process that made it (see vitkern.fusion): never pickled.
        state = super().__getstate__()
        state["_plan"] = None
        return state

    def _residual_branch_is_identity(self, dropout: nn.Dropout, drop_path: DropPath) -> bool:
        return not self.training or (dropout.p == 0.0 and drop_path.drop_prob == 0.0)

    def _make_plan(self) -> _BlockPlan:
        key = fusion.plan_key()
        attn, mlp = self.attn, self.mlp
        plain = fusion.is_plain
        no_global_hooks = not fusion.global_hooks_registered()
        attn_ok = (
            no_global_hooks and fusion.is_plain_layer_norm(self.norm1) and plain(attn, Attention)
            and attn.qk_norm_args() is not None and plain(attn.norm, nn.Identity)
            and fusion.is_plain_dropout(attn.proj_drop) and _is_plain_scale(self.ls1) and plain(self.drop_path1, DropPath)
        )
        qkv = fusion.linear_kind(attn.qkv) if attn_ok else None
        proj = fusion.linear_kind(attn.proj) if attn_ok else None
        attn_ok = attn_ok and qkv is not None and proj is not None
        act = fusion.activation_of(mlp.act) if plain(mlp, Mlp) else None
        mlp_ok = (
            no_global_hooks and fusion.is_plain_layer_norm(self.norm2) and plain(mlp, Mlp)
            and act is not None and fusion.is_plain_dropout(mlp.drop1) and plain(mlp.norm, nn.Identity)
            and fusion.is_plain_dropout(mlp.drop2) and _is_plain_scale(self.ls2) and plain(self.drop_path2, DropPath)
        )
        fc1 = fusion.linear_kind(mlp.fc1) if mlp_ok else None
        fc2 = fusion.linear_kind(mlp.fc2) if mlp_ok else None
        mlp_ok = mlp_ok and fc1 is not None and fc2 is not None
        # The per-call class check covers the fused leaves, LayerScale and QK-norm included (a
        # parametrization changes a module's class without a swap).
        leaves = ((self.norm1, attn.qkv, attn.proj, attn.q_norm, attn.k_norm, self.ls1) if attn_ok else ()) + (
            (self.norm2, mlp.fc1, mlp.fc2, mlp.act, self.ls2) if mlp_ok else ())
        return _BlockPlan(key, leaves, tuple(map(type, leaves)), attn_ok, qkv, proj, mlp_ok, fc1, fc2, act)

    def _current_plan(self) -> _BlockPlan:
        if torch.compiler.is_compiling():
            # Decided at trace time; dynamo guards on the hooks and modules it read.
            return self._make_plan()
        plan = self._plan
        if plan is None or plan.key != fusion.plan_key() or tuple(map(type, plan.leaves)) != plan.types:
            plan = self._make_plan()
            # Only a fully fused plan is kept: a block that calls modules re-decides on every call
            # (it is the slow path anyway), so removing a hook restores the fused path.
            self._plan = plan if plan.attn and plan.mlp else None
        return plan

    def forward(self, x: Tensor, cu_seqlens: Any = None) -> Tensor:
        """x [batch, tokens, dim], or packed sequences [total_tokens, dim] with cu_seqlens (a
        `vitkern.packing.SeqLens` or int32 offsets, see `ops.attention`): every op but attention
        acts per token, so only attention sees the sequences."""
        plan = self._current_plan()
        backend = _backend_of(self)
        x = self._attention_half(x, plan, backend, cu_seqlens)
        return self._mlp_half(x, plan, backend)

    def _attention_half(self, x: Tensor, plan: _BlockPlan, backend: str, cu_seqlens: Any = None) -> Tensor:
        attn = self.attn
        if plan.attn:
            qkv_call = fusion.linear_call(attn.qkv, plan.qkv)
            proj_call = fusion.linear_call(attn.proj, plan.proj)
            if qkv_call is not None and proj_call is not None:
                a = attn.core(fusion.run_ln_linear(self.norm1, qkv_call, x, backend=backend), cu_seqlens)
                if self._residual_branch_is_identity(attn.proj_drop, self.drop_path1):
                    return fusion.run_linear(proj_call, a, residual=x, scale=_gamma(self.ls1), backend=backend)
                return x + self.drop_path1(self.ls1(attn.proj_drop(fusion.run_linear(proj_call, a, backend=backend))))
        h = fusion.call_norm(self.norm1, x, backend=backend)
        return x + self.drop_path1(self.ls1(attn(h) if cu_seqlens is None else attn(h, cu_seqlens=cu_seqlens)))

    def _mlp_half(self, x: Tensor, plan: _BlockPlan, backend: str) -> Tensor:
        mlp = self.mlp
        if plan.mlp:
            fc1_call = fusion.linear_call(mlp.fc1, plan.fc1)
            fc2_call = fusion.linear_call(mlp.fc2, plan.fc2)
            act = fusion.epilogue_activation(mlp.act)  # per call: GELU's `approximate` may have changed
            if fc1_call is not None and fc2_call is not None and act is not None:
                h = mlp.drop1(fusion.run_ln_linear(self.norm2, fc1_call, x, activation=act, backend=backend))
                if self._residual_branch_is_identity(mlp.drop2, self.drop_path2):
                    return fusion.run_linear(fc2_call, h, residual=x, scale=_gamma(self.ls2), backend=backend)
                return x + self.drop_path2(self.ls2(mlp.drop2(fusion.run_linear(fc2_call, h, backend=backend))))
        return x + self.drop_path2(self.ls2(mlp(fusion.call_norm(self.norm2, x, backend=backend))))


def _is_plain_scale(module: nn.Module) -> bool:
    """A LayerScale slot the fused epilogue can take: vitkern's Identity or LayerScale, no hooks."""
    return fusion.is_plain(module, nn.Identity) or fusion.is_plain(module, LayerScale)


def _gamma(module: nn.Module) -> Optional[Tensor]:
    """LayerScale's gamma [dim] for the residual epilogue, None for the Identity slot."""
    return module.gamma if type(module) is LayerScale else None


def _backend_of(module: nn.Module) -> str:
    return getattr(module, "backend", "auto")


def _built_on_device(init: Callable[..., None]) -> Callable[..., None]:
    """Give `ViT.__init__` timm's `device=` and `dtype=` keywords: the modules are created under
    `torch.device(device)` (so `device="meta"` allocates nothing and a GPU model never exists on the
    CPU), then floating-point parameters and buffers are cast to `dtype`."""

    @functools.wraps(init)
    def init_on_device(self: nn.Module, *args: Any, device: Optional[Union[str, torch.device]] = None,
                       dtype: Optional[torch.dtype] = None, **kwargs: Any) -> None:
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        where = torch.device(device) if device is not None else contextlib.nullcontext()
        with where:
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype=dtype)

    # help() and inspect show the real signature: the model's arguments, then device and dtype.
    sig = inspect_signature(init)
    extra = [Parameter(name, Parameter.KEYWORD_ONLY, default=None) for name in ("device", "dtype")]
    init_on_device.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    return init_on_device


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2020), a drop-in for timm's `VisionTransformer`.

    Arguments have timm's names and meaning (see `ViTConfig`); in addition `representation_size`
    adds the paper's pre-training head (`pre_logits`: Linear + tanh), `hybrid_backbone` runs a CNN
    first and embeds its feature map (patch size 1 unless given), and `backend` picks the kernels
    ("auto", "eager", "triton", "cuda", "torch"; changeable later through `model.backend`).

    forward: images [batch, in_chans, H, W] -> logits [batch, num_classes] (pooled features when
    num_classes == 0; every token's features when global_pool == '').

    The ViT family (timm's arguments, names and state-dict keys): `init_values` (LayerScale
    `blocks.N.ls1.gamma`, `ls2.gamma`, in the residual epilogue), `qk_norm` (`attn.q_norm`,
    `attn.k_norm`, inside the attention op), `act_layer` ("gelu", "gelu_tanh", "quick_gelu", in
    fc1's epilogue), `reg_tokens` (`reg_token`), `no_embed_class`, `pre_norm` (`norm_pre`),
    global_pool="map" (`attn_pool.*`), `class_token=False`, `patch_drop_rate` (PatchDropout, training
    only) and `distilled` (DeiT's `dist_token` and `head_dist`: timm's VisionTransformerDistilled).

    timm's backbone API: `forward_intermediates`, `get_intermediate_layers`,
    `prune_intermediate_layers`, `feature_info`, `set_input_size`, `group_matcher`,
    `pretrained_cfg` (alias `default_cfg`; set by `vitkern.create_model` and `from_timm`, empty for
    a model built directly, as in timm) and the attributes `in_chans`, `num_features` (embed_dim),
    `head_hidden_size` (the head's input width), `num_prefix_tokens`. `device=` and `dtype=` build
    the model straight on a device (e.g. "meta") and cast it to a floating dtype.
    """

    @_built_on_device
    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Optional[Union[int, Tuple[int, int]]] = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        fc_norm: Optional[bool] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        representation_size: Optional[int] = None,
        hybrid_backbone: Optional[nn.Module] = None,
        backend: str = "auto",
        qk_norm: bool = False,
        init_values: Optional[float] = None,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        act_layer: Optional[str] = None,
        patch_drop_rate: float = 0.0,
        distilled: bool = False,
    ) -> None:
        super().__init__()
        if hybrid_backbone is not None and not isinstance(hybrid_backbone, nn.Module):
            raise TypeError(f"hybrid_backbone must be an nn.Module, got {type(hybrid_backbone).__name__}")
        if patch_size is None:
            patch_size = 1 if hybrid_backbone is not None else 16
        cfg = ViTConfig(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token, fc_norm=fc_norm,
            drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_eps=norm_eps,
            dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad,
            representation_size=representation_size, backend=backend, qk_norm=qk_norm, init_values=init_values,
            no_embed_class=no_embed_class, reg_tokens=reg_tokens, pre_norm=pre_norm, act_layer=act_layer,
            patch_drop_rate=patch_drop_rate, distilled=distilled,
        )
        self.config = cfg
        self.num_classes = num_classes
        self.global_pool = global_pool
        # timm's names: num_features is what forward_features gives per token, head_hidden_size
        # what the classifier reads (representation_size when the pre-logits head is there).
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.in_chans = in_chans
        self.pretrained_cfg: Dict[str, Any] = {}
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.distilled_training = False  # timm's VisionTransformerDistilled: set_distilled_training()
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self._backend = backend

        self.patch_embed = PatchEmbed(
            to_2tuple(img_size, "img_size"), to_2tuple(patch_size, "patch_size"), in_chans, embed_dim,
            dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad, backbone=hybrid_backbone,
            bias=not pre_norm,  # timm: a pre-norm (CLIP) patch embedding has no bias
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + cfg.pos_embed_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = (PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens)
                           if patch_drop_rate > 0 else nn.Identity())
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        drop_path_rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, cfg.mlp_hidden_dim, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=drop_path_rates[i], norm_eps=norm_eps, qk_norm=qk_norm,
                  init_values=init_values, act_layer=act_layer)
            for i in range(depth)
        ])
        use_fc_norm = cfg.use_fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not use_fc_norm else nn.Identity()
        self.attn_pool = (AttentionPoolLatent(embed_dim, num_heads, cfg.mlp_hidden_dim, norm_eps, act_layer)
                          if global_pool == "map" else None)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        if representation_size:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim, representation_size), act=nn.Tanh()))
            self.head_hidden_size = representation_size
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.backend = backend
        self.init_weights()

    # ----------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        """Set the backend of the model and every submodule that runs ops."""
        ViTConfig(backend=value)  # validates the name
        if value != "auto":
            reasons = dispatch.backend_unavailable_reasons(value)
            if reasons:  # fail when asked, not at the first forward
                raise BackendUnavailableError(f"backend={value!r} cannot run here:\n  - " + "\n  - ".join(reasons))
        self._backend = value
        self.config.backend = value
        for module in self.modules():
            if isinstance(module, (PatchEmbed, Attention, Mlp, Block, AttentionPoolLatent)):
                module.backend = value

    def init_weights(self) -> None:
        """timm's default init: trunc_normal(0.02) Linear weights, zero biases, pos_embed
        trunc_normal(0.02), cls_token normal(1e-6); the Conv2d keeps PyTorch's default; a hybrid
        backbone is left as given."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.attn_pool.latent_dim ** -0.5)
        backbone = self.patch_embed.backbone
        skip = set(backbone.modules()) if backbone is not None else set()
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in skip:
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # timm's set; it names dist_token (no decay on DeiT's distillation token) but not reg_token.
        return {"pos_embed", "cls_token"} | ({"dist_token"} if self.dist_token is not None else set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        """The head; (head, head_dist) for a distilled model, as timm's."""
        return (self.head, self.head_dist) if self.dist_token is not None else self.head

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """Distilled models: in training, return (class logits, distillation logits) instead of
        their mean (timm's VisionTransformerDistilled)."""
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh Linear(head_hidden_size, num_classes) (Identity for 0) on
        the model's device and dtype and in its train/eval mode; `global_pool` ("token", "avg",
        "") changes the pooling but not where the final norm sits (timm's rule)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool == "map" and self.attn_pool is None:
                # timm's rule too: the attention-pool head's weights would have to come from nowhere.
                raise ValueError("reset_classifier cannot add an attention-pool head (global_pool='map'); "
                                 "build the model with global_pool='map'")
            # fc_norm made explicit: the norm modules stay where they are when the pooling changes.
            self.config = self.config.replace(global_pool=global_pool, fc_norm=not fusion.is_plain(self.fc_norm, nn.Identity))
            self.global_pool = global_pool
            if global_pool != "map":
                self.attn_pool = None  # timm drops the attention-pool head when the pooling changes
        self.num_classes = num_classes
        self.config.num_classes = num_classes
        device = self.pos_embed.device
        dtype = self.pos_embed.dtype
        head = nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.head = head.train(self.training)
        if self.dist_token is not None:
            head_dist = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
            if num_classes > 0:
                nn.init.trunc_normal_(head_dist.weight, std=0.02)
                nn.init.zeros_(head_dist.bias)
            self.head_dist = head_dist.train(self.training)

    # ----------------------------------------------------------------------------------------
    def _pos_embed_for(self, grid: Tuple[int, int]) -> Tensor:
        """pos_embed for a patch grid; resampled in 2-D when it differs from the built one."""
        return _pos_embed_for_grid(self.pos_embed, grid, self.patch_embed.grid_size, self._pos_prefix,
                                   self.dynamic_img_size)

    @property
    def _pos_prefix(self) -> int:
        """The prefix tokens pos_embed has rows for (none with no_embed_class)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def _prefix_tokens(self) -> Optional[Tensor]:
        """[1, prefix, dim]: class, distillation and register tokens in timm's order, or None."""
        parts = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _embed(self, x: Tensor) -> Tensor:
        """Images [batch, in_chans, H, W] -> [prefix; patch tokens] + pos_embed, [batch, tokens, dim]:
        one fused op while patch_embed is vitkern's plain PatchEmbed, else timm's order (the
        patch_embed module, then the prefix tokens and position embedding); then timm's pos_drop,
        patch_drop (training) and norm_pre. A plain PatchDropout in training hands its kept
        patches to the fused op, which embeds only those (same draw, same tokens as timm's)."""
        pe = self.patch_embed
        prefix = self._prefix_tokens()
        keep = None
        if (type(pe) is PatchEmbed and not fusion.has_hooks(pe) and fusion.is_plain_patch_conv(pe.proj)
                and fusion.is_plain(pe.norm, nn.Identity)):
            x = pe.prepare(x)
            pos = _position_embedding(self.pos_embed, x, pe.patch_size, pe.grid_size, self._pos_prefix,
                                      self.dynamic_img_size)
            if self._patch_drop_fuses():
                patches = (x.shape[-2] // pe.patch_size[0]) * (x.shape[-1] // pe.patch_size[1])
                keep = self.patch_drop.draw_keep(x.shape[0], patches, x.device)
            z = ops.patch_embed(x, pe.proj.weight, pe.proj.bias, prefix, pos, no_embed_class=self.no_embed_class,
                                keep=keep, backend=self.backend)
        else:
            z = _add_prefix_and_position(pe(x), prefix, self.pos_embed, pe.grid_size, self._pos_prefix,
                                         self.dynamic_img_size, self.no_embed_class)
        z = self.pos_drop(z) if keep is not None else self.patch_drop(self.pos_drop(z))
        if not fusion.is_plain(self.norm_pre, nn.Identity):
            z = fusion.call_norm(self.norm_pre, z, backend=self.backend)
        return z

    def _patch_drop_fuses(self) -> bool:
        """patch_drop is a plain PatchDropout that drops now (training) and pos_drop, which timm runs
        before it, draws nothing (so the draw, moved before the embedding, takes the same numbers)."""
        drop, pos_drop = self.patch_drop, self.pos_drop
        return (type(drop) is PatchDropout and not fusion.has_hooks(drop) and drop.training and drop.prob > 0
                and type(pos_drop) is nn.Dropout and not fusion.has_hooks(pos_drop)
                and (pos_drop.p == 0 or not pos_drop.training))

    def _blocks(self, z: Tensor) -> Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                z = checkpoint(blk, z, use_reentrant=False)
            else:
                z = blk(z)
        return z

    def _norm(self, z: Tensor) -> Tensor:
        if fusion.is_plain(self.norm, nn.Identity):
            return z
        return fusion.call_norm(self.norm, z, backend=self.backend)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [batch, in_chans, H, W] -> normalized tokens [batch, tokens, embed_dim]."""
        return self._norm(self._blocks(self._embed(x)))

    def _pool(self, z: Tensor) -> Tensor:
        if self.attn_pool is not None:
            return self.attn_pool(z[:, self.num_prefix_tokens:])
        if self.global_pool == "avg":
            return z[:, self.num_prefix_tokens:].mean(dim=1)
        if self.global_pool == "token":
            return z[:, 0]
        return z

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens [batch, tokens, embed_dim] -> logits [batch, num_classes] (pooled features with pre_logits).
        A distilled model returns the mean of the class and distillation heads, or both in
        distilled training (timm's VisionTransformerDistilled)."""
        if self.dist_token is not None:
            return self._distilled_head(x, pre_logits)
        y = self._pool(x)
        if not fusion.is_plain(self.fc_norm, nn.Identity):
            y = fusion.call_norm(self.fc_norm, y, backend=self.backend)
        y = self.pre_logits(y)
        y = self.head_drop(y)
        return y if pre_logits else self.head(y)

    def _distilled_head(self, x: Tensor, pre_logits: bool) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        y, y_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (y + y_dist) / 2
        y, y_dist = self.head(y), self.head_dist(y_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return y, y_dist
        return (y + y_dist) / 2

    def forward(self, x: Tensor) -> Tensor:
        z = self._blocks(self._embed(x))
        if self.global_pool == "token" and (fusion.is_plain_layer_norm(self.norm) or fusion.is_plain(self.norm, nn.Identity)):
            # LayerNorm acts per token: normalizing only the tokens the head reads (class, and
            # distillation for a distilled model) gives the same logits (a swapped or hooked norm
            # sees every token, as in timm).
            z = z[:, :2] if self.dist_token is not None else z[:, :1]
        return self.forward_head(self._norm(z))

    def forward_attention(self, x: Tensor, **options):
        """(self(x), per-layer attention statistics) from the fused kernels; options and results
        as `vitkern.inspect.forward_attention` (full=, distance=, layers=)."""
        from vitkern import inspect

        return inspect.forward_attention(self, x, **options)

    # ----------------------------------------------------------------------------------------
    # timm's backbone API (same signatures and results as timm's VisionTransformer)

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: Dict[str, Any]) -> None:
        self.pretrained_cfg = value

    @property
    def feature_info(self) -> List[Dict[str, Any]]:
        """One dict per block: `module` ("blocks.i"), `num_chs` (embed_dim) and `reduction` (input
        pixels per token along a side: the patch size, times the hybrid backbone's stride)."""
        pe = self.patch_embed
        stride = max(pe.img_size[0] // pe.feature_size[0], pe.img_size[1] // pe.feature_size[1])
        reduction = stride * max(pe.patch_size)
        return [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=reduction) for i in range(len(self.blocks))]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm.optim's `layer_decay`): the
        embedding is layer 0, block i is layer i + 1, the final norm and the head come last.
        `coarse` is accepted for timm's signature; a ViT has one grouping."""
        return dict(
            stem=r"^(?:cls_token|reg_token|dist_token|pos_embed|patch_embed\.)",
            blocks=[(r"^blocks\.(\d+)\.", None), (r"^norm\.", (99999,))],
        )

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Change the input resolution and/or patch size in place, as timm's does: pos_embed is
        resampled to the new patch grid (bicubic, antialiased) and a new patch size resamples the
        patch kernel [embed_dim, chans, ph, pw] by FlexiViT's pseudo-inverse resize."""
        pe = self.patch_embed
        new_img = pe.img_size if img_size is None else to_2tuple(img_size, "img_size")
        new_patch = pe.patch_size if patch_size is None else to_2tuple(patch_size, "patch_size")
        feature_chans, feature_size = pe.proj.in_channels, new_img
        if pe.backbone is not None:
            feature_chans, feature_size = _probe_backbone(pe.backbone, pe.in_chans, new_img)
        new_grid = (feature_size[0] // new_patch[0], feature_size[1] // new_patch[1])
        if new_grid[0] == 0 or new_grid[1] == 0:
            raise ValueError(f"patch_size {new_patch} is larger than the {'feature map' if pe.backbone else 'image'} {feature_size}")
        old_grid = tuple(pe.grid_size)
        with torch.no_grad():
            if new_patch != tuple(pe.patch_size):
                old = pe.proj
                proj = nn.Conv2d(feature_chans, old.out_channels, kernel_size=new_patch, stride=new_patch,
                                 bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
                proj.weight.copy_(resample_patch_kernel(old.weight, new_patch))
                proj.weight.requires_grad_(old.weight.requires_grad)
                if old.bias is not None:
                    proj.bias.copy_(old.bias)
                    proj.bias.requires_grad_(old.bias.requires_grad)
                pe.proj = proj
            if new_grid != old_grid:
                pos = resample_pos_embed(self.pos_embed.detach(), new_grid, old_grid, self._pos_prefix)
                self.pos_embed = nn.Parameter(pos.clone(), requires_grad=self.pos_embed.requires_grad)
        pe.img_size, pe.patch_size, pe.feature_size = new_img, new_patch, feature_size
        pe.grid_size, pe.num_patches = new_grid, new_grid[0] * new_grid[1]
        self.config = self.config.replace(img_size=new_img, patch_size=new_patch)

    def _feature_grid(self, height: int, width: int, patch_tokens: int) -> Tuple[int, int]:
        """(rows, cols) of the patch tokens of an input of height x width."""
        pe = self.patch_embed
        if (height, width) == tuple(pe.img_size):
            return tuple(pe.grid_size)
        if pe.backbone is None:
            return self.config.grid_size((height, width))
        # A hybrid at another size: the backbone's stride, read off the built size.
        sh, sw = pe.img_size[0] // pe.feature_size[0], pe.img_size[1] // pe.feature_size[1]
        grid = (height // sh // pe.patch_size[0], width // sw // pe.patch_size[1])
        if grid[0] * grid[1] != patch_tokens:
            raise ValueError(f"cannot tell the patch grid of the hybrid backbone's feature map for a {height}x{width} "
                             "input; use output_fmt='NLC'")
        return grid

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Any], Tuple[Tensor, List[Any]]]:
        """Images [batch, in_chans, H, W] -> (forward_features' tokens [batch, tokens, dim], the
        outputs of the selected blocks), as timm's.

        indices: None for every block, n for the last n, or a list of block indices (negative from
        the end); the outputs come in block order. Each intermediate drops the prefix (class) token:
        [batch, dim, grid_h, grid_w] for output_fmt="NCHW", [batch, patches, dim] for "NLC"; with
        return_prefix_tokens each is a pair (that, prefix tokens [batch, prefix, dim]). norm: apply
        the final norm to each. stop_early: run no block past the last selected one (the first
        result is then the norm of that block's output). intermediates_only: return the list only.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, last = take_indices(len(self.blocks), indices)
        height, width = (x.shape[-2], x.shape[-1]) if isinstance(x, Tensor) else (0, 0)
        z = self._embed(x)
        blocks = self.blocks[:last + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                z = checkpoint(blk, z, use_reentrant=False)
            else:
                z = blk(z)
            if i in taken:
                intermediates.append(self._norm(z) if norm else z)
        prefix = self.num_prefix_tokens
        prefixes = [y[:, :prefix] for y in intermediates]
        maps = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW" and maps:
            gh, gw = self._feature_grid(height, width, maps[0].shape[1])
            maps = [y.reshape(y.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in maps]
        out: List[Any] = list(zip(maps, prefixes)) if return_prefix_tokens and prefix else maps
        if intermediates_only:
            return out
        return self._norm(z), out

    def prune_intermediate_layers(self, indices: Indices = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks past the last of `indices` (and the final norm with prune_norm, the
        head, fc_norm and pre-logits with prune_head) from this model in place, as timm's; returns
        the selected block indices, counted from 0."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        self.config.depth = len(self.blocks)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.attn_pool = None
            self.fc_norm = nn.Identity()
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.embed_dim
            self.config = self.config.replace(fc_norm=False, representation_size=None)
            self.reset_classifier(0, "")
        return taken

    def get_intermediate_layers(self, x: Tensor, n: Indices = 1, reshape: bool = False,
                                return_prefix_tokens: bool = False, norm: bool = False) -> List[Any]:
        """The outputs of the last n blocks (or of the blocks listed in n) without the prefix token:
        [batch, patches, dim] each, or [batch, dim, grid_h, grid_w] with reshape (DINO's API, as
        timm's; `forward_intermediates(..., intermediates_only=True)`)."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
