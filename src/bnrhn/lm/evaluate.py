"""Scoring a character language model on a text: loss in nats per character, bits per character and
perplexity, with the hidden state carried through the whole text.

For a text x_1..x_N the model is scored on every one of the N − 1 predictions p(x_{i+1} | x_{≤i}):

    loss = −(1/(N−1)) Σ_i ln p(x_{i+1} | x_{≤i})      (nats per character)
    BPC  = loss / ln 2                               (bits per character)
    perplexity = exp(loss)                           (per character)

The text is cut into B contiguous streams evaluated in parallel (see :class:`bnrhn.data.text.TBPTTBatches`)
in windows of the training window length L; the state is carried from one window to the next and the
time index passed to batch-norm cells is the position inside the window, as in training. Each stream
starts from the zero state, so larger B means slightly less context at B places of the text. A model
trained with ``carry_state=False`` (every window from the zero state) is evaluated the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bnrhn.data.text import TBPTTBatches

__all__ = ["LMScore", "bits_per_char", "perplexity", "evaluate_ids"]

LN2 = math.log(2.0)


def bits_per_char(loss_nats: float) -> float:
    """BPC = loss / ln 2."""
    return loss_nats / LN2


def perplexity(loss_nats: float) -> float:
    """exp(loss) (inf when it overflows)."""
    try:
        return math.exp(loss_nats)
    except OverflowError:
        return math.inf


@dataclass
class LMScore:
    loss: float  # nats per character
    bpc: float
    perplexity: float
    chars: int  # number of predicted characters

    @classmethod
    def from_loss(cls, loss: float, chars: int) -> "LMScore":
        return cls(loss, bits_per_char(loss), perplexity(loss), chars)

    def as_dict(self) -> dict:
        return asdict(self)


def _detach(state):
    return [tuple(t.detach() for t in s) for s in state]


@torch.no_grad()
def evaluate_ids(model, ids: Tensor, batch_size: int = 64, seq_len: int = 100, progress=None,
                 carry_state: bool = True) -> LMScore:
    """Score ``model`` (a :class:`bnrhn.models.char_lm.CharLM`) on the character ids ``ids``.

    ``progress``: optional callable(n) called after each window with the number of windows done.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = TBPTTBatches(ids, batch_size, seq_len, full=True)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    state = None
    try:
        for win in batches:
            x, y = win.inputs.to(device), win.targets.to(device)
            lengths = None if win.lengths is None else win.lengths.clamp(min=1).to(device)
            logits, state = model(x, state=state if carry_state else None, step=0, lengths=lengths)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none")
            if win.lengths is not None:
                mask = torch.arange(x.shape[0]).unsqueeze(1) < win.lengths.unsqueeze(0)
                nll = nll[mask.reshape(-1).to(device)]
            total += nll.double().sum().cpu()
            count += int(nll.numel())
            state = _detach(state)
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    assert count == batches.num_targets, (count, batches.num_targets)
    return LMScore.from_loss(float(total) / count, count)
