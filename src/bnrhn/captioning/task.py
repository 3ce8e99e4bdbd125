"""The captioning task for :class:`bnrhn.training.Trainer`: batches, the training step, validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bnrhn.captioning.config import CaptionConfig
from bnrhn.captioning.data import CaptionTensors, SplitFeatures, bucketed_batches
from bnrhn.captioning.scoring import VALIDATION_METRICS, score_captions
from bnrhn.data.captions import CaptionDataset
from bnrhn.data.vocab import Vocabulary
from bnrhn.decoding import bad_ending_ids, decode
from bnrhn.layers.seq_batchnorm import uses_batch_statistics

if TYPE_CHECKING:
    from bnrhn.captioning.scst import SelfCritical

CHECKPOINT_KIND = "bnrhn-captioner"


def resolve_batching(batching: str, model) -> str:
    """``auto`` → ``random`` when the model normalises with batch statistics, else ``bucketed``.

    Length-sorted batches let batch statistics tell a caption when it ends (the rows still valid at
    step t are the batch's composition); inference has no batch to read, so the cue does not transfer."""
    if batching != "auto":
        return batching
    return "random" if uses_batch_statistics(model) else "bucketed"


@dataclass(frozen=True)
class CaptionShard:
    """One data-parallel rank's part of a training batch: its ``rows`` (indices of training captions) and
    the global batch's ``width`` (longest caption), so that every rank runs the same number of time steps
    (synchronised batch norm reduces over the ranks at every step)."""

    rows: torch.Tensor
    width: int


@dataclass
class Prepared:
    """Everything a run needs from the data: vocabulary, features per split, training captions."""

    config: CaptionConfig
    dataset: CaptionDataset
    vocab: Vocabulary
    encoder: dict  # encoder.describe()
    train: SplitFeatures
    val: SplitFeatures
    test: SplitFeatures
    train_caps: CaptionTensors
    val_caps: CaptionTensors | None
    feature_seconds: float = 0.0


DECODING_OPTIONS = ("length_norm", "length_penalty", "block_trigrams", "remove_bad_endings")


def decoding_options(config: CaptionConfig, **given) -> dict:
    """The decoding options :data:`DECODING_OPTIONS` (:mod:`bnrhn.decoding.constraints`): each one given and
    not None, else the config's (the checkpoint's: what it was validated with)."""
    return {name: getattr(config, name) if given.get(name) is None else given[name] for name in DECODING_OPTIONS}


def decoding_constraints(vocab: Vocabulary, block_trigrams: bool = False, remove_bad_endings: bool = False) -> dict:
    """The constraint keywords of :func:`bnrhn.decoding.decode` for a model with vocabulary ``vocab``: the
    bad-ending words (:data:`bnrhn.decoding.BAD_ENDINGS`) as this vocabulary's ids."""
    return {"block_trigrams": bool(block_trigrams),
            "bad_ending_ids": bad_ending_ids(vocab.index) if remove_bad_endings else None}


def decode_split(model, split: SplitFeatures, vocab: Vocabulary, method: str = "greedy", beam_size: int = 3,
                 max_len: int = 20, length_norm: float = 0.0, chunk: int = 500, progress=None,
                 length_penalty: str = "power", block_trigrams: bool = False,
                 remove_bad_endings: bool = False) -> list[str]:
    """One caption per image of ``split`` (text), decoding ``chunk`` images at a time on the model's device
    (decoding options: :mod:`bnrhn.decoding.constraints`)."""
    out: list[str] = []
    n = len(split.records)
    p = next(model.parameters())
    constraints = decoding_constraints(vocab, block_trigrams, remove_bad_endings)
    for s in range(0, n, chunk):
        feats = split.batch(torch.arange(s, min(n, s + chunk))).to(p.device, p.dtype)
        hyps = decode(model, feats, method, beam_size, max_len, length_norm, length_penalty=length_penalty,
                      **constraints)
        out.extend(vocab.decode(h[0].tokens) for h in hyps)
        if progress is not None:
            progress(min(n, s + chunk))
    return out


class CaptionTask:
    """Implements the trainer's task interface for a :class:`~bnrhn.models.Captioner`."""

    def __init__(self, config: CaptionConfig, data: Prepared, model, world_size: int = 1,
                 scst: "SelfCritical | None" = None) -> None:
        """``world_size``: the number of data-parallel processes sharing each batch (batches with fewer
        captions than processes, at most a few tail batches per epoch, are left out). ``scst``: train with
        self-critical sequence training instead of cross-entropy (:mod:`bnrhn.captioning.scst`); batches
        are then ``config.batch_size`` training images, not captions."""
        if scst is not None and world_size > 1:
            raise ValueError("self-critical training runs in one process for now; start it without torchrun")
        self.scst = scst
        self.config = config
        self.world_size = int(world_size)
        self.data = data
        self.model = model
        self.vocab = data.vocab
        self._batches: dict[int, list[torch.Tensor]] = {}
        self.last_samples: list[tuple[str, str]] = []

    # -- batches -------------------------------------------------------------------------------------
    @property
    def batching(self) -> str:
        """``bucketed`` or ``random``: the config's choice, with ``auto`` resolved for this model."""
        return resolve_batching(self.config.batching, self.model)

    def _epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        if epoch not in self._batches:
            if self.scst is not None:  # batches of images, in a random order per (seed, epoch)
                lengths = torch.zeros(len(self.data.train.records), dtype=torch.long)
                batches = bucketed_batches(lengths, self.config.batch_size, self.config.seed, epoch, bucket=1)
                self._batches = {epoch: batches}
                return batches
            bucket = 1 if self.batching == "random" else 50
            batches = bucketed_batches(self.data.train_caps.lengths, self.config.batch_size, self.config.seed, epoch,
                                       bucket=bucket)
            self._batches = {epoch: [b for b in batches if len(b) >= self.world_size]}
        return self._batches[epoch]

    def num_batches(self, epoch: int) -> int:
        return len(self._epoch_batches(epoch))

    def batches(self, epoch: int, start: int = 0):
        yield from self._epoch_batches(epoch)[start:]

    def shard(self, idx: torch.Tensor, rank: int, world_size: int) -> CaptionShard:
        """Rank ``rank``'s rows of the global batch ``idx`` (every ``world_size``-th, so that length-sorted
        batches give each rank a similar share of long captions)."""
        if len(idx) < world_size:  # _epoch_batches leaves such batches out
            raise ValueError(f"a batch of {len(idx)} captions cannot be shared by {world_size} processes")
        return CaptionShard(idx[rank::world_size], int(self.data.train_caps.lengths[idx].max()))

    def _inputs(self, caps: CaptionTensors, split: SplitFeatures, idx: torch.Tensor, width: int | None = None):
        """Features, tokens and lengths of captions ``idx`` on the model's device (features in its dtype),
        tokens cut to ``width`` (default: the longest of these captions)."""
        p = next(self.model.parameters())
        lengths = caps.lengths[idx]
        tokens = caps.tokens[idx, : int(lengths.max()) if width is None else width]
        feats = split.batch(caps.image[idx]).to(p.device, p.dtype)
        return feats, tokens.to(p.device), lengths.to(p.device)

    def train_step(self, batch: torch.Tensor | CaptionShard):
        """(mean loss, tokens) of a batch: the caption indices of one process, or one rank's shard; with SCST
        (loss, sampled words, {reward, baseline, entropy, ...}) of a batch of image indices."""
        if self.scst is not None:
            p = next(self.model.parameters())
            return self.scst.loss(self.model, self.data.train.batch(batch).to(p.device, p.dtype), batch)
        if isinstance(batch, CaptionShard):
            feats, tokens, lengths = self._inputs(self.data.train_caps, self.data.train, batch.rows, batch.width)
        else:
            feats, tokens, lengths = self._inputs(self.data.train_caps, self.data.train, batch)
        loss, n_tokens, _ = self.model.loss(feats, tokens, lengths)
        return loss, n_tokens

    # -- validation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, batch_size: int = 256) -> float:
        caps = self.data.val_caps
        if caps is None or len(caps) == 0:
            return float("nan")
        total, count = 0.0, 0
        for s in range(0, len(caps), batch_size):
            idx = torch.arange(s, min(len(caps), s + batch_size))
            feats, tokens, lengths = self._inputs(caps, self.data.val, idx)
            logits, targets, _ = self.model.real_token_logits(feats, tokens, lengths)  # no logits for padding
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += targets.numel()
        return total / max(count, 1)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        cfg = self.config
        val = self.data.val
        if not val.records:
            return {"loss": float("nan")}
        self.model.eval()
        caps = decode_split(self.model, val, self.vocab, cfg.val_decode, cfg.beam_size, cfg.max_len, cfg.length_norm,
                            length_penalty=cfg.length_penalty, block_trigrams=cfg.block_trigrams,
                            remove_bad_endings=cfg.remove_bad_endings)
        cands = {r.image_id: c for r, c in zip(val.records, caps)}
        refs = {r.image_id: r.captions for r in val.records}
        scores = score_captions(cands, refs, VALIDATION_METRICS)
        scores["loss"] = self.validation_loss()
        self.last_samples = [(r.image_id, c) for r, c in zip(val.records[:3], caps[:3])]
        return scores

    # -- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "config": self.config.to_dict(),
            "vocab": self.vocab.to_dict(),
            "model_config": self.model.cfg.to_dict(),
            "encoder": dict(self.data.encoder),
            "dataset": {"name": self.data.dataset.name, "source": self.data.dataset.source,
                        "counts": self.data.dataset.counts()},
        }

    def load_state_dict(self, d: dict) -> None:
        saved = Vocabulary.from_dict(d["vocab"])
        if saved != self.vocab:
            raise ValueError(
                f"the checkpoint's vocabulary ({len(saved)} words, fingerprint {saved.fingerprint}) differs from the "
                f"one built from the current data ({len(self.vocab)} words, fingerprint {self.vocab.fingerprint}); "
                "resume with the same data set and settings, or start a new run"
            )

    def config_dict(self) -> dict:
        return self.config.to_dict()
