"""MUT1, MUT2 and MUT3: the three recurrent architectures that Jozefowicz, Zaremba & Sutskever (2015,
"An Empirical Exploration of Recurrent Network Architectures", ICML) found by evolutionary search over
about ten thousand candidates, as good as or better than the LSTM and the GRU on their tasks.

Every update is a GRU-like interpolation between a candidate and the previous state,

    h_t = tanh(a_t) ⊙ z + h_{t−1} ⊙ (1 − z),

with (σ the logistic function, ⊙ elementwise):

=====  ===============================================  ===========================  =====================================
cell   update gate z                                    reset gate r                 candidate pre-activation a_t
=====  ===============================================  ===========================  =====================================
MUT1   σ(W_xz x_t + b_z)                                σ(W_xr x_t + W_hr h + b_r)   W_hh (r ⊙ h) + tanh(x_t) + b_h
MUT2   σ(W_xz x_t + W_hz h + b_z)                       σ(x_t + b_r)                 W_hh (r ⊙ h) + W_xh x_t + b_h
MUT3   σ(W_xz x_t + W_hz tanh(h) + b_z)                 σ(W_xr x_t + W_hr h + b_r)   W_hh (r ⊙ h) + W_xh x_t + b_h
=====  ===============================================  ===========================  =====================================

(h = h_{t−1}). MUT1's tanh(x_t) and MUT2's σ(x_t + b_r) add the raw input to a hidden-sized vector, so
those two cells need ``input_size == hidden_size``, as in the paper, where inputs are embeddings of the
hidden size. They refuse other sizes with an error saying so; put a linear layer in front (the
long-range task models of :mod:`bnrhn.tasks` always read their input through one).

State-independent terms (everything with x_t) are computed for all steps at once by
:meth:`project_input`; :meth:`recur` does the two recurrent products of a step: the gates' ``h`` (or
``tanh(h)``) product first, then ``W_hh (r ⊙ h)``. A recurrent-dropout mask multiplies h where it enters
those products, not the carried ``h_{t−1} ⊙ (1 − z)`` (as for the GRU). Initialisation: PyTorch's
U(−1/√H, 1/√H) for every weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnrhn import kernels
from bnrhn.kernels import batch_split, onednn
from bnrhn.cells.base import REFERENCE, RecurrentCell, State, StepMode

__all__ = ["MUT1Cell", "MUT2Cell", "MUT3Cell"]


class _MUTCell(RecurrentCell):
    """What the three share: the interpolation, the candidate's W_hh (r ⊙ h) product, the parameters.

    Subclasses name the gates that read the state (``recurrent_gates``: "z", "r" or both; a weight
    ``weight_hz`` / ``weight_hr`` each) and implement :meth:`_project` and :meth:`_gates`."""

    state_names = ("h",)
    name = ""
    raw_input = False  # True: the input is added to a hidden-sized vector (needs input_size == hidden_size)
    recurrent_gates: tuple[str, ...] = ()

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        H, I = self.hidden_size, self.input_size
        if self.raw_input and I != H:
            raise ValueError(
                f"{self.name} needs input_size == hidden_size (got {I} and {H}): it adds the raw input x_t to a "
                "hidden-sized vector (Jozefowicz et al. 2015); put a linear layer of output size "
                f"{H} in front of it (the task models of bnrhn.tasks do)"
            )
        n_proj = 2 if self.raw_input else 3  # input products W_x· x among z, r and the candidate
        self.weight_ih = nn.Parameter(torch.empty(n_proj * H, I))
        self.bias = nn.Parameter(torch.empty(3 * H))  # b_z, b_r, b_h
        for gate in self.recurrent_gates:
            self.register_parameter(f"weight_h{gate}", nn.Parameter(torch.empty(H, H)))
        self.weight_hh = nn.Parameter(torch.empty(H, H))  # the candidate's W_hh
        self._uniform_(list(self.parameters()), H)

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        """[z term, r term, candidate term] of width 3H: every part of the step that does not need h."""
        self.check_input(x)
        return self._project(x)

    def _project(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _gates(self, mode: StepMode, x_z: Tensor, x_r: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None, mode: StepMode = REFERENCE) -> State:
        h = state[0]
        h_in = h if h_mask is None else h * h_mask
        x_z, x_r, x_h = xp.chunk(3, dim=-1)
        z, r = self._gates(mode, x_z, x_r, h_in)
        candidate = torch.tanh(self.recurrent_mm(mode, "hh", x_h, r * h_in, self.weight_hh))
        return (torch.lerp(h, candidate, z),)  # tanh(a) ⊙ z + h ⊙ (1 − z)

    def recur_sequence(self, xp: Tensor, state: State, step: int = 0, h_mask: Tensor | None = None,
                       mode: StepMode = REFERENCE, active: list[int] | None = None):
        """All T steps of ``xp`` ``[T, B, 3H]`` in the C++ loop (:class:`MUTSequence`) when gradients are recorded
        for a whole sequence (``mode.taps``) and the fused CPU kernels serve the tensors; else None."""
        ops = self.loop_ops(xp, state[0], mode)
        if ops is None:
            return None
        plan = MUTPlan(ops=ops, variant=int(self.name[-1]), active=active)
        out, h = MUTSequence.apply(plan, xp, state[0], h_mask, getattr(self, "weight_hz", None),
                                   getattr(self, "weight_hr", None), self.weight_hh)
        return out, (h,)

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        H, I = self.hidden_size, self.input_size
        return 2 * batch_size * steps * H * (self.weight_ih.shape[0] // H * I + (len(self.recurrent_gates) + 1) * H)


class MUT1Cell(_MUTCell):
    """MUT1: z = σ(W_xz x + b_z), r = σ(W_xr x + W_hr h + b_r), h' = tanh(W_hh (r ⊙ h) + tanh(x) + b_h) ⊙ z
    + h ⊙ (1 − z). Needs input_size == hidden_size."""

    name = "MUT1"
    raw_input = True
    recurrent_gates = ("r",)

    def _project(self, x: Tensor) -> Tensor:
        b_z, b_r, b_h = self.bias.chunk(3)
        zr = F.linear(x, self.weight_ih, torch.cat([b_z, b_r]))
        return torch.cat([zr, torch.tanh(x) + b_h], dim=-1)

    def _gates(self, mode, x_z, x_r, h):
        return torch.sigmoid(x_z), torch.sigmoid(self.recurrent_mm(mode, "hr", x_r, h, self.weight_hr))


class MUT2Cell(_MUTCell):
    """MUT2: z = σ(W_xz x + W_hz h + b_z), r = σ(x + b_r), h' = tanh(W_hh (r ⊙ h) + W_xh x + b_h) ⊙ z
    + h ⊙ (1 − z). Needs input_size == hidden_size."""

    name = "MUT2"
    raw_input = True
    recurrent_gates = ("z",)

    def _project(self, x: Tensor) -> Tensor:
        b_z, b_r, b_h = self.bias.chunk(3)
        zh = F.linear(x, self.weight_ih, torch.cat([b_z, b_h]))
        x_z, x_h = zh.chunk(2, dim=-1)
        return torch.cat([x_z, torch.sigmoid(x + b_r), x_h], dim=-1)  # r depends on the input only

    def _gates(self, mode, x_z, x_r, h):
        return torch.sigmoid(self.recurrent_mm(mode, "hz", x_z, h, self.weight_hz)), x_r


class MUT3Cell(_MUTCell):
    """MUT3: z = σ(W_xz x + W_hz tanh(h) + b_z), r = σ(W_xr x + W_hr h + b_r),
    h' = tanh(W_hh (r ⊙ h) + W_xh x + b_h) ⊙ z + h ⊙ (1 − z)."""

    name = "MUT3"
    recurrent_gates = ("z", "r")

    def _project(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_ih, self.bias)

    def _gates(self, mode, x_z, x_r, h):
        z = torch.sigmoid(self.recurrent_mm(mode, "hz", x_z, torch.tanh(h), self.weight_hz))
        return z, torch.sigmoid(self.recurrent_mm(mode, "hr", x_r, h, self.weight_hr))


