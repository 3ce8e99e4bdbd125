"""Gated recurrent unit (Cho et al. 2014), in PyTorch's form and gate order r, z, n:

    r = σ(W_ir x + b_ir + W_hr h + b_hr),   z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

Parameter names and shapes follow ``torch.nn.GRU`` so that weights copy over one to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from bnrhn.cells.base import REFERENCE, RecurrentCell, State, StepMode


class GRUCell(RecurrentCell):
    """GRU cell with PyTorch's equations (the reset gate multiplies W_hn h + b_hn)."""

    state_names = ("h",)
    torch_equivalent = nn.GRU

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__(input_size, hidden_size)
        H = self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, self.input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H))
        self.bias_ih = nn.Parameter(torch.empty(3 * H)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(3 * H)) if bias else None
        self._uniform_([p for p in self.parameters()], H)

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        return F.linear(x, self.weight_ih, self.bias_ih)

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None, mode: StepMode = REFERENCE) -> State:
        h = state[0]
        h_in = h if h_mask is None else h * h_mask
        hp = self.recurrent_mm(mode, "hh", None, h_in, self.weight_hh, self.bias_hh)
        x_r, x_z, x_n = xp.chunk(3, dim=1)
        h_r, h_z, h_n = hp.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (torch.lerp(n, h, z),)  # (1 − z) n + z h

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        return 2 * batch_size * steps * 3 * self.hidden_size * (self.input_size + self.hidden_size)
