"""Which kind of differentiation is running."""

from __future__ import annotations

import functools

import torch


def plain_autograd() -> bool:
    """False inside ``torch.func`` transforms (jacrev, vmap, …). The hand-written autograd nodes of the
    fast paths (:mod:`bnrhn.cells.highway`, the BN-LSTM step, masked batch norm) support ordinary
    autograd only; under a transform the cells compose their steps from PyTorch operations instead."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (active is not None and active())


_HALF = (torch.float16, torch.bfloat16)


def autocast_forward(float32: bool):
    """Decorator of a hand-written autograd node's ``forward`` for ``torch.autocast``, on any device:
    with ``float32=True`` its 16-bit inputs are cast to float32 and it runs with autocast off (elementwise
    work and batch-norm statistics in full precision); otherwise it runs under autocast (its products in 16
    bits). Either way :func:`autocast_backward` replays the forward's autocast state. (``torch.amp.custom_fwd``
    does this for one device type per decorator and keeps its state in single attributes of ``ctx``, so
    it cannot serve a node that runs on the CPU and on CUDA.)"""

    def wrap(fwd):
        @functools.wraps(fwd)
        def forward(ctx, *args):
            device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
            active = torch.is_autocast_enabled(device)
            ctx.autocast_state = (device, active and not float32, torch.get_autocast_dtype(device))
            if not (active and float32):
                return fwd(ctx, *args)
            args = tuple(a.float() if torch.is_tensor(a) and a.dtype in _HALF else a for a in args)
            with torch.autocast(device, enabled=False):
                return fwd(ctx, *args)

        return forward

    return wrap


def autocast_backward(bwd):
    """Decorator of the ``backward`` of a node whose forward has :func:`autocast_forward`."""

    @functools.wraps(bwd)
    def backward(ctx, *grads):
        device, active, dtype = ctx.autocast_state
        if torch.is_autocast_enabled(device) == active and (not active or torch.get_autocast_dtype(device) == dtype):
            return bwd(ctx, *grads)  # the forward's state already (the common case: no context to enter)
        with torch.autocast(device, dtype=dtype, enabled=active):
            return bwd(ctx, *grads)

    return backward
