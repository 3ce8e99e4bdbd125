"""The high-level captioning API: train, evaluate, caption images.

    from bnrhn.captioning import CaptionConfig, train, evaluate, caption_images

    result = train(CaptionConfig(dataset="synthetic", cell="bn_rhn", run_dir="runs/demo", epochs=5))
    results, scores = evaluate(result.best_checkpoint, split="test", beam=3)
    for item in caption_images(result.best_checkpoint, ["photo.jpg"], beam=3, topk=3):
        print(item.path, item.captions)

Everything a checkpoint needs to caption images is inside it (model, vocabulary, config, encoder
name and weights hash); only the encoder weights are looked up again (offline, see
:func:`bnrhn.encoders.find_mobilenet_weights`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bnrhn.captioning.config import CaptionConfig, resolve_dropout
from bnrhn.cells import legacy_statistics, pin_statistics
from bnrhn.captioning.data import (
    CaptionTensors,
    caption_rows,
    SplitFeatures,
    attach_features,
    load_dataset,
    report_problems,
    stderr_log,
)
from bnrhn.captioning.scoring import ALL_METRICS, score_captions
from bnrhn.captioning.task import (CHECKPOINT_KIND, CaptionTask, Prepared, decode_split, decoding_constraints,
                                   decoding_options)
from bnrhn.data.captions import CaptionDataset
from bnrhn.data.vocab import Vocabulary, unknown_fraction
from bnrhn import kernels
from bnrhn.kernels import onednn
from bnrhn.decoding import METHODS, decode
from bnrhn.encoders import ImageFileError, build_encoder, load_image, stack_images
from bnrhn.models import Captioner, CaptionerConfig, build_captioner

Log = Callable[[str], None]


# -- data ----------------------------------------------------------------------------------------------
def dataset_for_config(config: CaptionConfig, log: Log) -> CaptionDataset:
    ds = load_dataset(config.dataset, images=config.images, strict=config.strict,
                      synthetic_sizes=config.synthetic_sizes, cache_dir=config.cache_dir, progress=config.progress)
    ds = ds.subset({"train": config.max_train_images, "val": config.max_val_images, "test": config.max_test_images})
    report_problems(ds, log)
    return ds


def prepare_data(config: CaptionConfig, log: Log = stderr_log, encoder=None) -> Prepared:
    """Read the data set, extract (or reuse) features, build the vocabulary and the training tensors."""
    ds = dataset_for_config(config, log)
    if encoder is None:
        from bnrhn.devices import resolve_device

        encoder = build_encoder(config.encoder, config.weights, config.resize, device=str(resolve_device(config.device)))
    grid = config.model == "show_attend_tell"
    n_before = len(ds.problems)
    ds, fs = attach_features(ds, encoder, config.cache_dir, grid, config.strict, config.progress,
                             config.feature_batch_size, log)
    for p in ds.problems[n_before:]:
        log(f"data: {p}")
    train_recs, val_recs, test_recs = ds.split("train"), ds.split("val"), ds.split("test")
    if not train_recs:
        raise ValueError(f"{ds.name}: the training split is empty; check the split files or --max-train-images")
    vocab = Vocabulary.build((c for r in train_recs for c in r.captions), min_count=config.min_count)
    lost = unknown_fraction((c for r in train_recs for c in r.captions), vocab)
    if lost > 0.5:
        log(f"warning: {lost:.0%} of the training words are rarer than --min-count {config.min_count} and become "
            "<unk>; captions in a language written without spaces (e.g. Chinese) must be segmented into "
            "space-separated words first (see bnrhn.data.vocab)")
    log(f"data: {ds.summary()}; vocabulary {len(vocab)} words (min count {config.min_count}); "
        f"features {'extracted in %.1f s' % fs.seconds if not fs.reused else 'from cache'} ({fs.folder})")
    return Prepared(
        config=config, dataset=ds, vocab=vocab, encoder=encoder.describe(),
        train=SplitFeatures.build(train_recs, fs, grid), val=SplitFeatures.build(val_recs, fs, grid),
        test=SplitFeatures.build(test_recs, fs, grid),
        train_caps=CaptionTensors.build(train_recs, vocab, config.max_caption_len),
        val_caps=CaptionTensors.build(val_recs, vocab, config.max_caption_len) if val_recs else None,
        feature_seconds=fs.seconds,
    )


def model_config(config: CaptionConfig, vocab: Vocabulary, encoder: dict) -> CaptionerConfig:
    return CaptionerConfig(
        model=config.model, vocab_size=len(vocab), feature_size=encoder["feature_size"],
        grid_size=encoder["grid_size"], embed_size=config.embed_size, hidden_size=config.hidden_size,
        num_layers=config.num_layers, cell=config.cell, cell_options=dict(config.cell_options),
        dropout=resolve_dropout(config), attention_size=config.attention_size, alpha_c=config.alpha_c,
        feature_norm=config.feature_norm,
        pad_id=vocab.pad_id, start_id=vocab.start_id, end_id=vocab.end_id, unk_id=vocab.unk_id,
    )


# -- training ------------------------------------------------------------------------------------------
DEMO_SETTINGS = dict(dataset="synthetic", embed_size=128, hidden_size=128, lr=3e-3, dropout=0.1, batch_size=64,
                     epochs=5, min_count=5, max_len=20)


def demo_config(cell: str = "lstm", run_dir: str | Path = "runs/demo", **overrides) -> CaptionConfig:
    """Settings that train a small Show-and-Tell captioner on the synthetic scenes in one or two minutes
    on two CPU cores (:data:`DEMO_SETTINGS`, see docs/captioning.md for measured results)."""
    return CaptionConfig(**{**DEMO_SETTINGS, "cell": cell, "run_dir": str(run_dir), **overrides})


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict]  # one row per validation: step, epoch, CIDEr, BLEU-4, loss
    best: dict  # the validation row of the best checkpoint
    steps: int
    seconds: float  # wall-clock of training incl. validation (excl. feature extraction)
    train_seconds: float  # training steps only
    tokens_per_s: float
    n_params: int
    stopped: str
    feature_seconds: float
    config: CaptionConfig = field(repr=False)

    def train_losses(self) -> list[tuple[int, float]]:
        """(step, loss) of every logged training step (from ``log.jsonl``)."""
        from bnrhn.training import read_log

        return [(r["step"], r["loss"]) for r in read_log(self.run_dir / "log.jsonl") if r.get("kind") == "train"]


def train(config: CaptionConfig, resume: bool = False, log: Log = stderr_log) -> RunResult:
    """Train a captioner as ``config`` says; ``resume=True`` continues the run in ``config.run_dir``, which is
    locked for the whole run (a second process on the same folder is refused, naming the first).

    Started by ``torchrun`` with several processes, this is data-parallel training (see
    :mod:`bnrhn.training.distributed`): every process calls ``train`` with the same config; rank 0 holds
    the lock and writes the run, and every rank returns the same result."""
    from bnrhn.training.distributed import start_training_process

    if Path(config.run_dir).exists() and not Path(config.run_dir).is_dir():
        raise NotADirectoryError(f"--run-dir {config.run_dir} exists and is not a folder")
    proc = start_training_process(config.device, config.precision, config.batch_size, "captions", log)
    if not proc.is_main:
        config = replace(config, progress=False)
    with proc.run_folder_lock(config.run_dir):
        return _train(config, resume, proc.log, proc.device, proc.distributed)


def _train(config: CaptionConfig, resume: bool, log: Log, device: torch.device, distributed) -> RunResult:
    from bnrhn.devices import autocast_mode, model_dtype
    from bnrhn.training import Trainer, TrainerConfig, build_optimizer, build_scheduler
    from bnrhn.training.distributed import prepare_replica

    # the run records the batch-norm estimator and the dropout it trains with (a later default cannot
    # change a resumed run)
    config = replace(config, cell_options=pin_statistics(config.cell, config.cell_options))
    config = replace(config, dropout=resolve_dropout(config))
    last = Path(config.run_dir) / "last.pt"
    if not resume and last.exists() and not config.overwrite:  # say so before extracting any feature
        raise FileExistsError(
            f"{config.run_dir} already holds a training run ({last.name}); resume it (--resume), choose another "
            "--run-dir, or pass --overwrite to start afresh"
        )
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if config.objective == "scst" and distributed is not None:
        raise ValueError("self-critical training (--objective scst) runs in one process for now; start it without "
                         "torchrun")
    init = _read_init(Path(config.init), config) if config.init and not resume else None  # before any feature
    if not resume:  # files of an earlier run in this folder that this run may not write
        for name in ("init_validation.json", "loss.png"):
            (Path(config.run_dir) / name).unlink(missing_ok=True)
    data = prepare_data(config, log)
    if resume:
        _check_resumable(Path(config.run_dir) / "last.pt", data.vocab, config)
    torch.manual_seed(config.seed)  # the model's initial weights depend on the seed only
    model = build_captioner(model_config(config, data.vocab, data.encoder))
    model.set_feature_stats(data.train.feats)
    if init is not None:
        _load_init(model, init, data, log)
    model.to(device, model_dtype(config.precision))
    world = distributed.world_size if distributed is not None else 1
    if distributed is not None:
        prepare_replica(model, distributed, config.bn_stats, config.seed, log)
    scst = None
    if config.objective == "scst":
        from bnrhn.captioning.scst import SelfCritical, training_reward

        scst = SelfCritical(training_reward([r.captions for r in data.train.records]), data.vocab,
                            config.scst_samples, config.scst_baseline, config.scst_temperature, config.max_len,
                            config.scst_policy)
        log(f"scst: {config.scst_samples} samples per image at temperature {config.scst_temperature:g}, baseline "
            f"{config.scst_baseline}, log-probabilities in {config.scst_policy} mode, reward CIDEr-D (document "
            f"frequencies of the {len(data.train.records)} training images); divergence is checked for NaN/inf only")
        if config.lr > 1e-4:
            log(f"scst: warning: learning rate {config.lr:g} is high for self-critical training (Rennie et al. 2017 "
                "and self-critical.pytorch use 5e-5 or less; CIDEr tends to fall at cross-entropy rates): --lr 5e-5")
    task = CaptionTask(config, data, model, world_size=world, scst=scst)
    opt = build_optimizer(model.parameters(), config.optimizer, config.lr, config.weight_decay, config.momentum)
    total = config.max_steps or config.epochs * task.num_batches(0)
    sched = build_scheduler(opt, config.schedule, total_steps=total, warmup_steps=config.warmup_steps,
                            step_size=config.step_size, gamma=config.gamma)
    has_val = bool(data.val.records)
    if not has_val:
        log("data: no validation images; the last checkpoint is also the best (no CIDEr selection)")
    tcfg = TrainerConfig(
        run_dir=config.run_dir, max_epochs=config.epochs, max_steps=config.max_steps, max_minutes=config.max_minutes,
        grad_clip=config.grad_clip,
        select_metric=config.select_metric if has_val else None,
        select_mode="min" if config.select_metric == "loss" else "max", patience=config.patience if has_val else None,
        # the policy-gradient loss is centred on 0: its size says nothing about divergence
        diverge_factor=None if scst is not None else config.diverge_factor,
        validate_every=config.validate_every, seed=config.seed, progress=config.progress,
        description=f"{config.model}/{config.cell}", overwrite=config.overwrite,
        autocast=autocast_mode(config.precision),
    )
    trainer = Trainer(task, opt, sched, tcfg, distributed=distributed, on_validation=_validation_line(task, log))
    where = f"{device}, {config.precision}" + (f", {world} processes ({distributed.backend}, batch-norm statistics "
                                               f"{config.bn_stats})" if distributed is not None else "")
    log(f"train: {config.model} with a {config.cell} decoder, {model.num_parameters():,} parameters, "
        + (f"{len(data.train.records)} images / {task.num_batches(0)} batches of {config.batch_size} images per epoch"
           if scst is not None else f"{len(data.train_caps)} captions / {task.num_batches(0)} {task.batching} batches per epoch")
        + f" on {where} "
        f"-> {config.run_dir}")
    if device.type == "cpu":
        log(f"train: {kernels.status()}")
        kernels.check_settings()  # a mistyped setting stops the run here
    init_scores = None
    if config.init and has_val and not resume and (distributed is None or distributed.rank == 0):
        init_scores = task.validate()  # the starting point, for "before and after" (CIDEr before SCST)
        _write_json(Path(config.run_dir) / "init_validation.json", {"init": config.init, **init_scores})
        log("init: validation " + " ".join(f"{k} {v:.3f}" for k, v in init_scores.items()))
    summary = trainer.fit(resume=resume)
    if distributed is None or distributed.rank == 0:
        if device.type == "cpu":
            log(f"train: {onednn.summary()}")
        try:
            _plot_run(Path(summary["run_dir"]), config)
        except Exception as exc:  # a figure must not fail a run whose checkpoints are written
            log(f"train: could not draw {summary['run_dir']}/loss.png ({type(exc).__name__}: {exc})")
    history = summary["validations"]
    best = next((h for h in history if h["step"] == summary["best_step"]), history[-1] if history else {})
    return RunResult(
        run_dir=Path(summary["run_dir"]), best_checkpoint=Path(summary["best_checkpoint"]),
        last_checkpoint=Path(summary["last_checkpoint"]), history=history, best=best, steps=summary["steps"],
        seconds=summary["seconds"], train_seconds=summary["train_seconds"], tokens_per_s=summary["tokens_per_s"],
        n_params=model.num_parameters(), stopped=summary["stopped"], feature_seconds=data.feature_seconds,
        config=config,
    )


# settings a checkpoint must share with a run that starts from its weights (--init): the model's shape and
# the features it reads (dropout and the loss weight alpha_c are training settings and may change)
INIT_MODEL_FIELDS = ("model", "cell", "embed_size", "hidden_size", "num_layers", "attention_size", "feature_norm")
INIT_FEATURE_FIELDS = ("encoder", "resize")


@dataclass
class InitCheckpoint:
    """A captioning checkpoint a run starts from (``--init``), read and checked before any feature work."""

    path: Path
    checkpoint: dict


def _read_init(path: Path, config: CaptionConfig) -> InitCheckpoint:
    """Read ``--init`` and refuse it, naming what differs, when its model shape, cell options or encoder are
    not those of ``config`` (the vocabulary is checked once the data is read: :func:`_load_init`)."""
    from bnrhn.training import load_checkpoint

    if path.is_dir():
        path = path / ("best.pt" if (path / "best.pt").exists() else "last.pt")
    ckpt = load_checkpoint(path)  # FileNotFoundError / ValueError naming the file
    task = ckpt.get("task")
    if not isinstance(task, dict) or task.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"--init {path} is not a captioning checkpoint")
    saved = dict(task.get("config") or {})
    saved_cell = saved.get("cell", "lstm")
    saved["cell_options"] = pin_statistics(saved_cell, legacy_statistics(saved_cell, saved.get("cell_options") or {}))
    ours = {**config.to_dict(), "cell_options": pin_statistics(config.cell, config.cell_options)}
    differ = [k for k in (*INIT_MODEL_FIELDS, "cell_options", *INIT_FEATURE_FIELDS) if saved.get(k) != ours.get(k)]
    if differ:
        raise ValueError(f"--init {path} was trained with other settings: "
                         + ", ".join(f"{k} {saved.get(k)!r} (this run: {ours.get(k)!r})" for k in differ)
                         + "; give the same flags (bnrhn train --init takes them from the checkpoint unless given)")
    return InitCheckpoint(path, ckpt)


def _load_init(model: Captioner, init: InitCheckpoint, data: Prepared, log: Log) -> None:
    """Start ``model`` from the ``--init`` weights, once the data shows that the vocabulary and the encoder
    (weights and preprocessing) are the checkpoint's."""
    from bnrhn.training import check_finite_weights

    path, task = init.path, init.checkpoint["task"]
    saved = Vocabulary.from_dict(task["vocab"])
    if saved != data.vocab:
        raise ValueError(f"--init {path}: its vocabulary ({len(saved)} words, fingerprint {saved.fingerprint}) "
                         f"differs from this run's ({len(data.vocab)} words, fingerprint {data.vocab.fingerprint}); "
                         "use the data set and --min-count / --max-*-images it was trained with")
    encoder = {k: v for k, v in dict(task.get("encoder") or {}).items() if k in ("encoder", "weights", "preprocess")}
    now = {k: data.encoder.get(k) for k in encoder}
    if encoder != now:
        raise ValueError(f"--init {path} was trained on other image features: {encoder} (this run: {now}); use "
                         "the encoder, weights and --resize it was trained with")
    check_finite_weights(init.checkpoint["model"], path)
    try:
        model.load_state_dict(init.checkpoint["model"])
    except RuntimeError as exc:
        raise ValueError(f"--init {path}: its weights do not fit this run's model ({str(exc)[:300]})") from None
    log(f"init: weights from {path} (step {(init.checkpoint.get('trainer') or {}).get('global_step', '?')})")


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _plot_run(run_dir: Path, config: CaptionConfig) -> None:
    """RUN_DIR/loss.png: training loss (and SCST's mean sampled reward) and validation CIDEr vs steps."""
    from bnrhn.reports import plot_training_curves
    from bnrhn.training import read_log

    rows = list(read_log(run_dir / "log.jsonl")) if (run_dir / "log.jsonl").exists() else []
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return
    val = [r for r in rows if r.get("kind") == "validation" and isinstance(r.get("CIDEr"), (int, float))]
    init = run_dir / "init_validation.json"
    start = json.loads(init.read_text(encoding="utf-8")) if config.init and init.exists() else None
    vsteps = ([0] if start and "CIDEr" in start else []) + [r["step"] for r in val]
    vvals = ([start["CIDEr"]] if start and "CIDEr" in start else []) + [r["CIDEr"] for r in val]
    name = f"{config.model}/{config.cell}"
    rewards = {name: ([r["step"] for r in train if "reward" in r], [r["reward"] for r in train if "reward" in r])}
    plot_training_curves(
        run_dir / "loss.png", {name: ([r["step"] for r in train], [r["loss"] for r in train])},
        {name: (vsteps, vvals)} if vsteps else None,
        title="SCST policy-gradient loss" if config.objective == "scst" else "Training loss",
        loss_label="policy-gradient loss" if config.objective == "scst" else None,
        rewards=rewards if rewards[name][0] else None,
    )


