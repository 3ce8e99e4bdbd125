"""Training curves: total loss vs training steps for every model on one plot (the BN-RHN paper's figure),
and validation CIDEr vs steps beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    head = np.cumsum(v[: window - 1]) / np.arange(1, window)  # running mean while the window fills
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (figures are files here), chosen when a
    figure is drawn rather than when a module is imported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int, bbox_inches: str | None = None) -> Path:
    """Write the PNG (creating its folder) and close ``fig``; laid out with ``tight_layout`` first unless
    ``bbox_inches`` (e.g. "tight") crops it instead."""
    plt = pyplot()
    if bbox_inches is None:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches=bbox_inches)
    plt.close(fig)
    return path


def plot_training_curves(
    path: str | Path,
    losses: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    validation: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
    validation_label: str = "validation CIDEr",
    title: str = "Training loss",
    smooth: int | None = None,
    loss_label: str | None = None,
    rewards: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
) -> Path:
    """Write a PNG with training loss vs steps (raw, faint, and a moving average) for each model,
    ``rewards`` (self-critical training's mean sampled CIDEr-D per step) in a panel of their own when given,
    and ``validation`` (e.g. CIDEr) vs steps in the last panel when given."""
    plt = pyplot()

    curves = [(losses, loss_label or "cross-entropy loss (nats per word)", title)]
    if rewards:
        curves.append((rewards, "mean reward of the sampled captions (CIDEr-D)", "SCST reward"))
    panels = len(curves) + (1 if validation else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (series, ylabel, panel_title) in zip(axes[0], curves):
        for i, (name, (steps, values)) in enumerate(series.items()):
            color = colors[i % len(colors)]
            window = smooth or max(1, len(values) // 50)
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), color=color, linewidth=1.8,
                    label=f"{name}" + (f" (moving average of {window})" if window > 1 else ""))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        ax.legend()
    if validation:
        ax2 = axes[0][-1]
        for i, (name, (steps, values)) in enumerate(validation.items()):
            ax2.plot(steps, values, marker="o", color=colors[i % len(colors)], label=name)
        ax2.set_xlabel("training step")
        ax2.set_ylabel(validation_label)
        ax2.set_title(f"{validation_label} during training")
        ax2.grid(alpha=0.3)
        ax2.legend()
    return save_figure(fig, path, dpi=120)


MODE_LABELS = {
    "sorted": "batch statistics, length-sorted batches",
    "random": "batch statistics, random batches",
    "batch": "batch statistics",
    "population": "population statistics (inference)",
    "precise": "population statistics recomputed (precise BN)",
}


def plot_batchnorm_leak(path: str | Path, report: dict, title: str = "") -> Path:
    """The batch-composition diagnostic: loss per word position for each mode (top) and the mean number of
    valid rows per batch at each position (bottom), from :meth:`bnrhn.analysis.batchnorm.LeakReport.to_dict`."""
    plt = pyplot()

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for mode, m in report["modes"].items():
        ks = range(1, len(m["per_step_loss"]) + 1)
        ax.plot(ks, m["per_step_loss"], marker="o", markersize=3,
                label=f"{MODE_LABELS.get(mode, mode)}: {m['loss']:.3f}")
    unit = "word position k" if report["kind"] == "captioner" else "position in the window"
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title or f"Teacher-forced {report['split']} loss by {unit}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="mode: total loss", title_fontsize=8)
    for mode in [m for m in ("sorted", "random", "batch") if m in report["modes"]] or ["population"]:
        m = report["modes"][mode]
        ax2.plot(range(1, len(m["valid_rows"]) + 1), m["valid_rows"], marker=".", label=MODE_LABELS.get(mode, mode))
    ax2.axhline(report["batch_size"], color="grey", linewidth=0.8, linestyle="--")
    ax2.set_xlabel(unit)
    ax2.set_ylabel(f"valid rows per batch (of {report['batch_size']})")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def plot_error_vs_length(path: str | Path, summary: Mapping[str, Mapping[str, Mapping[str, float]]],
                         baseline: Mapping[int, float], ylabel: str = "test error", title: str = "") -> Path:
    """Test error vs sequence length per cell (mean over seeds, bars: ± one standard deviation), log-scaled
    length axis, and the trivial baseline dashed: where a line meets the baseline the cell stopped learning."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    lengths = sorted(baseline)
    for cell, row in summary.items():
        xs = [L for L in lengths if str(L) in row and row[str(L)]["n"] > 0]
        ax.errorbar(xs, [row[str(L)]["mean"] for L in xs], yerr=[row[str(L)]["std"] for L in xs], marker="o",
                    capsize=3, lw=1.6, label=cell)
    ax.plot(lengths, [baseline[L] for L in lengths], "k--", lw=1.2, label="trivial baseline")
    ax.set_xscale("log")
    ax.minorticks_off()  # only the lengths measured are labelled
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(L) for L in lengths])
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=110)
