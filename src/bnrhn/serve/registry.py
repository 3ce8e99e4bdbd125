"""The models ``bnrhn serve`` serves, found from what the user names on the command line.

A path may be a checkpoint file (``best.pt``, ``last.pt``), a run folder (its ``best.pt``, else ``last.pt``)
or a ``bnrhn compare`` / ``bnrhn demo`` folder (``compare.json`` beside ``runs/*/``: every run in it). A model
that fails to load is reported by name with the reason; the others are served all the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["ServedModel", "find_checkpoints", "load_models"]


@dataclass
class ServedModel:
    """One loaded captioner with its encoder and what ``GET /api/models`` says about it."""

    name: str
    loaded: Any  # bnrhn.captioning.api.LoadedCaptioner
    encoder: Any
    info: dict[str, Any] = field(default_factory=dict)


def _run_checkpoint(folder: Path) -> Path | None:
    for name in ("best.pt", "last.pt"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_checkpoints(paths: list[str]) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """(name, checkpoint) for every model the paths name, and (path, why) for paths that name none."""
    found, problems = [], []
    for text in paths:
        p = Path(text)
        if p.is_file():
            found.append((p.parent.name if p.stem in ("best", "last") else p.stem, p))
        elif p.is_dir() and (p / "compare.json").is_file() and (p / "runs").is_dir():
            runs = sorted(d for d in (p / "runs").iterdir() if d.is_dir() and _run_checkpoint(d))
            if not runs:
                problems.append((text, "a comparison folder with no trained run in runs/"))
            found += [(d.name, _run_checkpoint(d)) for d in runs]
        elif p.is_dir():
            ckpt = _run_checkpoint(p)
            if ckpt is None:
                problems.append((text, "a folder with neither best.pt nor last.pt (nor a comparison's compare.json)"))
            else:
                found.append((p.name, ckpt))
        else:
            problems.append((text, "no such file or folder"))
    taken: set[str] = set()
    unique = []
    for name, ckpt in found:  # two runs called best.pt in folders of the same name: lstm, lstm-2
        candidate, k = name, 1
        while candidate in taken:
            k += 1
            candidate = f"{name}-{k}"
        taken.add(candidate)
        unique.append((candidate, ckpt))
    return unique, problems


def load_models(paths: list[str], weights: str | None = None,
                log: Callable[[str], None] = lambda m: None) -> tuple[dict[str, ServedModel], list[tuple[str, str]]]:
    """Load every model the paths name: ``({name: ServedModel}, [(name or path, why it failed)])``."""
    from bnrhn.captioning.api import _encoder_for, load_captioner

    checkpoints, failures = find_checkpoints(paths)
    models: dict[str, ServedModel] = {}
    encoders: dict[tuple, Any] = {}
    for name, ckpt in checkpoints:
        try:
            loaded = load_captioner(ckpt)
            encoder = _encoder_for(loaded, weights, log)  # the weights this model's run used, where still there
            key = (loaded.encoder.get("encoder"), loaded.config.resize, encoder.weights_id)
            encoder = encoders.setdefault(key, encoder)  # models on the same encoder share one copy of it
            models[name] = ServedModel(name, loaded, encoder, _info(name, loaded, ckpt))
            log(f"serve: {name}: {loaded.model.cfg.cell} {loaded.model.cfg.model} from {ckpt}")
        except Exception as exc:  # noqa: BLE001 - any load failure is reported, the other models still serve
            failures.append((f"{name} ({ckpt})", f"{type(exc).__name__}: {exc}"))
            log(f"serve: could not load {name} from {ckpt}: {exc}")
    return models, failures


def _info(name: str, loaded, ckpt: Path) -> dict[str, Any]:
    metrics = None
    for f in (ckpt.parent / "metrics_test.json", ckpt.parent / "eval" / "metrics_test.json"):
        if f.is_file():
            try:
                metrics = json.loads(f.read_text(encoding="utf-8"))
                metrics = metrics.get("scores", metrics) if isinstance(metrics, dict) else None
            except (OSError, ValueError):
                metrics = None
            break
    return {
        "name": name, "cell": loaded.model.cfg.cell, "model": loaded.model.cfg.model,
        "dataset": loaded.config.dataset, "vocabulary_size": len(loaded.vocab), "checkpoint": str(ckpt),
        "test_metrics": metrics, "attention": bool(loaded.model.needs_grid),
    }
