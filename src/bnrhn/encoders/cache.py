"""On-disk feature cache: features of an image list, extracted once, float16, memory-mapped.

A cache folder holds

    pooled.npy    [N, F] float16        the pooled vector of image i in row i
    grid.npy      [N, G, F] float16     the spatial grid (only when asked for)
    meta.json     the sidecar: encoder, weights sha256, preprocessing, sha256 of the image list
                  (resolved paths + sizes + modification times), shapes, and the images that failed

``meta.json`` is written last, so a folder without it is never mistaken for a finished cache. The
arrays are filled in place (``numpy.lib.format.open_memmap``) under temporary names with a progress
file, so an interrupted extraction (Ctrl-C) resumes where it stopped; they are renamed when complete.

:func:`extract_features` reuses the cache when its sidecar matches the requested image list and
encoder, and otherwise re-extracts, saying what differs. Images that cannot be read are reported with
their path and left as zero rows marked invalid (``FeatureSet.failed``); with ``strict=True`` the
first one raises instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bnrhn.encoders.base import ImageEncoder, ImageFileError, load_image, stack_images

FORMAT = "bnrhn-features-1"


@dataclass
class FeatureSet:
    """Cached features: row ``index[path]`` of ``pooled`` (and ``grid``) belongs to image ``path``."""

    folder: Path
    pooled: np.ndarray
    grid: np.ndarray | None
    paths: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    seconds: float = 0.0  # time spent extracting in this call (0 when reused)
    reused: bool = False

    def __post_init__(self) -> None:
        self.index = {p: i for i, p in enumerate(self.paths)}

    def rows(self, paths) -> np.ndarray:
        return np.array([self.index[_key(p)] for p in paths], dtype=np.int64)

    def valid(self, path) -> bool:
        k = _key(path)
        return k in self.index and k not in self.failed


def _key(path) -> str:
    return str(Path(path).resolve())


def _signature(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def image_list_digest(paths: list[str], signatures: list[str] | None = None) -> str:
    """sha256 of the resolved paths with their sizes and modification times (missing files included)."""
    h = hashlib.sha256()
    for p, sig in zip(paths, signatures if signatures is not None else map(_signature, paths)):
        h.update(f"{p}\0{sig}\n".encode())
    return h.hexdigest()


def default_cache_root() -> Path:
    """``$BNRHN_CACHE`` or ``~/.cache/bnrhn``."""
    env = os.environ.get("BNRHN_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnrhn"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_cache(folder: Path, expect: dict, need_grid: bool) -> tuple[FeatureSet | None, str | None]:
    """The cached FeatureSet when ``folder`` holds one matching ``expect``, else (None, why not)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None, f"its {meta_path.name} is unreadable"
    if meta.get("format") != FORMAT:
        return None, "it was written by another version"
    diffs = [k for k in ("encoder", "weights", "preprocess", "n_images", "image_list_sha256") if meta.get(k) != expect[k]]
    if diffs:
        names = {"encoder": "encoder", "weights": "encoder weights", "preprocess": "preprocessing",
                 "n_images": "number of images", "image_list_sha256": "image list (paths, sizes or dates)"}
        return None, "the " + ", ".join(names[d] for d in diffs) + " differ"
    if need_grid and not meta.get("has_grid"):
        return None, "it holds pooled features only and the grid is needed now"
    try:
        pooled = np.load(folder / "pooled.npy", mmap_mode="r")
        grid = np.load(folder / "grid.npy", mmap_mode="r") if meta.get("has_grid") else None
    except (OSError, ValueError) as exc:
        return None, f"its arrays are unreadable ({exc})"
    if pooled.shape != (meta["n_images"], meta["feature_size"]) or (
        grid is not None and grid.shape != (meta["n_images"], meta["grid_size"], meta["feature_size"])
    ):
        return None, "its arrays have the wrong shape"
    return FeatureSet(folder, pooled, grid, list(meta["paths"]), dict(meta.get("failed", {})), meta), None


