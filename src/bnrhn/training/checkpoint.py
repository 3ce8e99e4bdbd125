"""Checkpoints: atomic writes, clear errors on load, and the random-number state for exact resume.

A checkpoint is a ``dict`` of plain Python values and tensors saved with :func:`torch.save`; it is
read back with ``weights_only=True`` so that loading a file never runs code from it. Writes go to a
temporary file in the same folder, are flushed to disk, then renamed over the target
(:func:`os.replace` is atomic on POSIX and Windows), so an interrupted write never leaves a torn
checkpoint behind and the previous one stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnrhn.errors import CheckpointWriteError

FORMAT = "bnrhn-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):  # torch's zip writer reports a full disk as RuntimeError
            free = shutil.disk_usage(path.parent).free
            need = _payload_bytes(payload)
            raise CheckpointWriteError(
                f"could not write the checkpoint {path}: {exc} — the folder has {free / 1e6:.1f} MB free and the "
                f"checkpoint needs about {need / 1e6:.1f} MB (disk full?); "
                + (f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written")
            ) from None
        raise
    return path


TEMP_SUFFIX = ".tmp"


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a killed :func:`save_checkpoint` left in ``folder`` (``.NAME.pt.*.tmp``);
    call only while holding the folder's lock (no other writer). Returns the files removed."""
    removed = []
    for p in Path(folder).glob(f".*.pt.*{TEMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _payload_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` naming the path when it
    is not a readable bnrhn checkpoint (truncated, corrupt, or another program's file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).exists():
                return load_checkpoint(path / name, map_location)
        raise FileNotFoundError(f"no best.pt or last.pt in run folder {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted copy?)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run the file's code: never pass that on
        raise ValueError(
            f"{path} holds Python objects that bnrhn does not load, for safety (a bnrhn checkpoint holds only "
            "tensors and plain values): it was not written by bnrhn, or has been altered"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or truncated?): {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bnrhn checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer bnrhn (checkpoint format {payload['format_version']}); upgrade bnrhn"
        )
    return payload


def check_finite_weights(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``ValueError`` when a model state dict holds NaN or infinite values (a model that cannot predict)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{path}: the model's weights are not finite (NaN or inf in {len(bad)} tensor(s), e.g. {bad[0]!r}); "
            "it cannot be used. Take an earlier checkpoint of the run (best.pt, last.pt) or train again"
        )


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's and PyTorch's generators (CPU, and every GPU when CUDA is in use), as
    checkpoint-safe values."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        # every GPU's generator, when CUDA is in use (resuming on another device skips them)
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
