"""Reading back the markdown tables the reports write (a test helper)."""

from __future__ import annotations


def parse_markdown_table(text: str) -> dict[str, dict[str, str]]:
    """Read back a table written by :func:`bnrhn.reports.table.metrics_table`: {row: {column: cell text without bold}}."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(rows) < 2:
        raise ValueError("no markdown table found")
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out: dict[str, dict[str, str]] = {}
    for line in rows[2:]:
        cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header[1:], cells[1:]))
    return out
