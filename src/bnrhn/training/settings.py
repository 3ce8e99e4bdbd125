"""A run's settings as JSON in its folder, so that ``--resume`` rebuilds the same run (``bnrhn lm train``
writes ``lm_config.json``, ``bnrhn tasks train`` ``task_config.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["save_settings", "load_settings"]


def save_settings(run_dir: str | Path, filename: str, settings: Any) -> None:
    """Write the dataclass ``settings`` to ``run_dir/filename`` (creating the folder)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / filename).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")


def load_settings(run_dir: str | Path, filename: str, cls: Any, command: str) -> Any:
    """``cls.from_dict`` of ``run_dir/filename``; a ``FileNotFoundError`` naming ``command`` when it is absent."""
    path = Path(run_dir) / filename
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} not found (was {run_dir} made by {command}?)")
    return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
