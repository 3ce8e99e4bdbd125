"""Figures of the gradient-flow analyses (matplotlib, Agg backend: no display needed).

Every figure is meant to be read without the code: a title saying what is measured and on what, axis
labels with units, and a legend naming the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnrhn.reports.plots import pyplot, save_figure

__all__ = ["plot_gradient_flow", "plot_jacobian_trace", "plot_gershgorin", "plot_gate_activity", "plot_loss_curves"]

FLOOR = 1e-300


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def _colors(n: int):
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_gradient_flow(curves: dict[str, dict[str, list[float]]], path, subtitle: str = "", which: str = "h",
                       xlabel: str = "distance T − t (steps back from the scored character)",
                       styles: dict[str, dict[str, Any]] | None = None) -> Path:
    """Two panels: ‖∂L_T/∂h_t‖ (geometric mean and quartile band over sequences) vs distance T − t, and
    the same relative to distance 0. ``styles``: matplotlib line settings per label (e.g. one colour per
    cell, dashed for its untrained weights); default one colour per label."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    sym = "h_t" if which == "h" else "s_t"
    for (label, c), color in zip(curves.items(), _colors(len(curves))):
        style = {"color": color, "lw": 1.8, **((styles or {}).get(label, {}))}
        d = c["distance"]
        g = [max(v, FLOOR) for v in c["geomean"]]
        lo = [max(v, FLOOR) for v in c["q25"]]
        hi = [max(v, FLOOR) for v in c["q75"]]
        axes[0].plot(d, g, label=label, **style)
        axes[0].fill_between(d, lo, hi, color=style["color"], alpha=0.15, lw=0)
        rel = [max(v / g[0], FLOOR) if g[0] > 0 else FLOOR for v in g]
        axes[1].plot(d, rel, label=label, **style)
    axes[0].set_ylabel(f"‖∂L_T/∂{sym}‖  (geometric mean; band: quartiles)")
    axes[1].set_ylabel(f"‖∂L_T/∂{sym}‖ / ‖∂L_T/∂{sym.replace('t', 'T')}‖")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        lo_lim = max(min((l.get_ydata().min() for l in ax.get_lines()), default=FLOOR), 1e-40)
        ax.set_ylim(bottom=lo_lim * 0.5)
    axes[0].set_title("Gradient of the last loss w.r.t. earlier states")
    axes[1].set_title("Relative to the last step")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"How far back the gradient reaches{': ' + subtitle if subtitle else ''}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_jacobian_trace(traces: dict[str, dict[str, list[float]]], path, subtitle: str = "") -> Path:
    """Spectral radius and largest singular value of A_t per step, one line per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), sharex=True)
    for (label, tr), color in zip(traces.items(), _colors(len(traces))):
        steps = list(range(1, len(tr["spectral_radius"]) + 1))
        axes[0].plot(steps, tr["spectral_radius"], color=color, label=label, lw=1.5)
        axes[1].plot(steps, tr["sigma_max"], color=color, label=label, lw=1.5)
    axes[0].set_ylabel("spectral radius ρ(A_t) = max |λ_i|")
    axes[1].set_ylabel("largest singular value σ_max(A_t) = ‖A_t‖₂")
    axes[0].set_title("Spectral radius of the temporal Jacobian")
    axes[1].set_title("Largest singular value (max one-step stretch)")
    for ax in axes:
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="1 (neither shrink nor grow)")
        ax.set_xlabel("time step t along the input text")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    axes[1].legend(handles, labels, fontsize=8, loc="best")
    fig.suptitle(f"Temporal Jacobian A_t = ∂s_t/∂s_(t−1){': ' + subtitle if subtitle else ''}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_gershgorin(panels: dict[str, dict[str, Any]], path, subtitle: str = "") -> Path:
    """Per model, two panels: top, the Geršgorin discs (centre a_ii, radius Σ_{j≠i}|a_ij|) with the
    eigenvalues and the unit circle; bottom, the eigenvalues alone, zoomed, with the unit circle.

    ``panels[label]`` has ``centres``, ``radii``, ``eig_real``, ``eig_imag``, ``size`` and ``state``.
    """
    plt = pyplot()
    from matplotlib.patches import Circle
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(4.3 * n, 8.6), squeeze=False)
    blue = (0.12, 0.47, 0.71)
    for k, (label, p) in enumerate(panels.items()):
        ax, zoom = axes[0, k], axes[1, k]
        centres, radii = p["centres"], p["radii"]
        # Hundreds of overlapping discs: outlines only, so that single discs stay visible.
        for c, r in zip(centres, radii):
            ax.add_patch(Circle((c, 0.0), r, fill=False, edgecolor=(*blue, 0.3), lw=0.6))
        ax.scatter(centres, [0.0] * len(centres), s=16, color="navy", marker="|", lw=0.8, zorder=2,
                   label="disc centre a_ii")
        for a in (ax, zoom):
            a.scatter(p["eig_real"], p["eig_imag"], s=8, color="tab:red", zorder=3, label="eigenvalue λ of A")
            a.add_patch(Circle((0, 0), 1.0, fill=False, ls="--", color="k", lw=1.0, label="unit circle |z| = 1"))
            a.set_aspect("equal")
            a.set_xlabel("real part")
            a.set_ylabel("imaginary part")
            a.grid(True, alpha=0.25)
        xs = [c - r for c, r in zip(centres, radii)] + [c + r for c, r in zip(centres, radii)] + list(p["eig_real"]) + [-1.05, 1.05]
        ys = list(radii) + [abs(v) for v in p["eig_imag"]] + [1.05]
        _square_limits(ax, min(xs), max(xs), max(ys))
        ex = list(p["eig_real"]) + [-1.0, 1.0]
        ey = [abs(v) for v in p["eig_imag"]] + [1.0]
        _square_limits(zoom, min(ex), max(ex), max(ey))
        ax.set_title(f"{label}\n{p['state']} ({p['size']}×{p['size']}): discs, max radius {max(radii):.3g}", fontsize=9)
        rho = max((a * a + b * b) ** 0.5 for a, b in zip(p["eig_real"], p["eig_imag"]))
        zoom.set_title(f"{label}: eigenvalues only, spectral radius {rho:.3g}", fontsize=9)
    handles = [Circle((0, 0), 1, fill=False, edgecolor=(*blue, 0.8))]
    labels = ["Geršgorin disc: centre a_ii, radius Σ_(j≠i)|a_ij| (row i)"]
    h, l = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles + h, labels + l, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Geršgorin discs and eigenvalues of one temporal Jacobian A_t = ∂s_t/∂s_(t−1)"
                 f"{': ' + subtitle if subtitle else ''}\n(every eigenvalue lies in the union of the discs)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))
    return _save(fig, path)


def _square_limits(ax, xmin: float, xmax: float, yabs: float) -> None:
    half = max(xmax - xmin, 2 * yabs) / 2 * 1.08
    mid = (xmax + xmin) / 2
    ax.set_xlim(mid - half, mid + half)
    ax.set_ylim(-half, half)


def plot_gate_activity(models: dict[str, dict[str, Any]], path, subtitle: str = "") -> Path:
    """Mean transform gate t_l and carry gate c_l per highway depth l (bars: ± std over time steps)."""
    plt = pyplot()
    n = len(models)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False, sharey=True)
    for ax, (label, g) in zip(axes.flat, models.items()):
        k = 0  # first stacked layer (one panel per model; more layers are in the JSON)
        L = len(g["transform_mean"][k])
        xs = list(range(1, L + 1))
        w = 0.38
        ax.bar([x - w / 2 for x in xs], g["transform_mean"][k], w, yerr=g["transform_std"][k], capsize=3,
               color="tab:orange", label="transform gate t_l (new candidate let in)")
        carry_label = "carry gate c_l = 1 − t_l (coupled)" if g["carry"][k] == "coupled" else "carry gate c_l (free)"
        ax.bar([x + w / 2 for x in xs], g["carry_mean"][k], w, yerr=g["carry_std"][k], capsize=3,
               color="tab:green", label=carry_label)
        ax.set_xticks(xs)
        ax.set_xlabel("highway depth l within one time step")
        ax.set_ylim(0, 1.05)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center")
    axes.flat[0].set_ylabel("mean gate value (over units, batch, steps)")
    fig.suptitle(f"Highway gate activity per depth{': ' + subtitle if subtitle else ''}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, dict[str, list[float]]], path, title: str, xlabel: str = "training step",
                     ylabel: str = "loss (nats per character)") -> Path:
    """Training loss (thin) and validation loss (markers) per run; ``curves[label]`` has ``train_step``,
    ``train_loss``, ``valid_step``, ``valid_loss`` and optionally ``diverged_step``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for (label, c), color in zip(curves.items(), _colors(len(curves))):
        if c.get("train_step"):
            ax.plot(c["train_step"], c["train_loss"], color=color, lw=0.9, alpha=0.6, label=f"{label}: training")
        if c.get("valid_step"):
            ax.plot(c["valid_step"], c["valid_loss"], color=color, lw=2, marker="o", ms=4, label=f"{label}: validation")
        if c.get("diverged_step") is not None:
            ax.axvline(c["diverged_step"], color=color, ls=":", lw=1.5, label=f"{label}: diverged (NaN)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)
