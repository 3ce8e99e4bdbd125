"""``bnrhn tasks train`` as a function: settings → generated data → model → :class:`bnrhn.training.Trainer`.

Data. The adding problem and the copy task train on fresh sequences: batch k of epoch e is generated
from a seed derived from (run seed, e, k), so a resumed run sees exactly the batches an uninterrupted one
would, and validation and test use fixed sets of ``n_eval`` sequences with seeds of their own (never a
training seed). Sequential MNIST trains on its fixed 3,500 training digits, reshuffled per epoch with a
seeded generator; model selection uses its 500 validation digits, the final score its 1,000 test digits.

Batch-norm cells keep one statistics slot per time step up to the sequence length (``max_steps``), as
the language models do for their window.

The run folder holds ``task_config.json`` (the settings, for ``--resume``), the trainer's ``last.pt`` /
``best.pt`` / logs, and ``results.json`` (validation and test loss and error of the best checkpoint,
the trivial baseline, time).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from bnrhn.cells import CELLS, cell_options, legacy_statistics, pin_statistics
from bnrhn.tasks.generators import COPY_K, TASKS, TaskSpec, adding_problem, copy_task, sequential_mnist
from bnrhn.tasks.heads import HEADS, SequenceModel, sequence_loss
from bnrhn.training.settings import load_settings, save_settings

__all__ = ["TaskTrainConfig", "SequenceTask", "train_task", "load_task_model", "task_data", "TASK_CONFIG_FILE",
           "RESULTS_FILE", "CHECKPOINT_KIND", "evaluate_model"]

TASK_CONFIG_FILE = "task_config.json"
RESULTS_FILE = "results.json"
CHECKPOINT_KIND = "bnrhn.sequence_task"
_EVAL_SEED = {"valid": 1_000_000_007, "test": 2_000_000_011}  # far from every training seed
MNIST_LENGTHS = {784: 1, 196: 2, 49: 4}


@dataclass
class TaskTrainConfig:
    """Every setting of a long-range task run (the ``bnrhn tasks train`` options)."""

    task: str = "adding"
    length: int = 100  # adding: T; copy: the delay T (sequences of T + 20 steps); smnist: 784, 196 or 49 pixels
    run_dir: str = "runs/task"
    cell: str = "lstm"
    hidden: int = 128
    layers: int = 1
    head: str | None = None  # None: the task's own ("every" for copy, "last" otherwise)
    cell_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 50
    steps: int = 2000
    batches_per_epoch: int = 100  # generated tasks; sequential MNIST: one pass over its training digits
    n_eval: int = 1000
    optimizer: str = "adam"
    lr: float = 1e-3
    grad_clip: float | None = 1.0
    diverge_factor: float | None = 10.0
    validate_every: int = 200
    max_minutes: float | None = None
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose from {', '.join(CELLS)}")
        for name in ("length", "hidden", "layers", "batch_size", "steps", "batches_per_epoch", "n_eval",
                     "validate_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.task == "adding" and self.length < 2:
            raise ValueError(f"--length: the adding problem needs at least 2 steps, got {self.length}")
        if self.task == "smnist" and self.length not in MNIST_LENGTHS:
            raise ValueError(f"--length for smnist is the number of pixels read: 784 (28×28), 196 (14×14) or 49 "
                             f"(7×7), got {self.length}")
        if self.head is not None and self.head not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.head is not None and (self.head == "every") != self.spec.per_step:
            raise ValueError(f"--head {self.head}: the {self.task} task needs a "
                             f"{'per-step head (every)' if self.spec.per_step else 'many-to-one head (last or mean)'}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"--grad-clip must be positive (or 0 = off), got {self.grad_clip}")
        if self.diverge_factor is not None and not self.diverge_factor > 1:
            raise ValueError(f"--diverge-factor must be > 1 (or 0 = off), got {self.diverge_factor}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be positive, got {self.max_minutes}")

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    @property
    def steps_per_sequence(self) -> int:
        return self.length + 2 * COPY_K if self.task == "copy" else self.length

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskTrainConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown task setting(s): {', '.join(unknown)}")
        return cls(**d)

    def model_config(self) -> dict[str, Any]:
        opts = dict(self.cell_options)
        if "max_steps" in cell_options(self.cell) and "max_steps" not in opts:
            opts["max_steps"] = self.steps_per_sequence  # batch-norm statistics for every step
        head = self.head or ("every" if self.spec.per_step else "last")
        return dict(cell=self.cell, input_size=self.spec.input_size, hidden_size=self.hidden,
                    output_size=self.spec.output_size, head=head, num_layers=self.layers, **opts)


def task_data(cfg: TaskTrainConfig, n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``cfg``'s task generated with ``seed`` (sequential MNIST: the whole ``split``)."""
    if cfg.task == "adding":
        return adding_problem(n, cfg.length, seed)
    if cfg.task == "copy":
        return copy_task(n, cfg.length, seed)
    return sequential_mnist(split, MNIST_LENGTHS[cfg.length])


