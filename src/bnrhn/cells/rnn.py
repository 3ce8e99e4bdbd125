"""Vanilla (Elman) recurrent cell: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t−1} + b_hh).

Parameter names and shapes follow ``torch.nn.RNN`` (``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``) so that weights copy over one to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from bnrhn.cells.base import REFERENCE, RecurrentCell, State, StepMode


class RNNCell(RecurrentCell):
    """h_t = tanh(W_ih x_t + b_ih + W_hh h_{t−1} + b_hh)."""

    state_names = ("h",)
    torch_equivalent = nn.RNN

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__(input_size, hidden_size)
        H = self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(H, self.input_size))
        self.weight_hh = nn.Parameter(torch.empty(H, H))
        self.bias_ih = nn.Parameter(torch.empty(H)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(H)) if bias else None
        self._uniform_([p for p in self.parameters()], H)

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
        return F.linear(x, self.weight_ih, bias)

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None, mode: StepMode = REFERENCE) -> State:
        h = state[0]
        h_in = h if h_mask is None else h * h_mask
        return (torch.tanh(self.recurrent_mm(mode, "hh", xp, h_in, self.weight_hh)),)

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        return 2 * batch_size * steps * self.hidden_size * (self.input_size + self.hidden_size)
