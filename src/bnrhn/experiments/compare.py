"""The BN-RHN paper's experiment: train several caption decoders under one protocol and compare them.

Every cell is trained with the same data, encoder, sizes, optimiser, budget and seed, then captions the
test split with beam search and is scored on the seven metrics. The experiment folder holds:

- ``results.md`` / ``results.json``: the paper's table (rows BLEU-1..4, ROUGE-L, METEOR, CIDEr; one column
  per cell; best in bold; mean ± std over seeds when there are several), plus training time, tokens/s,
  parameters and steps;
  and the batch-norm diagnostic of each run (:mod:`bnrhn.analysis.batchnorm`: validation loss with batch
  statistics over length-sorted and over random batches, with population statistics, and the
  population-statistics training loss, whose difference to the validation loss is the generalisation gap);
- ``loss.png``: training loss vs steps for every cell on one plot, and validation CIDEr vs steps;
- ``gallery.html`` (+ ``images/``): test images with every model's caption and the human captions, and for
  Show, Attend and Tell each model's attention figure of the image (``attention/<cell>/``, Xu et al. 2015:
  one panel per word with its attention map over the image);
- ``runs/<cell>-seed<N>/``: each run's checkpoints, logs, test captions (``results_test.json``), scores, and
  ``compare_run.json`` (what the report needs of the run, so that ``--resume`` keeps it);
- ``command.txt`` and ``compare.json``: the exact command and the resolved settings to reproduce it.

The comparison is a specification (:class:`CaptionComparison`) of the one experiment runner,
:mod:`bnrhn.experiments.runner`: the folder checks, ``--resume`` (only ``--seeds`` may grow), the lock, the
loop over the runs and divergence as a result are the runner's; training, scoring and the report are here.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from bnrhn.experiments.runner import ExperimentSpec, Run, follow_experiment, run_experiment
from bnrhn.reports import METRIC_ORDER, metrics_table, plot_training_curves, write_gallery

Log = Callable[[str], None]

MODEL_NAMES = {"show_tell": "Show and Tell", "show_attend_tell": "Show, Attend and Tell"}
REPORT_FILES = ("results.md", "results.json", "loss.png", "gallery.html", "command.txt", "compare.json")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- settings -------------------------------------------------------------------------------------------
def parse_budget(text: str | int | float) -> tuple[int | None, float | None]:
    """``"2000"`` / ``"2000steps"`` → (2000 steps, None); ``"10m"``, ``"10min"``, ``"1.5h"`` → (None, minutes)."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(steps?|m|min|mins|minutes?|h|hours?|s|sec|seconds?)?", s)
    if not m:
        raise ValueError(f"--budget must be a number of steps (e.g. 2000) or a time (e.g. 10m, 1.5h), got {text!r}")
    value, unit = float(m.group(1)), m.group(2) or "steps"
    if value <= 0:
        raise ValueError(f"--budget must be positive, got {text!r}")
    if unit.startswith("step"):
        if value != int(value):
            raise ValueError(f"--budget in steps must be a whole number, got {text!r}")
        return int(value), None
    minutes = value * 60 if unit.startswith("h") else value / 60 if unit.startswith("s") else value
    return None, minutes


@dataclass
class CompareSettings:
    """One comparison: the cells, the shared base config (a ``CaptionConfig``), budget, seeds, output."""

    cells: list[str]
    base: Any  # CaptionConfig
    out_dir: Path
    budget_steps: int | None = None
    budget_minutes: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    beam: int = 3
    gallery_size: int = 12
    overwrite: bool = False
    resume: bool = False
    command: str = ""
    jobs: int = 1  # runs trained at a time (not a setting of the experiment: a resume may change it)

    def to_dict(self) -> dict:
        """The settings saved in ``compare.json`` (what a resume must match: :meth:`CaptionComparison.must_match`)."""
        return {
            "cells": self.cells, "seeds": self.seeds, "budget_steps": self.budget_steps,
            "budget_minutes": self.budget_minutes, "beam": self.beam, "gallery_size": self.gallery_size,
            "out_dir": str(self.out_dir), "command": self.command, "base_config": self.base.to_dict(),
        }