def error_of(spec: TaskSpec, pred: torch.Tensor, y: torch.Tensor) -> float:
    """The task's error: MSE (adding), symbol error rate on the copied part (copy), error rate (MNIST)."""
    if spec.regression:
        return float(((pred.squeeze(1) - y) ** 2).mean())
    if spec.per_step:
        return float((pred[:, -COPY_K:].argmax(-1) != y[:, -COPY_K:]).float().mean())
    return float((pred.argmax(-1) != y).float().mean())


@torch.no_grad()
def evaluate_model(model: SequenceModel, spec: TaskSpec, x: torch.Tensor, y: torch.Tensor,
                   chunk: int = 500) -> dict[str, float]:
    """Loss and error of ``model`` (eval mode) on ``x``, ``y``, in chunks of ``chunk`` sequences."""
    was = model.training
    model.eval()
    try:
        preds = [model(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    finally:
        model.train(was)
    pred = torch.cat(preds)
    return {"loss": float(sequence_loss(pred, y)), "error": error_of(spec, pred, y)}


class SequenceTask:
    """The task object that :class:`bnrhn.training.Trainer` drives (see the module docstring)."""

    def __init__(self, model: SequenceModel, cfg: TaskTrainConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.spec = cfg.spec
        self.valid = task_data(cfg, cfg.n_eval, _EVAL_SEED["valid"] + cfg.seed, "valid")
        if self.spec.fixed_data:
            self.train_x, self.train_y = task_data(cfg, 0, 0, "train")

    def num_batches(self, epoch: int) -> int:
        if self.spec.fixed_data:
            return math.ceil(len(self.train_y) / self.cfg.batch_size)
        return self.cfg.batches_per_epoch

    def batches(self, epoch: int, start: int = 0):
        B = self.cfg.batch_size
        if self.spec.fixed_data:
            order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch))
            for k in range(start, self.num_batches(epoch)):
                idx = order[k * B:(k + 1) * B]
                yield self.train_x[idx], self.train_y[idx]
            return
        for k in range(start, self.num_batches(epoch)):
            # one seed per (run seed, epoch, batch): resumable, and never one of the evaluation seeds
            yield task_data(self.cfg, B, (self.cfg.seed * 1_000_003 + epoch) * 10_007 + k)

    def train_step(self, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        loss = sequence_loss(self.model(x), y)
        return loss, int(y.numel())

    def validate(self) -> dict[str, float]:
        return evaluate_model(self.model, self.spec, *self.valid)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": CHECKPOINT_KIND, "model_config": dict(self.model.config), "task_config": asdict(self.cfg)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("kind") != CHECKPOINT_KIND:
            raise ValueError("the checkpoint was not written by bnrhn tasks train")

    def config_dict(self) -> dict[str, Any]:
        return {"task_config": asdict(self.cfg), "model": dict(self.model.config)}


def train_task(cfg: TaskTrainConfig, resume: bool = False, log=print) -> dict[str, Any]:
    """Train (or resume) one model on one task; returns the results written to ``results.json``.

    Raises :class:`bnrhn.training.TrainingDiverged` when the loss becomes non-finite or explodes (the last
    good checkpoint stays intact)."""
    from bnrhn.training import FolderLock
    from bnrhn.training.distributed import refuse_data_parallel

    refuse_data_parallel("bnrhn tasks train")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise NotADirectoryError(f"--run-dir {cfg.run_dir} exists and is not a folder")
    with FolderLock(cfg.run_dir, "run folder"):
        return _train_task(cfg, resume, log)


def _train_task(cfg: TaskTrainConfig, resume: bool, log) -> dict[str, Any]:
    from bnrhn.training import Trainer, TrainerConfig, build_optimizer, load_checkpoint

    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / "last.pt").exists() and not cfg.overwrite:
        raise FileExistsError(f"{run_dir} already holds a training run (last.pt); resume it (--resume), choose "
                              "another --run-dir, or pass --overwrite to start afresh")
    if not resume:
        cfg = replace(cfg, cell_options=pin_statistics(cfg.cell, cfg.cell_options))
        (run_dir / RESULTS_FILE).unlink(missing_ok=True)  # a fresh run's results are not the old run's
    torch.manual_seed(cfg.seed)
    model = SequenceModel.from_config(cfg.model_config())
    task = SequenceTask(model, cfg)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr)
    tcfg = TrainerConfig(
        run_dir=str(run_dir), max_epochs=math.ceil(cfg.steps / task.num_batches(0)), max_steps=cfg.steps,
        max_minutes=cfg.max_minutes, grad_clip=cfg.grad_clip, diverge_factor=cfg.diverge_factor,
        select_metric="loss", select_mode="min", validate_every=cfg.validate_every, seed=cfg.seed,
        progress=cfg.progress, description=f"{cfg.task} T={cfg.length} {cfg.cell}", overwrite=cfg.overwrite,
    )
    trainer = Trainer(task, optimizer, None, tcfg)
    if not resume:
        save_task_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"task: {cfg.spec.description}; T = {cfg.length} ({cfg.steps_per_sequence} steps per sequence); trivial "
        f"baseline loss {cfg.spec.baseline(cfg.length):.4f}")
    log(f"model: {cfg.cell} ×{cfg.layers}, hidden {cfg.hidden}, head {model.head}, {n_params:,} parameters")
    summary = trainer.fit(resume=resume)
    best = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model"])
    test = evaluate_model(model, cfg.spec, *task_data(cfg, cfg.n_eval, _EVAL_SEED["test"] + cfg.seed, "test"))
    results = {
        "task": cfg.task, "length": cfg.length, "cell": cfg.cell, "seed": cfg.seed, "hidden": cfg.hidden,
        "parameters": n_params, "steps": summary["steps"], "stopped": summary["stopped"],
        "best_step": summary["best_step"], "valid": task.validate(), "test": test,
        "baseline": {"loss": cfg.spec.baseline(cfg.length), "error": cfg.spec.baseline_error(cfg.length)},
        "error_name": cfg.spec.error_name, "train_seconds": summary["train_seconds"], "seconds": summary["seconds"],
        "validations": summary["validations"],
    }
    (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return results


def save_task_config(cfg: TaskTrainConfig) -> None:
    save_settings(cfg.run_dir, TASK_CONFIG_FILE, cfg)


def load_task_config(run_dir: str | Path) -> TaskTrainConfig:
    cfg = load_settings(run_dir, TASK_CONFIG_FILE, TaskTrainConfig, "bnrhn tasks train")
    return replace(cfg, cell_options=legacy_statistics(cfg.cell, cfg.cell_options))


def load_task_model(path: str | Path) -> tuple[SequenceModel, TaskTrainConfig]:
    """A trained task model (``best.pt`` / ``last.pt`` of ``bnrhn tasks train``) in eval mode, and its settings."""
    from bnrhn.training.checkpoint import check_finite_weights, load_checkpoint

    payload = load_checkpoint(path)
    task = payload.get("task") or {}
    if not isinstance(task, dict) or task.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path}: not a checkpoint of bnrhn tasks train")
    check_finite_weights(payload["model"], path)
    model = SequenceModel.from_config(task["model_config"])
    model.load_state_dict(payload["model"])
    return model.eval(), TaskTrainConfig.from_dict(task["task_config"])