def _check_resumable(path: Path, vocab: Vocabulary, config: CaptionConfig) -> None:
    """Refuse, before any weight is loaded, to resume a run whose vocabulary, cell or batch-norm statistics
    options differ from the ones it would now be built with."""
    from bnrhn.training import load_checkpoint

    task = load_checkpoint(path).get("task")
    if not isinstance(task, dict) or task.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a captioning run's checkpoint; cannot resume it as one")
    saved_model = task.get("model_config", {})
    saved_cell = saved_model.get("cell", config.cell)
    saved_options = pin_statistics(saved_cell, legacy_statistics(saved_cell, saved_model.get("cell_options", {})))
    now = pin_statistics(config.cell, config.cell_options)
    if saved_cell != config.cell or saved_options != now:
        raise ValueError(
            f"cannot resume {path}: it was trained with cell {saved_model.get('cell')!r} and options {saved_options}, "
            f"the settings now give {config.cell!r} with {now}; resume with the run's own settings "
            "(bnrhn train --resume --run-dir DIR), or start a new run"
        )
    saved = Vocabulary.from_dict(task["vocab"])
    if saved != vocab:
        raise ValueError(
            f"cannot resume {path}: its vocabulary ({len(saved)} words, fingerprint {saved.fingerprint}) differs "
            f"from the one built from the current data ({len(vocab)} words, fingerprint {vocab.fingerprint}); "
            "resume with the same data set and settings (--min-count, --max-*-images), or start a new run"
        )


