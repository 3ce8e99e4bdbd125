"""Batch-normalised LSTM (Cooijmans et al. 2016, "Recurrent Batch Normalization"):

    [i, f, g, o] = BN(W_h h_{t−1}; γ_h) + BN(W_x x_t; γ_x) + b        (no shift β_h, β_x: b provides it)
    c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g)
    h_t = σ(o) ⊙ tanh(BN(c_t; γ_c, β_c))

Every BN keeps statistics per time step up to T_max (``max_steps``; later steps reuse the last) and
γ starts at 0.1. The two normalisations of the gate pre-activations are separate so that the input
and recurrent terms keep their own scales.

``carry_norm="recurrence"`` normalises the memory *inside* the recurrence instead
(c_t = BN(σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g)) is what is carried to the next step). That destroys the
additive gradient path of the LSTM and diverges (Glinskis 2017, the seed report); it is kept as a
reproducible negative result, not a default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from bnrhn.cells.base import RecurrentCell, State
from bnrhn.nn.seq_batchnorm import SequenceBatchNorm

_CARRY_NORM = ("output", "recurrence")


class BNLSTMCell(RecurrentCell):
    """LSTM with recurrent batch normalisation (see the module docstring for the equations)."""

    state_names = ("h", "c")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int = 100,
        per_step: bool = True,
        stats: str = "momentum",
        momentum: float = 0.1,
        gamma_init: float = 0.1,
        forget_bias: float = 1.0,
        carry_norm: str = "output",
    ) -> None:
        super().__init__(input_size, hidden_size)
        if carry_norm not in _CARRY_NORM:
            raise ValueError(f"carry_norm must be one of {_CARRY_NORM}, got {carry_norm!r}")
        H = self.hidden_size
        self.carry_norm = carry_norm
        self.weight_ih = nn.Parameter(torch.empty(4 * H, self.input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias = nn.Parameter(torch.zeros(4 * H))
        for block in self.weight_hh.data.view(4, H, H):  # orthogonal recurrent blocks (Cooijmans et al.)
            nn.init.orthogonal_(block)
        nn.init.xavier_uniform_(self.weight_ih)
        with torch.no_grad():
            self.bias[H : 2 * H] = forget_bias
        bn = dict(max_steps=max_steps, per_step=per_step, stats=stats, momentum=momentum)
        self.bn_x = SequenceBatchNorm(4 * H, center=False, gamma_init=gamma_init, **bn)
        self.bn_h = SequenceBatchNorm(4 * H, center=False, gamma_init=gamma_init, **bn)
        self.bn_c = SequenceBatchNorm(H, center=True, gamma_init=gamma_init, **bn)

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        return self.bn_x(F.linear(x, self.weight_ih), step, mask) + self.bias

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None) -> State:
        h, c = state
        h_in = h if h_mask is None else h * h_mask
        gates = self.bn_h(self.recurrent_mm("hh", None, h_in, self.weight_hh), step, mask) + xp
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_n = self.bn_c(c, step, mask)
        if self.carry_norm == "recurrence":
            c = c_n
        return torch.sigmoid(o) * torch.tanh(c_n), c

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        return 2 * batch_size * steps * 4 * self.hidden_size * (self.input_size + self.hidden_size)
