"""Does batch norm see in training what it sees at inference? The batch-composition diagnostic.

A batch-norm decoder is trained on batch statistics and decodes with population statistics. If the
batch statistics carry information the model cannot have at inference, the training loss drops but
the gain does not transfer. For a captioner, the teacher-forced loss per word position k is measured
on the same captions three ways (Ioffe & Szegedy's two modes, with two ways of forming batches):

- ``sorted``: batch statistics, batches formed as length-bucketed training batches are
  (:func:`bnrhn.captioning.data.bucketed_batches` with its default bucket: runs of batches sorted
  by caption length);
- ``random``: batch statistics, each batch a random sample of the captions;
- ``population``: eval mode, the population statistics that decoding uses.

and, optionally, ``precise``: eval mode after the population statistics were recomputed with the
frozen weights over K random training batches (cumulative averages: "precise BN").

With masked per-step statistics, the rows still valid at step t of a sorted batch are captions of
nearly one length, so the statistics of step t say when they end. A model that reads this cue has
``sorted`` far below ``random`` and ``population``; a model that does not has all three equal.
Batch statistics here are computed without dropout and without touching the model's population
statistics (a copy is used, its buffers restored after every batch).

For a character LM (contiguous streams of equal-length windows, only the last window of a text
shorter; nothing is sorted by length) the modes are ``batch`` (batch statistics over the evaluation
streams) and ``population``.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnrhn.cells.base import RecurrentCell
from bnrhn.layers.seq_batchnorm import SequenceBatchNorm, estimating_population_statistics, uses_batch_statistics

__all__ = ["ModeLoss", "LeakReport", "batch_statistics_model", "caption_leak", "lm_leak",
           "recompute_population_statistics", "leak_summary"]


@dataclass
class ModeLoss:
    """Teacher-forced loss of one mode: total (nats per token) and per position (k = 1, 2, …)."""

    loss: float
    per_step_loss: list[float]
    per_step_tokens: list[int]
    valid_rows: list[float]  # mean number of valid rows at each position, over the batches that reach it


@dataclass
class LeakReport:
    kind: str  # "captioner" or "lm"
    split: str
    batch_size: int
    sequences: int
    modes: dict[str, ModeLoss]
    train_loss: float | None = None  # population-statistics loss on training sequences (the gap's other end)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = leak_summary(self)
        return d


def leak_summary(report: LeakReport) -> dict[str, float]:
    """The numbers the acceptance reads: each mode's loss, the relative gaps, the generalisation gap."""
    m = {k: v.loss for k, v in report.modes.items()}
    out = {f"loss_{k}": v for k, v in m.items()}
    ref = m.get("random", m.get("batch"))
    if "sorted" in m and ref:
        out["sorted_vs_random"] = m["sorted"] / ref - 1.0
    if "population" in m and ref:
        out["population_vs_random" if "random" in m else "population_vs_batch"] = m["population"] / ref - 1.0
    if report.train_loss is not None and "population" in m:
        out["train_loss_population"] = report.train_loss
        out["generalisation_gap"] = m["population"] - report.train_loss
    return out


# -- batch statistics without side effects -------------------------------------------------------------------
def batch_statistics_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode (no dropout) whose cells and batch norms run in training mode."""
    m = copy.deepcopy(model)
    _batch_statistics_only(m)
    return m


def _batch_statistics_only(model: nn.Module) -> None:
    """Eval mode (no dropout) except the cells and their batch norms, which use batch statistics."""
    model.eval()
    for mod in model.modules():
        if isinstance(mod, (RecurrentCell, SequenceBatchNorm)):
            mod.train()


@contextmanager
def _buffers_restored(model: nn.Module):
    """Population statistics (and every other buffer) as they were before the block."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])


