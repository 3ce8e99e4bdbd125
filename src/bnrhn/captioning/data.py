"""Data for captioning runs: data sets by name, features from the cache, token tensors, batches."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bnrhn.data.captions import CaptionDataset, ImageRecord, read_coco, read_flickr8k, read_folder, read_karpathy
from bnrhn.data.synthetic import synthetic_dataset
from bnrhn.data.vocab import Vocabulary
from bnrhn.encoders.cache import FeatureSet, default_cache_root, extract_features

DATASET_SPECS = "synthetic, flickr8k, flickr8k:DIR, karpathy:FILE.json, coco:FILE.json, folder:DIR"


def find_data_root() -> Path | None:
    """The shared data folder: ``$BNRHN_DATA``, else ``../shared/data`` from the working directory or
    from the repository this package lives in."""
    env = os.environ.get("BNRHN_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        cand = base / "shared" / "data"
        if cand.is_dir():
            return cand
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def load_dataset(spec: str, images: str | Path | None = None, strict: bool = False,
                 synthetic_sizes: tuple[int, int, int] = (1500, 150, 150),
                 cache_dir: str | Path | None = None, progress: bool = False) -> CaptionDataset:
    """A caption data set by name (see :data:`DATASET_SPECS`)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "synthetic":
        root = Path(cache_dir) if cache_dir else default_cache_root()
        sizes = tuple(int(x) for x in arg.split(",")) if arg else tuple(synthetic_sizes)
        if len(sizes) != 3:
            raise ValueError(f"synthetic:TRAIN,VAL,TEST expects three numbers, got {arg!r}")
        return synthetic_dataset(root / "synthetic", *sizes, seed=0, progress=progress)
    if kind == "flickr8k":
        if arg:
            root = Path(arg)
        else:
            data = find_data_root()
            if data is None:
                raise FileNotFoundError(
                    "Flickr8k not found: set BNRHN_DATA to the shared data folder (with flickr8k/ inside) "
                    "or name the folder: --dataset flickr8k:DIR"
                )
            root = data / "flickr8k"
        return read_flickr8k(root, images_root=images, strict=strict)
    if kind == "karpathy":
        _need(arg, spec)
        return read_karpathy(arg, images_root=images, strict=strict)
    if kind == "coco":
        _need(arg, spec)
        return read_coco(arg, images_root=images, strict=strict)
    if kind == "folder":
        _need(arg, spec)
        return read_folder(arg, strict=strict)
    raise ValueError(f"unknown dataset {spec!r}; use one of: {DATASET_SPECS}")


def _need(arg: str, spec: str) -> None:
    if not arg:
        raise ValueError(f"dataset {spec!r} needs a path after the colon, e.g. {spec.rstrip(':')}:PATH")


def feature_cache_dir(dataset: CaptionDataset, encoder_name: str, cache_dir: str | Path | None) -> Path:
    """``<cache>/features/<dataset>-<encoder>-<hash of the data source>-<images>-<hash of their paths>``.

    Each image list (a data set, or a subset of it) has its own folder; a subset also reuses the
    folder of a larger list of the same source (see :func:`cache_family`).
    """
    paths = sorted(str(Path(r.path).resolve()) for r in dataset.records)
    h = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:8]
    return cache_family(dataset, encoder_name, cache_dir) / f"{len(paths)}img-{h}"


def cache_family(dataset: CaptionDataset, encoder_name: str, cache_dir: str | Path | None) -> Path:
    """The folder holding every feature cache of one data source and encoder."""
    root = Path(cache_dir) if cache_dir else default_cache_root()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{dataset.name}-{encoder_name}").strip("-").lower()
    return root / "features" / f"{slug}-{hashlib.sha256(dataset.source.encode()).hexdigest()[:8]}"


def report_problems(dataset: CaptionDataset, log, limit: int = 5) -> None:
    if not dataset.problems:
        return
    log(f"data: {len(dataset.problems)} problem(s) in {dataset.source or dataset.name}; affected entries were skipped:")
    for p in dataset.problems[:limit]:
        log(f"  {p}")
    if len(dataset.problems) > limit:
        log(f"  ... and {len(dataset.problems) - limit} more")


