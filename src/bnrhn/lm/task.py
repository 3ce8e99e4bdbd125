"""Training a character language model with :class:`bnrhn.training.Trainer`: the task object, the
checkpoint format and loading a trained model back.

Truncated backpropagation through time (TBPTT). The training text is cut into B contiguous streams
(:class:`bnrhn.data.text.TBPTTBatches`); batch k is window k of every stream, so consecutive batches
continue each stream. The hidden state at the end of a window is carried, detached, into the next one
(the gradient is truncated at window boundaries, the state is not) and reset to zero at the start of
every epoch. The carried state is part of the task's ``state_dict``, so resuming from a checkpoint
continues the streams exactly where they were. With ``carry_state=False`` every window starts from the
zero state instead (fixed-length training sequences, as in Cooijmans et al. and the BN-RHN paper), and
evaluation does the same so that it measures the model the way it was trained.

Why this option exists: a highway cell with a *free* carry gate (``bn_rhn``) computes
s_t = h ⊙ t + s_{t−1} ⊙ c with c and t independent, so nothing bounds ‖s‖ when c + t > 1, and batch norm of
R s is blind to the scale of s. Carried over a stream of tens of thousands of characters the state
(which is also the output that feeds the softmax) can grow without limit; on tiny Shakespeare it did
(docs/language_models.md). A coupled carry (c = 1 − t) makes s a convex combination and bounded;
the LSTM emits h = σ(o) ⊙ tanh(·) ∈ (−1, 1) whatever its memory does.

Batch norm and TBPTT. The time index t passed to the cells (which picks batch-norm statistics) is the
position *inside* the window, 0..L−1, in training, in evaluation and (modulo L) in sampling. This is
the setting of Cooijmans et al. on PTB characters (windows of 100 steps, statistics per step within a
window), it keeps exactly L statistics slots each fed by every batch, and evaluation sees the same
statistics as training. The alternative, a time index counted from the start of the stream, would put
almost every step of an epoch into the last slot (t ≥ T_max), i.e. shared statistics in disguise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bnrhn.cells import legacy_statistics
from bnrhn.data.text import CharCorpus, CharVocab, TBPTTBatches, TextWindow, check_seq_len
from bnrhn.lm.evaluate import LMScore, evaluate_ids
from bnrhn.models.char_lm import CharLM

__all__ = ["CharLMTask", "load_char_lm", "LoadedLM", "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "bnrhn.char_lm"
# CharLM's own arguments; every other key of its saved config is a cell option
_LM_ARGS = ("vocab_size", "cell", "hidden_size", "num_layers", "embed_size", "input_dropout", "dropout",
            "recurrent_dropout", "tie_weights")


def _detach(state):
    return [tuple(t.detach() for t in s) for s in state]


@dataclass(frozen=True)
class StreamShard:
    """One data-parallel rank's part of a training window: streams ``rank``, ``rank + N``, ``rank + 2N``, ...
    of the B streams (N = ``world_size``)."""

    window: TextWindow
    rank: int
    world_size: int

    @property
    def num_targets(self) -> int:
        return self.window.num_targets


def _all_streams(state: list, rank: int, world_size: int, streams: int) -> list:
    """Every rank's carried state rows put back into the one-process layout ``[B, ...]`` (this rank holds
    rows ``rank::world_size``): one ``all_gather`` of the layers' tensors side by side. The ranks may hold
    one row more or less, so each sends its rows padded to ⌈B / N⌉."""
    flat = [t for s in state for t in s]
    mine = torch.cat([t.reshape(t.shape[0], -1) for t in flat], 1)
    rows = -(-streams // world_size)
    padded = mine.new_zeros((rows, mine.shape[1]))
    padded[: mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    full = mine.new_empty((streams, mine.shape[1]))
    for r, part in enumerate(parts):
        full[r::world_size] = part[: len(range(r, streams, world_size))]
    out, col = [], 0
    for s in state:
        layer = []
        for t in s:
            width = t[0].numel()
            # contiguous: cuDNN's recurrent kernels refuse strided initial states
            layer.append(full[:, col : col + width].reshape(streams, *t.shape[1:]).contiguous())
            col += width
        out.append(tuple(layer))
    return out


class CharLMTask:
    """The task object that :class:`bnrhn.training.Trainer` drives (see the module docstring).

    Args:
        model: a :class:`CharLM`.
        corpus: the :class:`CharCorpus` (its vocabulary is saved with the model).
        batch_size: B parallel streams.
        seq_len: L, the TBPTT window.
        eval_batch_size: streams for validation (default: B).
        valid_chars: validate during training on the first ``valid_chars`` characters of the validation
            text only (cheaper frequent validations); ``evaluate("valid")`` always uses all of it.
        carry_state: carry the hidden state across windows (True) or start each window from zero.
        device: where the model lives.

    Data-parallel training (``torchrun``): :meth:`shard` gives each rank every N-th stream of a window; each
    rank runs its streams from their carried state, and the ranks then gather the new carried state of all
    B streams (one ``all_gather`` per step), so that every rank holds the state of one process. A
    checkpoint therefore resumes with any number of processes, one included.
    """

    def __init__(self, model: CharLM, corpus: CharCorpus, batch_size: int = 32, seq_len: int = 100,
                 eval_batch_size: int | None = None, device: str | torch.device = "cpu",
                 extra_config: dict[str, Any] | None = None, valid_chars: int | None = None,
                 carry_state: bool = True) -> None:
        check_seq_len(seq_len)
        if model.vocab_size != len(corpus.vocab):
            raise ValueError(f"model vocabulary size {model.vocab_size} != corpus vocabulary size {len(corpus.vocab)}")
        self.model = model
        self.corpus = corpus
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.eval_batch_size = eval_batch_size or batch_size
        self.device = torch.device(device)
        self.train_batches = TBPTTBatches(corpus.train, batch_size, seq_len)
        self.extra_config = dict(extra_config or {})
        if valid_chars is not None and valid_chars < 2:
            raise ValueError(f"valid_chars must be ≥ 2 (or None for the whole validation text), got {valid_chars}")
        self.valid_chars = valid_chars
        self.carry_state = bool(carry_state)
        self.carried: list | None = None  # state after the last training window (detached)

    # -- Trainer interface --------------------------------------------------------------------------
    def num_batches(self, epoch: int) -> int:
        return len(self.train_batches)

    def batches(self, epoch: int, start: int = 0):
        # The order is the text's order (TBPTT needs it); it is the same for every epoch.
        for k in range(start, len(self.train_batches)):
            yield self.train_batches.window(k)

    def shard(self, window: TextWindow, rank: int, world_size: int) -> StreamShard:
        """Rank ``rank``'s streams of ``window`` (every ``world_size``-th)."""
        if window.inputs.shape[1] < world_size:
            raise ValueError(f"a window of {window.inputs.shape[1]} streams cannot be shared by {world_size} processes")
        rows = slice(rank, None, world_size)
        part = TextWindow(window.inputs[:, rows], window.targets[:, rows],
                          None if window.lengths is None else window.lengths[rows], window.index)
        return StreamShard(part, rank, world_size)

    def train_step(self, batch: TextWindow | StreamShard) -> tuple[torch.Tensor, int]:
        """(mean loss, targets) of a window: all B streams in one process, or one rank's shard of them."""
        window = batch.window if isinstance(batch, StreamShard) else batch
        if window.index == 0 or not self.carry_state:  # a new epoch starts every stream from the zero state
            self.carried = None
        state = self.carried
        if isinstance(batch, StreamShard) and state is not None:
            state = [tuple(t[batch.rank :: batch.world_size].contiguous() for t in s) for s in state]
        x = window.inputs.to(self.device)
        y = window.targets.to(self.device)
        logits, state = self.model(x, state=state, step=0)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if not self.carry_state:  # the next window starts from zero: nothing to carry (or to save)
            self.carried = None
        elif isinstance(batch, StreamShard):
            self.carried = _all_streams(_detach(state), batch.rank, batch.world_size, self.batch_size)
        else:
            self.carried = _detach(state)
        return loss, window.num_targets

    def validate(self) -> dict[str, float]:
        ids = self.corpus.valid if self.valid_chars is None else self.corpus.valid[: self.valid_chars]
        score = evaluate_ids(self.model, ids, self.eval_batch_size, self.seq_len, carry_state=self.carry_state)
        return {"loss": score.loss, "bpc": score.bpc, "perplexity": score.perplexity}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": CHECKPOINT_KIND,
            "vocab": self.corpus.vocab.to_dict(),
            "model_config": dict(self.model.config),
            "corpus": {"source": self.corpus.source, "transform": self.corpus.transform, **self.corpus.summary()},
            "train_config": self.config_dict(),
            "carried": None if self.carried is None else [[t.cpu() for t in s] for s in self.carried],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if CharVocab.from_dict(d["vocab"]) != self.corpus.vocab:
            raise ValueError("the checkpoint's character vocabulary differs from this corpus's; resume with the same text")
        carried = d.get("carried")
        dtype = next(self.model.parameters()).dtype  # a resumed run may change --precision (fp32 ↔ fp64)
        self.carried = None if carried is None else [tuple(t.to(self.device, dtype) for t in s) for s in carried]

    def config_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "eval_batch_size": self.eval_batch_size,
            "valid_chars": self.valid_chars,
            "carry_state": self.carry_state,
            "batches_per_epoch": len(self.train_batches),
            "model": dict(self.model.config),
            "corpus": {"source": self.corpus.source, "transform": self.corpus.transform, **self.corpus.summary()},
            **self.extra_config,
        }

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, split: str = "valid") -> LMScore:
        ids = self.corpus.splits().get(split)
        if ids is None:
            raise ValueError(f"the corpus has no {split!r} split")
        return evaluate_ids(self.model, ids, self.eval_batch_size, self.seq_len, carry_state=self.carry_state)


