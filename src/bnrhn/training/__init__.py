"""Optimisation shared by all tasks: the trainer loop, atomic checkpoints, logs, optimisers and schedules."""

from bnrhn.folder_lock import FolderInUse, FolderLock
from bnrhn.training.checkpoint import capture_rng_state, check_finite_weights, load_checkpoint, restore_rng_state, save_checkpoint
from bnrhn.training.log import StepLogger, read_log
from bnrhn.training.optim import build_optimizer, build_scheduler, load_optimizer_state
from bnrhn.training.trainer import Trainer, TrainerConfig, TrainingDiverged

__all__ = [
    "Trainer", "TrainerConfig", "TrainingDiverged", "StepLogger", "read_log",
    "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
    "build_optimizer", "build_scheduler", "load_optimizer_state", "FolderLock", "FolderInUse", "check_finite_weights",
]