def _validation_line(task: CaptionTask, log: Log):
    """The trainer's ``on_validation``: one line per validation (metrics and a sample caption)."""

    def announce(step: int, scores: dict[str, float]) -> None:
        parts = " ".join(f"{k} {v:.3f}" for k, v in scores.items())
        sample = f" | {task.last_samples[0][1]!r}" if task.last_samples else ""
        log(f"validation: {parts}{sample}")

    return announce


# -- loading a trained captioner -----------------------------------------------------------------------------
@dataclass
class LoadedCaptioner:
    """A trained captioner ready to caption: model (eval mode, on ``device``), vocabulary, run config, the
    description of the encoder it was trained on, and the checkpoint it came from."""

    model: Captioner
    vocab: Vocabulary
    config: CaptionConfig
    encoder: dict
    checkpoint: Path
    device: torch.device = torch.device("cpu")


def load_captioner(checkpoint: str | Path, device: str = "cpu") -> LoadedCaptioner:
    """Model (eval mode, on ``device``: auto, cpu, cuda, cuda:N, mps), vocabulary and config from a checkpoint
    file or run folder, whatever device it was trained on."""
    from bnrhn.devices import resolve_device
    from bnrhn.training import check_finite_weights, load_checkpoint

    where = resolve_device(device)
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)  # onto the CPU: checked there, then moved
    task = ckpt.get("task")
    if not isinstance(task, dict) or task.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is a bnrhn checkpoint but not of a captioner (no captioning task state)")
    vocab = Vocabulary.from_dict(task["vocab"])
    mcfg = CaptionerConfig.from_dict(task["model_config"])
    mcfg.cell_options = legacy_statistics(mcfg.cell, mcfg.cell_options)
    if mcfg.vocab_size != len(vocab):
        raise ValueError(f"{path}: the model was built for {mcfg.vocab_size} words but the saved vocabulary "
                         f"has {len(vocab)} (fingerprint {vocab.fingerprint}); the checkpoint is inconsistent")
    check_finite_weights(ckpt["model"], path)
    model = build_captioner(mcfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: model weights do not fit the saved model config ({str(exc)[:300]})") from None
    model.eval().to(where)
    if path.is_dir():
        path = path / ("best.pt" if (path / "best.pt").exists() else "last.pt")
    return LoadedCaptioner(model, vocab, CaptionConfig.from_dict(task["config"], str(path)), task["encoder"], path,
                           where)


def _encoder_for(loaded: LoadedCaptioner, weights: str | Path | None, log: Log):
    if weights is None and loaded.config.weights and Path(loaded.config.weights).is_file():
        weights = loaded.config.weights  # the file the model was trained with, if it is still there
    enc = build_encoder(loaded.encoder["encoder"], weights, loaded.config.resize, device=str(loaded.device))
    if enc.weights_id != loaded.encoder.get("weights"):
        log(f"warning: the encoder weights found now (sha256 {enc.weights_id[:12]}) differ from the ones the "
            f"model was trained with ({str(loaded.encoder.get('weights'))[:12]}); captions may be worse")
    return enc


# -- evaluation ------------------------------------------------------------------------------------------
def evaluate(checkpoint: str | Path, split: str = "test", beam: int = 3, method: str = "beam", max_len: int | None = None,
             length_norm: float | None = None, metrics=ALL_METRICS, out_dir: str | Path | None = None,
             dataset: str | None = None, images: str | None = None, max_images: int | None = None,
             cache_dir: str | None = None, progress: bool | None = None, device: str = "cpu",
             length_penalty: str | None = None, block_trigrams: bool | None = None,
             remove_bad_endings: bool | None = None,
             log: Log = stderr_log) -> tuple[list[dict], dict[str, float]]:
    """Caption every image of ``split`` and score them; returns (COCO-format results, {metric: value}).

    The data set is the checkpoint's own (same subset limits) unless ``dataset`` names another. With
    ``out_dir`` the results go to ``results_<split>.json`` (COCO format: ``[{"image_id", "caption"}]``)
    and the scores to ``metrics_<split>.json`` / ``.md``. ``device``: where the encoder and the decoding run.
    ``length_norm``, ``length_penalty``, ``block_trigrams``, ``remove_bad_endings``: the decoding options
    (:mod:`bnrhn.decoding.constraints`); None = the checkpoint's own (its config, off unless trained with them).
    """
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a folder")
    loaded = load_captioner(checkpoint, device)
    cfg = CaptionConfig.from_dict(loaded.config.to_dict())
    if progress is not None:
        cfg.progress = progress
    if dataset is not None:
        cfg.dataset, cfg.images = dataset, images
        cfg.max_train_images = cfg.max_val_images = cfg.max_test_images = None
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    split = {"dev": "val", "valid": "val", "validation": "val"}.get(split, split)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    ds = dataset_for_config(cfg, log)
    recs = ds.split(split)
    if max_images is not None:
        recs = recs[:max_images]
    if not recs:
        raise ValueError(f"{ds.name}: the {split} split is empty")
    # features of this split only (a cache of the whole data set is reused when there is one)
    ds = CaptionDataset(ds.name, recs, list(ds.problems), ds.source)
    enc = _encoder_for(loaded, None, log)
    grid = loaded.model.needs_grid
    ds, fs = attach_features(ds, enc, cfg.cache_dir, grid, cfg.strict, cfg.progress, cfg.feature_batch_size, log)
    recs = ds.records
    feats = SplitFeatures.build(recs, fs, grid)
    t0 = time.perf_counter()
    options = decoding_options(cfg, length_norm=length_norm, length_penalty=length_penalty,
                               block_trigrams=block_trigrams, remove_bad_endings=remove_bad_endings)
    caps = decode_split(loaded.model, feats, loaded.vocab, method, beam, cfg.max_len if max_len is None else max_len,
                        **options)
    seconds = time.perf_counter() - t0
    results = [{"image_id": _coco_id(r.image_id), "caption": c} for r, c in zip(recs, caps)]
    scores = score_captions({r.image_id: c for r, c in zip(recs, caps)}, {r.image_id: r.captions for r in recs},
                            metrics)
    log(f"evaluate: {len(recs)} {split} images captioned ({method}{' %d' % beam if method == 'beam' else ''}) "
        f"in {seconds:.1f} s")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"results_{split}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        meta = {"checkpoint": str(loaded.checkpoint), "split": split, "images": len(recs), "method": method,
                "beam": beam, **options, "dataset": cfg.dataset, "scores": scores}
        (out / f"metrics_{split}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (out / f"metrics_{split}.md").write_text(scores_table(scores) + "\n", encoding="utf-8")
    return results, scores


def batchnorm_leak(checkpoint: str | Path, split: str = "val", batch_size: int | None = None, precise_batches: int = 0,
                   cache_dir: str | None = None, progress: bool | None = None, device: str = "cpu",
                   log: Log = stderr_log):
    """The batch-composition diagnostic (:mod:`bnrhn.analysis.batchnorm`) of a captioner checkpoint on its own
    data set: teacher-forced loss on ``split`` with batch statistics over length-sorted and random batches and
    with population statistics, plus the population-statistics loss on training captions. ``batch_size``
    defaults to the run's training batch size. Returns a :class:`~bnrhn.analysis.batchnorm.LeakReport`."""
    from bnrhn.analysis.batchnorm import caption_leak

    loaded = load_captioner(checkpoint, device)
    cfg = CaptionConfig.from_dict(loaded.config.to_dict())
    if progress is not None:
        cfg.progress = progress
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    split = {"dev": "val", "valid": "val", "validation": "val"}.get(split, split)
    if split not in ("val", "test"):
        raise ValueError(f"split must be val or test (the training captions are measured too), got {split!r}")
    ds = dataset_for_config(cfg, log)
    train_recs, recs = ds.split("train"), ds.split(split)
    if not recs:
        raise ValueError(f"{ds.name}: the {split} split is empty")
    ds = CaptionDataset(ds.name, train_recs + recs, list(ds.problems), ds.source)
    enc = _encoder_for(loaded, None, log)
    grid = loaded.model.needs_grid
    ds, fs = attach_features(ds, enc, cfg.cache_dir, grid, cfg.strict, cfg.progress, cfg.feature_batch_size, log)
    keep = {r.image_id for r in ds.records}
    train_recs = [r for r in train_recs if r.image_id in keep]
    recs = [r for r in recs if r.image_id in keep]
    caps = CaptionTensors.build(recs, loaded.vocab, cfg.max_caption_len)
    train_caps = CaptionTensors.build(train_recs, loaded.vocab, cfg.max_caption_len) if train_recs else None
    return caption_leak(loaded.model, caps, SplitFeatures.build(recs, fs, grid), train_caps,
                        SplitFeatures.build(train_recs, fs, grid) if train_recs else None,
                        batch_size=batch_size or cfg.batch_size, seed=cfg.seed, precise_batches=precise_batches,
                        split_name=split)


def scores_table(scores: dict[str, float]) -> str:
    """A one-row markdown table of the scores."""
    names = [m for m in ALL_METRICS if m in scores] + [m for m in scores if m not in ALL_METRICS]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n| " + " | ".join(
        f"{scores[m]:.3f}" for m in names) + " |"


