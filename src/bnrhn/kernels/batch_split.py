"""How many threads share a C++ loop's batch (``team.h``): each takes a contiguous range of every step's rows.

At small hidden sizes a recurrent step is a small product, which MKL spreads over the threads with a fork and
join per call, then elementwise passes on one thread while the others wait. Split, each thread runs the whole
sequence on its rows with single-threaded products, and the threads meet only where a batch norm combines its
column sums and where a step has fewer rows than the one before. ``BNRHN_BATCH_SPLIT``: ``auto`` (the default)
splits where :func:`parts` says so, ``off`` never, a number N splits into N parts wherever a step's rows allow
(tests, measurements). docs/performance.md has the measurements behind the rule.
"""

from __future__ import annotations

import os

import torch

from bnrhn.kernels import onednn

MIN_ROWS = 16  # rows per thread at the first step, at least: fewer make products too small to run well alone
# from here on the products may go through oneDNN on the whole batch (bnrhn/kernels/onednn.py decides), and at
# 512 with MKL the split made BN-RHN's step slower (docs/performance.md)
MAX_HIDDEN = onednn.MIN_HIDDEN


def setting() -> str:
    """``BNRHN_BATCH_SPLIT``: "auto", "off" or a number of parts (1–256)."""
    value = os.environ.get("BNRHN_BATCH_SPLIT", "auto").strip().lower()
    if value in ("auto", "off") or (value.isascii() and value.isdigit() and 1 <= int(value) <= 256):
        return value
    raise ValueError(f"BNRHN_BATCH_SPLIT must be auto, off or a number of parts from 1 to 256, got {value!r}")


def parts(rows: int, hidden: int, onednn_products: bool) -> int:
    """Threads to share a loop whose first step has ``rows`` rows: with ``auto``, PyTorch's thread count where
    the products stay with MKL (``onednn_products`` false, ``hidden`` below :data:`MAX_HIDDEN`), at most one per
    :data:`MIN_ROWS` rows; 1 otherwise."""
    chosen = setting()
    if chosen == "off":
        return 1
    if chosen != "auto":
        return max(1, min(int(chosen), rows))
    if onednn_products or hidden >= MAX_HIDDEN:
        return 1
    return max(1, min(torch.get_num_threads(), rows // MIN_ROWS))


def forward_parts(active: list[int] | None, batch: int, hidden: int, packed: list | None) -> int:
    """:func:`parts` for a loop's forward: ``active`` (rows per step, or None: the whole ``batch`` at every step)
    and the reordered weights it was given (``packed``: oneDNN's products, or None)."""
    return parts(active[0] if active else batch, hidden, packed is not None)


def backward_parts(forward: int, packed_t: list | None) -> int:
    """The backward's parts: the forward's, or one where its products go through oneDNN (on the whole batch)."""
    return 1 if packed_t is not None else forward
