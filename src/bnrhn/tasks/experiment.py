"""``bnrhn tasks compare``: cells × sequence lengths × seeds on one long-range task.

Every run is ``bnrhn tasks train`` with the shared settings and its own (cell, length, seed), in
``OUT/runs/<cell>-T<length>-seed<k>``. A run is defined by the shared settings plus those three, so
``--resume`` keeps every finished run (its ``results.json``), continues an interrupted one from its
``last.pt``, and trains the missing ones; cells, lengths and seeds may be added on a resume, the shared
settings may not change. A run that diverges is a result (its error is recorded as NaN, the table counts
it), not the end of the comparison.

The comparison is a specification (:class:`TaskComparison`) of the one experiment runner,
:mod:`bnrhn.experiments.runner`, which checks the folder, holds its lock, writes ``compare.json`` and
``command.txt``, and reuses, continues, trains or records as diverged each run in turn.

Outputs: ``results.json`` (every run), ``results.md`` (test error per cell and length, mean ± standard
deviation over seeds, beside the trivial baseline), ``error_vs_length.png``, and for the longest length
``gradients-T<L>/`` with ‖∂L/∂h_t‖ of every cell's seed-0 model at initialisation and after training
(the numbers and figures of ``bnrhn analyze gradients --task``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from bnrhn.experiments.runner import ExperimentSpec, Run, run_experiment
from bnrhn.tasks.train import RESULTS_FILE, TaskTrainConfig, load_task_config, train_task

__all__ = ["TaskCompareSettings", "TaskComparison", "run_task_compare", "check_compare_settings"]

SETTINGS_FILE = "compare.json"


@dataclass
class TaskCompareSettings:
    base: TaskTrainConfig  # the shared settings (cell, length, seed and run_dir are set per run)
    cells: list[str]
    lengths: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "experiments/tasks"
    gradient_batch: int = 32
    resume: bool = False
    overwrite: bool = False
    command: str = ""
    jobs: int = 1  # runs trained at a time (a resume may change it)

    def shared(self) -> dict[str, Any]:
        """What every run shares (a resumed comparison must match it)."""
        d = asdict(self.base)
        for key in ("cell", "length", "seed", "run_dir", "progress", "overwrite"):
            d.pop(key)
        return d


def _run_dir(s: TaskCompareSettings, cell: str, length: int, seed: int) -> Path:
    return Path(s.out_dir) / "runs" / f"{cell}-T{length}-seed{seed}"


def config_for(s: TaskCompareSettings, cell: str, length: int, seed: int) -> TaskTrainConfig:
    """One run's settings: the shared ones, this cell, length and seed, and the shared cell options that this
    cell has (``depth=3`` goes to the RHN cells only)."""
    from bnrhn.cells import cell_options

    accepted = cell_options(cell)
    return replace(s.base, cell=cell, length=length, seed=seed, run_dir=str(_run_dir(s, cell, length, seed)),
                   cell_options={k: v for k, v in s.base.cell_options.items() if k in accepted})


def check_compare_settings(s: TaskCompareSettings) -> None:
    """Every check of the settings that can fail before training: cells, lengths, seeds, gradient batch (the
    output folder is the runner's: :func:`bnrhn.experiments.runner.check_folder`)."""
    if not s.cells or not s.lengths or not s.seeds:
        raise ValueError("give at least one cell (--cells), one length (--lengths) and one seed (--seeds)")
    for name, values in (("--cells", s.cells), ("--lengths", s.lengths)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name} names a value twice: {values}")
    for cell in s.cells:
        for length in s.lengths:  # builds and validates every run's settings (unknown cell, bad length, ...)
            config_for(s, cell, length, 0)
    if s.gradient_batch < 1:
        raise ValueError(f"--gradient-batch must be ≥ 1, got {s.gradient_batch}")


class TaskComparison(ExperimentSpec):
    """``bnrhn tasks compare`` as a specification of :func:`bnrhn.experiments.runner.run_experiment`: one run
    per (length, cell, seed), each ``bnrhn tasks train`` in its own folder, whose ``results.json`` is the run's
    result; a resume must keep the shared settings (cells, lengths and seeds may change)."""

    noun = "task comparison"
    log_name = "tasks compare"
    settings_file = SETTINGS_FILE
    result_file = RESULTS_FILE
    resume_note = "cells, lengths and seeds may change, the rest may not"

    def __init__(self, s: TaskCompareSettings) -> None:
        self.s = s

    def settings(self) -> dict:
        return {"task": self.s.base.task, "shared": self.s.shared(), "command": self.s.command}

    def must_match(self, settings: dict) -> dict:
        return settings["shared"]

    def check(self, log) -> None:
        check_compare_settings(self.s)

    def runs(self) -> list[Run]:
        s = self.s
        return [Run(f"{cell} T={length} seed {seed}", _run_dir(s, cell, length, seed),
                    config_for(s, cell, length, seed))
                for length in s.lengths for cell in s.cells for seed in s.seeds]

    def cost(self, run: Run) -> float:
        from bnrhn.cells import relative_step_cost

        return run.config.length * relative_step_cost(run.config.cell, run.config.cell_options)

    def train(self, run: Run, resume: bool, log) -> dict[str, Any]:
        cfg = replace(run.config, overwrite=True)
        if resume:  # the interrupted run's own settings (its budget may have been extended since)
            cfg = replace(load_task_config(run.run_dir), progress=run.config.progress)
        return train_task(cfg, resume=resume, log=lambda m: None)

    def diverged(self, run: Run, exc: Exception, log) -> dict[str, Any]:
        cfg = run.config
        return {"task": cfg.task, "length": cfg.length, "cell": cfg.cell, "seed": cfg.seed, "stopped": "diverged",
                "test": {"loss": math.nan, "error": math.nan}, "valid": {"loss": math.nan, "error": math.nan},
                "why": str(exc)}

    def report(self, results: dict[str, dict], out_dir: Path, log) -> dict[str, Any]:
        """``results.json``, ``results.md``, ``error_vs_length.png`` and the gradient norms at the longest length."""
        from bnrhn.reports.plots import plot_error_vs_length

        s, runs = self.s, list(results.values())
        summary = summarise(runs, s.cells, s.lengths)
        report = {"task": s.base.task, "command": s.command, "shared": s.shared(), "cells": s.cells,
                  "lengths": s.lengths, "seeds": s.seeds, "runs": runs, "summary": summary}
        longest = max(s.lengths)
        report["gradients"] = _gradients(s, longest, out_dir / f"gradients-T{longest}", log)
        (out_dir / "results.json").write_text(json.dumps(report, indent=1, allow_nan=True) + "\n", encoding="utf-8")
        (out_dir / "results.md").write_text(results_markdown(report), encoding="utf-8")
        plot_error_vs_length(out_dir / "error_vs_length.png", summary,
                             {L: s.base.spec.baseline_error(L) for L in s.lengths},
                             ylabel=f"test {s.base.spec.error_name}", title=s.base.spec.description)
        return report


def run_task_compare(s: TaskCompareSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every (cell, length, seed), write the table and figures; returns what results.json holds."""
    return run_experiment(TaskComparison(s), s.out_dir, resume=s.resume, overwrite=s.overwrite, command=s.command,
                          log=log, jobs=s.jobs)


def summarise(runs: list[dict], cells: list[str], lengths: list[int]) -> dict[str, dict[str, dict[str, Any]]]:
    """cell -> str(length) -> mean, std (sample, over seeds), n, diverged of the test error."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in cells:
        table[cell] = {}
        for length in lengths:
            errs = [r["test"]["error"] for r in runs if r["cell"] == cell and r["length"] == length]
            finite = [e for e in errs if math.isfinite(e)]
            table[cell][str(length)] = {
                "mean": statistics.fmean(finite) if finite else math.nan,
                "std": statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else math.nan,
                "n": len(finite), "diverged": len(errs) - len(finite),
            }
    return table


def results_markdown(report: dict[str, Any]) -> str:
    from bnrhn.tasks.generators import TASKS

    spec = TASKS[report["task"]]
    lengths, seeds = report["lengths"], report["seeds"]
    lines = [f"# {spec.description}", "", f"`{report['command']}`" if report["command"] else "", "",
             f"Test {spec.error_name} of the best-validation checkpoint, mean ± standard deviation over "
             f"{len(seeds)} seed(s); lower is better. The baseline row is the trivial predictor "
             f"({'always predicting 1' if report['task'] == 'adding' else 'blank, then uniform guesses' if report['task'] == 'copy' else 'chance'}).",
             "", "| cell | " + " | ".join(f"T = {L}" for L in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for cell, row in report["summary"].items():
        cells = []
        for L in lengths:
            c = row[str(L)]
            text = "diverged" if c["n"] == 0 else (f"{c['mean']:.4f} ± {c['std']:.4f}" if len(seeds) > 1 else f"{c['mean']:.4f}")
            if c["diverged"] and c["n"]:
                text += f" ({c['diverged']} diverged)"
            cells.append(text)
        lines.append(f"| {cell} | " + " | ".join(cells) + " |")
    lines.append("| baseline | " + " | ".join(f"{spec.baseline_error(L):.4f}" for L in lengths) + " |")
    g = report.get("gradients") or {}
    if g and g.get("cells"):
        last = len(next(iter(g["cells"].values()))["init"]) - 1
        lines += ["", f"Gradient of each sequence's loss w.r.t. the state d steps before the end, T = {g['length']} "
                  f"(geometric mean over {g['batch']} sequences, seed-0 models; `gradients-T{g['length']}/`):", "",
                  f"| cell | at init, d = 0 | at init, d = {last} | trained, d = 0 | trained, d = {last} |",
                  "|---|---:|---:|---:|---:|"]
        for cell, r in g["cells"].items():
            trained = (f"{r['trained'][0]:.2e} | {r['trained'][-1]:.2e}" if r["trained"]
                       else "no checkpoint (diverged) | –")
            lines.append(f"| {cell} | {r['init'][0]:.2e} | {r['init'][-1]:.2e} | {trained} |")
    lines += ["", "![test error vs sequence length](error_vs_length.png)", ""]
    return "\n".join(lines)


def _gradients(s: TaskCompareSettings, length: int, out: Path, log) -> dict[str, Any]:
    """‖∂L/∂h_t‖ of every cell's seed-0 model at T = ``length``, fresh (its initial weights) and trained."""
    import torch

    from bnrhn.analysis.runner import run_task_gradients
    from bnrhn.tasks.heads import SequenceModel
    from bnrhn.tasks.train import load_task_model

    seed = s.seeds[0]
    models = []
    for cell in s.cells:
        best = _run_dir(s, cell, length, seed) / "best.pt"
        cfg = config_for(s, cell, length, seed)
        torch.manual_seed(seed)  # the run's initial weights (train_task seeds the same way)
        models.append((f"{cell} (init)", SequenceModel.from_config(cfg.model_config()), cfg))
        if best.is_file():
            model, trained_cfg = load_task_model(best)
            models.append((f"{cell} (trained)", model, trained_cfg))
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    styles = {}
    for k, cell in enumerate(s.cells):  # one colour per cell; its untrained weights dashed
        styles[f"{cell} (init)"] = {"color": colours(k % 10), "ls": "--", "lw": 1.2}
        styles[f"{cell} (trained)"] = {"color": colours(k % 10)}
    rep = run_task_gradients(models, out, s.base.task, length, s.gradient_batch, seed, styles=styles)
    log(f"tasks compare: gradient norms at T={length} -> {out}")
    cells = {}
    for cell in s.cells:
        init = rep["results"].get(f"{cell} (init)", {}).get("h", {}).get("geomean")
        trained = rep["results"].get(f"{cell} (trained)", {}).get("h", {}).get("geomean")
        if init:
            cells[cell] = {"init": init, "trained": trained}  # trained: None when the run left no checkpoint
    return {"length": length, "batch": s.gradient_batch, "cells": cells}
