"""Image captioners over any registered recurrent cell.

Both models read frozen CNN features and generate ``w_1 .. w_n <end>`` one word at a time; both share
the decoding interface used by :mod:`bnrhn.decoding`:

    state = model.start(features)                  # batch of B images
    logp, state = model.step(tokens, state)        # tokens [B] = previous words → log p(w_t | ...) [B, V]
    state = model.select(state, index)             # reorder / repeat images (beam search)

Image features are standardised per channel with the training set's mean and standard deviation
(``feature_norm="standardize"``, saved in the model's buffers; ``"none"`` leaves them raw): frozen CNN
features share a large common component, and without this a plain LSTM decoder is slow to pick up
the differences between images.

**Show and Tell** (Vinyals et al. 2015), :class:`ShowTell`. With image feature v (pooled, F-d), word
embedding E and the recurrent decoder f (any cell, ``num_layers`` layers):

    x_0 = W_I v + b_I                     (image embedding; the first input only, never repeated)
    x_1 = E[<start>],  x_t = E[w_{t−1}]   (teacher forcing: the reference words)
    h_t = f(x_t, h_{t−1}),  p(w_t | w_<t, v) = softmax(W_o h_t + b_o)      t ≥ 1

Time index t (step 0 = the image) is what batch-norm cells use to pick their per-step statistics, in
training (whole sequences through :meth:`bnrhn.nn.Recurrent.forward`) and in decoding (one
:meth:`~bnrhn.nn.Recurrent.step` at a time with ``step=t``) alike.

**Show, Attend and Tell** (Xu et al. 2015, soft attention), :class:`ShowAttendTell`. With the grid
a_1..a_N (F-d each) and h_{t−1} the top layer's output:

    h_0, c_0 = tanh(W_init mean_i a_i)                       (one map per state tensor and layer)
    e_{t,i} = w_α · tanh(W_a a_i + W_h h_{t−1} + b),  α_t = softmax_i(e_t)
    z_t = β_t Σ_i α_{t,i} a_i,  β_t = σ(W_β h_{t−1} + b_β)    (the gating scalar of §4.2.1)
    h_t = f([E w_{t−1}; z_t], h_{t−1})
    p(w_t) = softmax(L_o(E w_{t−1} + L_h h_t + L_z z_t))     (the deep output layer, eq. 7)

with time index t = 0 for the ``<start>`` input. The loss adds the doubly stochastic regulariser
λ Σ_i (1 − Σ_t α_{t,i})² (eq. 14). Because the input at t depends on h_{t−1}, training runs the step
API too, packed: step t runs only the captions that still have a target, so padded positions cost nothing
and stay out of batch-norm statistics.

Loss: cross-entropy summed over real tokens only (padding masked), divided by their number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnrhn import kernels
from bnrhn.cells import pin_statistics
from bnrhn.cells.packed_rows import pack_order
from bnrhn.nn import Recurrent

MODELS = ("show_tell", "show_attend_tell")


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a captioner (stored in every checkpoint)."""

    model: str = "show_tell"
    vocab_size: int = 0
    feature_size: int = 1280
    grid_size: int = 49
    embed_size: int = 512
    hidden_size: int = 512
    num_layers: int = 1
    cell: str = "lstm"
    cell_options: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.3
    attention_size: int = 512
    alpha_c: float = 1.0  # λ of the doubly stochastic regulariser
    feature_norm: str = "standardize"  # or "none"
    pad_id: int = 0
    start_id: int = 1
    end_id: int = 2
    unk_id: int = 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CaptionerConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class DecodeState:
    """Decoder state while generating: recurrent state, the next time index, model-specific tensors."""

    rnn: list[tuple[Tensor, ...]]
    t: int
    extra: dict[str, Tensor] = field(default_factory=dict)

    def select(self, index: Tensor) -> DecodeState:
        return DecodeState(
            [tuple(s.index_select(0, index) for s in layer) for layer in self.rnn],
            self.t,
            {k: v.index_select(0, index) for k, v in self.extra.items()},
        )