# --------------------------------------------------------------------------------------------------
class LoadedLM:
    """A trained model with its vocabulary and the settings it was trained with."""

    def __init__(self, model: CharLM, vocab: CharVocab, task_state: dict[str, Any], payload: dict[str, Any]) -> None:
        self.model = model
        self.vocab = vocab
        self.task_state = task_state
        self.train_config = task_state.get("train_config", {})
        self.corpus_info = task_state.get("corpus", {})
        self.payload = payload

    @property
    def seq_len(self) -> int:
        return int(self.train_config.get("seq_len", 100))

    @property
    def carry_state(self) -> bool:
        return bool(self.train_config.get("carry_state", True))

    @property
    def transform(self) -> dict | None:
        return self.corpus_info.get("transform")


def load_char_lm(path, device: str | torch.device = "cpu") -> LoadedLM:
    """Load a character LM checkpoint (``last.pt`` / ``best.pt`` of ``bnrhn lm train``) in eval mode."""
    from bnrhn.devices import resolve_device
    from bnrhn.training.checkpoint import check_finite_weights, load_checkpoint

    device = resolve_device(str(device))  # a missing GPU fails before the file is read
    payload = load_checkpoint(path)
    task = payload.get("task") or {}
    if not isinstance(task, dict) or task.get("kind") != CHECKPOINT_KIND:
        raise ValueError(
            f"{path}: not a character language-model checkpoint (written by another task: "
            f"{task.get('kind') if isinstance(task, dict) else type(task).__name__!r})"
        )
    check_finite_weights(payload["model"], path)
    vocab = CharVocab.from_dict(task["vocab"])
    config = dict(task["model_config"])
    extra = {k: v for k, v in config.items() if k not in _LM_ARGS}
    model = CharLM.from_config({**config, **legacy_statistics(config.get("cell", "lstm"), extra)})
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: the model weights do not match the saved configuration: {exc}") from None
    model.to(device).eval()
    return LoadedLM(model, vocab, task, payload)
