"""Models for sequence tasks over the runner, for any registered cell.

:class:`SequenceModel` = input layer → :class:`bnrhn.nn.Recurrent` → head:

- input layer: a linear map of the F input features to the hidden size, x'_t = W_in x_t + b_in, for every
  cell (so MUT1/MUT2, which add the input to a hidden-sized vector, get inputs of the right size, and every
  cell reads the same kind of input);
- head ``"last"`` (many-to-one): y = W_out h_{L} + b_out with h_L the state at each sequence's last valid
  step (L = its length);
- head ``"mean"`` (many-to-one): y = W_out (1/L Σ_{t≤L} h_t) + b_out, the mean over the valid steps;
- head ``"every"`` (many-to-many): y_t = W_out h_t + b_out at every step; padded steps are left out of the
  loss (:func:`sequence_loss`).

Padded batches: ``lengths`` (``[B]``) gives each sequence's valid length; the runner keeps padded steps out
of every state and statistic, so a padded sequence gets the outputs it would get alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnrhn.nn import Recurrent

__all__ = ["SequenceModel", "HEADS", "sequence_loss"]

HEADS = ("last", "mean", "every")


class SequenceModel(nn.Module):
    """Input layer → stacked recurrent cells → a many-to-one or many-to-many linear head (module docstring)."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, output_size: int, head: str = "last",
                 num_layers: int = 1, **cell_options: Any) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head = head
        self.config = dict(cell=cell, input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                           head=head, num_layers=num_layers, **cell_options)
        self.input_layer = nn.Linear(input_size, hidden_size)
        self.rnn = Recurrent(cell, hidden_size, hidden_size, num_layers=num_layers, **cell_options)
        self.output_layer = nn.Linear(hidden_size, output_size)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SequenceModel":
        return cls(**config)

    def features(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, list]:
        """Runner outputs ``[T, B, H]`` (zeros at padded steps) and final states for x ``[B, T, F]``."""
        if x.dim() != 3 or x.shape[-1] != self.config["input_size"]:
            raise ValueError(f"expected input of shape [B, T, {self.config['input_size']}], got {tuple(x.shape)}")
        return self.rnn(self.input_layer(x.transpose(0, 1)), lengths=lengths)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Outputs ``[B, O]`` (heads "last", "mean") or ``[B, T, O]`` (head "every")."""
        out, final = self.features(x, lengths)
        return self.readout(out, final, lengths)

    def readout(self, out: Tensor, final: list, lengths: Tensor | None) -> Tensor:
        if self.head == "every":
            return self.output_layer(out).transpose(0, 1)
        if self.head == "last":
            return self.output_layer(final[-1][0])
        T, B = out.shape[:2]
        n = torch.full((B,), T, device=out.device) if lengths is None else torch.as_tensor(lengths, device=out.device)
        return self.output_layer(out.sum(0) / n.unsqueeze(1).to(out.dtype))  # padded outputs are zeros


def sequence_loss(pred: Tensor, target: Tensor, lengths: Tensor | None = None) -> Tensor:
    """The task loss: MSE for one regression output (``pred [B, 1]``), cross-entropy for classes
    (``pred [B, C]`` or, per step, ``[B, T, C]`` with ``target [B, T]``); per-step losses are averaged over
    the valid steps only (steps t ≥ length are ignored)."""
    if pred.dim() == 2 and pred.shape[1] == 1:
        return F.mse_loss(pred.squeeze(1), target.to(pred.dtype))
    if pred.dim() == 2:
        return F.cross_entropy(pred, target)
    B, T, C = pred.shape
    if lengths is not None:
        valid = torch.arange(T, device=pred.device).unsqueeze(0) < torch.as_tensor(lengths, device=pred.device).unsqueeze(1)
        target = target.masked_fill(~valid, -100)  # cross_entropy's ignore_index
    return F.cross_entropy(pred.reshape(B * T, C), target.reshape(B * T), ignore_index=-100)
