"""The training loop shared by every task (captioning, language modelling).

The trainer knows optimisation; the task knows the data and the model's loss. A task implements::

    model: nn.Module
    num_batches(epoch) -> int
    batches(epoch, start=0) -> iterator       # deterministic order for (seed, epoch), skipping `start`
    train_step(batch) -> (loss, tokens[, parts])  # scalar loss to minimise, number of target tokens, and
                                              # optionally {name: float} logged with the step (SCST's reward)
    validate() -> dict[str, float]            # e.g. {"CIDEr": ..., "BLEU-4": ..., "loss": ...}
    state_dict() -> dict / load_state_dict(d) # what a usable checkpoint needs besides the model
    config_dict() -> dict                     # optional: written to config.json

Each step: zero_grad → loss.backward() → clip the global gradient norm → optimiser step → scheduler
step. A non-finite loss or gradient norm raises :class:`TrainingDiverged` *before* the optimiser
touches the parameters, so ``last.pt`` (the last good state) stays intact. So does a loss that explodes
without overflowing: the reference loss is the mean of the run's first ``REFERENCE_STEPS`` steps, a
step whose loss exceeds ``diverge_factor`` × the reference (10 by default; None = off) stops training
as diverged, and one above half that factor is warned about once. Ctrl-C is deferred to the
end of the current step, which then writes a resumable ``last.pt`` and raises ``KeyboardInterrupt``
(a second Ctrl-C aborts at once). Resuming restores model, optimiser, scheduler, task state, counters
and all random generators, and skips the batches of the epoch already done, so a resumed run
reproduces the losses of an uninterrupted one exactly.

With ``distributed`` (a :class:`~bnrhn.training.distributed.Distributed`, from ``torchrun``) the step runs
under ``DistributedDataParallel`` on each rank's shard of the batch (``task.shard(batch, rank, world_size)``),
the ranks agree on the global loss, Ctrl-C and the time budget in one all-reduce per step, rank 0 alone
validates, logs and writes checkpoints, and every rank resumes from them exactly (see
:mod:`bnrhn.training.distributed`). With ``autocast`` (``"bf16"`` or ``"fp16"``) the task's step runs under
``torch.autocast`` on the model's device, fp16 with a ``GradScaler``.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from bnrhn.kernels import onednn
from bnrhn.training.checkpoint import (
    capture_rng_state, load_checkpoint, remove_orphan_temporaries, restore_rng_state, save_checkpoint,
)
from bnrhn.training.log import STEP_COLUMNS, NullLogger, StepLogger
from bnrhn.training.optim import load_optimizer_state


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the last good checkpoint is left intact."""