@dataclass
class MUTPlan:
    """What one call of :class:`MUTSequence` needs besides its tensors: the kernels' op namespace, which MUT (1, 2
    or 3) and the rows of each step (None: all)."""

    ops: object
    variant: int
    active: list[int] | None


class MUTSequence(Function):
    """A whole sequence of MUT steps as one autograd node, its time loop in C++ (``bnrhn/kernels/mut_sequence.cpp``
    states the forward and backward): ``MUTSequence.apply(plan, xp, h0, h_mask, W_hz, W_hr, W_hh)`` →
    ``(outputs [T, B, H], h_T)`` with the runner's packed rows and recurrent-dropout mask; W_hz or W_hr is None
    where the cell has none. Why: the step loop's Python and dispatcher work cost more than the small products."""

    @staticmethod
    def forward(ctx, plan: MUTPlan, xp, h0, h_mask, w_hz, w_hr, w_hh):
        if xp.stride(2) != 1:
            xp = xp.contiguous()
        h_mask = kernels.loop_mask(h_mask, h0)
        dense = lambda w: w.contiguous() if w is not None else None  # noqa: E731
        weights = [w for w in (w_hz, w_hr, w_hh) if w is not None]
        packed = onednn.packed_recurrent_weights(weights, xp.shape[1])
        parts = batch_split.forward_parts(plan.active, xp.shape[1], h0.shape[1], packed)
        out, h, *records = plan.ops.mut_sequence_forward(plan.variant, xp, h0.contiguous(), h_mask, dense(w_hz),
                                                         dense(w_hr), dense(w_hh), list(plan.active or []),
                                                         packed=packed, parts=parts)
        ctx.plan, ctx.size, ctx.parts = plan, (xp.shape[0], xp.shape[1]), parts
        ctx.save_for_backward(h_mask, w_hz, w_hr, w_hh, *records)
        return out, h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h):
        h_mask, w_hz, w_hr, w_hh, *records = ctx.saved_tensors
        dense = lambda w: w.contiguous() if w is not None else None  # noqa: E731
        need = ctx.needs_input_grad  # (plan, xp, h0, h_mask, W_hz, W_hr, W_hh)
        weights = [w for w in (w_hz, w_hr, w_hh) if w is not None]
        packed_t = onednn.packed_transposed_weights(weights, ctx.size[1])
        dxp, dh0, dw_hz, dw_hr, dw_hh = ctx.plan.ops.mut_sequence_backward(
            ctx.plan.variant, grad_out, grad_h, ctx.size[0], ctx.size[1], h_mask, dense(w_hz), dense(w_hr),
            dense(w_hh), records, list(ctx.plan.active or []), need[1], packed_t=packed_t,
            parts=batch_split.backward_parts(ctx.parts, packed_t))
        keep = lambda g, n: g if n and g.numel() else None  # noqa: E731
        return (None, dxp, dh0 if need[2] else None, None, keep(dw_hz, need[4]), keep(dw_hr, need[5]),
                keep(dw_hh, need[6]))