def _coco_id(image_id: str) -> Any:
    return int(image_id) if image_id.isdigit() else image_id


# -- captioning images -------------------------------------------------------------------------------------
@dataclass
class ImageCaptions:
    """The captions of one image, best first, as (text, log-probability); ``error`` for unreadable files.

    With ``caption_images(..., attention=True)`` (Show, Attend and Tell models): ``attention[k]`` is the
    ``[words, grid_h, grid_w]`` array of caption k's attention maps (row j: the α with which the model chose
    word j of ``captions[k][0].split()``; each sums to 1), and ``attention_box`` the region of the image
    (left, top, right, bottom, in pixels of the image as read) that the encoder's grid covers."""

    path: str
    captions: list[tuple[str, float]]
    error: str | None = None
    attention: list[np.ndarray] | None = None
    attention_box: tuple[float, float, float, float] | None = None


def caption_images(checkpoint: str | Path, paths, beam: int = 3, topk: int = 3, max_len: int | None = None,
                   length_norm: float | None = None, weights: str | Path | None = None, batch_size: int = 32,
                   method: str = "beam", temperature: float = 1.0, seed: int = 0, device: str = "cpu",
                   attention: bool = False, length_penalty: str | None = None, block_trigrams: bool | None = None,
                   remove_bad_endings: bool | None = None, log: Log = stderr_log) -> list[ImageCaptions]:
    """Captions of each image file, best first, with their log-probabilities.

    ``method="beam"``: the ``topk`` best captions of a beam of ``beam``; ``"greedy"``: one caption;
    ``"sample"``: ``topk`` captions sampled at ``temperature`` (reproducible with ``seed``). Files that
    cannot be read get ``error`` set and no captions; the others are captioned all the same. ``device``:
    where the encoder and the decoding run. ``length_norm``, ``length_penalty``, ``block_trigrams``,
    ``remove_bad_endings``: the decoding options (:mod:`bnrhn.decoding.constraints`); None = the checkpoint's.

    ``attention=True`` (Show, Attend and Tell checkpoints only; others are refused, naming the model, before
    any image is read): each caption's per-word attention maps too (:class:`ImageCaptions`), from the decoded
    caption read again teacher-forced (:meth:`bnrhn.models.ShowAttendTell.attention_maps`) — the α the
    decoder had when it chose each word, whichever ``method`` chose them.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "beam" and not 1 <= topk <= beam:
        raise ValueError(f"--topk must be between 1 and the beam size ({beam}), got {topk}")
    loaded = load_captioner(checkpoint, device)
    if attention:
        grid_shape = attention_grid(loaded)
    enc = _encoder_for(loaded, weights, log)
    generator = torch.Generator(loaded.device).manual_seed(seed)
    out: list[ImageCaptions] = []
    paths = [str(p) for p in paths]
    for s in range(0, len(paths), batch_size):
        results = [ImageCaptions(p, []) for p in paths[s : s + batch_size]]
        tensors, ok = [], []
        for item in results:
            try:
                image = load_image(item.path)
                tensors.append(enc.preprocess(image))
                ok.append(item)
                if attention:
                    item.attention_box = enc.crop_box(*image.size)
            except ImageFileError as exc:
                item.error = exc.reason
        if tensors:
            feats, hyps = _decode_images(loaded, enc, stack_images(tensors), method, beam, topk, max_len, length_norm,
                                         temperature, generator, dict(length_penalty=length_penalty,
                                                                      block_trigrams=block_trigrams,
                                                                      remove_bad_endings=remove_bad_endings))
            for item, hs in zip(ok, hyps):
                item.captions = [(loaded.vocab.decode(h.tokens), h.logprob) for h in hs]
            if attention:
                maps = caption_attention(loaded.model, feats, [[h.tokens for h in hs] for hs in hyps], grid_shape)
                for item, m in zip(ok, maps):
                    item.attention = m
        out.extend(results)
    return out


def attention_grid(loaded: LoadedCaptioner) -> tuple[int, int]:
    """(grid_h, grid_w) of the attention maps of a Show, Attend and Tell checkpoint; ``ValueError`` naming the
    model for any other (Show and Tell reads one pooled vector: it has no attention to show)."""
    from bnrhn.models import ShowAttendTell

    model = loaded.model
    if not isinstance(model, ShowAttendTell):
        raise ValueError(
            f"{loaded.checkpoint} is a {model.cfg.model} model (Show and Tell), which has no attention over the "
            "image: attention maps need a Show, Attend and Tell checkpoint (bnrhn train --model show_attend_tell)"
        )
    n = int(loaded.encoder.get("grid_size") or model.cfg.grid_size)
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"{loaded.checkpoint}: the encoder's grid of {n} positions is not square; cannot lay the "
                         "attention maps out as images")
    return side, side


def caption_attention(model, features: torch.Tensor, captions: list[list[list[int]]],
                      grid_shape: tuple[int, int]) -> list[list[np.ndarray]]:
    """The attention maps of decoded captions: ``features`` ``[B, N, F]`` (as decoded), ``captions[b]`` the
    word ids (no ``<start>``/``<end>``) of image b's captions → per image, per caption, a float32 array
    ``[words, grid_h, grid_w]``: the captions read again teacher-forced in one batch
    (:meth:`bnrhn.models.ShowAttendTell.attention_maps`)."""
    cfg = model.cfg
    rows = [(b, toks) for b, caps in enumerate(captions) for toks in caps]
    out: list[list[np.ndarray]] = [[] for _ in captions]
    if not rows:
        return out
    tokens, lengths = caption_rows([t for _, t in rows], cfg.start_id, cfg.end_id, cfg.pad_id)
    device = features.device
    index = torch.tensor([b for b, _ in rows], device=device)
    alphas = model.attention_maps(features.index_select(0, index), tokens.to(device), lengths.to(device))
    alphas = alphas.float().cpu().numpy()
    for i, (b, toks) in enumerate(rows):  # rows 0..n−1: the words; row n (the <end> step) is left out
        out[b].append(alphas[i, : len(toks)].reshape(len(toks), *grid_shape).copy())
    return out


def attention_figure(item: ImageCaptions, path: str | Path, which: int = 0) -> Path:
    """Write the Show-Attend-Tell figure (:func:`bnrhn.reports.attention.plot_attention`) of caption ``which``
    of a :class:`ImageCaptions` from ``caption_images(..., attention=True)``: the part of the image the
    encoder saw, and one panel per word with its attention map laid over it."""
    from bnrhn.reports.attention import plot_attention

    if item.attention is None or item.attention_box is None:
        raise ValueError(f"{item.path}: no attention maps (caption it with attention=True)")
    text = item.captions[which][0]
    image = load_image(item.path)
    box = item.attention_box
    if box != (0.0, 0.0, float(image.width), float(image.height)):
        image = image.crop(tuple(int(round(v)) for v in box))
    return plot_attention(path, np.asarray(image), text.split(), item.attention[which], caption=text)


def caption_tensors(loaded: LoadedCaptioner, enc, images: torch.Tensor, method: str = "beam", beam: int = 3,
                    topk: int = 3, max_len: int | None = None, length_norm: float | None = None,
                    temperature: float = 1.0, generator: torch.Generator | None = None,
                    **options) -> list[list[tuple[str, float]]]:
    """Captions (text, log-probability), best first, of a batch of preprocessed images ``[B, 3, H, W]``: the
    encoder, then one batched decoding. ``bnrhn caption`` and ``bnrhn serve`` both caption through here.
    ``options``: ``length_penalty``, ``block_trigrams``, ``remove_bad_endings`` (None or left out: the
    checkpoint's)."""
    _, hyps = _decode_images(loaded, enc, images, method, beam, topk, max_len, length_norm, temperature, generator,
                             options)
    return [[(loaded.vocab.decode(h.tokens), h.logprob) for h in hs] for hs in hyps]


def _decode_images(loaded: LoadedCaptioner, enc, images: torch.Tensor, method: str, beam: int, topk: int,
                   max_len: int | None, length_norm: float | None, temperature: float,
                   generator: torch.Generator | None, options: dict | None = None):
    """(the features the model read, the hypotheses per image) of :func:`caption_tensors`."""
    max_len = loaded.config.max_len if max_len is None else max_len  # 0 is an error (decoding says so)
    opts = decoding_options(loaded.config, length_norm=length_norm, **(options or {}))
    constraints = decoding_constraints(loaded.vocab, opts["block_trigrams"], opts["remove_bad_endings"])
    with torch.no_grad():
        pooled, grid = enc.encode(images)
        feats = grid if loaded.model.needs_grid else pooled
        # the cached training features were float16; the model's device and dtype
        feats = feats.half().to(loaded.device, next(loaded.model.parameters()).dtype)
        hyps = decode(loaded.model, feats, method, beam, max_len, opts["length_norm"], topk, temperature,
                      generator=generator, length_penalty=opts["length_penalty"], **constraints)
    return feats, hyps