def check_settings(s: CompareSettings, log: Log = _stderr) -> None:
    """Every check of the settings that can fail before training starts: device, cells, budget, seeds, data set
    (the output folder is the runner's: :func:`bnrhn.experiments.runner.check_folder`)."""
    from bnrhn.captioning.api import dataset_for_config
    from bnrhn.cells import CELLS, build_cell, cell_options

    from bnrhn.devices import resolve_device

    resolve_device(s.base.device)  # a missing GPU fails before the data set is read
    if not s.cells:
        raise ValueError("--cells needs at least one cell name")
    unknown = [c for c in s.cells if c not in CELLS]
    if unknown:
        raise ValueError(f"unknown cell(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(CELLS)}")
    if len(set(s.cells)) != len(s.cells):
        raise ValueError(f"--cells names a cell twice: {s.cells}")
    if s.budget_steps is None and s.budget_minutes is None:
        raise ValueError("a budget is needed: --budget STEPS or --budget MINUTESm")
    if (s.budget_steps is not None and s.budget_steps <= 0) or (s.budget_minutes is not None and s.budget_minutes <= 0):
        raise ValueError("--budget must be positive")
    if not s.seeds:
        raise ValueError("--seeds must be at least 1")
    if s.beam < 1:
        raise ValueError(f"--beam must be ≥ 1, got {s.beam}")
    for key in s.base.cell_options:
        if not any(key in cell_options(c) for c in s.cells):
            raise ValueError(f"--cell-option {key}: none of the cells {s.cells} has that option; see 'bnrhn cells'")
    for cell in s.cells:  # a bad option value or size fails here, not after the first cell has trained
        build_cell(cell, 8, 8, **options_for(cell, s.base.cell_options))
        replace(s.base, cell=cell)  # the config's own checks for this cell (MUT1/MUT2: embedding = hidden size)
    ds = dataset_for_config(replace(s.base, progress=False), lambda m: None)  # raises for a missing data set
    counts = ds.counts()
    if counts["test"] == 0:
        raise ValueError(f"{ds.name} has no test images to compare the models on")
    log(f"compare: {ds.summary()}")


def options_for(cell: str, options: dict) -> dict:
    """The shared ``--cell-option`` values that ``cell`` accepts (``depth=3`` applies to RHN cells only)."""
    from bnrhn.cells import cell_options

    accepted = cell_options(cell)
    return {k: v for k, v in options.items() if k in accepted}


# -- running ---------------------------------------------------------------------------------------------
@dataclass
class CellRun:
    """One trained and scored decoder: what the report needs of it."""

    cell: str
    seed: int
    run_dir: Path
    scores: dict[str, float]
    steps: int
    train_seconds: float
    seconds: float
    tokens_per_s: float
    n_params: int
    stopped: str
    losses: list[tuple[int, float]]
    validation: list[tuple[int, float]]
    captions: dict[str, str]  # test image id -> caption
    batchnorm: dict[str, float] = field(default_factory=dict)  # leak_summary of the best checkpoint
    batching: str = ""

    def to_dict(self) -> dict:
        return {
            "cell": self.cell, "seed": self.seed, "run_dir": str(self.run_dir), "scores": self.scores,
            "steps": self.steps, "train_seconds": self.train_seconds, "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s, "parameters": self.n_params, "stopped": self.stopped,
            "batching": self.batching, "batchnorm": self.batchnorm,
        }

    def record(self) -> dict:
        """Everything the report needs (what ``compare_run.json`` holds), so that a resumed comparison does not
        redo a finished run."""
        return {**self.to_dict(), "losses": self.losses, "validation": self.validation, "captions": self.captions}

    @classmethod
    def from_record(cls, d: dict) -> "CellRun":
        return cls(
            cell=d["cell"], seed=d["seed"], run_dir=Path(d["run_dir"]), scores=d["scores"], steps=d["steps"],
            train_seconds=d["train_seconds"], seconds=d["seconds"], tokens_per_s=d["tokens_per_s"],
            n_params=d["parameters"], stopped=d["stopped"], losses=[tuple(x) for x in d["losses"]],
            validation=[tuple(x) for x in d["validation"]], captions=d["captions"],
            batchnorm=d.get("batchnorm") or {}, batching=d.get("batching", ""),
        )


RUN_SUMMARY = "compare_run.json"  # written into each run's folder once it is trained and evaluated


@dataclass
class _Trained:
    """What the training of one run left: its best checkpoint (None: none was saved) and its numbers."""

    best: Path | None
    steps: int
    stopped: str
    train_seconds: float
    tokens_per_s: float
    n_params: int


