"""Data-parallel training on PyTorch's own engine: ``torch.distributed`` processes started by ``torchrun``.

    torchrun --nproc_per_node 2 -m bnrhn train --cell bn_rhn ...      # one machine, 2 processes

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`from_environment`
joins the process group (gloo on CPU, NCCL on CUDA) when ``WORLD_SIZE`` > 1. The trainer then

- gives each rank a disjoint shard of every global batch (the batches are those of one process: the same
  order, the same global batch size), and scales each rank's loss so that the gradient DDP averages is the
  gradient of the global batch's mean loss;
- agrees every step, in one all-reduce of a few numbers, on the global loss (a NaN on any rank stops all
  ranks at the same step), the number of tokens, a Ctrl-C on any rank and the time budget;
- lets rank 0 alone validate, log and write checkpoints (with every rank's random-generator state, so that
  each rank resumes exactly), and broadcasts the validation scores so that every rank takes the same
  decisions (best checkpoint, early stopping).

A rank that dies takes the others down: ``torchrun`` stops the remaining workers when one fails, and a
collective that waits for a dead peer fails after ``timeout`` (:data:`DEFAULT_TIMEOUT_S`).
"""

from __future__ import annotations

import atexit
import gc
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# Rank 0 validates (and, in ``bnrhn compare``, evaluates on the test split) while the others wait at the next
# collective: 30 minutes, torch's own default for gloo.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Distributed:
    """This process's place in a running process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values)
        return values

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


def environment_world_size() -> int:
    """The number of processes ``torchrun`` (or another launcher setting ``WORLD_SIZE``) started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def environment_rank() -> int:
    """This process's rank as the launcher set it (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def from_environment(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed | None:
    """Join the process group a launcher described in the environment; None for a single process.
    CUDA ranks use NCCL on their own GPU (``cuda:LOCAL_RANK``), the others gloo."""
    world = environment_world_size()
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start data-parallel training with "
                         "torchrun (e.g. torchrun --nproc_per_node 2 -m bnrhn train ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        join_process_group(backend, timeout_s)
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend)


def join_process_group(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S, **init_options) -> None:
    """``dist.init_process_group(backend, ...)``, left again at exit (:func:`leave_process_group`)."""
    # DistributedDataParallel imports torch.distributed.nn.functional, whose functions take
    # ``group=group.WORLD`` as a default argument: imported after the group exists, ten defaults keep the
    # default group alive for good (torch 2.13), destroy_process_group cannot free it, and its gloo worker
    # threads outlive the interpreter's shutdown. Imported first, the defaults are None.
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **init_options)
    atexit.unregister(leave_process_group)  # once, however often a process joins and leaves
    atexit.register(leave_process_group)


def leave_process_group() -> None:
    """Destroy the process group, which joins gloo's worker threads. Run at exit (registered when the group
    is created): a group left to the interpreter's shutdown can abort the process ("terminate called without
    an active exception") when a worker thread frees the last collective's tensors after Python has begun to
    shut down."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # a DistributedDataParallel wrapper in a reference cycle still holds the group


@dataclass(frozen=True)
class TrainingProcess:
    """Where a training run computes and, under ``torchrun``, which process of the group this is."""

    device: torch.device
    distributed: Distributed | None
    log: object  # rank 0's log; a silent one on the other ranks

    @property
    def is_main(self) -> bool:
        return self.distributed is None or self.distributed.is_main

    def run_folder_lock(self, run_dir: str | Path):
        """The run folder's lock, held by rank 0 alone (the ranks of one run share the folder)."""
        from bnrhn.folder_lock import FolderLock

        return FolderLock(run_dir, "run folder") if self.is_main else nullcontext()


def start_training_process(device: str, precision: str, batch_size: int, rows: str, log) -> TrainingProcess:
    """The first step of every training command: the device (a missing GPU fails here, before any work), the
    process group when ``torchrun`` started several processes, and a line when ``precision`` is slow or
    unsupported there. ``rows`` names what a batch is made of, for the error when there are fewer than ranks."""
    from bnrhn.devices import precision_note, resolve_device

    where = resolve_device(device)
    distributed = from_environment(where)
    if distributed is not None and not distributed.is_main:
        log = _quiet
    if distributed is not None and batch_size < distributed.world_size:
        raise ValueError(f"--batch-size {batch_size} is smaller than the {distributed.world_size} processes that "
                         f"share each batch's {rows}")
    note = precision_note(precision, where)
    if note:
        log(note)
    if where.type == "cpu" and torch.get_num_threads() > 1 and "BNRHN_OMP_WAIT" in os.environ:
        log(f"cpu: {torch.get_num_threads()} threads; between operations PyTorch's OpenMP workers "
            f"{os.environ['BNRHN_OMP_WAIT']}")
    return TrainingProcess(where, distributed, log)


def _quiet(message: str) -> None:
    """The log of data-parallel ranks other than 0 (rank 0 reports for the run)."""


def prepare_replica(model: torch.nn.Module, distributed: Distributed, bn_stats: str, seed: int, log) -> None:
    """Set up this rank's copy of a freshly built model: its batch norm synchronised over the ranks
    (``bn_stats="sync"``, see :func:`bnrhn.layers.seq_batchnorm.synchronize_batch_norm`) or kept local; ranks
    other than 0 reseeded, so that they draw their own dropout masks (rank 0 keeps one process's stream)."""
    from bnrhn.layers.seq_batchnorm import synchronize_batch_norm

    if bn_stats == "sync":
        synchronize_batch_norm(model)
    if distributed.rank > 0:
        torch.manual_seed(seed + 7919 * distributed.rank)
    note = synchronised_batch_norm_note(distributed, model)
    if note:
        log(note)


def synchronised_batch_norm_note(distributed: Distributed, model: torch.nn.Module) -> str | None:
    """A line for runs whose batch norm is synchronised over gloo processes: each normalised pre-activation
    costs 2 collectives per time step (one forward, one backward), which on the CPU costs more than the
    step's arithmetic."""
    from bnrhn.layers.seq_batchnorm import uses_synchronized_statistics

    if distributed.backend != "gloo" or not uses_synchronized_statistics(model):
        return None
    return ("note: batch-norm statistics synchronised over gloo processes cost 2 collectives per normalised "
            "pre-activation and time step; on one machine's CPU that is slower than one process with threads "
            "(docs/performance.md); --bn-stats local avoids them")


def refuse_data_parallel(what: str) -> None:
    """``ValueError`` when started by a launcher with several processes: ``what`` trains in one process only
    (N copies would write the same run folder)."""
    world = environment_world_size()
    if world > 1:
        raise ValueError(f"{what} trains in one process; it was started as {world} processes (torchrun?). "
                         "Data-parallel training exists for bnrhn train, bnrhn compare and bnrhn lm train "
                         "(docs/distributed.md)")
