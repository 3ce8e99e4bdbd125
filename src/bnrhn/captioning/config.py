"""``CaptionConfig``: every setting of a captioning run, serialised to ``config.json`` and the checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bnrhn.models.captioner import MODELS

BATCHING = ("auto", "bucketed", "random")
OBJECTIVES = ("xe", "scst")
SCST_BASELINES = ("mean", "greedy")  # bnrhn.captioning.scst
SCST_POLICIES = ("train", "eval")
DROPOUT = 0.3
# Decoders that normalise with batch statistics (BN-RHN, BN-LSTM) fit their training captions faster;
# on Flickr8k BN-RHN's validation − training loss gap at 0.3 was 0.07 above the LSTM's, at 0.4 it is
# below, for the same CIDEr (docs/results.md, "Dropout of the batch-norm decoders").
DROPOUT_BATCH_NORM = 0.4


def resolve_dropout(config: "CaptionConfig") -> float:
    """The config's dropout; when it is None, DROPOUT_BATCH_NORM for a cell that normalises with batch
    statistics and DROPOUT otherwise."""
    from bnrhn.cells import build_cell
    from bnrhn.layers.seq_batchnorm import uses_batch_statistics

    if config.dropout is not None:
        return float(config.dropout)
    cell = build_cell(config.cell, 8, 8, **config.cell_options)
    return DROPOUT_BATCH_NORM if uses_batch_statistics(cell) else DROPOUT


@dataclass
class CaptionConfig:
    """Settings of a captioning run (the CLI flags of ``bnrhn train`` map onto these fields).

    Data:
        dataset: ``synthetic``, ``flickr8k`` (the shared copy, or ``flickr8k:DIR``), ``karpathy:FILE.json``,
            ``coco:captions_*.json``, ``folder:DIR`` (images + captions.csv/jsonl).
        images: folder of the images when the dataset's default location is wrong.
        max_train_images / max_val_images / max_test_images: use only the first N images of a split.
        synthetic_sizes: train/val/test scene counts of the synthetic data set.
        strict: refuse (instead of report and skip) empty captions, missing and corrupt images.
        min_count: words seen fewer times in the training captions become ``<unk>``.
        max_caption_len: training captions are cut to this many words.
    Encoder: encoder name (``mobilenet_v2`` or ``tv:ARCH``), weights file, resize mode, cache folder.
    Model: ``show_tell`` or ``show_attend_tell``; the recurrent ``cell`` and its options; sizes; dropout
        (None = :func:`resolve_dropout`: 0.3, or 0.4 for decoders that normalise with batch statistics;
        a run resolves it when it starts and saves the value).
    Optimisation: optimiser, learning rate, schedule, gradient clipping, batch size, budgets
        (epochs, steps, minutes), early-stopping patience, seed; ``diverge_factor``: training stops as
        diverged when the loss exceeds this multiple of its first steps' mean (0 or None = off).
    Objective: ``xe`` (cross-entropy on the reference captions) or ``scst`` (self-critical sequence
        training, :mod:`bnrhn.captioning.scst`: ``scst_samples`` captions per image sampled at
        ``scst_temperature`` and rewarded with CIDEr-D, baseline ``mean`` of the other samples or ``greedy``,
        log-probabilities in ``scst_policy`` mode; batches are then ``batch_size`` images); ``init``: a
        captioning checkpoint whose weights the run starts from (required by ``scst``).
    Validation: decoding method (``greedy`` is fast; ``beam``), beam size, maximum caption length.
    Decoding (validation, and the default of ``evaluate``/``caption`` with this checkpoint; all off by
        default, see :mod:`bnrhn.decoding.constraints`): ``length_norm`` α of the ``length_penalty`` form
        (``power``: |Y|^α, im2txt's; ``gnmt``: ((5 + |Y|)/6)^α, Wu et al. 2016), ``block_trigrams`` (no
        repeated word trigram), ``remove_bad_endings`` (no caption ends in "a", "the", "with", ...).
    Compute: ``device`` (auto, cpu, cuda, cuda:N, mps), ``precision`` (fp32, bf16, fp16, fp64; see
        :mod:`bnrhn.devices`), and under ``torchrun`` ``bn_stats``: batch-norm statistics over the global
        batch (``sync``, default: the same training as one process) or each process's own rows (``local``).
    """

    # data
    dataset: str = "synthetic"
    images: str | None = None
    max_train_images: int | None = None
    max_val_images: int | None = None
    max_test_images: int | None = None
    synthetic_sizes: tuple[int, int, int] = (1500, 150, 150)
    strict: bool = False
    min_count: int = 5
    max_caption_len: int = 20
    # encoder and feature cache
    encoder: str = "mobilenet_v2"
    weights: str | None = None
    resize: str = "squash"
    cache_dir: str | None = None
    feature_batch_size: int = 32
    # model
    model: str = "show_tell"
    cell: str = "lstm"
    cell_options: dict[str, Any] = field(default_factory=dict)
    embed_size: int = 512
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float | None = None  # None: DROPOUT, or DROPOUT_BATCH_NORM for a batch-norm decoder
    attention_size: int = 512
    alpha_c: float = 1.0
    feature_norm: str = "standardize"
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "none"
    warmup_steps: int = 0
    step_size: int | None = None
    gamma: float = 0.5
    grad_clip: float | None = 5.0
    diverge_factor: float | None = 10.0
    batch_size: int = 64
    batching: str = "auto"
    epochs: int = 10
    max_steps: int | None = None
    max_minutes: float | None = None
    patience: int | None = None
    validate_every: int | None = None
    select_metric: str = "CIDEr"
    seed: int = 0
    # objective: cross-entropy, or self-critical sequence training from a cross-entropy checkpoint
    objective: str = "xe"
    init: str | None = None
    scst_samples: int = 5
    scst_baseline: str = "mean"
    scst_temperature: float = 1.0
    scst_policy: str = "train"
    # validation decoding
    val_decode: str = "greedy"
    beam_size: int = 3
    max_len: int = 20
    length_norm: float = 0.0
    length_penalty: str = "power"
    block_trigrams: bool = False
    remove_bad_endings: bool = False
    # compute
    device: str = "auto"
    precision: str = "fp32"
    bn_stats: str = "sync"
    # run
    run_dir: str = "runs/caption"
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.synthetic_sizes, list):
            self.synthetic_sizes = tuple(self.synthetic_sizes)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        min_rows = self.cell_options.get("min_rows", 0) if isinstance(self.cell_options, dict) else 0
        if isinstance(min_rows, int) and not isinstance(min_rows, bool) and min_rows > self.batch_size:
            raise ValueError(f"cell option min_rows={min_rows} exceeds the batch size {self.batch_size}: no training "
                             "step would ever update the population statistics; lower min_rows")
        from bnrhn.devices import check_device_spec, check_precision

        check_device_spec(self.device)
        check_precision(self.precision)
        if self.bn_stats not in ("sync", "local"):
            raise ValueError(f"bn_stats must be 'sync' or 'local', got {self.bn_stats!r}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {self.batching!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "scst":
            if not self.init:
                raise ValueError("SCST fine-tunes a captioner trained with cross-entropy: give its checkpoint "
                                 "with --init CKPT (e.g. runs/caption/best.pt)")
            if self.scst_baseline not in SCST_BASELINES:
                raise ValueError(f"scst_baseline must be one of {SCST_BASELINES}, got {self.scst_baseline!r}")
            if self.scst_policy not in SCST_POLICIES:
                raise ValueError(f"scst_policy must be one of {SCST_POLICIES}, got {self.scst_policy!r}")
            if isinstance(self.scst_samples, bool) or not isinstance(self.scst_samples, int) or self.scst_samples < 1 \
                    or (self.scst_baseline == "mean" and self.scst_samples < 2):
                raise ValueError(f"scst_samples must be an integer ≥ 2 (≥ 1 with the greedy baseline), "
                                 f"got {self.scst_samples!r}")
            if not (isinstance(self.scst_temperature, (int, float)) and self.scst_temperature > 0):
                raise ValueError(f"scst_temperature must be > 0, got {self.scst_temperature!r}")
        if self.val_decode not in ("greedy", "beam"):
            raise ValueError(f"val_decode must be 'greedy' or 'beam', got {self.val_decode!r}")
        from bnrhn.decoding.constraints import check_length_penalty

        check_length_penalty(self.length_norm, self.length_penalty)
        for name in ("block_trigrams", "remove_bad_endings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("embed_size", "hidden_size", "num_layers", "batch_size", "epochs", "beam_size", "max_len",
                     "max_caption_len", "min_count", "attention_size", "feature_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.grad_clip is not None and not isinstance(self.grad_clip, bool) and self.grad_clip == 0:
            self.grad_clip = None  # 0 = off, as for bnrhn lm train
        if self.diverge_factor is not None and not isinstance(self.diverge_factor, bool) and self.diverge_factor == 0:
            self.diverge_factor = None
        if self.dropout is not None and (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                                         or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self._check_cell_input_size()
        if len(self.synthetic_sizes) != 3:
            raise ValueError(f"synthetic_sizes must be (train, val, test), got {self.synthetic_sizes!r}")

    def _check_cell_input_size(self) -> None:
        """MUT1/MUT2 add their input to a hidden-sized vector: refuse, before any work, a decoder input of
        another size (Show and Tell reads the word embedding; Show, Attend and Tell [embedding; context])."""
        from bnrhn.cells import CELLS

        spec = CELLS.get(self.cell)
        if spec is None or not getattr(spec.cls, "raw_input", False):
            return
        if self.model != "show_tell":
            raise ValueError(f"cell {self.cell} needs its input size to equal the hidden size; the {self.model} "
                             "decoder reads [word embedding; context], which never does: use --model show_tell "
                             "or another cell")
        if self.embed_size != self.hidden_size:
            raise ValueError(f"cell {self.cell} needs its input size to equal the hidden size: give --embed-size "
                             f"{self.hidden_size} (= --hidden-size), not {self.embed_size}")

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["synthetic_sizes"] = list(self.synthetic_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> CaptionConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> CaptionConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(d, dict) and isinstance(d.get("task"), dict) and "trainer" in d:
            d = d["task"]  # a run folder's config.json: {"trainer": ..., "task": <this config>}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of settings")
        return cls.from_dict(d, str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
