"""Character-level language model: embedding → recurrent stack (any registered cell) → softmax.

    e_t = E[x_t]                                    (embedding, E ∈ R^{V×D})
    h_t^{(1..K)}, state_t = Recurrent(e_t, state_{t−1})   (K stacked layers of one cell type)
    p(x_{t+1} | x_{≤t}) = softmax(W h_t^{(K)} + b)  (W = E when the weights are tied, D = H)

Variational dropout (one mask per sequence window) on the embedding, on every layer's output and on
h_{t−1} inside the recurrence comes from :class:`bnrhn.nn.Recurrent`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bnrhn.cells import pin_statistics
from bnrhn.cells.base import State, check_size
from bnrhn.nn import Recurrent

__all__ = ["CharLM"]


class CharLM(nn.Module):
    """Character language model (see the module docstring).

    Args:
        vocab_size: V.
        cell: registry name of the recurrent cell (``bnrhn cells`` lists them).
        hidden_size: H.
        num_layers: K stacked layers.
        embed_size: D (default: H when tying, else min(H, 128)).
        input_dropout, dropout, recurrent_dropout: variational dropout probabilities (see Recurrent).
        tie_weights: share the embedding matrix with the softmax weights (needs D = H).
        **cell_options: options of the cell (e.g. ``depth=3``, ``per_step=False``); the LSTM's
            ``forget_bias`` is 0 here unless given (PyTorch's initialisation).
    """

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        hidden_size: int = 256,
        num_layers: int = 1,
        embed_size: int | None = None,
        input_dropout: float = 0.0,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        tie_weights: bool = False,
        **cell_options: Any,
    ) -> None:
        super().__init__()
        check_size("vocab_size", vocab_size)
        check_size("hidden_size", hidden_size)
        if embed_size is None:
            embed_size = hidden_size if tie_weights else min(hidden_size, 128)
        check_size("embed_size", embed_size)
        if tie_weights and embed_size != hidden_size:
            raise ValueError(
                f"weight tying shares the embedding with the softmax weights, so the embedding size ({embed_size}) "
                f"must equal the hidden size ({hidden_size})"
            )
        if cell == "lstm":
            # PyTorch's initialisation of the forget gate (bias 0), not LSTMCell's +1: on tiny Shakespeare the
            # +1 start learnt slower, 1.747 vs 1.674 nats after 1,000 windows (benchmarks/lm.py)
            cell_options = {"forget_bias": 0.0, **cell_options}
        cell_options = pin_statistics(cell, cell_options)  # saved with the model: rebuilt as trained
        self.config: dict[str, Any] = dict(
            vocab_size=vocab_size, cell=cell, hidden_size=hidden_size, num_layers=num_layers,
            embed_size=embed_size, input_dropout=input_dropout, dropout=dropout,
            recurrent_dropout=recurrent_dropout, tie_weights=bool(tie_weights), **cell_options,
        )
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = Recurrent(
            cell, embed_size, hidden_size, num_layers=num_layers, input_dropout=input_dropout,
            dropout=dropout, recurrent_dropout=recurrent_dropout, **cell_options,
        )
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            # the shared matrix is also the softmax's weights: N(0, 1) there would start with huge logits
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            self.decoder.weight = self.embedding.weight
        # Untied, the embedding keeps nn.Embedding's own N(0, 1) initialisation. A U(−0.1, 0.1) start (the
        # word-level LMs' habit) has std 0.058, so the first layer's input term W e starts 17× smaller, and
        # slows early learning of the LSTM: 2.374 vs 2.098 nats after 200 windows on tiny Shakespeare
        # (benchmarks/lm.py, docs/language_models.md). Batch norm of W e would remove that scale.
        self.vocab_size = vocab_size

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CharLM":
        return cls(**config)

    @property
    def cells(self):
        return self.rnn.cells

    def init_state(self, batch_size: int) -> list[State]:
        return self.rnn.init_state(batch_size)

    def forward(
        self,
        inputs: Tensor,
        state: list[State] | None = None,
        step: int = 0,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, list[State]]:
        """``inputs`` ``[T, B]`` character ids → logits ``[T, B, V]`` and the final state.

        ``step`` is the time index of the first position (batch-norm cells pick statistics with it).
        """
        if inputs.dim() != 2:
            raise ValueError(f"CharLM expects character ids of shape [T, B], got {tuple(inputs.shape)}")
        out, state = self.rnn(self.embedding(inputs), lengths=lengths, state=state, step=step)
        return self.decoder(out), state

    def step(self, inputs: Tensor, state: list[State] | None, step: int) -> tuple[Tensor, list[State]]:
        """One character per sequence: ``inputs`` ``[B]`` → logits ``[B, V]`` and the new state."""
        h, state = self.rnn.step(self.embedding(inputs), state, step)
        return self.decoder(h), state
