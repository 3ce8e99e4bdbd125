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

from typing import Any

import torch
import torch.nn.functional as F

from bnrhn.cells import legacy_statistics
from bnrhn.data.text import CharCorpus, CharVocab, TBPTTBatches, check_seq_len
from bnrhn.lm.evaluate import LMScore, evaluate_ids
from bnrhn.models.char_lm import CharLM

__all__ = ["CharLMTask", "load_char_lm", "LoadedLM", "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "bnrhn.char_lm"
# CharLM's own arguments; every other key of its saved config is a cell option
_LM_ARGS = ("vocab_size", "cell", "hidden_size", "num_layers", "embed_size", "input_dropout", "dropout",
            "recurrent_dropout", "tie_weights")


def _detach(state):
    return [tuple(t.detach() for t in s) for s in state]


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

    def train_step(self, window) -> tuple[torch.Tensor, int]:
        if window.index == 0 or not self.carry_state:  # a new epoch starts every stream from the zero state
            self.carried = None
        x = window.inputs.to(self.device)
        y = window.targets.to(self.device)
        logits, state = self.model(x, state=self.carried, step=0)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
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
        self.carried = None if carried is None else [tuple(t.to(self.device) for t in s) for s in carried]

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
    from bnrhn.training.checkpoint import check_finite_weights, load_checkpoint

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
