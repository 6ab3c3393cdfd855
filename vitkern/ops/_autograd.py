"""What the fused backends' autograd Functions (Triton, CUDA) cannot do, said in vitkern's words.

Their backward passes are kernels: first-order only, with no formula for their own derivative, and
their autograd.Functions define no functorch rules. Without these guards torch answered a double
backward (`torch.autograd.grad(..., create_graph=True)`: gradient penalties, R1, MAML) with a
gradient that silently lacked the fused ops' second-order terms or with an internal message, and a
`torch.func` transform (grad, vmap, jacrev, ...) with a message about `setup_context`; neither
named the backend or the way out. The eager backend (plain PyTorch) supports both.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

WAY_OUT = "use backend='eager' for this (vitkern.ViT(..., backend='eager'), model.backend = 'eager', or the op's backend='eager'), which supports them"


def first_order(backend: str, op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of an autograd.Function's backward: refuse to run it while grad mode is on.

    Autograd runs a backward with grad mode on exactly when the caller asked for create_graph=True,
    i.e. a gradient of this gradient. The kernels' gradients carry no graph of their own, so rather
    than return a gradient whose second-order terms through this op are silently missing (what
    torch's once_differentiable does when the incoming gradient needs no grad), say so at once.
    """

    def wrap(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def guarded(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"vitkern's {backend} backend computes first-order gradients of {op} only: a gradient of "
                    f"its gradient (torch.autograd.grad(..., create_graph=True), as in gradient penalties or "
                    f"R1) is not supported there; {WAY_OUT}"
                )
            return backward(ctx, *grads)

        return guarded

    return wrap


def refuse_functorch(backend: str, op: str) -> None:
    """Call before a fused Function's `apply`: under a torch.func transform (grad, vmap, jacrev,
    functional_call inside one, ...) raise an error naming the backend and the way out."""
    if torch.compiler.is_compiling():  # traced by torch.compile: no functorch layer is live here
        return
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"torch.func transforms (grad, vmap, jacrev, jvp, ...) cannot run vitkern's {backend} backend of "
            f"{op} (its kernels have no functorch rules); {WAY_OUT}"
        )
