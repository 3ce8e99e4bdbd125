"""The three analyses end to end: models + real text → numbers (JSON, CSV) and figures (PNG).

Used by ``bnrhn analyze gradients|jacobian|gates``. All computations run in float64 (on a copy of
each model) so that gradient norms far below float32's range (~1e-38) are still resolved.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any, Callable

import torch

from bnrhn.analysis.common import (
    AnalysisModel, calibrate_batchnorm, encode_for, fresh_model, load_models, text_windows,
)
from bnrhn.analysis.gates import gate_activity, is_highway
from bnrhn.analysis.gradients import gradient_norms
from bnrhn.analysis.jacobian import gershgorin_discs, jacobian_along_sequence, spectrum
from bnrhn.layers.seq_batchnorm import uses_batch_statistics
from bnrhn.reports import analysis_figures as plots
from bnrhn.data.text import CharVocab, apply_transform

__all__ = ["prepare_models", "run_gradients", "run_task_gradients", "run_jacobian", "run_gates"]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n", encoding="utf-8")


def _write_csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def prepare_models(text: str, source: str, cells: list[str], checkpoints: list[str], hidden: int, length: int,
                   seed: int, calibrate: int = 20, fresh_transform: str | None = None,
                   log: Callable[[str], None] = lambda s: None,
                   device: torch.device | str = "cpu") -> list[tuple[AnalysisModel, torch.Tensor]]:
    """The models to compare, each in float64 on ``device`` with the text encoded in its own vocabulary.

    Fresh models share a vocabulary built from ``text`` (after ``fresh_transform``, e.g. "ptb_chars")
    and have their batch-norm population statistics calibrated on it (see :func:`calibrate_batchnorm`).
    Trained models apply the text transform recorded in their checkpoint.
    """
    out = []
    if cells:
        fresh_text = apply_transform(text, {"name": fresh_transform} if fresh_transform else None)
        vocab = CharVocab.from_texts(fresh_text)
        ids = vocab.encode(fresh_text)
        for spec in cells:
            am = fresh_model(spec, vocab, hidden, length, seed)
            if calibrate and uses_batch_statistics(am.model):
                calibrate_batchnorm(am.model, ids, length, batches=calibrate, seed=seed)
                am.origin += f", batch-norm statistics from {calibrate} batches of the text"
            out.append((am, ids))
    for am in load_models(checkpoints):
        out.append((am, encode_for(am, text, source)))
    if not out:
        raise ValueError("nothing to analyse: give --cells and/or --checkpoint")
    for am, _ in out:
        am.model = copy.deepcopy(am.model).double().eval().to(device)
        log(f"{am.label}: {am.origin}")
    return out


def _header(models, text_source: str, length: int, extra: dict) -> dict:
    return {
        "text": text_source,
        "length": length,
        "models": {am.label: {"origin": am.origin, "config": am.model.config, "bn_window": am.window}
                   for am, _ in models},
        **extra,
    }


def run_gradients(models, out_dir, text_source: str, length: int = 100, batch: int = 32, seed: int = 0,
                  which: str = "h", layer: int = -1) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, curves, rows = {}, {}, []
    for am, ids in models:
        windows = text_windows(ids, length, batch, seed)
        flow = gradient_norms(am.model, windows, am.window, layer)
        sh, ss = flow.summary("h"), flow.summary("state")
        results[am.label] = {"last_loss_nats": flow.loss, "h": sh, "state": ss}
        curves[am.label] = sh if which == "h" else ss
        for d in sh["distance"]:
            rows.append([am.label, d, sh["geomean"][d], sh["mean"][d], sh["median"][d], sh["q25"][d], sh["q75"][d],
                         ss["geomean"][d], ss["mean"][d]])
    report = {**_header(models, text_source, length, {"batch": batch, "seed": seed, "layer": layer, "plotted": which}),
              "results": results}
    _write_json(out_dir / "gradients.json", report)
    _write_csv(out_dir / "gradients.csv",
               ["model", "distance", "h_geomean", "h_mean", "h_median", "h_q25", "h_q75", "state_geomean", "state_mean"],
               rows)
    plots.plot_gradient_flow(curves, out_dir / "gradients.png",
                             subtitle=f"{len(models)} models, {batch} windows of {length} characters of real text",
                             which=which)
    return report


def run_task_gradients(models, out_dir, task: str, length: int, batch: int = 32, seed: int = 0,
                       which: str = "h", layer: int = -1, styles: dict | None = None,
                       device: torch.device | str = "cpu") -> dict:
    """:func:`run_gradients` for long-range task models (in float64 on ``device``): ``models`` is a list of
    (label, SequenceModel, TaskTrainConfig); every model reads the same ``batch`` generated sequences of ``task`` at ``length``
    (seed ``seed`` + 3,000,000,019, never a training or evaluation seed; sequential MNIST: its test digits).
    ``styles``: line settings per label for the figure."""
    from bnrhn.analysis.gradients import task_gradient_norms
    from bnrhn.tasks.train import task_data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, curves, rows, header = {}, {}, [], {}
    for label, model, cfg in models:
        if cfg.task != task or cfg.length != length:
            raise ValueError(f"{label}: a model of {cfg.task} at T={cfg.length}, not of {task} at T={length}")
        x, y = task_data(cfg, batch, 3_000_000_019 + seed, "test")
        flow = task_gradient_norms(copy.deepcopy(model).double().to(device), x[:batch], y[:batch], layer)
        sh, ss = flow.summary("h"), flow.summary("state")
        results[label] = {"loss": flow.loss, "h": sh, "state": ss}
        curves[label] = sh if which == "h" else ss
        header[label] = {"config": model.config}
        for d in sh["distance"]:
            rows.append([label, d, sh["geomean"][d], sh["mean"][d], sh["median"][d], sh["q25"][d], sh["q75"][d],
                         ss["geomean"][d], ss["mean"][d]])
    report = {"task": task, "length": length, "batch": batch, "seed": seed, "layer": layer, "plotted": which,
              "models": header, "results": results}
    _write_json(out_dir / "gradients.json", report)
    _write_csv(out_dir / "gradients.csv",
               ["model", "distance", "h_geomean", "h_mean", "h_median", "h_q25", "h_q75", "state_geomean", "state_mean"],
               rows)
    plots.plot_gradient_flow(curves, out_dir / "gradients.png", which=which,
                             subtitle=f"{task}, T = {length}, {batch} generated sequences",
                             xlabel="distance T − t (steps back from the end of the sequence)", styles=styles)
    return report


def run_jacobian(models, out_dir, text_source: str, length: int = 100, seed: int = 0, part: str = "full",
                 layer: int = 0, disc_step: int | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if disc_step is None:
        disc_step = length
    if not 1 <= disc_step <= length:
        raise ValueError(f"--disc-step must be in 1..{length} (the steps of the sequence), got {disc_step}")
    traces, panels, results = {}, {}, {}
    trace_rows, disc_rows, eig_rows = [], [], []
    for am, ids in models:
        seq = text_windows(ids, length, 1, seed)[:-1, 0]
        tr = jacobian_along_sequence(am.model, seq, am.window, layer, part)
        A = tr.matrices[disc_step - 1]
        sp = spectrum(A)
        centres, radii = gershgorin_discs(A.double())
        is_lstm = len(am.model.cells[tr.layer].state_names) > 1
        state = "s = [h, c]" if (is_lstm and part == "full") else ("h" if am.model.cells[tr.layer].state_names[0] == "h" else "s")
        panels[am.label] = {
            "centres": centres.tolist(), "radii": radii.tolist(),
            "eig_real": sp["eigvals"].real.tolist(), "eig_imag": sp["eigvals"].imag.tolist(),
            "size": A.shape[0], "state": state,
        }
        traces[am.label] = {"spectral_radius": tr.spectral_radius, "sigma_max": tr.sigma_max}
        results[am.label] = {
            "state": state, "size": A.shape[0],
            "spectral_radius": tr.spectral_radius, "sigma_max": tr.sigma_max,
            "mean_spectral_radius": sum(tr.spectral_radius) / len(tr), "mean_sigma_max": sum(tr.sigma_max) / len(tr),
            "disc_step": disc_step, "discs": {"centres": panels[am.label]["centres"], "radii": panels[am.label]["radii"]},
            "eigenvalues": {"real": panels[am.label]["eig_real"], "imag": panels[am.label]["eig_imag"]},
        }
        for t, (r, s) in enumerate(zip(tr.spectral_radius, tr.sigma_max), start=1):
            trace_rows.append([am.label, t, r, s])
        for i, (c, r) in enumerate(zip(centres.tolist(), radii.tolist())):
            disc_rows.append([am.label, disc_step, i, c, r])
        for re_, im in zip(sp["eigvals"].real.tolist(), sp["eigvals"].imag.tolist()):
            eig_rows.append([am.label, disc_step, re_, im])
    report = {**_header(models, text_source, length, {"seed": seed, "part": part, "layer": layer}), "results": results}
    _write_json(out_dir / "jacobian.json", report)
    _write_csv(out_dir / "jacobian.csv", ["model", "step", "spectral_radius", "sigma_max"], trace_rows)
    _write_csv(out_dir / "gershgorin.csv", ["model", "step", "row", "centre", "radius"], disc_rows)
    _write_csv(out_dir / "eigenvalues.csv", ["model", "step", "real", "imag"], eig_rows)
    what = "whole state (LSTM: [h, c])" if part == "full" else "h block ∂h_t/∂h_(t−1)"
    plots.plot_jacobian_trace(traces, out_dir / "jacobian_spectrum.png", subtitle=f"{what}, one sequence of real text")
    plots.plot_gershgorin(panels, out_dir / "gershgorin.png", subtitle=f"step t = {disc_step}")
    return report


def run_gates(models, out_dir, text_source: str, length: int = 100, batch: int = 32, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    highway = [(am, ids) for am, ids in models if is_highway(am.model)]
    skipped = [am.label for am, _ in models if not is_highway(am.model)]
    if not highway:
        raise ValueError(f"gate activity needs highway models (rhn, bn_rhn, bn_rhn_tf); got only: {', '.join(skipped)}")
    results, rows = {}, []
    for am, ids in highway:
        windows = text_windows(ids, length, batch, seed)
        g = gate_activity(am.model, windows[:-1], am.window)
        results[am.label] = g.as_dict()
        for k in range(len(g.transform_mean)):
            for l in range(len(g.transform_mean[k])):
                rows.append([am.label, k, l + 1, g.transform_mean[k][l], g.transform_std[k][l],
                             g.carry_mean[k][l], g.carry_std[k][l], g.carry_kind[k]])
    report = {**_header(highway, text_source, length, {"batch": batch, "seed": seed, "skipped_not_highway": skipped}),
              "results": results}
    _write_json(out_dir / "gates.json", report)
    _write_csv(out_dir / "gates.csv",
               ["model", "layer", "depth", "transform_mean", "transform_std", "carry_mean", "carry_std", "carry"], rows)
    plots.plot_gate_activity(results, out_dir / "gates.png",
                             subtitle=f"{batch} windows of {length} characters of real text")
    return report
