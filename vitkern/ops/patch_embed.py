"""Patch embedding op: image [batch, chans, H, W] -> tokens [batch, tokens, dim] (eq. 1 of the paper).

validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.patch_embed`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
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
    Returns [batch, prefix + patches, dim] in x's dtype ([batch, prefix + kept, dim] with keep).
    """
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
    check_same_dtype(call)
    if keep is not None:  # integer indices: checked on their own
        call["keep"] = check_keep(keep, batch, patches, x.device)
    impl = dispatch.select("patch_embed", backend, x.device, call)
    return impl.fn(**call)


dispatch.register("patch_embed", "eager", reference.patch_embed)


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
