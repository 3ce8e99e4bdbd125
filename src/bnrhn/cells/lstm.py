"""Long short-term memory cell (Hochreiter & Schmidhuber 1997), in PyTorch's gate order i, f, g, o:

    [i, f, g, o] = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh
    c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g)
    h_t = σ(o) ⊙ tanh(c_t)

Parameter names and shapes follow ``torch.nn.LSTM`` so that weights copy over one to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from bnrhn.cells.base import REFERENCE, RecurrentCell, State, StepMode


def lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(h_t, c_t) from the summed pre-activations ``gates`` = [i, f, g, o] and c_{t−1}."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class LSTMCell(RecurrentCell):
    """LSTM cell; ``forget_bias`` is added to the forget gate's b_ih at initialisation (0 = nn.LSTM's init)."""

    state_names = ("h", "c")
    torch_equivalent = nn.LSTM

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, forget_bias: float = 1.0) -> None:
        super().__init__(input_size, hidden_size)
        H = self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, self.input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias_ih = nn.Parameter(torch.empty(4 * H)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(4 * H)) if bias else None
        self.forget_bias = float(forget_bias)
        self._uniform_([p for p in self.parameters()], H)
        if bias and forget_bias:
            with torch.no_grad():
                self.bias_ih[H : 2 * H] += forget_bias

    def project_input(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
        return F.linear(x, self.weight_ih, bias)

    def recur(self, xp, state: State, step: int = 0, mask=None, h_mask=None, mode: StepMode = REFERENCE) -> State:
        h, c = state
        h_in = h if h_mask is None else h * h_mask
        return lstm_update(self.recurrent_mm(mode, "hh", xp, h_in, self.weight_hh), c)

    def matmul_flops(self, batch_size: int, steps: int) -> int:
        return 2 * batch_size * steps * 4 * self.hidden_size * (self.input_size + self.hidden_size)
