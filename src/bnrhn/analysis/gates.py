"""Transform- and carry-gate activity of recurrent highway layers, per highway depth.

In an RHN time step the state passes through L highway layers s_l = h_l ⊙ t_l + s_{l−1} ⊙ c_l. The mean
transform gate t_l says how much of layer l's new candidate h_l enters the state, the mean carry gate
c_l how much of the previous layer's state is kept (c = 1 − t for the coupled RHN). Zilly et al. found
that trained RHNs open the transform gates mostly in the first layers of a step and carry in the
deeper ones; a carry gate near 1 is what keeps the temporal Jacobian near the identity.

The means (over the batch and the units of each layer at each step) are recorded through
:meth:`bnrhn.cells.RHNCell.register_gate_hook` while the model reads real text in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GateActivity", "gate_activity", "is_highway"]


def is_highway(model) -> bool:
    return all(hasattr(c, "register_gate_hook") for c in model.cells)


@dataclass
class GateActivity:
    """Per stacked layer k and highway depth l: the mean over steps of the per-step mean gate values,
    and their standard deviation over steps; ``per_step[k]`` is ``[T, L, 2]`` (t, c) for plots over time."""

    transform_mean: list[list[float]]  # [K][L]
    transform_std: list[list[float]]
    carry_mean: list[list[float]]
    carry_std: list[list[float]]
    per_step: list[Tensor]
    carry_kind: list[str]

    def as_dict(self) -> dict:
        return {
            "transform_mean": self.transform_mean, "transform_std": self.transform_std,
            "carry_mean": self.carry_mean, "carry_std": self.carry_std, "carry": self.carry_kind,
        }


@torch.no_grad()
def gate_activity(model, inputs: Tensor, window: int | None = None) -> GateActivity:
    """Run ``model`` (a CharLM with RHN-family cells) over ``inputs`` (``[T, B]`` ids) and collect the
    mean transform and carry gate of every highway layer.

    The batch-norm time index is ``t mod window`` (None = t).
    """
    if not is_highway(model):
        raise ValueError(
            f"gate activity needs highway cells (rhn, bn_rhn, bn_rhn_tf); this model's cell is {model.config['cell']!r}"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cells = list(model.cells)
    logs: list[list] = [[] for _ in cells]

    def recorder(log: list):
        return lambda layer, t, c: log.append((layer, t.mean().item(), c.mean().item()))

    handles = [c.register_gate_hook(recorder(log)) for c, log in zip(cells, logs)]
    try:
        x = model.embedding(inputs.to(device))
        state = model.init_state(inputs.shape[1])
        for t in range(inputs.shape[0]):
            step = t if window is None else t % window
            _, state = model.rnn.step(x[t], state, step)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tm, ts, cm, cs, per_step = [], [], [], [], []
    for c, log in zip(cells, logs):
        L = c.depth
        arr = torch.tensor([[tv, cv] for _, tv, cv in log], dtype=torch.float64).reshape(-1, L, 2)  # [T, L, 2]
        per_step.append(arr)
        tm.append(arr[:, :, 0].mean(0).tolist())
        ts.append(arr[:, :, 0].std(0, unbiased=False).tolist())
        cm.append(arr[:, :, 1].mean(0).tolist())
        cs.append(arr[:, :, 1].std(0, unbiased=False).tolist())
    return GateActivity(tm, ts, cm, cs, per_step, [c.carry for c in cells])
