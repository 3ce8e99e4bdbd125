"""How far back the gradient of the last loss reaches: ‖∂L_T/∂h_t‖ for t = 1..T.

For a sequence x_1..x_T the model reads x_1..x_T one step at a time and only the last prediction is
scored, L_T = −ln p(x_{T+1} | x_{≤T}). By the chain rule

    ∂L_T/∂h_t = ∂L_T/∂h_T · ∂h_T/∂h_{T−1} · … · ∂h_{t+1}/∂h_t

(for a gated cell through the whole state: the product of the temporal Jacobians A_k = ∂s_k/∂s_{k−1},
see :mod:`bnrhn.analysis.jacobian`). If the Jacobians shrink vectors, the norm decays geometrically
with the distance T − t and the model cannot learn from what happened that far back (Bengio et al.
1994; Hochreiter 1991). The norms are measured per sequence (the models run in eval mode, so
sequences do not interact through batch statistics) and summarised over a batch of real text.

``h_t`` is the output of a layer (``layer``, default the top one); ``state`` norms use the whole state
of that layer (for the LSTM family [h_t, c_t]).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GradientFlow", "gradient_norms", "task_gradient_norms"]


@dataclass
class GradientFlow:
    """Per-step gradient norms of one model: tensors ``[T, B]`` (t = 0..T−1; distance = T−1−t)."""

    h: Tensor  # ‖∂L_T/∂h_t‖ per sequence
    state: Tensor  # ‖∂L_T/∂s_t‖ (whole state of the layer) per sequence
    loss: float  # mean L_T over the batch (nats)

    @property
    def length(self) -> int:
        return self.h.shape[0]

    def summary(self, which: str = "h") -> dict[str, list[float]]:
        """Mean, median, quartiles and geometric mean over sequences, indexed by distance T − t."""
        g = (self.h if which == "h" else self.state).flip(0).double()  # row d = distance d
        logs = g.clamp_min(1e-300).log()
        q = torch.quantile(g, torch.tensor([0.25, 0.5, 0.75], dtype=g.dtype), dim=1)
        return {
            "distance": list(range(g.shape[0])),
            "mean": g.mean(1).tolist(),
            "geomean": logs.mean(1).exp().tolist(),
            "q25": q[0].tolist(),
            "median": q[1].tolist(),
            "q75": q[2].tolist(),
        }


def gradient_norms(model, windows: Tensor, window: int | None = None, layer: int = -1) -> GradientFlow:
    """‖∂L_T/∂h_t‖ and ‖∂L_T/∂s_t‖ for every step of ``windows`` (``[T + 1, B]`` character ids: inputs are
    rows 0..T−1, the target of the last step is row T).

    ``window``: the batch-norm time index is ``t mod window`` (the model's training window; None = t).
    The model runs in eval mode; its parameters' ``.grad`` are left untouched.
    """
    inputs, target = windows[:-1], windows[-1]
    device = next(model.parameters()).device
    inputs, target = inputs.to(device), target.to(device)
    k = layer % len(model.cells)
    with _frozen_eval(model), torch.enable_grad():
        emb = model.embedding(inputs)
        outs, _, kept = _run_traced(model.rnn, emb, model.init_state(inputs.shape[1]), k, window)
        losses = F.cross_entropy(model.decoder(outs[-1]), target, reduction="none")
        # Sequences are independent in eval mode, so ∂(Σ_b L^b)/∂h_t^b = ∂L^b/∂h_t^b.
        losses.sum().backward()
        return _flow(kept, losses)


@contextmanager
def _frozen_eval(model):
    """The model in eval mode with every parameter frozen (gradients w.r.t. the states only, the parameters'
    ``.grad`` untouched); mode and flags restored afterwards."""
    was_training = model.training
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(params, saved_flags):
            p.requires_grad_(f)
        model.train(was_training)


def _run_traced(rnn, inputs: Tensor, state, k: int, window: int | None = None):
    """Step ``rnn`` over ``inputs`` ([T, B, I]) keeping layer ``k``'s state at every step with its gradient
    retained; the parameters are frozen, so the graph starts at layer k's initial state. Returns the outputs
    per step, the final state and the kept states."""
    state = [tuple(x.clone().requires_grad_(i == k) for x in s) for i, s in enumerate(state)]
    outs, kept = [], []
    for t in range(inputs.shape[0]):
        out, state = rnn.step(inputs[t], state, t if window is None else t % window)
        for x in state[k]:
            x.retain_grad()
        kept.append(state[k])
        outs.append(out)
    return outs, state, kept


def _flow(kept, losses: Tensor) -> GradientFlow:
    """The norms of the retained state gradients (after ``backward``) and the mean loss."""
    h_norms = torch.stack([s[0].grad.norm(dim=1) for s in kept])  # [T, B]
    state_norms = torch.stack([torch.cat([x.grad for x in s], dim=1).norm(dim=1) for s in kept])
    loss = float(losses.detach().mean())
    return GradientFlow(h_norms.detach().cpu(), state_norms.detach().cpu(), loss if math.isfinite(loss) else math.nan)


def task_gradient_norms(model, x: Tensor, y: Tensor, layer: int = -1) -> GradientFlow:
    """‖∂L/∂h_t‖ and ‖∂L/∂s_t‖ for every step of a long-range task model
    (:class:`bnrhn.tasks.heads.SequenceModel`) on sequences ``x [B, T, F]`` with targets ``y``: L is each
    sequence's own task loss (the adding problem's squared error, the copy task's cross-entropy summed over
    its copied steps, the digit's cross-entropy), read out after the last step as in training.

    As for :func:`gradient_norms`, the model runs in eval mode with frozen parameters; its ``.grad`` are left
    untouched."""
    from bnrhn.tasks.generators import COPY_K

    B = x.shape[0]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x, y = x.to(device=device, dtype=dtype), y.to(device)
    k = layer % model.rnn.num_layers
    with _frozen_eval(model), torch.enable_grad():
        inputs = model.input_layer(x.transpose(0, 1))
        outs, state, kept = _run_traced(model.rnn, inputs, model.rnn.init_state(B, device, dtype), k)
        pred = model.readout(torch.stack(outs), state, None)
        if pred.dim() == 2 and pred.shape[1] == 1:
            losses = (pred.squeeze(1) - y.to(dtype)) ** 2
        elif pred.dim() == 2:
            losses = F.cross_entropy(pred, y, reduction="none")
        else:  # per step: the copied part is what needs memory (the blanks before it need none)
            losses = F.cross_entropy(pred[:, -COPY_K:].transpose(1, 2), y[:, -COPY_K:], reduction="none").sum(1)
        losses.sum().backward()  # sequences are independent in eval mode
        return _flow(kept, losses)