def _open_superset(folder: Path, expect: dict, need_grid: bool, wanted: list[str],
                    sigs: dict[str, str]) -> FeatureSet | None:
    """A cache in ``folder`` made by the same encoder for a larger image list holding all of ``wanted``."""
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != FORMAT or any(meta.get(k) != expect[k] for k in ("encoder", "weights", "preprocess")):
        return None
    if (need_grid and not meta.get("has_grid")) or len(meta.get("paths", [])) <= len(wanted):
        return None
    have = dict(zip(meta["paths"], meta.get("signatures") or []))
    if any(have.get(p) != sigs[p] for p in wanted):
        return None
    fs, _ = _open_cache(folder, {**expect, "n_images": meta["n_images"],
                                 "image_list_sha256": meta["image_list_sha256"]}, need_grid)
    return fs


def extract_features(
    paths: list[str | Path],
    encoder: ImageEncoder,
    folder: str | Path,
    grid: bool = False,
    batch_size: int = 32,
    strict: bool = False,
    progress: bool = True,
    log=None,
    search: list[str | Path] | None = None,
    compile: str = "auto",
) -> FeatureSet:
    """Features of every image in ``paths`` (duplicates allowed), from the cache in ``folder`` or extracted.

    ``grid=True`` also stores the spatial grid. ``search``: other cache folders whose features may be
    reused when they hold every requested image, unchanged, from the same encoder (e.g. the cache of a
    whole data set serving a subset of it). ``log`` (default: print to stderr) receives the one-line
    messages (reuse, rebuild reason, unreadable images). ``compile``: ``auto`` (compile the CNN for large
    extractions), ``yes`` or ``no`` (see :meth:`bnrhn.encoders.base.MobileNetV2Encoder.prepare_extraction`).
    """
    from tqdm.auto import tqdm

    if log is None:
        def log(msg: str) -> None:
            tqdm.write(msg, file=sys.stderr)  # does not garble a running progress bar
    from bnrhn.folder_lock import FolderLock

    with FolderLock(folder, "feature cache", wait=log):  # one writer at a time; a second process waits and reuses
        fs = _extract_features(paths, encoder, folder, grid, batch_size, strict, progress, log, search, compile)
    if strict:  # also when the features come from a cache that an earlier, non-strict run wrote
        bad = [k for k in dict.fromkeys(_key(p) for p in paths) if k in fs.failed]
        if bad:
            raise ValueError(
                f"unreadable image {bad[0]}: {fs.failed[bad[0]]} (strict mode; recorded in the feature cache "
                f"{fs.folder}{f', with {len(bad) - 1} more' if len(bad) > 1 else ''}; fix or remove the file, "
                "or drop --strict to skip such images)"
            )
    return fs