class CaptionComparison(ExperimentSpec):
    """The decoder comparison as a specification of :func:`bnrhn.experiments.runner.run_experiment`: one run
    per (seed, cell), trained under the shared budget, then captioning the test split with beam search and
    scored. A run whose loss becomes NaN is a result, not a crash: its best checkpoint so far (if any) is
    evaluated and the table says it diverged. (``train`` notes when the run started, for ``diverged``.)"""

    noun = "comparison"
    log_name = "compare"
    settings_file = "compare.json"
    result_file = RUN_SUMMARY
    may_grow = ("seeds",)
    resume_note = "only --seeds may grow, to add seeds to a finished comparison"

    def __init__(self, s: CompareSettings) -> None:
        self.s = s
        self._started = 0.0

    def settings(self) -> dict:
        return self.s.to_dict()

    def must_match(self, settings: dict) -> dict:
        """All but the command, the folder and the gallery size (only the report); of the base config, settings
        added since the comparison was saved take their defaults (what its runs trained with), and the progress
        bar, --overwrite and the divergence watchdog (it only stops a run that has already diverged;
        comparisons saved before it existed have no such key) may change."""
        kept = {k: v for k, v in settings.items() if k not in ("command", "out_dir", "gallery_size")}
        if isinstance(kept.get("base_config"), dict):
            config = type(self.s.base)  # CaptionConfig
            saved = kept["base_config"]
            filled = config.from_dict({k: v for k, v in saved.items() if k in config.__dataclass_fields__}).to_dict()
            base = json.loads(json.dumps({**filled, **saved}))
            for key in ("progress", "overwrite", "diverge_factor"):
                base.pop(key, None)
            kept["base_config"] = base
        return kept

    def check(self, log: Log) -> None:
        check_settings(self.s, log)

    def cost(self, run: Run) -> float:
        from bnrhn.cells import relative_step_cost

        return relative_step_cost(run.config.cell, run.config.cell_options)

    def prepare(self, log: Log) -> None:
        """The data set and its features in the cache, once, before runs train side by side."""
        from bnrhn.captioning.api import prepare_data

        prepare_data(self.s.base, log)

    def runs(self) -> list[Run]:
        out = Path(self.s.out_dir)
        runs = []
        for seed in self.s.seeds:
            for cell in self.s.cells:
                run_dir = out / "runs" / f"{cell}-seed{seed}"
                runs.append(Run(f"{cell} seed {seed}", run_dir, _run_config(self.s, cell, seed, run_dir)))
        return runs

    def train(self, run: Run, resume: bool, log: Log) -> dict:
        from bnrhn.captioning import train  # looked up at each call (the tests replace it)

        self._started = time.perf_counter()
        result = train(run.config, resume=resume, log=log)
        trained = _Trained(result.best_checkpoint, result.steps, result.stopped, result.train_seconds,
                           result.tokens_per_s, result.n_params)
        return self._scored(run, trained, log)

    def diverged(self, run: Run, exc: Exception, log: Log) -> dict:
        best = run.run_dir / "best.pt" if (run.run_dir / "best.pt").is_file() else None
        steps = max((r["step"] for r in _log_rows(run.run_dir) if r.get("kind") == "train"), default=0)
        trained = _Trained(best, steps, "diverged (NaN loss)", time.perf_counter() - self._started, float("nan"),
                           _count_parameters(run.config))
        return self._scored(run, trained, log)

    def follow(self, run: Run, resume: bool) -> None:
        from bnrhn.captioning import train

        train(run.config, resume=resume, log=lambda m: None)

    def _scored(self, run: Run, trained: _Trained, log: Log) -> dict:
        """Caption the test split with the run's best checkpoint, score it, and the batch-norm diagnostic."""
        from bnrhn.captioning import evaluate
        from bnrhn.captioning.scoring import ALL_METRICS

        cfg = run.config
        rows = _log_rows(run.run_dir)
        losses = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
        validation = [(r["step"], r["CIDEr"]) for r in rows if r.get("kind") == "validation" and "CIDEr" in r]
        if trained.best is None:
            scores, captions = {m: float("nan") for m in METRIC_ORDER}, {}
        else:
            log(f"evaluating {cfg.cell} on the test split (beam {self.s.beam})")
            results, scores = evaluate(trained.best, split="test", beam=self.s.beam, metrics=ALL_METRICS,
                                       out_dir=run.run_dir, progress=cfg.progress, device=self.s.base.device,
                                       log=log)
            captions = {str(r["image_id"]): r["caption"] for r in results}
        leak = _batchnorm_diagnostic(trained.best, log, self.s.base.device) if trained.best is not None else {}
        scored = CellRun(
            cell=cfg.cell, seed=cfg.seed, run_dir=run.run_dir, scores=scores, steps=trained.steps,
            train_seconds=trained.train_seconds, seconds=time.perf_counter() - self._started,
            tokens_per_s=trained.tokens_per_s, n_params=trained.n_params, stopped=trained.stopped, losses=losses,
            validation=validation, captions=captions, batchnorm=leak, batching=_batching_of(cfg),
        )
        log(f"{cfg.cell} seed {cfg.seed}: "
            + ", ".join(f"{m} {scores[m]:.3f}" for m in METRIC_ORDER if m in scores))
        return scored.record()

    def report(self, results: dict[str, dict], out_dir: Path, log: Log) -> dict:
        runs = [CellRun.from_record(r) for r in results.values()]
        summary = write_report(self.s, runs, sum(r.seconds for r in runs), log)
        log(f"compare: report written to {out_dir / 'results.md'} (gallery: {out_dir / 'gallery.html'})")
        return summary


