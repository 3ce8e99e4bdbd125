"""Optimisers and learning-rate schedules by name (thin wrappers over ``torch.optim``)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "step", "exponential", "cosine")


def build_optimizer(
    params: Iterable,
    name: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``adam`` / ``adamw`` / ``sgd`` (with ``momentum``) over ``params``."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "none",
    total_steps: int | None = None,
    warmup_steps: int = 0,
    step_size: int | None = None,
    gamma: float = 0.5,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-training-step schedule: linear warm-up over ``warmup_steps``, then

    - ``none``: constant;
    - ``step``: multiply by ``gamma`` every ``step_size`` steps;
    - ``exponential``: multiply by ``gamma`` per ``step_size`` steps, smoothly (gamma^(t/step_size));
    - ``cosine``: cosine decay from 1 to ``min_lr_ratio`` over ``total_steps``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if name in ("step", "exponential") and not step_size:
        raise ValueError(f"schedule {name!r} needs step_size (steps between decays)")
    if name == "cosine" and not total_steps:
        raise ValueError("schedule 'cosine' needs total_steps")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be ≥ 0, got {warmup_steps}")

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        t = max(0, step - warmup_steps)
        if name == "step":
            return warm * gamma ** (t // step_size)
        if name == "exponential":
            return warm * gamma ** (t / step_size)
        if name == "cosine":
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, t / span)
            return warm * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
