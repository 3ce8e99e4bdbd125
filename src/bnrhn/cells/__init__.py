"""Recurrent cells and the registry that builds any of them by name.

>>> from bnrhn.cells import build_cell
>>> cell = build_cell("bn_rhn", input_size=32, hidden_size=64, depth=2)

Names: ``rnn``, ``lstm``, ``gru``, ``mut1``, ``mut2``, ``mut3``, ``rhn``, ``bn_rhn``, ``bn_rhn_tf``, ``bn_lstm``. The RHN-family names
are presets of :class:`RHNCell`; keyword options override a preset's defaults.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from bnrhn.cells.base import REFERENCE, RecurrentCell, State, StepMode, check_size
from bnrhn.cells.bn_lstm import BNLSTMCell
from bnrhn.cells.gru import GRUCell
from bnrhn.cells.lstm import LSTMCell
from bnrhn.cells.mut import MUT1Cell, MUT2Cell, MUT3Cell
from bnrhn.cells.rhn import RHNCell
from bnrhn.cells.rnn import RNNCell

__all__ = [
    "RecurrentCell", "State", "StepMode", "REFERENCE", "RNNCell", "LSTMCell", "GRUCell", "MUT1Cell", "MUT2Cell", "MUT3Cell", "RHNCell",
    "BNLSTMCell",
    "CELLS", "CellSpec", "build_cell", "cell_options", "pin_statistics", "legacy_statistics", "STATISTICS_OPTIONS",
    "relative_step_cost",
]


@dataclass(frozen=True)
class CellSpec:
    """A registered cell: its class, the preset defaults and a one-line description."""

    cls: type[RecurrentCell]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


CELLS: dict[str, CellSpec] = {
    "rnn": CellSpec(RNNCell, "vanilla tanh RNN"),
    "lstm": CellSpec(LSTMCell, "LSTM (PyTorch gate order; forget-gate bias 1)"),
    "gru": CellSpec(GRUCell, "GRU (PyTorch's equations)"),
    "mut1": CellSpec(MUT1Cell, "MUT1 (Jozefowicz et al. 2015): update gate from the input only; needs input size = hidden size"),
    "mut2": CellSpec(MUT2Cell, "MUT2 (Jozefowicz et al. 2015): reset gate from the input only; needs input size = hidden size"),
    "mut3": CellSpec(MUT3Cell, "MUT3 (Jozefowicz et al. 2015): update gate reads tanh(h)"),
    "rhn": CellSpec(
        RHNCell,
        "Recurrent Highway Network (Zilly et al.): coupled carry, transform bias -2, depth 3",
        dict(norm="none", carry="coupled", input_at="first", transform_bias=-2.0),
    ),
    "bn_rhn": CellSpec(
        RHNCell,
        "BN-RHN (Zhang et al. 2017): batch norm per highway layer and time step, relaxed carry gate; "
        "trained with batch renormalization (stats='renorm')",
        dict(norm="batch", normalize=("h",), carry="free", input_at="first", transform_bias=-2.0, stats="renorm"),
    ),
    "bn_rhn_tf": CellSpec(
        RHNCell,
        "BN-RHN as in the authors' public TF code: layer norm on h, free carry bias -3, transform bias -3, input at every layer",
        dict(norm="layer", normalize=("h",), carry="free", input_at="every", transform_bias=-3.0, carry_bias=-3.0),
    ),
    "bn_lstm": CellSpec(BNLSTMCell, "BN-LSTM (Cooijmans et al. 2016): per-step batch norm, gamma 0.1; "
                        "trained with batch renormalization (stats='renorm')", dict(stats="renorm")),
}


def cell_options(name: str) -> dict[str, Any]:
    """The keyword options of cell ``name`` with their effective defaults (preset values applied)."""
    spec = _spec(name)
    params = inspect.signature(spec.cls.__init__).parameters
    opts = {k: p.default for k, p in params.items() if k not in ("self", "input_size", "hidden_size")}
    opts.update(spec.defaults)
    return opts


def build_cell(name: str, input_size: int, hidden_size: int, **options: Any) -> RecurrentCell:
    """Build the cell registered as ``name``; ``options`` override the preset's defaults.

    Raises ``ValueError`` naming the problem for an unknown name, an unknown option or a bad size.
    """
    spec = _spec(name)
    check_size("input_size", input_size)
    check_size("hidden_size", hidden_size)
    valid = cell_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for cell {name!r}; "
            f"valid options: {', '.join(sorted(valid))}"
        )
    kwargs = {**spec.defaults, **options}
    return spec.cls(input_size, hidden_size, **kwargs)


def relative_step_cost(name: str, options: dict[str, Any] | None = None) -> float:
    """A rough guess of a training step's time relative to an LSTM's at small sizes, where sequential work
    dominates: the highway layers per time step (``depth``; 1 for the other cells), twice for cells that
    normalise with batch statistics (the demo, 1 thread: BN-RHN 64 s, RHN 23 s, LSTM 17 s of training). Used
    only to start long runs first when runs train side by side; it changes no result."""
    opts = {**cell_options(name), **(options or {})}
    batch_norm = "stats" in opts and opts.get("norm", "batch") == "batch"
    return float(opts.get("depth", 1)) * (2.0 if batch_norm else 1.0)


def _spec(name: str) -> CellSpec:
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; choose from: {', '.join(CELLS)}")
    return CELLS[name]


STATISTICS_OPTIONS = ("stats", "min_rows", "renorm_rmax", "renorm_dmax", "renorm_warmup")


def pin_statistics(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the batch-norm statistics options (:data:`STATISTICS_OPTIONS`) written out where cell
    ``name`` has them, so that a model or run saved with these options is rebuilt with the estimator it was
    trained with even if a default changes (as it did: ``bn_rhn`` and ``bn_lstm`` train with
    ``stats="renorm"`` since the batch-composition leak was fixed)."""
    valid = cell_options(name)
    return {**{k: valid[k] for k in STATISTICS_OPTIONS if k in valid}, **options}


def legacy_statistics(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of a checkpoint saved before :func:`pin_statistics` existed: every batch-norm cell then
    defaulted to ``stats="momentum"``."""
    if "stats" in cell_options(name) and "stats" not in options:
        return {**options, "stats": "momentum"}
    return dict(options)