def run_compare(s: CompareSettings, log: Log = _stderr) -> dict:
    """Check, train every cell for every seed, evaluate on the test split, write the report; returns the summary.

    Under ``torchrun`` every rank trains every run (data-parallel, :func:`bnrhn.captioning.train`); rank 0
    alone checks, evaluates and writes the experiment folder, and the other ranks return ``{}``."""
    from bnrhn.training.distributed import environment_rank

    from bnrhn.training.distributed import environment_world_size

    spec = CaptionComparison(s)
    if s.jobs > 1 and environment_world_size() > 1:
        raise ValueError("--jobs N trains runs side by side in processes of one machine; under torchrun every "
                         "process already trains each run data-parallel: leave --jobs at 1")
    if environment_rank() != 0:
        follow_experiment(spec, resume=s.resume)
        return {}
    return run_experiment(spec, s.out_dir, resume=s.resume, overwrite=s.overwrite, command=s.command, log=log,
                          jobs=s.jobs)


def _run_config(s: CompareSettings, cell: str, seed: int, run_dir: Path):
    return replace(
        s.base, cell=cell, cell_options=options_for(cell, s.base.cell_options), seed=seed, run_dir=str(run_dir),
        overwrite=True, max_steps=s.budget_steps, max_minutes=s.budget_minutes, epochs=10**6,
    )


def _batchnorm_diagnostic(best: Path, log: Log, device: str = "cpu") -> dict[str, float]:
    """The batch-norm leak numbers of the best checkpoint (validation split), {} without validation captions."""
    from bnrhn.analysis.batchnorm import leak_summary
    from bnrhn.captioning.api import batchnorm_leak

    try:
        report = batchnorm_leak(best, split="val", progress=False, device=device, log=lambda m: None)
    except Exception as exc:  # e.g. no validation captions: the trained and scored run stays a result
        log(f"no batch-norm diagnostic ({type(exc).__name__}: {exc})")
        return {}
    summary = leak_summary(report)
    log("validation loss " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in summary.items() if k.startswith("loss_"))
        + (f"; generalisation gap {summary['generalisation_gap']:.3f}" if "generalisation_gap" in summary else ""))
    return summary


def _batching_of(cfg) -> str:
    from bnrhn.cells import build_cell
    from bnrhn.captioning.task import resolve_batching

    return resolve_batching(cfg.batching, build_cell(cfg.cell, 8, 8, **cfg.cell_options))


def _log_rows(run_dir: Path) -> list[dict]:
    from bnrhn.training import read_log

    path = run_dir / "log.jsonl"
    return list(read_log(path)) if path.is_file() else []


def _count_parameters(cfg) -> int:
    from bnrhn.training import load_checkpoint

    ckpt = load_checkpoint(Path(cfg.run_dir) / "last.pt") if (Path(cfg.run_dir) / "last.pt").is_file() else None
    return sum(v.numel() for v in ckpt["model"].values()) if ckpt else 0


# -- the report ------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float] | float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.mean(values), statistics.stdev(values)


LEAK_ROWS = (
    ("loss_sorted", "val loss, batch stats, sorted batches"),
    ("loss_random", "val loss, batch stats, random batches"),
    ("loss_population", "val loss, population stats (inference)"),
    ("train_loss_population", "train loss, population stats"),
    ("generalisation_gap", "generalisation gap (val − train)"),
)


def _logged_train_loss(run: CellRun, last: int = 100) -> float | None:
    """Mean training loss of the run's last ``last`` logged steps (batch statistics and dropout, as trained)."""
    tail = [loss for _, loss in run.losses[-last:] if loss is not None and math.isfinite(loss)]
    return sum(tail) / len(tail) if tail else None


