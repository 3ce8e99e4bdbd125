"""The one experiment runner (bnrhn.experiments.runner) with a fake experiment that trains nothing: finished
runs reused on a resume, interrupted ones continued, divergence as a result, settings that may not change
refused before any run, the folder lock, results written atomically, the data-parallel follower."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bnrhn.experiments import runner
from bnrhn.experiments.runner import (ExperimentSpec, Run, follow_experiment, refused_changes, run_experiment)
from bnrhn.training import FolderInUse, TrainingDiverged


class Interrupted(Exception):
    """Stands for Ctrl-C in the middle of a run (the runner lets it through, as it does KeyboardInterrupt)."""


class FakeExperiment(ExperimentSpec):
    """Runs "seed 0", "seed 1", ...: each "trains" by writing a last.pt and returns a score; records every call."""

    noun = "fake experiment"
    log_name = "fake"
    settings_file = "fake.json"
    result_file = "fake_run.json"
    may_grow = ("seeds",)
    resume_note = "only the seeds may grow"

    def __init__(self, seeds=(0, 1), lr=0.1, note="", diverge=(), interrupt=None):
        self.seeds, self.lr, self.note = list(seeds), lr, note
        self.diverge, self.interrupt = set(diverge), interrupt
        self.out = None  # set by run()
        self.trained: list[tuple[str, bool]] = []  # (run name, resume) of every train() call
        self.followed: list[tuple[str, bool]] = []
        self.reported: dict | None = None

    def settings(self) -> dict:
        return {"seeds": self.seeds, "lr": self.lr, "note": self.note}

    def must_match(self, settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k != "note"}  # the note is only for the reader

    def runs(self) -> list[Run]:
        return [Run(f"seed {s}", self.out / "runs" / f"seed{s}", {"seed": s}) for s in self.seeds]

    def train(self, run: Run, resume: bool, log) -> dict:
        self.trained.append((run.name, resume))
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "last.pt").write_text("a checkpoint")
        if run.name == self.interrupt:
            raise Interrupted
        if run.name in self.diverge:
            raise TrainingDiverged("loss is nan at step 3")
        return {"seed": run.config["seed"], "score": 10 + run.config["seed"], "continued": resume}

    def diverged(self, run: Run, exc: Exception, log) -> dict:
        return {"seed": run.config["seed"], "score": float("nan"), "why": str(exc)}

    def follow(self, run: Run, resume: bool) -> None:
        self.followed.append((run.name, resume))
        if run.name in self.diverge:
            raise TrainingDiverged("loss is nan at step 3")

    def report(self, results: dict, out_dir: Path, log) -> dict:
        self.reported = results
        (out_dir / "results.json").write_text(json.dumps(results))
        return {"runs": len(results)}


def run(spec: FakeExperiment, out: Path, *, resume=False, overwrite=False, command="bnrhn fake", log=None) -> dict:
    spec.out = out
    return run_experiment(spec, out, resume=resume, overwrite=overwrite, command=command,
                          log=log if log is not None else (lambda m: None))


def test_a_new_experiment_trains_every_run_then_reports(tmp_path):
    out, lines = tmp_path / "exp", []
    spec = FakeExperiment()
    assert run(spec, out, log=lines.append) == {"runs": 2}
    assert spec.trained == [("seed 0", False), ("seed 1", False)]
    assert spec.reported == {"seed 0": {"seed": 0, "score": 10, "continued": False},
                             "seed 1": {"seed": 1, "score": 11, "continued": False}}
    assert json.loads((out / "fake.json").read_text()) == spec.settings()
    assert (out / "command.txt").read_text() == "bnrhn fake\n"
    assert json.loads((out / "runs" / "seed1" / "fake_run.json").read_text())["score"] == 11
    assert f"fake [1/2]: training seed 0 -> {out / 'runs' / 'seed0'}" in lines
    assert any(line.startswith("fake [2/2]: training seed 1") for line in lines)


def test_resume_reuses_finished_runs_without_training_them(tmp_path):
    out = tmp_path / "exp"
    run(FakeExperiment(), out)
    again, lines = FakeExperiment(), []
    run(again, out, resume=True, command="bnrhn fake --resume", log=lines.append)
    assert again.trained == []
    assert again.reported["seed 1"] == {"seed": 1, "score": 11, "continued": False}
    assert f"fake [2/2]: seed 1 already done ({out / 'runs' / 'seed1'})" in lines
    assert (out / "command.txt").read_text() == "bnrhn fake\nbnrhn fake --resume\n"  # each command once
    run(FakeExperiment(), out, resume=True, command="bnrhn fake --resume")
    assert (out / "command.txt").read_text() == "bnrhn fake\nbnrhn fake --resume\n"


def test_an_interrupted_run_continues_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "exp"
    cut = FakeExperiment(interrupt="seed 1")
    with pytest.raises(Interrupted):
        run(cut, out)
    assert cut.trained == [("seed 0", False), ("seed 1", False)]
    assert (out / "runs" / "seed1" / "last.pt").is_file() and not (out / "runs" / "seed1" / "fake_run.json").exists()
    more = FakeExperiment(seeds=(0, 1, 2))  # and a seed added: it has no checkpoint, so it starts afresh
    run(more, out, resume=True)
    assert more.trained == [("seed 1", True), ("seed 2", False)]
    assert more.reported["seed 1"]["continued"] is True


def test_without_resume_every_run_starts_afresh(tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(Interrupted):
        run(FakeExperiment(interrupt="seed 1"), out)
    spec = FakeExperiment()
    run(spec, out, overwrite=True)
    assert spec.trained == [("seed 0", False), ("seed 1", False)]


def test_a_diverging_run_is_a_result_and_the_others_still_run(tmp_path):
    out, lines = tmp_path / "exp", []
    spec = FakeExperiment(seeds=(0, 1, 2), diverge={"seed 1"})
    run(spec, out, log=lines.append)
    assert spec.trained == [("seed 0", False), ("seed 1", False), ("seed 2", False)]
    assert spec.reported["seed 1"]["why"] == "loss is nan at step 3" and spec.reported["seed 2"]["score"] == 12
    assert "fake [2/3]: seed 1 diverged: loss is nan at step 3" in lines
    saved = json.loads((out / "runs" / "seed1" / "fake_run.json").read_text())
    assert saved["why"] == "loss is nan at step 3"
    again = FakeExperiment(seeds=(0, 1, 2))
    run(again, out, resume=True)
    assert again.trained == []  # the divergence is the run's result: a resume keeps it


@pytest.mark.parametrize("change, refused", [
    ({"lr": 0.2}, "lr"),
    ({"seeds": (1, 0)}, "seeds"),  # reordered, not grown
    ({"seeds": (0,)}, "seeds"),  # shrunk
    ({"lr": 0.2, "seeds": (0, 1, 2)}, "lr"),  # a seed added, and the lr changed
])
def test_settings_that_may_not_change_are_refused_before_any_run(tmp_path, change, refused):
    out = tmp_path / "exp"
    run(FakeExperiment(), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = FakeExperiment(**change)
    with pytest.raises(ValueError) as exc:
        run(other, out, resume=True, command="bnrhn fake --other")
    message = str(exc.value)
    assert f"({refused})" in message and str(out) in message and "only the seeds may grow" in message
    assert other.trained == [] and other.reported is None
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written


def test_settings_that_may_change_are_accepted_and_saved(tmp_path):
    out = tmp_path / "exp"
    run(FakeExperiment(), out)
    grown = FakeExperiment(seeds=(0, 1, 2), note="three seeds now")
    run(grown, out, resume=True)
    assert grown.trained == [("seed 2", False)]
    assert json.loads((out / "fake.json").read_text()) == {"seeds": [0, 1, 2], "lr": 0.1, "note": "three seeds now"}


def test_refused_changes():
    assert refused_changes({"a": 1, "s": [0]}, {"a": 1, "s": [0, 1]}, ("s",)) == []
    assert refused_changes({"a": 1, "s": [0, 1]}, {"a": 1, "s": [0]}, ("s",)) == ["s"]
    assert refused_changes({"a": 1, "s": [0]}, {"a": 1, "s": [0, 1]}) == ["s"]  # not named: may not grow
    assert refused_changes({"b": 1, "a": 1}, {"a": 2, "c": 3}) == ["a", "b", "c"]  # keys gone and added count


def test_the_folder_is_checked_before_any_work(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    spec = FakeExperiment()
    with pytest.raises(FileExistsError, match="already exists.*--resume.*--overwrite"):
        run(spec, out)
    with pytest.raises(FileNotFoundError, match=r"--resume: .*fake\.json not found; .* holds no fake experiment"):
        run(spec, out, resume=True)
    assert spec.trained == [] and [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        run(spec, tmp_path / "file", overwrite=True)
    run(spec, out, overwrite=True)  # --overwrite: the experiment's own files are written, the user's kept
    assert (out / "notes.txt").read_text() == "my notes" and spec.trained == [("seed 0", False), ("seed 1", False)]


HOLD = """
import sys
from bnrhn.folder_lock import FolderLock
with FolderLock(sys.argv[1], "experiment folder"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_lock_refuses_a_second_runner_on_the_same_folder(tmp_path):
    out = tmp_path / "exp"
    run(FakeExperiment(), out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = FakeExperiment()
        with pytest.raises(FolderInUse, match=re.escape(f"experiment folder {out} is in use by process {holder.pid} ")):
            run(second, out, overwrite=True)
        assert second.trained == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    run(second, out, overwrite=True)  # free again once the other process has finished
    assert len(second.trained) == 2


def test_a_result_is_written_atomically(tmp_path, monkeypatch):
    """The process stopped after writing a result's temporary file, before its rename: no result file, so
    a resume trains that run again instead of trusting half a result."""
    out = tmp_path / "exp"
    real_replace = runner.os.replace

    def cut_before_the_rename(src, dst):
        if Path(dst).name == "fake_run.json" and Path(dst).parent.name == "seed1":
            assert json.loads(Path(src).read_text())["score"] == 11  # the whole result, in the temporary file
            raise Interrupted
        real_replace(src, dst)

    monkeypatch.setattr(runner.os, "replace", cut_before_the_rename)
    with pytest.raises(Interrupted):
        run(FakeExperiment(), out)
    monkeypatch.undo()
    assert (out / "runs" / "seed0" / "fake_run.json").is_file()
    assert not (out / "runs" / "seed1" / "fake_run.json").exists()
    again = FakeExperiment()
    run(again, out, resume=True)
    assert again.trained == [("seed 1", True)]


def test_a_stale_result_goes_before_its_run_is_trained_again(tmp_path):
    """--overwrite trains a finished run again: cut off, it must not leave the old result for a resume."""
    out = tmp_path / "exp"
    run(FakeExperiment(), out)
    with pytest.raises(Interrupted):
        run(FakeExperiment(interrupt="seed 1"), out, overwrite=True)
    assert not (out / "runs" / "seed1" / "fake_run.json").exists()


def test_a_follower_trains_the_runs_rank_0_trains_and_writes_nothing(tmp_path):
    out = tmp_path / "exp"
    spec = FakeExperiment(seeds=(0, 1, 2), diverge={"seed 0"})
    spec.out = out
    follow_experiment(spec, resume=False)
    assert spec.followed == [("seed 0", False), ("seed 1", False), ("seed 2", False)]  # divergence: rank 0's to record
    assert not out.exists()
    with pytest.raises(Interrupted):
        run(FakeExperiment(seeds=(0, 1, 2), interrupt="seed 1"), out)
    follower = FakeExperiment(seeds=(0, 1, 2))
    follower.out = out
    follow_experiment(follower, resume=True)
    assert follower.followed == [("seed 1", True), ("seed 2", False)]  # as rank 0 will: seed 0 is done
    assert follower.trained == [] and follower.reported is None


@dataclass
class FakeConfig:
    seed: int
    progress: bool = True

    def __getitem__(self, key):
        return getattr(self, key)


class SideBySide(FakeExperiment):
    """The fake experiment, saying which process trained each run, with how many threads, which kernel choice
    and whether its progress bars were on; ``fail`` names runs that raise an ordinary error."""

    def __init__(self, fail=(), slow=(), ctrl_c=(), **kw):
        super().__init__(**kw)
        self.prepared = 0
        self.fail, self.slow, self.ctrl_c = set(fail), set(slow), set(ctrl_c)

    def runs(self) -> list[Run]:
        return [Run(f"seed {s}", self.out / "runs" / f"seed{s}", FakeConfig(s)) for s in self.seeds]

    def prepare(self, log) -> None:
        self.prepared += 1

    def train(self, run: Run, resume: bool, log) -> dict:
        import os

        import torch

        log(f"training {run.name} here")
        print("a progress line on stderr", file=sys.stderr)
        if run.name in self.fail:
            raise OSError("the disk said no")
        if run.name in self.ctrl_c:
            raise KeyboardInterrupt  # as the trainer does after saving last.pt
        if run.name in self.slow:
            import time

            time.sleep(3.0)
        result = super().train(run, resume, log)
        return {**result, "pid": os.getpid(), "threads": torch.get_num_threads(), "progress": run.config.progress,
                "kernels": os.environ.get("BNRHN_GATE_KERNELS")}


def test_jobs_train_runs_in_worker_processes_with_the_same_results(tmp_path):
    """jobs=2: every run trains in a process of its own (not the runner's), with its share of the threads and no
    progress bars, its messages in output.log; prepare() once before; results in run order as with jobs=1;
    a run that diverges is a result; a resume reuses the finished runs without starting a worker."""
    import os

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spec = SideBySide(seeds=(0, 1, 2), diverge={"seed 2"})
        spec.out = tmp_path / "exp"
        lines: list[str] = []
        run_experiment(spec, spec.out, resume=False, overwrite=False, command="bnrhn fake", log=lines.append, jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert spec.prepared == 1 and spec.trained == []  # the parent trained nothing itself
    assert list(spec.reported) == ["seed 0", "seed 1", "seed 2"]
    from bnrhn import kernels

    for name in ("seed 0", "seed 1"):
        r = spec.reported[name]
        assert r["pid"] != os.getpid() and r["threads"] == 1 and r["progress"] is False
        assert r["kernels"] == kernels.settled_mode() and r["score"] == 10 + r["seed"]
    assert spec.reported["seed 2"]["why"] == "loss is nan at step 3"
    log_text = (spec.out / "runs" / "seed1" / runner.OUTPUT_FILE).read_text()
    assert "training seed 1 here" in log_text and "a progress line on stderr" in log_text
    assert any("3 run(s), up to 2 at a time with 1 thread(s) each" in line for line in lines)
    again = SideBySide(seeds=(0, 1, 2))
    again.out = spec.out
    run_experiment(again, spec.out, resume=True, overwrite=False, command="bnrhn fake", log=lambda m: None, jobs=2)
    assert again.prepared == 0 and again.reported == spec.reported


def test_jobs_must_be_a_positive_whole_number(tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--jobs must be a whole number"):
            run_experiment(FakeExperiment(), tmp_path / "x", resume=False, overwrite=False, jobs=bad)
    assert not (tmp_path / "x").exists()


class Costly(SideBySide):
    def cost(self, run: Run) -> float:
        return {"seed 0": 1.0, "seed 1": 5.0, "seed 2": 5.0, "seed 3": 3.0}[run.name]


class Ordered(SideBySide):
    def __init__(self, costs, **kw):
        super().__init__(**kw)
        self.costs = costs

    def cost(self, run: Run) -> float:
        return self.costs[run.name]


def test_jobs_start_the_costliest_runs_first_and_report_in_run_order(tmp_path):
    spec = Costly(seeds=(0, 1, 2, 3))
    spec.out = tmp_path / "exp"
    lines: list[str] = []
    run_experiment(spec, spec.out, resume=False, overwrite=False, log=lines.append, jobs=2)
    started = [line.split("training ")[1].split(" ->")[0] for line in lines if ": training seed" in line]
    assert started == ["seed 1", "seed 2", "seed 3", "seed 0"]  # ties keep the run order
    assert list(spec.reported) == ["seed 0", "seed 1", "seed 2", "seed 3"]


def test_a_failing_run_beside_others_stops_new_runs_and_names_its_log(tmp_path):
    """jobs=2, runs costliest first: seed 0 fails while seed 1 trains (3 s); seed 1 finishes and keeps its result,
    seed 2 is not started, and the error names seed 0's output.log, which holds the traceback."""
    class_costs = {"seed 0": 3.0, "seed 1": 2.0, "seed 2": 1.0}
    spec = Ordered(costs=class_costs, seeds=(0, 1, 2), fail={"seed 0"}, slow={"seed 1"})
    spec.out = tmp_path / "exp"
    with pytest.raises(RuntimeError, match=r"seed 0 \(see .*seed0/output.log\); 1 not started"):
        run_experiment(spec, spec.out, resume=False, overwrite=False, log=lambda m: None, jobs=2)
    assert "OSError: the disk said no" in (spec.out / "runs" / "seed0" / runner.OUTPUT_FILE).read_text()
    assert json.loads((spec.out / "runs" / "seed1" / spec.result_file).read_text())["score"] == 11
    assert not (spec.out / "runs" / "seed2").exists()


def test_ctrl_c_in_a_worker_stops_the_experiment_as_a_keyboard_interrupt(tmp_path):
    """A worker that stops on Ctrl-C (exit code 130) while its neighbour trains: the neighbour finishes, no new
    run starts, and the runner raises KeyboardInterrupt (the commands then print how to resume), even though the
    runner itself never saw the signal (a background job ignores SIGINT while its children take it)."""
    spec = Ordered(costs={"seed 0": 3.0, "seed 1": 2.0, "seed 2": 1.0}, seeds=(0, 1, 2), ctrl_c={"seed 0"},
                   slow={"seed 1"})
    spec.out = tmp_path / "exp"
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, spec.out, resume=False, overwrite=False, log=lines.append, jobs=2)
    assert any("seed 0 interrupted" in line for line in lines)
    assert (spec.out / "runs" / "seed1" / spec.result_file).is_file() and not (spec.out / "runs" / "seed2").exists()