def _extract_features(paths, encoder, folder, grid, batch_size, strict, progress, log, search, compile) -> FeatureSet:
    from tqdm.auto import tqdm

    folder = Path(folder)
    unique = list(dict.fromkeys(_key(p) for p in paths))
    if not unique:
        raise ValueError("no images to extract features from")
    signatures = [_signature(p) for p in unique]
    expect = {
        "format": FORMAT,
        **{k: v for k, v in encoder.describe().items() if k != "weights"},
        "weights": encoder.weights_id,
        "n_images": len(unique),
        "image_list_sha256": image_list_digest(unique, signatures),
    }
    cached, why = _open_cache(folder, expect, grid)
    if cached is not None:
        log(f"features: reusing the cache in {folder} ({len(unique)} images, {encoder.name})")
        cached.reused = True
        return cached
    sigs = dict(zip(unique, signatures))
    for other in search or []:
        other = Path(other)
        if other.resolve() == folder.resolve() or not (other / "meta.json").is_file():
            continue
        sup = _open_superset(other, expect, grid, unique, sigs)
        if sup is not None:
            log(f"features: reusing the cache of a larger image list in {other} ({len(unique)} of "
                f"{len(sup.paths)} images, {encoder.name})")
            sup.reused = True
            return sup
    if why:
        log(f"features: the cache in {folder} does not match ({why}); extracting again")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    N, F, G = len(unique), encoder.feature_size, encoder.grid_size
    tmp_pooled, tmp_grid, part = folder / "pooled.npy.partial", folder / "grid.npy.partial", folder / "progress.json"
    start, failed = 0, {}
    if part.is_file() and tmp_pooled.is_file() and (tmp_grid.is_file() or not grid):
        try:
            state = json.loads(part.read_text(encoding="utf-8"))
            if state.get("expect") == expect and state.get("grid") == grid:
                start, failed = int(state["done"]), dict(state["failed"])
        except (OSError, ValueError, KeyError, TypeError):
            start, failed = 0, {}
    if start:
        pooled = np.load(tmp_pooled, mmap_mode="r+")
        grids = np.load(tmp_grid, mmap_mode="r+") if grid else None
        log(f"features: resuming an interrupted extraction at image {start}/{N}")
    else:
        pooled = np.lib.format.open_memmap(tmp_pooled, mode="w+", dtype=np.float16, shape=(N, F))
        grids = np.lib.format.open_memmap(tmp_grid, mode="w+", dtype=np.float16, shape=(N, G, F)) if grid else None
    bar = tqdm(total=N, initial=start, desc=f"features ({encoder.name})", unit="img",
               disable=not progress, leave=False, file=sys.stderr)

    def save_progress(done: int) -> None:
        pooled.flush()
        if grids is not None:
            grids.flush()
        _atomic_write_text(part, json.dumps({"expect": expect, "grid": grid, "done": done, "failed": failed}))

    def load_chunk(first: int):
        """Decode and preprocess images first..first+batch_size: (their batch or None, its rows, unreadable ones).
        The batch is an inference tensor, which the compiled CNN takes without a copy."""
        tensors, rows, bad = [], [], []
        for j, p in enumerate(unique[first : first + batch_size]):
            try:
                tensors.append(encoder.preprocess(load_image(p)))
                rows.append(first + j)
            except ImageFileError as exc:
                bad.append((first + j, p, exc))
        with torch.inference_mode():
            return (stack_images(tensors) if tensors else None), rows, bad

    encoder.prepare_extraction(N - start, batch_size, compile, log)
    # The next batch is decoded in a second thread while the CNN runs on this one (Pillow and the
    # tensor conversion release the GIL): decoding costs no wall-clock time when it is the faster part.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnrhn-decode")
    try:
        i = start
        pending = pool.submit(load_chunk, i)
        while i < N:
            batch, rows, bad = pending.result()
            n_chunk = min(batch_size, N - i)
            if i + n_chunk < N:
                pending = pool.submit(load_chunk, i + n_chunk)
            for row, p, exc in bad:
                if strict:
                    raise ValueError(f"unreadable image {exc} (strict mode; drop --strict to skip such images)") from None
                failed[p] = exc.reason
                pooled[row] = 0
                if grids is not None:
                    grids[row] = 0
                log(f"features: skipping unreadable image {exc}")
            chunk = unique[i : i + n_chunk]
            if batch is not None:
                pv, gv = encoder.encode(batch)
                idx = np.array(rows)
                pooled[idx] = pv.numpy().astype(np.float16)
                if grids is not None:
                    grids[idx] = gv.numpy().astype(np.float16)
            i += len(chunk)
            bar.update(len(chunk))
            if (i // batch_size) % 8 == 0 or i >= N:
                save_progress(i)
    except KeyboardInterrupt:
        save_progress(i)
        bar.close()
        log(f"features: interrupted at image {i}/{N}; run the same command again to resume")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    seconds = time.perf_counter() - t0
    del pooled, grids
    # Commit: old sidecar out first, arrays in place, sidecar last.
    (folder / "meta.json").unlink(missing_ok=True)
    os.replace(tmp_pooled, folder / "pooled.npy")
    if grid:
        os.replace(tmp_grid, folder / "grid.npy")
    else:
        (folder / "grid.npy").unlink(missing_ok=True)
    meta = {**expect, "has_grid": grid, "dtype": "float16", "paths": unique, "signatures": signatures, "failed": failed,
            "seconds": round(seconds, 2), "images_per_s": round((N - start) / max(seconds, 1e-9), 2), "cnn": encoder.engine(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    part.unlink(missing_ok=True)
    if failed:
        log(f"features: {len(failed)} of {N} images could not be read and were skipped")
    fs, why = _open_cache(folder, expect, grid)
    if fs is None:
        raise RuntimeError(f"feature cache in {folder} unreadable right after writing it: {why}")
    fs.seconds = seconds
    return fs