def _logged_gap(run: CellRun) -> float | None:
    train = _logged_train_loss(run)
    val = run.batchnorm.get("loss_population")
    return None if train is None or val is None else val - train


def _fmt_mean_std(values: list[float | None]) -> str:
    """"0.512" or "0.512 ± 0.010" over the runs that have the number; "–" when none has it."""
    v = _mean_std([x for x in values if x is not None])
    if isinstance(v, tuple):
        return f"{v[0]:.3f} ± {v[1]:.3f}"
    return "–" if math.isnan(v) else f"{v:.3f}"


def _nan_to_none(x):
    """Strict JSON has no NaN: a missing score (a run that diverged before any checkpoint) becomes null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _fmt_seconds(sec: float) -> str:
    return f"{sec / 60:.1f} min" if sec >= 90 else f"{sec:.0f} s"


def _decoding_note(base) -> str:
    """The decoding options the runs were decoded with (bnrhn.decoding.constraints), when any is on."""
    on = []
    if base.length_norm:
        on.append(f"length penalty {base.length_penalty} α {base.length_norm:g}")
    if base.block_trigrams:
        on.append("trigram blocking")
    if base.remove_bad_endings:
        on.append("no bad endings")
    return "; " + ", ".join(on) if on else ""


def write_report(s: CompareSettings, runs: list[CellRun], seconds: float, log: Log = _stderr) -> dict:
    out = Path(s.out_dir)
    by_cell = {c: [r for r in runs if r.cell == c] for c in s.cells}
    metrics = [m for m in METRIC_ORDER if any(m in r.scores for r in runs)]
    columns = {c: {m: _mean_std([r.scores.get(m, float("nan")) for r in rs]) for m in metrics} for c, rs in by_cell.items()}
    mean = lambda xs: sum(xs) / len(xs)
    extra = {
        "training time (per run)": {c: _fmt_seconds(mean([r.train_seconds for r in rs])) for c, rs in by_cell.items()},
        "tokens/s (training)": {c: f"{mean([r.tokens_per_s for r in rs]):,.0f}" for c, rs in by_cell.items()},
        "parameters": {c: f"{rs[0].n_params:,}" for c, rs in by_cell.items()},
        "steps": {c: f"{mean([r.steps for r in rs]):.0f}" for c, rs in by_cell.items()},
        "training batches": {c: rs[0].batching or "bucketed" for c, rs in by_cell.items()},
    }
    for key, label in LEAK_ROWS:
        if any(key in r.batchnorm for r in runs):
            extra[label] = {c: _fmt_mean_std([r.batchnorm.get(key) for r in rs]) for c, rs in by_cell.items()}
    if any("loss_population" in r.batchnorm and r.losses for r in runs):
        extra["train loss, logged (last 100 steps)"] = {
            c: _fmt_mean_std([_logged_train_loss(r) for r in rs]) for c, rs in by_cell.items()}
        extra["gap (val population − logged train)"] = {
            c: _fmt_mean_std([_logged_gap(r) for r in rs]) for c, rs in by_cell.items()}
    if any(r.stopped.startswith("diverged") for r in runs):
        extra["diverged (NaN loss)"] = {c: f"{sum(r.stopped.startswith('diverged') for r in rs)} of {len(rs)}"
                                        for c, rs in by_cell.items()}
    base = s.base
    budget = f"{s.budget_steps} steps" if s.budget_steps else f"{s.budget_minutes:g} minutes"
    seeds_note = (f"mean ± sample std over {len(s.seeds)} seeds ({', '.join(map(str, s.seeds))})"
                  if len(s.seeds) > 1 else f"seed {s.seeds[0]}")
    table = metrics_table(columns, metrics, extra)
    commands = (out / "command.txt").read_text(encoding="utf-8").splitlines() if (out / "command.txt").is_file() else []
    commands = commands or [s.command]
    md = [
        f"# {MODEL_NAMES.get(base.model, base.model)} decoders compared on {base.dataset}",
        "",
        f"Test split, beam search (beam {s.beam}{_decoding_note(base)}); {seeds_note}; budget {budget} per run; "
        f"hidden {base.hidden_size}, embedding {base.embed_size}, batch {base.batch_size}, {base.optimizer} lr {base.lr:g}, "
        f"encoder {base.encoder}. Best value of each metric in bold. Metrics: coco-caption's definitions "
        "(bnrhn.metrics; CIDEr is CIDEr-D).",
        "",
        table,
        f"Time of the runs (training, validation and test captioning), summed: {_fmt_seconds(seconds)}"
        + (f" (up to {s.jobs} trained at a time, so less wall-clock time). " if s.jobs > 1 else ". ")
        + (f"Reproduce with `{commands[0]}`." if len(commands) <= 1 else
           "Commands run, in order: " + "; ".join(f"`{c}`" for c in commands) + "."),
        "",
        "Loss rows: teacher-forced cross-entropy of the best checkpoint in nats per word (`bnrhn analyze batchnorm`): "
        "on validation captions with batch statistics over length-sorted and over random batches of the training "
        "batch size, and with the population statistics that decoding uses; on up to 5,000 training captions with "
        "population statistics; the logged training loss is the mean of the last 100 training steps (dropout on, batch "
        "statistics). Cells without batch norm have only the population numbers. A sorted-batch loss far "
        "below the others means the model reads its batches' composition (see docs/cells.md).",
        "",
        "![training loss and validation CIDEr](loss.png)",
        "",
        "Captions of test images: [gallery.html](gallery.html)"
        + (" (with each model's attention figures)." if base.model == "show_attend_tell" else "."),
        "",
    ]
    (out / "results.md").write_text("\n".join(md), encoding="utf-8")
    summary = {
        "settings": s.to_dict(),
        "metrics": metrics,
        "table": {c: {m: (list(v) if isinstance(v, tuple) else v) for m, v in col.items()} for c, col in columns.items()},
        "runs": [r.to_dict() for r in runs],
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(_nan_to_none(summary), indent=2) + "\n", encoding="utf-8")

    first = {c: rs[0] for c, rs in by_cell.items()}
    plot_training_curves(
        out / "loss.png",
        {c: ([st for st, _ in r.losses], [lv for _, lv in r.losses]) for c, r in first.items() if r.losses},
        {c: ([st for st, _ in r.validation], [v for _, v in r.validation]) for c, r in first.items() if r.validation},
        title=f"Training loss on {base.dataset} (seed {s.seeds[0]})",
    )
    _write_gallery(s, first, out, log)
    return summary


def _write_gallery(s: CompareSettings, first: dict[str, CellRun], out: Path, log: Log) -> None:
    from bnrhn.captioning.api import dataset_for_config

    ds = dataset_for_config(replace(s.base, progress=False), lambda m: None)
    records = [r for r in ds.split("test") if r.path is not None and Path(r.path).is_file()]
    records = [r for r in records if all(str(_coco_key(r.image_id)) in run.captions for run in first.values())]
    if not records:
        log("compare: no test image files to show in the gallery")
    step = max(1, len(records) // max(1, s.gallery_size))
    chosen = records[::step][: s.gallery_size]
    figures = _attention_figures(s, first, chosen, out, log) if s.base.model == "show_attend_tell" else {}
    items = [
        {"image": r.path, "image_id": r.image_id,
         "captions": {c: run.captions[str(_coco_key(r.image_id))] for c, run in first.items()},
         "references": r.captions, "attention": figures.get(k, {})}
        for k, r in enumerate(chosen)
    ]
    write_gallery(out / "gallery.html", items, title=f"Test captions on {s.base.dataset} (seed {s.seeds[0]})")


def _attention_figures(s: CompareSettings, first: dict[str, CellRun], records, out: Path,
                       log: Log) -> dict[int, dict[str, Path]]:
    """The attention figure (:func:`bnrhn.captioning.attention_figure`) of each gallery image for every cell's
    first run (its best checkpoint, beam search as for the test captions), in ``attention/<cell>/``;
    {gallery position: {cell: figure}}."""
    from bnrhn.captioning.api import attention_figure, caption_images

    figures: dict[int, dict[str, Path]] = {}
    paths = [str(r.path) for r in records]
    for cell, run in first.items():
        if not paths or not any((Path(run.run_dir) / n).is_file() for n in ("best.pt", "last.pt")):
            continue
        results = caption_images(run.run_dir, paths, beam=s.beam, topk=1, device=s.base.device, attention=True,
                                 log=log)
        for k, (r, res) in enumerate(zip(records, results)):
            if res.captions:
                path = out / "attention" / cell / f"{k:04d}-{Path(r.path).stem}.png"
                figures.setdefault(k, {})[cell] = attention_figure(res, path)
    if figures:
        log(f"compare: attention figures of the gallery images in {out / 'attention'}")
    return figures


def _coco_key(image_id: str):
    return int(image_id) if str(image_id).isdigit() else image_id
