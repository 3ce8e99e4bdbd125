"""Keep freed memory in the process for reuse (glibc's malloc), set as a command starts.

A training step allocates its large tensors afresh (the C++ loops' per-step records, the activations autograd
saves: tens of MB per step at hidden size 512) and frees them at its end. glibc's malloc hands blocks above its
mmap threshold back to the kernel when they are freed and trims the heap's free top, so the next step maps the
same memory again: every page is faulted in and zeroed by the kernel, every step — in most processes; in some,
glibc's placement happens to reuse it anyway. Measured on the 2-core AMD EPYC (AVX-512) we develop on
(docs/performance.md): `bnrhn lm train --cell bn_lstm --hidden 128 --max-steps 80`, three alternating pairs of
processes, 59,173 / 61,115 / 50,683 chars/s before and 68,101 / 78,062 / 77,422 with freed memory kept (the
processes' page faults 1.50–1.71 M → 1.19 M); a BN-LSTM layer's training step (B 64, T 20) at hidden size 128
19.5–20.3 ms with 1,800–2,200 page faults per step, 13.9–16.1 ms with 6–12; at 512 110.6–122.6 → 93.6–111.7 ms
(5,700–8,100 → 80–180 faults). In `benchmarks/cells.py`'s processes the default already reused the memory and
nothing changed.

:func:`keep_freed_memory` raises both thresholds (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD)``) so
that freed blocks stay in the heap for the next step. The cost: a process keeps the most memory it ever held
until it exits (its resident size does not shrink after a peak). Only where the C library is glibc; a setting of
the user's (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or either in ``GLIBC_TUNABLES``) is kept.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # 1 GiB: blocks below it come from (and return to) the heap; the heap is trimmed past it only
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def user_has_chosen(environ: Mapping[str, str] = os.environ) -> bool:
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(name in environ for name in USER_SETTINGS) or any(
        key in tunables for key in ("malloc.mmap_threshold", "malloc.trim_threshold"))


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD`; True when they were set (glibc, no setting of
    the user's, both calls accepted)."""
    if platform.libc_ver()[0] != "glibc" or user_has_chosen(environ):
        return False
    # the process's own symbols, glibc's among them (ctypes.util.find_library would run ldconfig: 3 ms per command)
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
