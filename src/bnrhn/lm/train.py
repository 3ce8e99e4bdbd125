"""``bnrhn lm train`` as a function: settings → corpus → model → :class:`bnrhn.training.Trainer` → scores.

The settings (:class:`LMTrainConfig`) are saved as ``lm_config.json`` in the run folder, so that
``--resume`` rebuilds the same corpus and model; the results (best validation and test loss, BPC,
perplexity, time per epoch) go to ``results.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from bnrhn.cells import legacy_statistics, pin_statistics
from bnrhn.data.text import CharCorpus, check_seq_len
from bnrhn.kernels import onednn
from bnrhn.lm.evaluate import LMScore
from bnrhn.lm.task import CharLMTask
from bnrhn.models.char_lm import CharLM
from bnrhn.training.settings import load_settings, save_settings

__all__ = ["LMTrainConfig", "build_corpus", "train_char_lm", "LM_CONFIG_FILE", "RESULTS_FILE"]

LM_CONFIG_FILE = "lm_config.json"
RESULTS_FILE = "results.json"


@dataclass
class LMTrainConfig:
    """Every setting of a character-LM training run (the ``bnrhn lm train`` options)."""

    run_dir: str = "runs/lm"
    # data: one of text (split by fractions), train/valid[/test] files, or ptb (a folder of word-level PTB)
    text: str | None = None
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    ptb: str | None = None
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    ptb_unk: str | None = None
    # model
    cell: str = "lstm"
    hidden: int = 256
    layers: int = 1
    embed: int | None = None
    tie_weights: bool = False
    input_dropout: float = 0.0
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    cell_options: dict[str, Any] = field(default_factory=dict)
    # optimisation
    batch_size: int = 32
    seq_len: int = 100
    eval_batch_size: int | None = None
    valid_chars: int | None = None  # validate during training on the first N validation characters only
    carry_state: bool = True  # carry the hidden state across TBPTT windows (False: each window from zero)
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "none"
    warmup_steps: int = 0
    step_size: int | None = None
    gamma: float = 0.5
    grad_clip: float | None = 5.0
    diverge_factor: float | None = 10.0  # stop when the loss exceeds this × the starting loss (None = off)
    epochs: int = 10
    max_steps: int | None = None
    max_minutes: float | None = None
    validate_every: int | None = None
    checkpoint_every: int | None = None
    patience: int | None = None
    seed: int = 0
    device: str = "auto"  # see bnrhn.devices: auto = CUDA when present
    precision: str = "fp32"  # fp32, bf16/fp16 (mixed, torch.autocast), fp64
    bn_stats: str = "sync"  # under torchrun: batch-norm statistics over the global batch (sync) or per rank (local)
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        from bnrhn.devices import check_device_spec, check_precision

        check_seq_len(self.seq_len)
        check_device_spec(self.device)
        check_precision(self.precision)
        if self.bn_stats not in ("sync", "local"):
            raise ValueError(f"bn_stats must be 'sync' or 'local', got {self.bn_stats!r}")
        for name in ("hidden", "layers", "batch_size", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        min_rows = self.cell_options.get("min_rows", 0) if isinstance(self.cell_options, dict) else 0
        if isinstance(min_rows, int) and not isinstance(min_rows, bool) and min_rows > self.batch_size:
            raise ValueError(f"cell option min_rows={min_rows} exceeds --batch-size {self.batch_size}: no training "
                             "step would ever update the population statistics; lower min_rows")
        sources = [s for s in ("text", "ptb") if getattr(self, s)] + (["train/valid"] if self.train or self.valid else [])
        if len(sources) > 1:
            raise ValueError(f"give one corpus: --text, --train/--valid[/--test] or --ptb (got {', '.join(sources)})")
        if not sources:
            raise ValueError("no corpus: give --text FILE, --train FILE --valid FILE [--test FILE], or --ptb DIR")
        if (self.train is None) != (self.valid is None):
            raise ValueError("--train and --valid go together (and --test optionally)")
        if self.test and not self.train:
            raise ValueError("--test goes with --train and --valid")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMTrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown language-model setting(s): {', '.join(unknown)}")
        return cls(**d)

    def model_kwargs(self, vocab_size: int) -> dict[str, Any]:
        from bnrhn.cells import cell_options

        opts = dict(self.cell_options)
        # Batch-norm cells: one statistics slot per position inside the TBPTT window (see bnrhn.lm.task).
        if "max_steps" in cell_options(self.cell) and "max_steps" not in opts:
            opts["max_steps"] = self.seq_len
        return dict(
            vocab_size=vocab_size, cell=self.cell, hidden_size=self.hidden, num_layers=self.layers,
            embed_size=self.embed, input_dropout=self.input_dropout, dropout=self.dropout,
            recurrent_dropout=self.recurrent_dropout, tie_weights=self.tie_weights, **opts,
        )


def build_corpus(cfg: LMTrainConfig) -> CharCorpus:
    if cfg.ptb:
        return CharCorpus.ptb_chars(cfg.ptb, unk=cfg.ptb_unk)
    if cfg.text:
        return CharCorpus.from_file(cfg.text, cfg.valid_fraction, cfg.test_fraction)
    return CharCorpus.from_files(cfg.train, cfg.valid, cfg.test)


def trained_split(lm, split: str, hint: str = "") -> tuple[torch.Tensor, str]:
    """The character ids of ``split`` of the corpus a loaded model (:class:`bnrhn.lm.task.LoadedLM`) was
    trained on, rebuilt from its saved settings, and a description of that text; ``ValueError`` (with
    ``hint`` appended) when the corpus has changed its characters or has no such split."""
    cfg = LMTrainConfig.from_dict(lm.train_config["lm_config"])
    corpus = build_corpus(cfg)
    if corpus.vocab != lm.vocab:
        raise ValueError(f"the corpus the model was trained on has changed (different characters){hint}")
    splits = corpus.splits()
    if splits.get(split) is None:
        have = ", ".join(k for k, v in splits.items() if v is not None)
        raise ValueError(f"the model's corpus has no {split!r} split (it has: {have}){hint}")
    ids = splits[split]
    return ids, f"{split} split of {cfg.text or cfg.ptb or cfg.train}"


def _score_dict(s: LMScore | None) -> dict[str, Any] | None:
    return None if s is None else s.as_dict()


def train_char_lm(cfg: LMTrainConfig, resume: bool = False, corpus: CharCorpus | None = None,
                  log=print) -> dict[str, Any]:
    """Train (or resume) a character LM; returns the results written to ``results.json``.

    Raises :class:`bnrhn.training.TrainingDiverged` when the loss becomes non-finite (``last.pt`` keeps
    the last good state).

    Started by ``torchrun`` with several processes, this is data-parallel training (see
    :mod:`bnrhn.training.distributed` and :class:`bnrhn.lm.task.CharLMTask`): each rank trains every N-th
    stream of each window; rank 0 holds the lock, writes the run and scores it (the results it returns); the
    other ranks return once training ends, with their rank, steps and stop reason only.
    """
    from bnrhn.training.distributed import start_training_process

    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise NotADirectoryError(f"--run-dir {cfg.run_dir} exists and is not a folder")
    proc = start_training_process(cfg.device, cfg.precision, cfg.batch_size, "text streams", log)
    if not proc.is_main:
        cfg = replace(cfg, progress=False)
    with proc.run_folder_lock(cfg.run_dir):
        return _train_char_lm(cfg, resume, corpus, proc.log, proc.device, proc.distributed)


def _train_char_lm(cfg: LMTrainConfig, resume: bool, corpus: CharCorpus | None, log, device: torch.device,
                   distributed) -> dict[str, Any]:
    from bnrhn.devices import autocast_mode, model_dtype
    from bnrhn.training import Trainer, TrainerConfig, build_optimizer, build_scheduler, load_checkpoint
    from bnrhn.training.distributed import prepare_replica

    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / "last.pt").exists() and not cfg.overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a training run (last.pt); resume it (--resume), choose another "
            "--run-dir, or pass --overwrite to start afresh"
        )
    if not resume:  # the run records the batch-norm estimator it trains with (see bnrhn.cells.pin_statistics)
        cfg = replace(cfg, cell_options=pin_statistics(cfg.cell, cfg.cell_options))
    main = distributed is None or distributed.is_main
    corpus = corpus or build_corpus(cfg)
    torch.manual_seed(cfg.seed)
    model = CharLM(**cfg.model_kwargs(len(corpus.vocab))).to(device, model_dtype(cfg.precision))
    if distributed is not None:
        prepare_replica(model, distributed, cfg.bn_stats, cfg.seed, log)
    task = CharLMTask(model, corpus, cfg.batch_size, cfg.seq_len, cfg.eval_batch_size, device,
                      extra_config={"lm_config": asdict(cfg)}, valid_chars=cfg.valid_chars,
                      carry_state=cfg.carry_state)
    steps_per_epoch = task.num_batches(0)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = None
    if cfg.schedule != "none" or cfg.warmup_steps:
        scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                                    step_size=cfg.step_size, gamma=cfg.gamma)
    tcfg = TrainerConfig(
        run_dir=str(run_dir), max_epochs=cfg.epochs, max_steps=cfg.max_steps, max_minutes=cfg.max_minutes,
        grad_clip=cfg.grad_clip, diverge_factor=cfg.diverge_factor, select_metric="loss", select_mode="min",
        patience=cfg.patience,
        validate_every=cfg.validate_every, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
        progress=cfg.progress, description=f"lm {cfg.cell}", overwrite=cfg.overwrite,
        autocast=autocast_mode(cfg.precision),
    )
    trainer = Trainer(task, optimizer, scheduler, tcfg, distributed=distributed)
    if not resume and main:
        save_lm_config(cfg)  # before training, so that an interrupted run can be resumed
    n_params = sum(p.numel() for p in model.parameters())
    info = corpus.summary()
    log(f"corpus: {info['vocab_size']} characters; train {info['train_chars']:,}, valid {info['valid_chars']:,}"
        + (f", test {info['test_chars']:,}" if "test_chars" in info else "")
        + f"; unigram entropy {info['train_unigram_bits']:.3f} bits/char")
    where = f"{device}, {cfg.precision}" + (f", {distributed.world_size} processes ({distributed.backend}, "
                                            f"batch-norm statistics {cfg.bn_stats})" if distributed is not None else "")
    log(f"model: {cfg.cell} ×{cfg.layers}, hidden {cfg.hidden}, {n_params:,} parameters; "
        f"{steps_per_epoch} windows of {cfg.batch_size}×{cfg.seq_len} characters per epoch; on {where}")
    if device.type == "cpu":
        from bnrhn import kernels

        log(f"model: {kernels.status()}")
        kernels.check_settings()  # a mistyped setting stops the run here
    t0 = time.perf_counter()
    summary = trainer.fit(resume=resume)
    if device.type == "cpu" and main:
        log(f"model: {onednn.summary()}")
    if not main:  # rank 0 scores the run and writes results.json, alone: no collective waits for the scoring
        return {"run_dir": str(run_dir), "rank": distributed.rank, "steps": summary["steps"],
                "stopped": summary["stopped"]}
    if resume:
        save_lm_config(cfg)  # budgets may have been extended
    wall = time.perf_counter() - t0
    # Score the selected (best-validation) weights on validation and test.
    best = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model"])
    valid = task.evaluate("valid")  # the whole validation text, also when training validated on a part
    test = task.evaluate("test") if corpus.test is not None else None
    epochs_done = summary["steps"] / steps_per_epoch if steps_per_epoch else 0.0
    results = {
        "run_dir": str(run_dir),
        "cell": cfg.cell,
        "hidden": cfg.hidden,
        "layers": cfg.layers,
        "parameters": n_params,
        "corpus": info,
        "steps": summary["steps"],
        "epochs": epochs_done,
        "stopped": summary["stopped"],
        "best_step": summary["best_step"],
        "valid": _score_dict(valid),
        "test": _score_dict(test),
        "train_seconds": summary["train_seconds"],
        "seconds": summary["seconds"],
        "wall_seconds_this_call": wall,
        "seconds_per_epoch": summary["train_seconds"] / epochs_done if epochs_done > 0 else math.nan,
        "chars_per_second": summary["tokens_per_s"],
        "validations": summary["validations"],
    }
    (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return results


def save_lm_config(cfg: LMTrainConfig) -> None:
    save_settings(cfg.run_dir, LM_CONFIG_FILE, cfg)


def load_lm_config(run_dir: str | Path) -> LMTrainConfig:
    cfg = load_settings(run_dir, LM_CONFIG_FILE, LMTrainConfig, "bnrhn lm train")
    # runs saved before estimators were recorded trained with the momentum estimator
    return replace(cfg, cell_options=legacy_statistics(cfg.cell, cfg.cell_options))
