"""Variational dropout (Gal & Ghahramani 2016): one Bernoulli mask per sequence, reused at every step.

A mask m ∈ {0, 1/(1−p)}^{B×F} is drawn once per sequence and multiplied into the same units at every
time step, as Zilly et al. do for RHNs; standard dropout (a fresh mask per step) would inject noise
into the recurrence at every step and hurt long-range memory.
"""

from __future__ import annotations

import torch
from torch import Tensor


def variational_mask(batch_size: int, features: int, p: float, like: Tensor) -> Tensor | None:
    """A ``[B, F]`` inverted-dropout mask with drop probability ``p``, or None when ``p == 0``."""
    if p <= 0.0:
        return None
    keep = 1.0 - p
    return torch.empty(batch_size, features, dtype=like.dtype, device=like.device).bernoulli_(keep) / keep


def check_probability(name: str, p: float) -> float:
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p!r}")
    return float(p)
