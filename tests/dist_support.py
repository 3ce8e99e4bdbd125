"""Helpers for the data-parallel tests: run a function on N gloo processes of one machine.

``run_ranks(fn, world, folder, *args)`` spawns ``world`` processes; each joins a gloo group through a file in
``folder`` and calls ``fn(rank, world, folder, *args)``, which saves what it wants compared under ``folder``.
An exception on any rank fails the call (``torch.multiprocessing.spawn`` re-raises it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bnrhn.training.distributed import join_process_group, leave_process_group


def _entry(rank: int, fn, world: int, folder: str, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    join_process_group("gloo", 60, init_method=f"file://{Path(folder) / 'rendezvous'}", rank=rank, world_size=world)
    try:
        fn(rank, world, folder, *args)
    finally:
        leave_process_group()


def run_ranks(fn, world: int, folder, *args) -> None:
    mp.spawn(_entry, args=(fn, world, str(folder), args), nprocs=world, join=True)