def attach_features(dataset: CaptionDataset, encoder, cache_dir, grid: bool, strict: bool, progress: bool,
                    batch_size: int = 32, log=None, compile: str = "auto") -> tuple[CaptionDataset, FeatureSet]:
    """Extract (or reuse) the features of every image in ``dataset``; drop images that cannot be read.
    ``compile``: whether the CNN is compiled for the extraction (see :func:`bnrhn.encoders.extract_features`)."""
    folder = feature_cache_dir(dataset, encoder.name, cache_dir)
    family = folder.parent
    others = sorted((d for d in family.iterdir() if d.is_dir()), key=lambda d: d.name) if family.is_dir() else []
    fs = extract_features([r.path for r in dataset.records], encoder, folder, grid=grid, batch_size=batch_size,
                          strict=strict, progress=progress, log=log, search=others, compile=compile)
    bad = {r.image_id for r in dataset.records if not fs.valid(r.path)}
    return dataset.without(bad, "unreadable image files"), fs


@dataclass
class SplitFeatures:
    """The images of one split with their features in memory (pooled float32, or grid float16)."""

    records: list[ImageRecord]
    feats: Tensor  # [n, F] float32, or [n, N, F] float16 for the grid

    def batch(self, idx) -> Tensor:
        return self.feats[idx].float()

    @classmethod
    def build(cls, records: list[ImageRecord], fs: FeatureSet, grid: bool) -> SplitFeatures:
        rows = fs.rows([r.path for r in records])
        if grid:
            if fs.grid is None:
                raise ValueError("grid features were not extracted")
            arr = np.asarray(fs.grid[rows])  # fancy indexing reads just these rows of the memmap
            return cls(records, torch.from_numpy(np.ascontiguousarray(arr)))
        arr = np.asarray(fs.pooled[rows], dtype=np.float32)
        return cls(records, torch.from_numpy(arr))


@dataclass
class CaptionTensors:
    """Training captions as one padded tensor: ``<start> w.. <end> <pad>..`` per row, with lengths."""

    tokens: Tensor  # [N, L] long
    lengths: Tensor  # [N] = words + 2
    image: Tensor  # [N] index into the split's images

    @classmethod
    def build(cls, records: list[ImageRecord], vocab: Vocabulary, max_words: int) -> CaptionTensors:
        seqs, owners = [], []
        for i, r in enumerate(records):
            for c in r.captions:
                seqs.append(vocab.encode(c, max_words))
                owners.append(i)
        if not seqs:
            raise ValueError("no training captions")
        L = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), L), vocab.pad_id, dtype=torch.long)
        for k, s in enumerate(seqs):
            tokens[k, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        return cls(tokens, lengths, torch.tensor(owners))

    def __len__(self) -> int:
        return self.tokens.shape[0]


def caption_rows(captions: list[list[int]], start_id: int, end_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Word-id lists (no ``<start>``/``<end>``) as ``<start> w_1 .. w_n <end> <pad>..`` rows ``[B, L]`` and their
    lengths n + 2: the teacher-forced input of decoded captions."""
    lengths = torch.tensor([len(c) + 2 for c in captions], dtype=torch.long)
    tokens = torch.full((len(captions), int(lengths.max()) if len(captions) else 2), pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        tokens[i, : len(c) + 2] = torch.tensor([start_id, *c, end_id], dtype=torch.long)
    return tokens, lengths


def bucketed_batches(lengths: Tensor, batch_size: int, seed: int, epoch: int, bucket: int = 50) -> list[Tensor]:
    """The batches of one epoch: a random permutation (from ``seed`` and ``epoch`` only), cut into runs
    of ``bucket`` batches that are sorted by caption length before batching (less padding), with the
    batch order shuffled again."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(len(lengths), generator=g)
    batches: list[Tensor] = []
    span = batch_size * bucket
    for s in range(0, len(perm), span):
        chunk = perm[s : s + span]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=g)
    return [batches[i] for i in order.tolist()]


def stderr_log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)
