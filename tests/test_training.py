"""The shared trainer: exact resume, NaN stop with the last good checkpoint intact, atomic checkpoints,
early stopping, budgets, Ctrl-C."""

from __future__ import annotations

import copy
import csv
import os
import signal

import pytest
import torch
from torch import nn

from bnrhn.kernels import onednn
from bnrhn.nn import Recurrent
from bnrhn.training.log import STEP_COLUMNS
from bnrhn.training import (
    Trainer, TrainerConfig, TrainingDiverged, build_optimizer, build_scheduler, load_checkpoint,
    load_optimizer_state, read_log, save_checkpoint,
)


class ToyTask:
    """Next-value regression with a small GRU and dropout (so RNG state matters for exact resume)."""

    def __init__(self, seed=0, n=48, batch=8, nan_at_step=None, interrupt_at_step=None, explode_at_step=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, 3, generator=g)
        self.y = self.x.sum(-1, keepdim=True).cumsum(1)
        self.seed, self.batch = seed, batch
        torch.manual_seed(seed)
        self.rnn = Recurrent("gru", 3, 16, batch_first=True, dropout=0.2)
        self.head = nn.Linear(16, 1)
        self.model = nn.ModuleDict({"rnn": self.rnn, "head": self.head})
        self.nan_at_step, self.interrupt_at_step, self.explode_at_step = nan_at_step, interrupt_at_step, explode_at_step
        self.steps_run = 0
        self.counter = torch.zeros(())  # task state that must survive resume

    def num_batches(self, epoch):
        return len(self.x) // self.batch

    def batches(self, epoch, start=0):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for b in range(start, self.num_batches(epoch)):
            yield perm[b * self.batch : (b + 1) * self.batch]

    def train_step(self, idx):
        self.steps_run += 1
        self.counter += 1
        if self.interrupt_at_step and self.steps_run == self.interrupt_at_step:
            os.kill(os.getpid(), signal.SIGINT)
        out, _ = self.rnn(self.x[idx])
        loss = (self.head(out) - self.y[idx]).pow(2).mean()
        if self.nan_at_step and self.steps_run >= self.nan_at_step:
            loss = loss * float("nan")
        if self.explode_at_step and self.steps_run >= self.explode_at_step:  # finite, but 100× the start
            loss = loss * 1e6
        return loss, idx.numel() * 6

    def validate(self):
        out, _ = self.rnn(self.x[:16])
        return {"loss": float((self.head(out) - self.y[:16]).pow(2).mean())}

    def state_dict(self):
        return {"counter": self.counter.clone()}

    def load_state_dict(self, d):
        self.counter = d["counter"].clone()


def make(tmp_path, name="run", **kw):
    own = ("nan_at_step", "interrupt_at_step", "explode_at_step")
    task = ToyTask(**{k: v for k, v in kw.items() if k in own})
    opt = build_optimizer(task.model.parameters(), "adam", lr=1e-2)
    sched = build_scheduler(opt, "cosine", total_steps=60, warmup_steps=3)
    cfg_kw = {k: v for k, v in kw.items() if k not in own}
    cfg = TrainerConfig(run_dir=str(tmp_path / name), progress=False, select_metric="loss", select_mode="min", **cfg_kw)
    return task, Trainer(task, opt, sched, cfg)


def train_losses(run_dir):
    return [r["loss"] for r in read_log(run_dir / "log.jsonl") if r["kind"] == "train"]


def test_training_reduces_loss_and_writes_run_folder(tmp_path):
    task, trainer = make(tmp_path, max_epochs=5)
    summary = trainer.fit()
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 30 and summary["steps"] == 30
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    for name in ("last.pt", "best.pt", "log.jsonl", "log.csv", "validation.csv", "config.json"):
        assert (tmp_path / "run" / name).exists(), name
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["trainer"]["global_step"] == summary["best_step"]
    assert summary["tokens_per_s"] > 0


def test_log_csv_rows_and_gradient_clipping(tmp_path, monkeypatch):
    """log.csv has one row per step with the logged columns; the global gradient norm is clipped to
    grad_clip (the norm before clipping is what gets logged), and the schedule sets each step's lr."""
    import csv

    seen = []
    original_step = torch.optim.Adam.step

    def spy(self, *a, **k):  # the gradient the optimiser receives, after clipping
        seen.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]))))
        return original_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    task, trainer = make(tmp_path, max_epochs=2, grad_clip=0.05)
    trainer.fit()
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and [int(r["step"]) for r in rows] == list(range(1, 13))
    for col in ("epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert all(r[col] != "" for r in rows), col
    logged = [float(r["grad_norm"]) for r in rows]
    assert max(logged) > 0.05  # the toy task's raw gradients are larger than the clip ...
    assert all(n <= 0.05 * (1 + 1e-4) for n in seen)  # ... and the optimiser only ever sees clipped ones
    assert [float(r["tokens"]) for r in rows] == [8 * 6] * 12
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < lrs[2] and lrs[2] > lrs[-1]  # warm-up for 3 steps, then cosine decay


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path):
    _, full = make(tmp_path, "full", max_epochs=4)
    full.fit()
    # Stop mid-epoch (step 9 of 6-batch epochs), then resume in a fresh process-like setup.
    onednn.reset()
    timing = [64, 2048, 512, 2, 900.0, 700.0]  # a library choice this process made (the toy's products are smaller)
    onednn.adopt([timing])
    _, part = make(tmp_path, "part", max_epochs=4, max_steps=9)
    part.fit()
    onednn.reset()  # the fresh process knows nothing ...
    _, resumed = make(tmp_path, "part", max_epochs=4)
    summary = resumed.fit(resume=True)
    assert onednn.saved_timings() == [timing]  # ... until it reads the checkpoint: the same choices again
    onednn.reset()
    assert summary["steps"] == 24
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")
    assert float(resumed.task.counter) == 24  # task state restored


