"""Optimisers and learning-rate schedules by name (thin wrappers over ``torch.optim``).

Adam and AdamW take PyTorch's *fused* update (``fused=True``: one kernel over all parameters) whenever every
parameter allows it — floating point, on a device with fused kernels. On the 2-core development machine an Adam
step over the parameters of a 2 × 512 character LM (3.5 M) took 2.09 ms per training step with the default
multi-tensor update and 0.73 ms fused, inside ``bnrhn lm train`` (under 1% of its ~160 ms step); alone, in a
tight loop, 0.19 → 0.06 ms for a 33 K-parameter layer and 0.80 → 0.26 ms for BN-RHN's 198 K
(docs/performance.md). The update is the same algorithm; only the order of the floating-point operations
differs. SGD keeps PyTorch's default update: with momentum, torch 2.13's fused SGD leaves its momentum buffers
uninitialised when the first step is one that fp16's GradScaler skips (an overflow), and every later step then
adds that garbage (found in review; a test pins it).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "step", "exponential", "cosine")
# torch.optim's fused Adam/AdamW/SGD run on these devices (torch 2.13; the list of its
# ``_get_fused_kernels_supported_devices``, a private function, less the accelerators we never run on)
FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")
# the param-group entries that choose how an update is computed, not what it computes: they belong to the run
# that loads a checkpoint (its device, its torch), not to the run that wrote it
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def fused_update_applies(params: list) -> bool:
    """Whether PyTorch's fused optimiser kernels can update every one of ``params`` (tensors, or torch's
    param-group dicts): dense floating-point tensors on a device that has them."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and all(
        t.is_floating_point() and not t.is_sparse and t.device.type in FUSED_DEVICES for t in tensors
    )


def build_optimizer(
    params: Iterable,
    name: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``adam`` / ``adamw`` (fused where :func:`fused_update_applies`, else PyTorch's default multi-tensor update)
    or ``sgd`` (with ``momentum``; PyTorch's default update) over ``params``."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # read twice (here and by torch): materialised, generators inside param groups included
    params = [{**p, "params": list(p["params"])} if isinstance(p, dict) else p for p in params]
    fused = True if fused_update_applies(params) else None  # None: torch's own default
    optimizer = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer(params, lr=lr, weight_decay=weight_decay, fused=fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)``, keeping ``optimizer``'s own choice of implementation.

    ``load_state_dict`` takes every param-group entry from the checkpoint, ``fused`` and ``foreach`` too, so a
    checkpoint written before the fused update (or on another device) would switch a resumed run back to the
    slower update for good; and the entries decide where the loaded ``step`` counters are placed (the fused
    kernels keep them on the parameters' device). The hyper-parameters (learning rate, betas, …) and the
    moments still come from ``saved``.
    """
    if len(saved["param_groups"]) == len(optimizer.param_groups):  # else load_state_dict reports the mismatch
        groups = [
            {**saved_group, **{k: own[k] for k in IMPLEMENTATION_KEYS if k in own}}
            for saved_group, own in zip(saved["param_groups"], optimizer.param_groups)
        ]
        saved = {**saved, "param_groups": groups}
    optimizer.load_state_dict(saved)


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