@dataclass
class TrainerConfig:
    """Settings of :class:`Trainer` (see the module docstring)."""

    run_dir: str
    max_epochs: int = 10
    max_steps: int | None = None
    max_minutes: float | None = None
    grad_clip: float | None = 5.0
    select_metric: str | None = None
    select_mode: str = "max"
    patience: int | None = None
    validate_every: int | None = None  # None: after each epoch; N: every N steps (and at the end)
    checkpoint_every: int | None = None  # steps; None: at each validation / epoch end
    log_every: int = 1
    seed: int = 0
    progress: bool = True
    description: str = "train"
    overwrite: bool = False
    diverge_factor: float | None = 10.0  # stop when the loss exceeds this × the run's starting loss
    autocast: str | None = None  # None (the model's own dtype), "bf16" or "fp16": torch.autocast for the step

    def __post_init__(self) -> None:
        for name in ("max_epochs", "max_steps", "validate_every", "checkpoint_every", "patience"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.diverge_factor is not None and not self.diverge_factor > 1:
            raise ValueError(f"diverge_factor must be > 1 or None (off), got {self.diverge_factor!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {self.autocast!r}")
        if self.select_mode not in ("max", "min"):
            raise ValueError(f"select_mode must be 'max' or 'min', got {self.select_mode!r}")


@dataclass
class TrainerState:
    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    seconds: float = 0.0  # wall-clock spent in fit(), summed over resumed runs
    train_seconds: float = 0.0  # time in training steps only
    tokens: int = 0
    best_value: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    last_validation_step: int = -1
    validations: list | None = None
    first_losses: list | None = None  # the first REFERENCE_STEPS losses: the divergence reference
    warned_rising: bool = False


REFERENCE_STEPS = 5


class _TaskStep(nn.Module):
    """The task's training step as a module's forward: ``DistributedDataParallel`` all-reduces the gradients
    of a step only when its forward ran through the wrapper, and tasks compute their losses with methods of
    their own (``model.loss``), not ``model.forward``."""

    def __init__(self, task) -> None:
        super().__init__()
        self.model = task.model  # the parameters DDP synchronises
        self._task = task

    def forward(self, batch):
        return self._task.train_step(batch)


class Trainer:
    def __init__(self, task, optimizer, scheduler=None, config: TrainerConfig | None = None,
                 distributed=None, on_validation: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """``on_validation(step, metrics)`` is called after each validation (by the process that validates)."""
        if config is None:
            raise ValueError("Trainer needs a TrainerConfig (at least run_dir)")
        self.task = task
        self.model = task.model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.last_path = self.run_dir / "last.pt"
        self.best_path = self.run_dir / "best.pt"
        self.state = TrainerState(validations=[])
        self.distributed = distributed
        self.on_validation = on_validation
        self.is_main = distributed is None or distributed.is_main
        self.logger = StepLogger(self.run_dir) if self.is_main else NullLogger()
        self._sigint_seen = False  # this process got Ctrl-C
        self._stop_requested = False  # the run stops after this step (agreed by every rank)
        self._stop_reason: str | None = None
        self._best_written = False
        self._step_module = self._data_parallel(task) if distributed is not None else None
        self._device = next(self.model.parameters()).device
        self._scaler = torch.amp.GradScaler(self._device.type) if config.autocast == "fp16" else None

    def _data_parallel(self, task):
        from torch.nn.parallel import DistributedDataParallel

        from bnrhn.layers.seq_batchnorm import uses_synchronized_statistics

        if not hasattr(task, "shard"):
            raise ValueError(f"{type(task).__name__} cannot train data-parallel: it has no shard(batch, rank, world_size)")
        # Synchronised batch norm keeps its running statistics identical on every rank; DDP's default
        # broadcast of rank 0's buffers before each forward would be redundant. Per-rank statistics keep
        # DDP's default: rank 0's running statistics are the ones every rank uses and saves.
        return DistributedDataParallel(_TaskStep(task), forward_sync_buffers=not uses_synchronized_statistics(task.model))

    # ----------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until a budget or early stopping ends it; returns a summary dict."""
        self._prepare_run_dir(resume)
        start = time.perf_counter()
        base_seconds = self.state.seconds
        cfg = self.config
        previous_handler = self._install_sigint_handler()
        bar = None
        try:
            while self._stop_reason is None and self.state.epoch < cfg.max_epochs:
                epoch = self.state.epoch
                n = self.task.num_batches(epoch)
                budget = f"/{cfg.max_epochs}" if cfg.max_steps is None and cfg.max_minutes is None else ""
                if cfg.max_steps is not None:
                    budget += f" (from step {self.state.global_step} of {cfg.max_steps})"
                bar = tqdm(
                    total=n, initial=self.state.batch_in_epoch, desc=f"{cfg.description} epoch {epoch + 1}{budget}",
                    disable=not cfg.progress or not self.is_main, leave=False, dynamic_ncols=True, unit="batch",
                )
                for batch in self.task.batches(epoch, self.state.batch_in_epoch):
                    self._train_step(batch, bar)
                    self.state.seconds = base_seconds + time.perf_counter() - start
                    self._check_budgets()
                    if self._stop_requested or (self.distributed is None and self._sigint_seen):
                        self._save(self.last_path)
                        raise KeyboardInterrupt
                    if cfg.validate_every and self.state.global_step % cfg.validate_every == 0:
                        self._validate()
                    elif cfg.checkpoint_every and self.state.global_step % cfg.checkpoint_every == 0:
                        self._save(self.last_path)
                    if self._stop_reason is not None:
                        break
                bar.close()
                if self._stop_reason is None:  # epoch completed
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    if cfg.validate_every is None:
                        self._validate()
                    else:
                        self._save(self.last_path)
            if self._stop_reason is None:
                self._stop_reason = "max_epochs"
            if self.state.last_validation_step != self.state.global_step and self._stop_reason != "early_stopping":
                self._validate()
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            # After a deferred Ctrl-C last.pt holds this very step; after a second Ctrl-C (mid-step) the
            # previous last.pt is the good state and is left untouched.
            raise
        finally:
            self._restore_sigint_handler(previous_handler)
        self.state.seconds = base_seconds + time.perf_counter() - start
        self._save(self.last_path)
        if not self._best_written:
            self._save(self.best_path)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        s = self.state
        return {
            "run_dir": str(self.run_dir),
            "steps": s.global_step,
            "epochs": s.epoch + (s.batch_in_epoch > 0),
            "stopped": self._stop_reason,
            "seconds": s.seconds,
            "train_seconds": s.train_seconds,
            "tokens": s.tokens,
            "tokens_per_s": s.tokens / s.train_seconds if s.train_seconds > 0 else 0.0,
            "best_step": s.best_step,
            "best_value": s.best_value,
            "select_metric": self.config.select_metric,
            "best_checkpoint": str(self.best_path),
            "last_checkpoint": str(self.last_path),
            "validations": list(s.validations or []),
        }

    # ----------------------------------------------------------------------------------------------
    def _forward(self, batch):
        """(loss, tokens) of this process's part of the batch, under autocast when asked for."""
        if self.distributed is not None:
            batch = self.task.shard(batch, self.distributed.rank, self.distributed.world_size)
        run = self._step_module if self._step_module is not None else self.task.train_step
        if self.config.autocast is None:
            return run(batch)
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        with torch.autocast(self._device.type, dtype=dtype):
            return run(batch)

    def _agree(self, loss, tokens: int):
        """(loss to differentiate, global loss value, global tokens). One process: as given. Data-parallel:
        one all-reduce of [Σ loss·tokens, tokens, Ctrl-C seen, time budget spent] over the ranks; the loss is
        scaled by tokens·N / global tokens, so that DDP's average of the ranks' gradients is the gradient
        of the global batch's mean loss; every rank then decides alike (divergence, stop)."""
        cfg = self.config
        if self.distributed is None:
            return loss, float(loss.detach()), int(tokens)
        d = self.distributed
        out_of_time = cfg.max_minutes is not None and self.state.seconds >= 60.0 * cfg.max_minutes
        device = self._device if d.backend == "nccl" else torch.device("cpu")
        agreed = torch.tensor([float(loss.detach()) * tokens, float(tokens), float(self._sigint_seen),
                               float(out_of_time)], dtype=torch.float64, device=device)
        total, n, sigint, late = d.all_reduce_sum(agreed).tolist()
        self._stop_requested = sigint > 0
        if late > 0 and self._stop_reason is None:
            self._stop_reason = "max_minutes"
        return loss * (tokens * d.world_size / max(n, 1.0)), total / max(n, 1.0), int(n)

    def _train_step(self, batch, bar) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        self.model.train()
        loss, tokens, *rest = self._forward(batch)
        parts = dict(rest[0]) if rest else {}  # this process's own (rank 0's are logged)
        clash = sorted(set(parts) & set(STEP_COLUMNS))
        if clash:
            raise ValueError(f"the task's train_step returned logged parts named like the trainer's own columns "
                             f"({', '.join(clash)}); rename them")
        loss, loss_value, tokens = self._agree(loss, tokens)
        step = self.state.global_step + 1
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {step} (epoch {self.state.epoch + 1}); training stopped, "
                f"the last good checkpoint is {self.last_path if self.last_path.exists() else 'none (no checkpoint yet)'}"
            )
        self._check_explosion(loss_value, step)
        self.optimizer.zero_grad(set_to_none=True)
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            self._scaler.unscale_(self.optimizer)  # clip and check the true gradient
        else:
            loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else math.inf))
        # fp16: an overflowing gradient is the GradScaler's to handle (it skips the step and lowers its scale)
        if not math.isfinite(grad_norm) and self._scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"gradient norm is {grad_norm} at step {step} (epoch {self.state.epoch + 1}); training stopped, "
                f"the last good checkpoint is {self.last_path if self.last_path.exists() else 'none (no checkpoint yet)'}"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        dt = time.perf_counter() - t0
        s = self.state
        s.global_step = step
        s.batch_in_epoch += 1
        s.train_seconds += dt
        s.tokens += int(tokens)
        tps = tokens / dt if dt > 0 else 0.0
        if step % cfg.log_every == 0:
            self.logger.log_step(
                step=step, epoch=s.epoch + 1, loss=loss_value, lr=lr, grad_norm=grad_norm,
                tokens=int(tokens), tokens_per_s=round(tps, 1), seconds=round(s.seconds, 3), **parts,
            )
        bar.update(1)
        shown = {"reward": f"{parts['reward']:.3f}"} if "reward" in parts else {}
        bar.set_postfix(loss=f"{loss_value:.3f}", **shown, tok_s=f"{s.tokens / s.train_seconds:.0f}", refresh=False)

    def _check_explosion(self, loss_value: float, step: int) -> None:
        """Divergence of a finite loss (module docstring), before the optimiser step."""
        s, factor = self.state, self.config.diverge_factor
        if s.first_losses is None:
            s.first_losses = []
        if len(s.first_losses) < REFERENCE_STEPS:
            s.first_losses.append(loss_value)
            return
        if factor is None:
            return
        ref = sum(s.first_losses) / len(s.first_losses)
        if ref <= 0:
            return
        if loss_value > factor * ref:
            raise TrainingDiverged(
                f"loss {loss_value:.4g} at step {step} is more than {factor:g}× the run's starting loss ({ref:.4g}, "
                f"mean of its first {REFERENCE_STEPS} steps): the training diverged (a learning rate too high?); "
                f"stopped, the last good checkpoint is "
                f"{self.last_path if self.last_path.exists() else 'none (no checkpoint yet)'} "
                "(the threshold: --diverge-factor, 0 = off)"
            )
        if loss_value > 0.5 * factor * ref and not s.warned_rising:
            s.warned_rising = True
            tqdm.write(f"warning: loss {loss_value:.4g} at step {step} is {loss_value / ref:.1f}× the starting loss "
                       f"({ref:.4g}); training stops as diverged past {factor:g}×")

    def _check_budgets(self) -> None:
        cfg, s = self.config, self.state
        if cfg.max_steps is not None and s.global_step >= cfg.max_steps:
            self._stop_reason = "max_steps"
        elif cfg.max_minutes is not None and s.seconds >= 60.0 * cfg.max_minutes and self.distributed is None:
            self._stop_reason = "max_minutes"  # data-parallel: agreed in _agree

    def _validate(self) -> None:
        cfg, s = self.config, self.state
        t0 = time.perf_counter()
        metrics = None
        if self.is_main:  # data-parallel: rank 0 validates, the others wait for its scores
            self.model.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in (self.task.validate() or {}).items()}
            self.model.train()
            if self.on_validation is not None:
                self.on_validation(s.global_step, metrics)
        if self.distributed is not None:
            metrics = self.distributed.broadcast_object(metrics)
        s.last_validation_step = s.global_step
        s.validations.append({"step": s.global_step, "epoch": s.epoch, **metrics})
        self.logger.log_validation(s.global_step, s.epoch, metrics, time.perf_counter() - t0)
        improved = False
        if cfg.select_metric:
            if cfg.select_metric not in metrics:
                raise ValueError(
                    f"select_metric {cfg.select_metric!r} is not among the validation metrics {sorted(metrics)}"
                )
            value = metrics[cfg.select_metric]
            better = (lambda a, b: a > b) if cfg.select_mode == "max" else (lambda a, b: a < b)
            if math.isfinite(value) and (s.best_value is None or better(value, s.best_value)):
                s.best_value, s.best_step, s.bad_validations = value, s.global_step, 0
                improved = True
            else:
                s.bad_validations += 1
        self._save(self.last_path)
        if improved or not cfg.select_metric:
            self._save(self.best_path)
        if cfg.patience is not None and s.bad_validations >= cfg.patience:
            self._stop_reason = "early_stopping"

    # ----------------------------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "task": self.task.state_dict(),
            "trainer": asdict(self.state),
            "trainer_config": asdict(self.config),
            "rng": capture_rng_state(),
            "grad_scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "recurrent_products": onednn.saved_timings(),  # the library choices, for a resume to make again
        }

    def _save(self, path: Path) -> None:
        """Every rank calls this at the same points; rank 0 writes, with every rank's generator states."""
        rngs = self.distributed.gather_objects(capture_rng_state()) if self.distributed is not None else None
        if path == self.best_path:
            self._best_written = True
        if not self.is_main:
            return
        payload = self._payload()
        if rngs is not None:
            payload["rng_ranks"] = rngs
        save_checkpoint(path, payload)

    def _prepare_run_dir(self, resume: bool) -> None:
        cfg = self.config
        if resume:
            if not self.last_path.exists():
                raise FileNotFoundError(f"cannot resume: no checkpoint {self.last_path}")
            for orphan in remove_orphan_temporaries(self.run_dir):  # a save that a kill interrupted
                tqdm.write(f"resume: removed {orphan.name}, the partial checkpoint of an interrupted save")
            # onto the CPU: the generator states must stay there; load_state_dict moves weights and optimizer
            # state to the parameters' device
            ckpt = load_checkpoint(self.last_path)
            self.model.load_state_dict(ckpt["model"])
            load_optimizer_state(self.optimizer, ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self._scaler is not None and ckpt.get("grad_scaler") is not None:
                self._scaler.load_state_dict(ckpt["grad_scaler"])
            self.task.load_state_dict(ckpt["task"])
            self.state = TrainerState(**ckpt["trainer"])
            self._best_written = self.best_path.exists()
            restore_rng_state(self._own_rng_state(ckpt))
            onednn.adopt(ckpt.get("recurrent_products", ()))
            self.logger.truncate_after(self.state.global_step)
            if self.distributed is not None:
                self.distributed.barrier()  # nobody writes before every rank has read the checkpoint
            return
        if self.last_path.exists() and not cfg.overwrite:
            raise FileExistsError(
                f"{self.run_dir} already holds a training run ({self.last_path.name}); "
                "resume it (--resume), choose another folder, or pass --overwrite to start afresh"
            )
        if self.distributed is not None:
            self.distributed.barrier()  # every rank has checked the folder before rank 0 clears it
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("log.jsonl", "log.csv", "validation.csv", "last.pt", "best.pt"):
            (self.run_dir / name).unlink(missing_ok=True)
        config = {"trainer": asdict(cfg)}
        if hasattr(self.task, "config_dict"):
            config["task"] = self.task.config_dict()
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")

    def _own_rng_state(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """This rank's generator states from a checkpoint (a single-process checkpoint has one)."""
        ranks = ckpt.get("rng_ranks")
        if self.distributed is None or ranks is None:
            if self.distributed is not None and self.distributed.world_size > 1:
                tqdm.write("resume: the checkpoint was written by one process; every rank restores its generators "
                           "(dropout masks differ from an uninterrupted run)")
            return ckpt["rng"]
        if len(ranks) != self.distributed.world_size:
            if self.is_main:
                tqdm.write(f"resume: the checkpoint was written by {len(ranks)} processes, this run has "
                           f"{self.distributed.world_size}; the batches are the same, the dropout masks are not")
            return ranks[self.distributed.rank % len(ranks)]
        return ranks[self.distributed.rank]

    # Ctrl-C: finish the current step, write last.pt, then stop. -----------------------------------
    def _install_sigint_handler(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._sigint_seen:
                raise KeyboardInterrupt
            self._sigint_seen = True
            if self.is_main:
                tqdm.write("Ctrl-C: stopping after this step and saving a resumable checkpoint (Ctrl-C again to abort)")

        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint_handler(previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
