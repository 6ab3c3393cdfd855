"""Patch embedding op: image [batch, chans, H, W] -> tokens [batch, tokens, dim] (eq. 1 of the paper).

validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.patch_embed`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.kernels import aten
from vitkern.ops import _autocast
from vitkern.ops._checks import check_keep, check_same_device, check_same_dtype, check_shape, check_tensor


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    cls_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    *,
    no_embed_class: bool = False,
    keep: Optional[Tensor] = None,
    grids=None,
    pos_embed_ar_preserving: bool = False,
    backend: str = "auto",
) -> Tensor:
    """[prefix; patches(x) @ W^T + b] + pos_embed, the patch grid flattened row-major.

    x: [batch, chans, H, W] with H, W multiples of the patch size; weight: [dim, chans, ph, pw]
    (a Conv2d weight, stride = kernel); bias: [dim] or None; cls_token: the prefix tokens
    [1, prefix, dim] or None (class, distillation, register tokens, prepended in that order);
    pos_embed: [1, tokens, dim] or None, tokens = prefix + (H / ph) * (W / pw), or, with
    `no_embed_class` (timm's), [1, (H / ph) * (W / pw), dim] added to the patch tokens only.
    keep: PatchDropout's kept patches, [batch, kept] int64 indices into each image's patches
    (row-major grid order), or None: then only those patch tokens are made, in that order, each
    with its own position embedding, as `tokens[:, prefix:].gather(1, keep)` of the full result.
    Returns [batch, prefix + patches, dim] in x's dtype ([batch, prefix + kept, dim] with keep);
    under torch.autocast see `_patch_embed_autocast`.

    Packed (NaViT/NaFlex) batches, with `grids`: see `_patch_embed_packed`.
    """
    if grids is not None:
        return _patch_embed_packed(x, weight, bias, grids, cls_token, pos_embed, pos_embed_ar_preserving, backend)
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    dim, chans, ph, pw = weight.shape
    batch, x_chans, height, width = x.shape
    if x_chans != chans:
        raise ValueError(f"x must have {chans} channels (weight is [dim, chans, ph, pw] = {tuple(weight.shape)}), got {x_chans}")
    if height % ph or width % pw:
        raise ValueError(
            f"x's height and width must be multiples of the patch size {(ph, pw)}, got {(height, width)} "
            "(pad the image, e.g. ViT(dynamic_img_pad=True))"
        )
    if not isinstance(no_embed_class, bool):
        raise TypeError(f"no_embed_class must be a bool, got {type(no_embed_class).__name__}")
    if cls_token is not None:
        check_tensor("cls_token", cls_token)
        prefix = cls_token.shape[1] if cls_token.dim() == 3 else 1
        if cls_token.dim() != 3 or cls_token.shape[0] != 1 or cls_token.shape[2] != dim:
            raise ValueError(f"cls_token must have shape (1, {prefix}, {dim}), got {tuple(cls_token.shape)} "
                             "(the prefix tokens: [1, prefix, dim])")
    prefix = cls_token.shape[1] if cls_token is not None else 0
    patches = (height // ph) * (width // pw)
    tokens = patches if no_embed_class else prefix + patches
    check_shape("bias", bias, (dim,))
    what = (f"{patches} patch tokens (no_embed_class)" if no_embed_class else f"{prefix} prefix + {patches} patch tokens")
    check_shape("pos_embed", pos_embed, (1, tokens, dim), f"{what} for a {height}x{width} image and patch {(ph, pw)}")
    call = dict(x=x, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed)
    if no_embed_class:
        # Family options ride in the call only when set (see vitkern.ops.linear).
        call["no_embed_class"] = True
    check_same_device(call)
    if keep is not None:  # integer indices: checked on their own
        keep = check_keep(keep, batch, patches, x.device)
    amp = _autocast.amp_dtype(x)
    if amp is not None:
        return _patch_embed_autocast(amp, x, weight, bias, cls_token, pos_embed, no_embed_class, keep, backend)
    check_same_dtype(call)
    if keep is not None:
        call["keep"] = keep
    impl = dispatch.select("patch_embed", backend, x.device, call)
    return impl.fn(**call)


def _patch_embed_packed(patches, weight, bias, grids, cls_token, pos_embed, ar_preserving, backend) -> Tensor:
    """patch_embed on pre-extracted patches (`vitkern.pack`): patches [total_patches, features];
    grids: each image's (grid_h, grid_w), a list or an int tensor [num_images, 2], its patches
    row-major and the images back to back; weight: [dim, features] (a linear projection in the
    patches' layout, timm NaFlex's proj) or a Conv2d weight [dim, chans, ph, pw] (read in
    `vitkern.pack`'s channels-last (py, px, c) order); cls_token [1, prefix, dim] or None: each
    image's prefix tokens (no position embedding on them, as timm's NaFlexEmbeds); pos_embed: None,
    a learned table [1, h, w, dim] or a factorized pair (pos_embed_y [1, h, dim], pos_embed_x
    [1, w, dim]), resampled to each image's grid (`vitkern.pos_embed.naflex_pos_embed`).
    Returns tokens [total_tokens, dim], total_tokens = sum(prefix + grid_h * grid_w): cu_seqlens
    of the tokens is `Packed.token_cu_seqlens(prefix)`. The projection runs as `vitkern.ops.linear`
    on `backend`; the per-image epilogue in torch.
    """
    import torch

    check_tensor("x", patches, ndim=2)
    check_tensor("weight", weight)
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    if weight.dim() != 2 or weight.shape[1] != patches.shape[1]:
        raise ValueError(f"weight must be [dim, {patches.shape[1]}] (x's patch features) or a Conv2d weight "
                         f"[dim, chans, ph, pw] with chans * ph * pw = {patches.shape[1]}, got {tuple(weight.shape)}")
    dim = weight.shape[0]
    if isinstance(grids, torch.Tensor):
        if grids.dim() != 2 or grids.shape[1] != 2 or grids.dtype.is_floating_point:
            raise ValueError(f"grids must be an int tensor [num_images, 2] of (grid_h, grid_w), got "
                             f"{grids.dtype} {tuple(grids.shape)}")
        grids = grids.tolist()
    if not isinstance(grids, (list, tuple)) or not grids or not all(
            isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(v, int) and v > 0 for v in g) for g in grids):
        raise ValueError(f"grids must be a non-empty list of (grid_h, grid_w) positive ints, got {grids!r}"[:300])
    grids = [(int(h), int(w)) for h, w in grids]
    total = sum(h * w for h, w in grids)
    if total != patches.shape[0]:
        raise ValueError(f"grids cover {total} patches but x has {patches.shape[0]} rows (x: [total_patches, features])")
    check_shape("bias", bias, (dim,))
    if cls_token is not None:
        check_tensor("cls_token", cls_token)
        if cls_token.dim() != 3 or cls_token.shape[0] != 1 or cls_token.shape[2] != dim:
            raise ValueError(f"cls_token must have shape (1, prefix, {dim}), got {tuple(cls_token.shape)}")
    if isinstance(pos_embed, (tuple, list)):
        if len(pos_embed) != 2:
            raise ValueError(f"a factorized pos_embed must be (pos_embed_y, pos_embed_x), got {len(pos_embed)} tensors")
        for name, t in zip(("pos_embed_y", "pos_embed_x"), pos_embed):
            check_tensor(name, t, ndim=3)
            if t.shape[0] != 1 or t.shape[2] != dim:
                raise ValueError(f"{name} must have shape (1, length, {dim}), got {tuple(t.shape)}")
    elif pos_embed is not None:
        check_tensor("pos_embed", pos_embed)
        if pos_embed.dim() != 4 or pos_embed.shape[0] != 1 or pos_embed.shape[3] != dim:
            raise ValueError(f"with grids, pos_embed must be a learned 2-D table (1, h, w, {dim}) or a factorized "
                             f"pair, got {tuple(pos_embed.shape)}")
    from vitkern.ops.linear import linear

    tokens = linear(patches, weight, bias, backend=backend)
    return reference.packed_epilogue(tokens, grids, cls_token, pos_embed, ar_preserving=ar_preserving)


def _patch_embed_autocast(amp, x, weight, bias, cls_token, pos_embed, no_embed_class, keep, backend) -> Tensor:
    """Under torch.autocast (see vitkern.ops._autocast): the patch projection (timm's Conv2d) in
    the autocast dtype `amp`; prefix tokens and position embedding of a wider dtype are added as
    timm adds them (bf16 patches + fp32 pos_embed = fp32 tokens), which is then the result's dtype.
    When everything is in `amp` the whole op stays fused."""
    cast = _autocast.cast
    out_dtype = _autocast.promoted(amp, cls_token, pos_embed)
    with _autocast.disabled(x):
        if out_dtype == amp:
            return patch_embed(cast(x, amp), cast(weight, amp), cast(bias, amp), cast(cls_token, amp),
                               cast(pos_embed, amp), no_embed_class=no_embed_class, keep=keep, backend=backend)
        patches = patch_embed(cast(x, amp), cast(weight, amp), cast(bias, amp), backend=backend)
        return reference.add_prefix_and_position(patches.to(out_dtype), cls_token, pos_embed,
                                                 no_embed_class=no_embed_class, keep=keep)


dispatch.register("patch_embed", "eager", reference.patch_embed)
dispatch.register("patch_embed", "torch", aten.patch_embed)


# --------------------------------------------------------------------------------------------
# Triton implementation: torch.library ops (traceable by torch.compile, checkable by opcheck)
# around the launchers of vitkern.kernels.triton.patch_embed, and the autograd Function.

if dispatch.triton_importable():
    from typing import List, Tuple

    import torch

    from vitkern.kernels.triton import patch_embed as _tpe
    from vitkern.kernels.triton import _common
    from vitkern.ops._checks import fused_backend_reasons, option_reasons
    from vitkern.ops._autograd import first_order, refuse_functorch

    # The prefix rows are written by their own programs, one row per (image, token): any number
    # works; this bound only keeps a nonsensical prefix (more tokens than an image) off the kernel.
    _TRITON_MAX_PREFIX = 1024

    @_common.library_op("vitkern::patch_embed_fwd")
    def _patch_embed_fwd_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        cls_token: Optional[torch.Tensor],
        pos_embed: Optional[torch.Tensor],
        no_embed_class: bool = False,
        keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [batch, chans, H, W]; weight: [dim, chans, ph, pw]; cls_token: prefix tokens [1, prefix, dim]
        -> tokens [batch, prefix + patches, dim]; pos_embed covers the patch rows only with no_embed_class;
        keep: [batch, kept] int64 patch indices (PatchDropout) -> [batch, prefix + kept, dim]."""
        return _tpe.patch_embed_fwd(x, weight, bias, cls_token, pos_embed, no_embed_class, keep)

    @_common.library_op("vitkern::patch_embed_bwd")
    def _patch_embed_bwd_op(
        dtokens: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_cls: bool, compute_dx: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """dtokens: [batch, tokens, dim] -> (dx [batch, chans, H, W] or [0], dweight, dbias [dim], dpos [1, tokens, dim]:
        the batch sum of dtokens, prefix rows included)."""
        return _tpe.patch_embed_bwd(dtokens, x, weight, has_cls, compute_dx)

    class PatchEmbedFn(torch.autograd.Function):
        """Patch embedding through the Triton ops; saves x and weight (the image is re-gathered
        by the dW GEMM, so no patch tensor is kept) and PatchDropout's kept indices.

        With `keep` the forward embeds only the kept patches (their GEMM rows, gathers and stores;
        the dropped ones cost nothing). The backward scatters the kept rows' gradient into a zero
        gradient of every token and runs the full backward: dx, dW and dpos then take what
        autograd of the eager gather would (zero for the dropped patches), at the cost of the
        backward of the whole patch embedding (about 1% of a ViT-B training step)."""

        @staticmethod
        def forward(ctx, x, weight, bias, cls_token, pos_embed, no_embed_class=False, keep=None):
            tokens = torch.ops.vitkern.patch_embed_fwd(x, weight, bias, cls_token, pos_embed, no_embed_class, keep)
            ctx.save_for_backward(x, weight, keep)
            ctx.present = (bias is not None, cls_token is not None, pos_embed is not None)
            ctx.prefix = cls_token.shape[1] if cls_token is not None else 0
            ctx.no_embed_class = no_embed_class
            return tokens

        @staticmethod
        @first_order("triton", "patch_embed")
        def backward(ctx, dtokens):
            x, weight, keep = ctx.saved_tensors
            has_bias, has_cls, has_pos = ctx.present
            if keep is not None:
                dtokens = _scatter_kept(dtokens, keep, ctx.prefix, (x.shape[2] // weight.shape[2]) * (x.shape[3] // weight.shape[3]))
            dx, dweight, dbias, dpos = torch.ops.vitkern.patch_embed_bwd(
                dtokens, x, weight, has_cls, bool(ctx.needs_input_grad[0])
            )
            prefix = ctx.prefix
            # dpos is the batch sum of every token row: the prefix tokens' rows are their gradient,
            # and pos_embed's is all of it, or its patch rows under no_embed_class.
            return (
                dx if ctx.needs_input_grad[0] else None,
                dweight,
                dbias if has_bias else None,
                dpos[:, :prefix].clone() if has_cls else None,
                (dpos[:, prefix:].clone() if ctx.no_embed_class else dpos) if has_pos else None,
                None,
                None,
            )

    def _scatter_kept(dtokens: Tensor, keep: Tensor, prefix: int, patches: int) -> Tensor:
        """dtokens [batch, prefix + kept, dim] -> the gradient of all tokens [batch, prefix + patches,
        dim]: the kept rows where they came from, zeros elsewhere (summed where an index repeats)."""
        full = dtokens.new_zeros((dtokens.shape[0], prefix + patches, dtokens.shape[2]))
        full[:, :prefix] = dtokens[:, :prefix]
        index = keep.unsqueeze(-1).expand(-1, -1, dtokens.shape[2])
        full[:, prefix:].scatter_add_(1, index, dtokens[:, prefix:])
        return full

    def _patch_embed_triton(x, weight, bias, cls_token=None, pos_embed=None, no_embed_class=False, keep=None):
        refuse_functorch("triton", "patch_embed")
        return PatchEmbedFn.apply(x, weight, bias, cls_token, pos_embed, no_embed_class, keep)

    def _patch_embed_triton_reasons(call) -> List[str]:
        return fused_backend_reasons(
            call,
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
            allow_cpu=dispatch.triton_interpret(),
            backend="triton",
        ) + option_reasons(call, "triton", max_prefix_tokens=_TRITON_MAX_PREFIX, no_embed_class=True, keep=True)

    dispatch.register("patch_embed", "triton", _patch_embed_triton, supports=_patch_embed_triton_reasons)
