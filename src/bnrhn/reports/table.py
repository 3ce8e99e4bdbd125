"""The comparison table of the BN-RHN paper: one row per metric, one column per model, best in bold."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

# Row order of the BN-RHN paper's table (Zhang et al. 2017, Table 1).
METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr")

Value = float | tuple[float, float] | None  # a value, or (mean, std) over seeds, or missing


def format_value(value: Value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{value:.{digits}f}"


def _key(value: Value) -> float:
    if value is None:
        return -math.inf
    v = value[0] if isinstance(value, tuple) else value
    return -math.inf if math.isnan(v) else v


def metrics_table(
    columns: Mapping[str, Mapping[str, Value]],
    metrics: Sequence[str] = METRIC_ORDER,
    extra_rows: Mapping[str, Mapping[str, str]] | None = None,
    digits: int = 3,
) -> str:
    """A markdown table with a row per metric and a column per model; the best (highest) value of each
    metric row is bold (all tied values are). ``extra_rows`` adds rows of preformatted text (training
    time, tokens/s, parameters, steps)."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        values = [columns[n].get(metric) for n in names]
        best = max((_key(v) for v in values), default=-math.inf)
        cells = []
        for v in values:
            text = format_value(v, digits)
            if best > -math.inf and _key(v) == best and len(names) > 1:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    for row, texts in (extra_rows or {}).items():
        lines.append(f"| {row} | " + " | ".join(texts.get(n, "–") for n in names) + " |")
    return "\n".join(lines) + "\n"