def test_a_checkpoint_of_the_unfused_update_resumes_with_the_fused_one(tmp_path):
    """A run whose checkpoint was written by torch's default optimiser update (before the fused one, or where it
    does not apply) resumes with the fused update, and its losses are those of the uninterrupted run."""
    _, full = make(tmp_path, "full", max_epochs=2)
    full.fit()
    _, part = make(tmp_path, "part", max_epochs=2, max_steps=5)
    part.fit()
    last = tmp_path / "part" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is True
    for group in ckpt["optimizer"]["param_groups"]:  # as an unfused optimizer writes it
        group["fused"] = None
    save_checkpoint(last, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    _, resumed = make(tmp_path, "part", max_epochs=2)
    resumed.fit(resume=True)
    assert resumed.optimizer.param_groups[0]["fused"] is True
    assert train_losses(tmp_path / "part") == pytest.approx(train_losses(tmp_path / "full"), rel=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    task, trainer = make(tmp_path, max_epochs=5, checkpoint_every=4, nan_at_step=11)
    with pytest.raises(TrainingDiverged, match="step 11"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["trainer"]["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_ctrl_c_leaves_resumable_checkpoint(tmp_path):
    task, trainer = make(tmp_path, max_epochs=3, interrupt_at_step=5)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["global_step"] == 5
    _, resumed = make(tmp_path, max_epochs=3)
    assert resumed.fit(resume=True)["steps"] == 18


def test_budget_and_early_stopping(tmp_path):
    _, t = make(tmp_path, "steps", max_epochs=100, max_steps=7)
    assert t.fit()["stopped"] == "max_steps"

    class Flat(ToyTask):
        def validate(self):
            return {"loss": 1.0}

    task = Flat()
    opt = build_optimizer(task.model.parameters(), "sgd", lr=1e-3)
    cfg = TrainerConfig(run_dir=str(tmp_path / "es"), max_epochs=50, patience=2, select_metric="loss",
                        select_mode="min", progress=False)
    s = Trainer(task, opt, None, cfg).fit()
    assert s["stopped"] == "early_stopping" and s["epochs"] == 3


def test_existing_run_is_refused_without_resume(tmp_path):
    _, t = make(tmp_path, max_epochs=1)
    t.fit()
    _, t2 = make(tmp_path, max_epochs=1)
    with pytest.raises(FileExistsError, match="--resume"):
        t2.fit()
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        make(tmp_path, "other", max_epochs=1)[1].fit(resume=True)


def test_checkpoint_write_is_atomic_and_corruption_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_config_errors():
    with pytest.raises(ValueError, match="max_steps"):
        TrainerConfig(run_dir="x", max_steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer([nn.Parameter(torch.ones(1))], "rmsprop")
    with pytest.raises(ValueError, match="step_size"):
        build_scheduler(build_optimizer([nn.Parameter(torch.ones(1))]), "step")


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_takes_the_fused_update_where_every_parameter_allows_it(name):
    dense = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2, dtype=torch.float64))]
    assert build_optimizer(dense, name).param_groups[0]["fused"] is True
    with_complex = dense + [nn.Parameter(torch.randn(2, dtype=torch.complex64))]  # no fused kernel for these
    assert build_optimizer(with_complex, name).param_groups[0]["fused"] is None
    groups = [{"params": dense[:1]}, {"params": dense[1:], "lr": 0.1}]  # torch's param groups are taken too
    assert [g["fused"] for g in build_optimizer(groups, name).param_groups] == [True, True]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_a_first_step_skipped_for_overflow_leaves_the_update_as_the_default_one_s(name):
    """fp16 training: the GradScaler skips a step whose gradients overflow (routine at the start) and the
    optimiser must come out of it as the default update does. torch 2.13's fused SGD did not (its momentum
    buffers stayed uninitialised), so SGD keeps the default update; fused Adam does."""
    def two_steps(opt, param):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for scale in (float("inf"), 1.0):  # an overflowing step, then an ordinary one
            opt.zero_grad()
            scaler.scale((param * torch.sin(param.detach()) * scale).sum()).backward()
            scaler.step(opt)
            scaler.update()
        return param.detach()

    start = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    ours = nn.Parameter(start.clone())
    default = nn.Parameter(start.clone())
    after_ours = two_steps(build_optimizer([ours], name, lr=0.05, weight_decay=0.01, momentum=0.9), ours)
    after_default = two_steps(TORCH_DEFAULT[name]([default]), default)
    assert torch.isfinite(after_ours).all()
    torch.testing.assert_close(after_ours, after_default, rtol=1e-6, atol=1e-6)


TORCH_DEFAULT = {  # each name as torch.optim builds it without being asked for the fused update
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_loading_an_optimizer_state_keeps_the_loader_s_implementation(name):
    """The state of torch's default update, loaded into a fused optimiser: the implementation stays fused, the
    hyper-parameters and moments come from the state, and the updates continue as the default update's would
    (float64; the two differ only in the order of their floating-point operations)."""
    def descend(opt, param, steps):
        for _ in range(steps):
            param.grad = torch.sin(3 * param.detach()) + param.detach() ** 2
            opt.step()

    param = nn.Parameter(torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    default = TORCH_DEFAULT[name]([param])
    descend(default, param, 3)
    saved, resumed_param = copy.deepcopy(default.state_dict()), nn.Parameter(param.detach().clone())
    descend(default, param, 4)

    fused = build_optimizer([resumed_param], name, lr=0.5, weight_decay=0.0, momentum=0.0)
    load_optimizer_state(fused, saved)
    group = fused.param_groups[0]
    assert group["fused"] is (None if name == "sgd" else True)  # SGD keeps the default update (test below)
    assert (group["lr"], group["weight_decay"]) == (0.05, 0.01)
    descend(fused, resumed_param, 4)
    torch.testing.assert_close(resumed_param.detach(), param.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="parameter groups"):  # torch's own check still speaks
        load_optimizer_state(build_optimizer([resumed_param, nn.Parameter(torch.ones(1))], name), {
            **saved, "param_groups": saved["param_groups"] * 2})


def test_a_finite_exploding_loss_stops_as_diverged(tmp_path):
    """A loss that grows 1e6× without overflowing stops training (before the optimiser step) with the last
    good checkpoint intact; the threshold is configurable and can be switched off."""
    task, trainer = make(tmp_path, max_epochs=5, checkpoint_every=4, explode_at_step=11)
    with pytest.raises(TrainingDiverged, match=r"step 11 is more than 10× the run's starting loss"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["trainer"]["global_step"] == 8 and len(ckpt["trainer"]["first_losses"]) == 5
    task, trainer = make(tmp_path, name="off", max_epochs=3, explode_at_step=11, diverge_factor=None)
    trainer.fit()  # off: trains on (the user asked for it)
    assert max(train_losses(tmp_path / "off")) > 1e4
    with pytest.raises(ValueError, match="diverge_factor"):
        TrainerConfig(run_dir=str(tmp_path / "x"), diverge_factor=0.5)


def test_disk_full_half_way_keeps_the_previous_checkpoint_and_says_why(tmp_path, monkeypatch):
    """Fault injection: the write fails after half the bytes (as a full disk does inside torch's zip writer)."""
    from bnrhn.errors import CheckpointWriteError

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}})
    real_save = torch.save

    def half_then_full(obj, f, *a, **k):
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(CheckpointWriteError, match=r"last.pt: .*MB free .*needs about 0.0 MB .*previous last.pt is unchanged"):
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the partial temporary file is gone


def test_resume_removes_orphan_temporary_checkpoints(tmp_path):
    task, trainer = make(tmp_path, max_epochs=1)
    trainer.fit()
    orphan = tmp_path / "run" / ".last.pt.abc123.tmp"  # what a kill -9 during a save leaves
    orphan.write_bytes(b"partial")
    make(tmp_path, max_epochs=2)[1].fit(resume=True)
    assert not orphan.exists()


def test_logged_parts_of_a_step_reach_the_log_and_clashes_are_refused(tmp_path):
    """A task's train_step may return (loss, tokens, parts): the parts go to log.jsonl with the step (SCST's
    reward), log.csv keeps its columns; a part named like a trainer column is refused with its name."""

    class WithParts(ToyTask):
        def __init__(self, parts):
            super().__init__()
            self.parts = parts

        def train_step(self, idx):
            loss, tokens = super().train_step(idx)
            return loss, tokens, {k: float(v(self.steps_run)) for k, v in self.parts.items()}

    task = WithParts({"reward": lambda step: step / 10})
    opt = build_optimizer(task.model.parameters(), "adam", lr=1e-2)
    Trainer(task, opt, None, TrainerConfig(run_dir=str(tmp_path / "ok"), progress=False, max_steps=4)).fit()
    rows = [r for r in read_log(tmp_path / "ok" / "log.jsonl") if r["kind"] == "train"]
    assert [r["reward"] for r in rows] == [0.1, 0.2, 0.3, 0.4]
    with (tmp_path / "ok" / "log.csv").open() as f:
        assert next(csv.reader(f)) == list(STEP_COLUMNS)
    task = WithParts({"lr": lambda step: 1.0})
    opt = build_optimizer(task.model.parameters(), "adam", lr=1e-2)
    with pytest.raises(ValueError, match="lr"):
        Trainer(task, opt, None, TrainerConfig(run_dir=str(tmp_path / "clash"), progress=False, max_steps=2)).fit()
