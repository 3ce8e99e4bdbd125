"""Training logs: every step as a JSON line (``log.jsonl``) and a CSV row (``log.csv``); validations
also go to ``validation.csv``. On resume the files are cut back to the checkpoint's step, so a resumed
run's logs equal those of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

STEP_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "seconds")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class NullLogger:
    """The logger of a data-parallel rank other than 0: rank 0 writes the run's logs."""

    def truncate_after(self, step: int) -> None:
        pass

    def log_step(self, **row: Any) -> None:
        pass

    def log_validation(self, step: int, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        pass


class StepLogger:
    """Append-only logs in ``run_dir``: ``log.jsonl`` (all rows, with ``kind``), ``log.csv`` (training
    steps) and ``validation.csv`` (validations)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "log.jsonl"
        self.csv = self.run_dir / "log.csv"
        self.val_csv = self.run_dir / "validation.csv"
        self._val_columns: list[str] | None = None

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (they belong to work a resumed run will redo)."""
        rows = list(read_log(self.jsonl)) if self.jsonl.exists() else []
        kept = [r for r in rows if r.get("step", 0) <= step]
        for path in (self.jsonl, self.csv, self.val_csv):
            if path.exists():
                path.unlink()
        self._val_columns = None
        for row in kept:
            self._write(row)

    def log_step(self, **row: Any) -> None:
        self._write({"kind": "train", **row})

    def log_validation(self, step: int, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        self._write({"kind": "validation", "step": step, "epoch": epoch, "seconds": seconds, **metrics})

    def _write(self, row: dict[str, Any]) -> None:
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if row.get("kind") == "validation":
            cols = self._val_columns or self._existing_columns(self.val_csv)
            if cols is None:
                cols = ["step", "epoch", "seconds"] + sorted(k for k in row if k not in ("kind", "step", "epoch", "seconds"))
            self._val_columns = cols
            self._append_csv(self.val_csv, cols, row)
        else:
            self._append_csv(self.csv, list(STEP_COLUMNS), row)

    @staticmethod
    def _existing_columns(path: Path) -> list[str] | None:
        if not path.exists():
            return None
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        return header

    @staticmethod
    def _append_csv(path: Path, columns: list[str], row: dict[str, Any]) -> None:
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in columns})


def read_log(path: str | Path):
    """Yield the rows of a ``log.jsonl``."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)
