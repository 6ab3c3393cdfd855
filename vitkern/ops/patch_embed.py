"""Patch embedding op: image [batch, chans, H, W] -> tokens [batch, tokens, dim] (eq. 1 of the paper).

validate -> dispatch -> implementation. The eager implementation is `vitkern.reference.patch_embed`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vitkern import dispatch, reference
from vitkern.ops._checks import check_same_device, check_shape, check_tensor


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    cls_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """[x_cls; patches(x) @ W^T + b] + pos_embed, the patch grid flattened row-major.

    x: [batch, chans, H, W] with H, W multiples of the patch size; weight: [dim, chans, ph, pw]
    (a Conv2d weight, stride = kernel); bias: [dim] or None; cls_token: [1, 1, dim] or None
    (prepended as token 0); pos_embed: [1, tokens, dim] or None, tokens = (1 if cls_token) +
    (H / ph) * (W / pw). Returns [batch, tokens, dim] in x's dtype.
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
    tokens = (1 if cls_token is not None else 0) + (height // ph) * (width // pw)
    check_shape("bias", bias, (dim,))
    check_shape("cls_token", cls_token, (1, 1, dim))
    check_shape("pos_embed", pos_embed, (1, tokens, dim), f"{tokens} tokens for a {height}x{width} image and patch {(ph, pw)}")
    call = dict(x=x, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed)
    check_same_device(call)
    impl = dispatch.select("patch_embed", backend, x.device, call)
    return impl.fn(**call)


dispatch.register("patch_embed", "eager", reference.patch_embed)
