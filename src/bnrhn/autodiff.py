"""Which kind of differentiation is running."""

from __future__ import annotations

import torch


def plain_autograd() -> bool:
    """False inside ``torch.func`` transforms (jacrev, vmap, …). The hand-written autograd nodes of the
    fast paths (:mod:`bnrhn.cells.highway`, the BN-LSTM step, masked batch norm) support ordinary
    autograd only; under a transform the cells compose their steps from PyTorch operations instead."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (active is not None and active())