class Captioner(nn.Module):
    """Base class: word embedding, recurrent decoder, shared helpers."""

    needs_grid = False

    def __init__(self, cfg: CaptionerConfig, input_size: int) -> None:
        super().__init__()
        if cfg.vocab_size < 5:
            raise ValueError(f"vocab_size must be ≥ 5 (4 special tokens and a word), got {cfg.vocab_size}")
        cfg.cell_options = pin_statistics(cfg.cell, cfg.cell_options)  # saved with the model: rebuilt as trained
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_size, padding_idx=cfg.pad_id)
        self.rnn = Recurrent(
            cfg.cell, input_size, cfg.hidden_size, num_layers=cfg.num_layers,
            input_dropout=cfg.dropout, dropout=cfg.dropout, **cfg.cell_options,
        )
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[cfg.pad_id].zero_()
        if cfg.feature_norm not in ("standardize", "none"):
            raise ValueError(f"feature_norm must be 'standardize' or 'none', got {cfg.feature_norm!r}")
        # Feature standardisation v ← (v − μ) / σ per channel, with μ, σ from the training images
        # (set_feature_stats); saved with the model so that decoding normalises the same way.
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_size))
        self.register_buffer("feature_std", torch.ones(cfg.feature_size))

    def set_feature_stats(self, features: Tensor) -> None:
        """Per-channel mean and standard deviation of training features ``[N, F]`` or ``[N, G, F]``."""
        if self.cfg.feature_norm == "none":
            return
        flat = features.reshape(-1, features.shape[-1])
        total = torch.zeros(flat.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for s in range(0, flat.shape[0], 65536):  # chunks: a float64 copy of a whole grid would be large
            chunk = flat[s : s + 65536].double()
            total += chunk.sum(0)
            squares += chunk.square().sum(0)
        n = max(flat.shape[0], 2)
        mean = total / n
        var = (squares / n - mean.square()) * n / (n - 1)
        with torch.no_grad():
            self.feature_mean.copy_(mean.float())
            self.feature_std.copy_(var.clamp_min(0).sqrt().float().clamp_min(1e-2))

    def normalize(self, features: Tensor) -> Tensor:
        features = features.to(self.feature_mean.dtype)
        if self.cfg.feature_norm == "none":
            return features
        return (features - self.feature_mean) / self.feature_std

    # -- decoding interface --------------------------------------------------------------------------
    def start(self, features: Tensor) -> DecodeState:
        raise NotImplementedError

    def step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        raise NotImplementedError

    @staticmethod
    def select(state: DecodeState, index: Tensor) -> DecodeState:
        return state.select(index)

    # -- training ---------------------------------------------------------------------------------------
    def loss(self, features: Tensor, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, int, dict[str, float]]:
        """(mean cross-entropy over real tokens [+ regulariser], number of real tokens, parts for logging).

        ``tokens`` ``[B, L]``: ``<start> w_1 .. w_n <end>`` padded with ``<pad>``; ``lengths`` ``[B]``:
        n + 2 per caption.
        """
        raise NotImplementedError

    def teacher_forced_logits(self, features, tokens, lengths) -> tuple[Tensor, Tensor, Tensor]:
        """(logits ``[B, L−1, V]``, targets ``[B, L−1]``, float mask ``[B, L−1]``)."""
        raise NotImplementedError

    def real_token_logits(self, features, tokens, lengths) -> tuple[Tensor, Tensor, Tensor]:
        """(logits ``[N, V]``, targets ``[N]``, bool mask ``[B, L−1]``) of the N real targets (w_1 .. <end> of every
        caption, in row-major order of the mask): :meth:`teacher_forced_logits` at the mask's positions, with
        nothing computed for padding (the output layer and anything after it see N rows, not B·(L−1))."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _check_tokens(tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
    lengths = torch.as_tensor(lengths, device=tokens.device)
    if int(lengths.min()) < 2 or int(lengths.max()) > tokens.shape[1]:
        raise ValueError(f"caption lengths must be in [2, {tokens.shape[1]}], got {lengths.tolist()[:8]}")
    return tokens, lengths


def _target_mask(tokens: Tensor, lengths: Tensor) -> Tensor:
    """[B, L−1] bool: True where tokens[:, 1:] is a real target (w_1 .. <end>), from the lengths alone."""
    return torch.arange(tokens.shape[1] - 1, device=tokens.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)


class ShowTell(Captioner):
    """Show and Tell (see the module docstring for the equations)."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        super().__init__(cfg, cfg.embed_size)
        self.image_embed = nn.Linear(cfg.feature_size, cfg.embed_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def _hidden(self, features: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Top-layer outputs ``[L, B, H]`` at steps 1..L (step 0, the image, produces no word)."""
        img = self.image_embed(self.drop(self.normalize(features))).unsqueeze(0)  # [1, B, E]
        words = self.embed(tokens[:, :-1]).transpose(0, 1)  # <start> w_1 .. : [L−1, B, E]
        x = torch.cat([img, words], 0)  # [L, B, E]
        out, _ = self.rnn(x, lengths=lengths, step=0)
        return out[1:]  # [L−1, B, H]: predictions of w_1 .. <end>

    def teacher_forced_logits(self, features, tokens, lengths):
        tokens, lengths = _check_tokens(tokens, lengths)
        h = self._hidden(features, tokens, lengths).transpose(0, 1)  # [B, L−1, H]
        return self.out(h), tokens[:, 1:], _target_mask(tokens, lengths).to(h.dtype)

    def real_token_logits(self, features, tokens, lengths):
        tokens, lengths = _check_tokens(tokens, lengths)
        h = self._hidden(features, tokens, lengths).transpose(0, 1)  # [B, L−1, H]
        valid = _target_mask(tokens, lengths)
        return self.out(h[valid]), tokens[:, 1:][valid], valid

    def loss(self, features, tokens, lengths):
        # Only real tokens reach the output layer: no logits are computed for padding. The hidden states
        # carry the runner's variational output dropout already: it is the one dropout on the decoder output.
        logits, targets, valid = self.real_token_logits(features, tokens, lengths)
        n = int(valid.sum())
        ce = F.cross_entropy(logits, targets, reduction="sum") / n
        return ce, n, {"ce": float(ce.detach())}

    def start(self, features: Tensor) -> DecodeState:
        x0 = self.image_embed(self.normalize(features))
        _, state = self.rnn.step(x0, None, step=0)
        return DecodeState(state, 1)

    def step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        if self.training or tokens.numel() < 32:
            h, rnn_state = self.rnn.step(self.embed(tokens), state.rnn, step=state.t)
        else:  # many beams share few distinct words: project each distinct word's embedding once
            words, rows = tokens.unique(return_inverse=True)
            h, rnn_state = self.rnn.step(self.embed(words), state.rnn, step=state.t, rows=rows)
        return self.out(h).log_softmax(-1), DecodeState(rnn_state, state.t + 1, state.extra)


class ShowAttendTell(Captioner):
    """Show, Attend and Tell with soft attention (see the module docstring for the equations)."""

    needs_grid = True

    def __init__(self, cfg: CaptionerConfig) -> None:
        super().__init__(cfg, cfg.embed_size + cfg.feature_size)
        F_, H, A, E = cfg.feature_size, cfg.hidden_size, cfg.attention_size, cfg.embed_size
        n_state = len(self.rnn.cells[0].state_names)
        self.init_maps = nn.ModuleList(nn.Linear(F_, H) for _ in range(cfg.num_layers * n_state))
        self.att_feat = nn.Linear(F_, A)
        self.att_hidden = nn.Linear(H, A, bias=False)
        self.att_score = nn.Linear(A, 1)
        self.gate = nn.Linear(H, 1)
        self.out_h = nn.Linear(H, E)
        self.out_z = nn.Linear(F_, E, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(E, cfg.vocab_size)

    def _init(self, grid: Tensor) -> tuple[list[tuple[Tensor, ...]], Tensor]:
        if grid.dim() != 3:
            raise ValueError(f"Show, Attend and Tell needs grid features [B, N, F], got shape {tuple(grid.shape)}")
        mean = grid.mean(1)
        n_state = len(self.rnn.cells[0].state_names)
        maps = iter(self.init_maps)
        state = [tuple(torch.tanh(next(maps)(mean)) for _ in range(n_state)) for _ in range(self.cfg.num_layers)]
        return state, self.att_feat(grid)

    def _attend(self, grid: Tensor, keys: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        e = self.att_score(kernels.tanh(keys + self.att_hidden(h).unsqueeze(1))).squeeze(-1)  # [B, N]
        alpha = e.softmax(-1)
        z = torch.bmm(alpha.unsqueeze(1), grid).squeeze(1) * torch.sigmoid(self.gate(h))  # [B, F]
        return z, alpha

    def _logits(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        return self.out(self.drop(emb + self.out_h(h) + self.out_z(z)))

    def _run(self, grid, tokens, lengths):
        """Teacher-forced pass: (deep-output pre-activations [B, L−1, E], attention [B, L−1, N], mask); zeros
        past each caption's end. Run as packed sequences are (:meth:`bnrhn.nn.Recurrent.forward`): the batch
        sorted by length, step t computes only the n_t captions that still have a target, as a full batch of
        n_t rows — nothing is computed for padding, batch-norm statistics are those of the n_t real positions
        (as masked statistics would be), and the cells can take their full-batch fast paths."""
        tokens, lengths = _check_tokens(tokens, lengths)
        grid = self.normalize(grid)
        state, keys = self._init(self.drop(grid))
        B, L = tokens.shape
        masks = self.rnn.sample_dropout_masks(B)
        emb = self.embed(tokens[:, :-1])  # [B, L−1, E]
        valid = _target_mask(tokens, lengths)  # [B, L−1]
        order, inverse, active = pack_order(valid)  # n_t: non-increasing once sorted
        grid, keys, emb = grid[order], keys[order], emb[order]
        state = [tuple(a[order] for a in layer) for layer in state]
        masks = masks.rows(order) if masks is not None else None
        # batch norm with statistics over several processes: every process must run every step (with no rows
        # if none of its captions reaches it), or their reductions would no longer pair up
        synchronized = any(getattr(m, "synchronized", False) for m in self.rnn.modules())
        outs, alphas = [], []
        for t in range(L - 1):
            n = active[t]
            if n == 0 and not synchronized:  # no caption reaches this far (tokens padded past the longest)
                outs.append(emb.new_zeros(B, emb.shape[2]))
                alphas.append(keys.new_zeros(B, keys.shape[1]))
                continue
            state = [tuple(a[:n] for a in layer) for layer in state]  # finished captions drop out
            z, alpha = self._attend(grid[:n], keys[:n], state[-1][0])
            _, state = self.rnn.step(torch.cat([emb[:n, t], z], 1), state, step=t,
                                     dropout_masks=masks.rows(slice(n)) if masks is not None else None)
            # the deep output reads the state before the runner's output dropout: its own dropout (in
            # loss()) is the one on the decoder output, as in Xu et al.
            outs.append(F.pad(emb[:n, t] + self.out_h(state[-1][0]) + self.out_z(z), (0, 0, 0, B - n)))
            alphas.append(F.pad(alpha, (0, 0, 0, B - n)))
        return torch.stack(outs, 1)[inverse], torch.stack(alphas, 1)[inverse], valid

    def teacher_forced_logits(self, features, tokens, lengths):
        pre, _, valid = self._run(features, tokens, lengths)
        return self.out(pre), tokens[:, 1:], valid.to(pre.dtype)

    def real_token_logits(self, features, tokens, lengths):
        pre, _, valid = self._run(features, tokens, lengths)
        return self.out(pre[valid]), tokens[:, 1:][valid], valid

    def loss(self, features, tokens, lengths):
        pre, alphas, valid = self._run(features, tokens, lengths)
        targets = tokens[:, 1:]
        logits = self.out(self.drop(pre[valid]))
        n = int(valid.sum())
        ce = F.cross_entropy(logits, targets[valid], reduction="sum") / n
        coverage = (alphas * valid.unsqueeze(-1).to(alphas.dtype)).sum(1)  # Σ_t α_{t,i}: [B, N]
        # per image beside a per-word cross-entropy: ≈ T× heavier relative to the likelihood than in Xu et al.'s
        # eq. 14 (whose −log p is summed over the caption). Kept by measurement: dividing the penalty by the word
        # count instead gave validation CIDEr 0.381 against 0.426 after 300 steps (Flickr8k, Lite2 9×9 grid, LSTM)
        reg = self.cfg.alpha_c * (1.0 - coverage).square().sum(1).mean()
        return ce + reg, n, {"ce": float(ce.detach()), "attention_reg": float(reg.detach())}

    @torch.no_grad()
    def attention_maps(self, features: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        """The attention weights α_t over the grid while the model reads the given captions (teacher forced,
        in eval mode: no dropout, batch-norm population statistics, as in decoding): ``[B, L−1, N]``, row k
        the α_t with which the model predicted ``tokens[:, k+1]`` (w_1 .. <end>), zeros past each caption's
        end. Each real row sums to 1 and equals the α of :meth:`step` when it is fed the same words.

        ``tokens`` / ``lengths`` as in :meth:`loss`. The model is put in eval mode for the pass and returned
        to the mode it was in."""
        was_training = self.training
        self.eval()
        try:
            _, alphas, valid = self._run(features, tokens, lengths)
        finally:
            self.train(was_training)
        return alphas * valid.unsqueeze(-1).to(alphas.dtype)

    def start(self, features: Tensor) -> DecodeState:
        grid = self.normalize(features)
        state, keys = self._init(grid)
        return DecodeState(state, 0, {"grid": grid, "keys": keys})

    def step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        grid, keys = state.extra["grid"], state.extra["keys"]
        emb = self.embed(tokens)
        z, alpha = self._attend(grid, keys, state.rnn[-1][0])
        h, rnn_state = self.rnn.step(torch.cat([emb, z], 1), state.rnn, step=state.t)
        logp = self._logits(emb, h, z).log_softmax(-1)
        return logp, DecodeState(rnn_state, state.t + 1, {**state.extra, "alpha": alpha})


def build_captioner(cfg: CaptionerConfig | dict) -> Captioner:
    """A captioner from its config (a :class:`CaptionerConfig` or its dict)."""
    if isinstance(cfg, dict):
        cfg = CaptionerConfig.from_dict(cfg)
    if cfg.model == "show_tell":
        return ShowTell(cfg)
    if cfg.model == "show_attend_tell":
        return ShowAttendTell(cfg)
    raise ValueError(f"unknown captioning model {cfg.model!r}; choose from {MODELS}")