@torch.no_grad()
def recompute_population_statistics(model: nn.Module, run_batch, batches) -> int:
    """"Precise BN": replace every :class:`SequenceBatchNorm`'s population statistics by the plain average
    of the batch statistics of ``batches`` (``run_batch(model, batch)`` runs one forward pass), with the
    weights frozen and no dropout. Returns the number of batches used. ``model`` is changed in place and
    left in eval mode."""
    was = model.training
    _batch_statistics_only(model)
    n = 0
    try:
        with estimating_population_statistics(model):
            for batch in batches:
                run_batch(model, batch)
                n += 1
    finally:
        model.eval()
        if was:
            model.train()
    return n


# -- captioners ------------------------------------------------------------------------------------------------
def _caption_batch_losses(model, feats: Tensor, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Per position k: (summed cross-entropy, number of tokens = valid rows) for one batch."""
    logits, targets, mask = model.teacher_forced_logits(feats, tokens, lengths)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask  # [B, L−1]
    return ce.double().sum(0).cpu(), mask.sum(0).long().cpu()  # summed on the host, whatever the device


def _accumulate(model, batches, inputs, max_positions: int, restore: bool) -> ModeLoss:
    loss = torch.zeros(max_positions, dtype=torch.float64)
    tokens = torch.zeros(max_positions, dtype=torch.long)
    reached = torch.zeros(max_positions, dtype=torch.long)  # batches with a valid row at position k
    for idx in batches:
        feats, toks, lengths = inputs(idx)
        if restore:
            with _buffers_restored(model):
                s, n = _caption_batch_losses(model, feats, toks, lengths)
        else:
            s, n = _caption_batch_losses(model, feats, toks, lengths)
        loss[: s.numel()] += s
        tokens[: n.numel()] += n
        reached[: n.numel()] += (n > 0).long()
    k = int((tokens > 0).sum())
    return ModeLoss(
        loss=float(loss.sum() / tokens.sum().clamp_min(1)),
        per_step_loss=[float(a / b) if b else math.nan for a, b in zip(loss[:k], tokens[:k])],
        per_step_tokens=[int(b) for b in tokens[:k]],
        valid_rows=[float(b) / max(int(r), 1) for b, r in zip(tokens[:k], reached[:k])],
    )


@torch.no_grad()
def caption_leak(model, caps, split, train_caps=None, train_split=None, batch_size: int = 64, seed: int = 0,
                 precise_batches: int = 0, train_sample: int = 5000, split_name: str = "val") -> LeakReport:
    """The diagnostic for a captioner (a :class:`~bnrhn.models.Captioner`) on captions ``caps``
    (:class:`~bnrhn.captioning.data.CaptionTensors`) of the images ``split``
    (:class:`~bnrhn.captioning.data.SplitFeatures`).

    ``train_caps``/``train_split`` (optional) give the population-statistics loss on up to ``train_sample``
    training captions (the generalisation gap) and, with ``precise_batches`` K > 0, the batches over which
    the ``precise`` mode recomputes the population statistics."""
    from bnrhn.captioning.data import bucketed_batches

    if batch_size < 2:
        raise ValueError(f"batch_size must be ≥ 2 (batch statistics need two rows), got {batch_size}")
    if caps is None or len(caps) == 0:
        raise ValueError(f"the {split_name} split has no captions to measure")

    def inputs_of(c, s):
        def inputs(idx):
            lengths = c.lengths[idx]
            p = next(model.parameters())
            return (s.batch(c.image[idx]).to(p.device, p.dtype), c.tokens[idx, : int(lengths.max())].to(p.device),
                    lengths.to(p.device))
        return inputs

    inputs = inputs_of(caps, split)
    P = caps.tokens.shape[1] - 1
    modes: dict[str, ModeLoss] = {}
    notes: list[str] = []
    pop = copy.deepcopy(model).eval()
    has_bn = uses_batch_statistics(model)
    if has_bn:
        bm = batch_statistics_model(model)
        modes["sorted"] = _accumulate(bm, bucketed_batches(caps.lengths, batch_size, seed, 0), inputs, P, True)
        modes["random"] = _accumulate(bm, bucketed_batches(caps.lengths, batch_size, seed, 0, bucket=1), inputs, P, True)
    else:
        notes.append("no batch normalisation: batch statistics do not exist, only the eval-mode loss is measured")
    plain = [torch.arange(s, min(len(caps), s + 256)) for s in range(0, len(caps), 256)]
    modes["population"] = _accumulate(pop, plain, inputs, P, False)
    train_loss = None
    if train_caps is not None and train_split is not None and len(train_caps):
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_caps), generator=g)[:train_sample]
        tr_inputs = inputs_of(train_caps, train_split)
        chunks = [pick[s : s + 256] for s in range(0, len(pick), 256)]
        train_loss = _accumulate(pop, chunks, tr_inputs, train_caps.tokens.shape[1] - 1, False).loss
        if has_bn and precise_batches > 0:
            batches = bucketed_batches(train_caps.lengths, batch_size, seed + 1, 0, bucket=1)[:precise_batches]
            precise = copy.deepcopy(model)
            n = recompute_population_statistics(
                precise, lambda m, idx: m.teacher_forced_logits(*tr_inputs(idx)), batches)
            modes["precise"] = _accumulate(precise.eval(), plain, inputs, P, False)
            notes.append(f"precise: population statistics recomputed over {n} random training batches of {batch_size}")
    return LeakReport("captioner", split_name, batch_size, len(caps), modes, train_loss, notes)


# -- character language models -------------------------------------------------------------------------------
@torch.no_grad()
def lm_leak(model, ids: Tensor, batch_size: int = 64, seq_len: int = 100, carry_state: bool = True,
            split_name: str = "valid") -> LeakReport:
    """The diagnostic for a :class:`~bnrhn.models.char_lm.CharLM` on the character ids ``ids``: the loss per
    window position with batch statistics over the evaluation streams and with population statistics."""
    from bnrhn.data.text import TBPTTBatches

    def run(m, restore: bool) -> ModeLoss:
        loss = torch.zeros(seq_len, dtype=torch.float64)
        count = torch.zeros(seq_len, dtype=torch.long)
        reached = torch.zeros(seq_len, dtype=torch.long)
        state = None
        device = next(m.parameters()).device
        for win in TBPTTBatches(ids, batch_size, seq_len, full=True):
            x, y = win.inputs.to(device), win.targets.to(device)
            lengths = None if win.lengths is None else win.lengths.clamp(min=1).to(device)
            if restore:
                with _buffers_restored(m):
                    logits, state = m(x, state=state if carry_state else None, step=0, lengths=lengths)
            else:
                logits, state = m(x, state=state if carry_state else None, step=0, lengths=lengths)
            nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").cpu()  # logits [T, V, B] → [T, B]
            y = y.cpu()
            valid = torch.ones_like(y, dtype=torch.bool) if win.lengths is None else (
                torch.arange(x.shape[0]).unsqueeze(1) < win.lengths.unsqueeze(0))
            T = x.shape[0]
            loss[:T] += (nll * valid).double().sum(1)
            count[:T] += valid.sum(1)
            reached[:T] += (valid.sum(1) > 0).long()
            state = [tuple(t.detach() for t in s) for s in state]
        k = int((count > 0).sum())
        return ModeLoss(float(loss.sum() / count.sum().clamp_min(1)),
                        [float(a / b) for a, b in zip(loss[:k], count[:k])], [int(b) for b in count[:k]],
                        [float(b) / max(int(r), 1) for b, r in zip(count[:k], reached[:k])])

    modes: dict[str, ModeLoss] = {}
    notes = ["language-model batches are contiguous streams of equal-length windows (nothing sorted by length): "
             "no sorted/random modes"]
    if uses_batch_statistics(model):
        modes["batch"] = run(batch_statistics_model(model), True)
    else:
        notes.append("no batch normalisation: only the eval-mode loss is measured")
    modes["population"] = run(copy.deepcopy(model).eval(), False)
    return LeakReport("lm", split_name, batch_size, int(ids.numel()), modes, None, notes)
