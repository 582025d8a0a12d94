"""The custom autograd Functions' shared rule for second-order gradients."""

from __future__ import annotations

import functools

import torch
from torch._C import _functions  # DelayedError: what once_differentiable uses


def first_order_only(what: str, instead: str = "use backend='reference' to differentiate attention twice"):
    """Decorate a Function's backward whose computation autograd cannot follow (fused kernels, tiled
    loops): under create_graph=True its gradients carry a node that raises when differentiated.

    torch's once_differentiable adds that node only when the incoming gradients require grad;
    a gradient penalty on dq (autograd.grad(out.sum(), q, create_graph=True)) passes ones, so it
    silently got a second order of 0 through the saved q, k, v. The node also takes the saved
    tensors that require grad as inputs: every path from a gradient back to what produced them
    (autograd.grad(penalty, weight) runs only the nodes on such paths) then meets it."""
    message = f"attnkit: {what} has no second-order gradient; {instead}".encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outs
            fake = [o.detach().requires_grad_() if isinstance(o, torch.Tensor) else o for o in outs]
            anchors = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor) and t.requires_grad]
            err = _functions.DelayedError(message, len(fake) + len(anchors))
            res = err(*fake, *anchors)
            return tuple(res[:len(fake)])

        return wrapper

    return decorate
