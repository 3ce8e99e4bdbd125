"""One runner for the experiments that train several runs and report on them.

An experiment is an :class:`ExperimentSpec`: its runs (cells × seeds, variants, cells × lengths × seeds),
the settings that define it, how one run is trained, what a run that diverged yields, and its report.
:func:`run_experiment` does the rest, the same way for every experiment:

- the output folder is checked before any work (:func:`check_folder`): it must be new or empty, unless
  ``resume`` (continue the experiment saved there: its settings must match, see
  :meth:`ExperimentSpec.must_match` and :attr:`ExperimentSpec.may_grow`) or ``overwrite`` (run every run
  again there);
- the folder is held with :class:`bnrhn.training.FolderLock` while the experiment runs;
- the settings go to the spec's settings file, the command to ``command.txt`` (each command that worked on
  the folder, once, in order);
- the runs, one after the other, logged as ``[k/N]``: with ``resume`` a finished run (one with a result file)
  is reused and an interrupted one continues from its ``last.pt``; every other run is trained from the start.
  A run that raises :class:`bnrhn.training.TrainingDiverged` is a result too (:meth:`ExperimentSpec.diverged`),
  and the experiment goes on;
- each run's result is written into its folder atomically (a temporary file, then a rename), so that an
  interruption never leaves half a result for a later resume to take for a finished run;
- the spec writes the report (``results.md``, ``results.json``, figures) from every run's result.

With ``jobs`` > 1 the runs that need training run that many at a time, each in a process of its own
(started with "spawn": no forked copy of a parent's threads), with the parent's CPU threads shared out
(its threads ÷ ``jobs`` each) and its choice of the fused gate kernels; the spec first does once what every run needs
(:meth:`ExperimentSpec.prepare`: e.g. extracting the features) so the runs do not race for it. A run's
messages then go to ``output.log`` in its folder, and its result is the one it has alone with as many
threads (the same seed, data and code; tested). The longest runs (:meth:`ExperimentSpec.cost`) start first. Small recurrent models gain most: at one thread a step of the
demo's captioners uses one core, so two at a time use both.

The specifications: :mod:`bnrhn.experiments.compare` (caption decoders, ``bnrhn compare`` / ``bnrhn demo``),
:mod:`bnrhn.lm.experiment` (the seed report, ``bnrhn lm experiment``), :mod:`bnrhn.tasks.experiment`
(long-range tasks, ``bnrhn tasks compare``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import sys
from abc import ABC, abstractmethod
import multiprocessing.connection
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

Log = Callable[[str], None]

COMMAND_FILE = "command.txt"
LAST_CHECKPOINT = "last.pt"
OUTPUT_FILE = "output.log"  # a run's messages when it trains beside others (jobs > 1)
INTERRUPTED = 130  # a worker's exit code after Ctrl-C (128 + SIGINT, as shells report it)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Run:
    """One run of an experiment."""

    name: str  # how messages name it ("bn_rhn seed 1"); unique within its experiment
    run_dir: Path  # its folder: checkpoints, training log, result file
    config: Any  # the spec's settings of this run (a CaptionConfig, an LMTrainConfig, a TaskTrainConfig)


class ExperimentSpec(ABC):
    """What makes one experiment: its settings, its runs, how a run is trained, and its report.

    The class attributes name the experiment's files and say what a resume may change; the methods without
    a default are the experiment's own work."""

    noun: str = "experiment"  # how messages name it: "the comparison in runs/cmp"
    log_name: str = "experiment"  # the prefix of its log lines: "compare [2/6]: ..."
    settings_file: str | None = "experiment.json"  # in the output folder; None: no settings of its own,
    # every run is checked on its own (see finished) and no resume is refused
    result_file: str = "result.json"  # in each run's folder: the result of the finished run
    may_grow: tuple[str, ...] = ()  # list settings that a resume may extend (the saved list a prefix of the new)
    resume_note: str = ""  # what a resume may change: the end of the message that refuses other changes

    @abstractmethod
    def settings(self) -> dict:
        """The experiment's settings, JSON-able: saved in :attr:`settings_file` for a resume to match."""

    def must_match(self, settings: dict) -> dict:
        """The part of ``settings`` (saved by this or an earlier version, or :meth:`settings` now) that a resume
        must leave unchanged; all of it unless a spec says otherwise."""
        return settings

    def check(self, log: Log) -> None:
        """Every check of the settings that can fail before any run; called after the folder is checked."""

    def prepare(self, log: Log) -> None:
        """What every run needs and only one process should make (a feature cache): done once before runs
        train side by side (``jobs`` > 1); runs alone do it themselves."""

    @abstractmethod
    def runs(self) -> list[Run]:
        """Every run, in the order they are trained."""

    def finished(self, run: Run) -> dict | None:
        """The saved result of ``run`` when it has finished and may be reused, else None: its result file."""
        path = run.run_dir / self.result_file
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def without_progress(self, run: Run) -> Run:
        """``run`` as a worker process trains it: no progress bars. The default turns off a ``progress`` field of
        a dataclass config."""
        fields = getattr(run.config, "__dataclass_fields__", {})
        return replace(run, config=replace(run.config, progress=False)) if "progress" in fields else run

    def cost(self, run: Run) -> float:
        """A guess of how long ``run`` takes relative to the others: with ``jobs`` > 1 the longest are started
        first, so the last to finish is not a long run started late (it orders the work, it changes no result)."""
        return 1.0

    def can_continue(self, run: Run) -> bool:
        """Whether ``run.run_dir`` holds an interrupted run that :meth:`train` can continue: its ``last.pt``."""
        return (run.run_dir / LAST_CHECKPOINT).is_file()

    @abstractmethod
    def train(self, run: Run, resume: bool, log: Log) -> dict:
        """Train ``run`` (continue it from its ``last.pt`` when ``resume``) and score it; its JSON-able result."""

    @abstractmethod
    def diverged(self, run: Run, exc: Exception, log: Log) -> dict:
        """The result of a run whose :meth:`train` raised :class:`bnrhn.training.TrainingDiverged` (``exc``)."""

    def follow(self, run: Run, resume: bool) -> None:
        """The training of ``run`` alone, on a data-parallel rank other than 0 (see :func:`follow_experiment`)."""
        raise NotImplementedError(f"{type(self).__name__} does not train data-parallel")

    @abstractmethod
    def report(self, results: dict[str, dict], out_dir: Path, log: Log) -> dict:
        """Write the report from every run's result ({run name: result}, in run order); returns its summary."""


def run_experiment(spec: ExperimentSpec, out_dir: str | Path, *, resume: bool, overwrite: bool, command: str = "",
                   log: Log = _stderr, jobs: int = 1) -> dict:
    """Check the folder and the settings, train (or reuse) every run, write the report; returns its summary.

    ``resume``: continue the experiment saved in ``out_dir`` (finished runs reused, interrupted ones
    continued); ``overwrite``: write into a folder that holds other files, every run from the start; neither:
    the folder must be new or empty. ``command`` goes to ``command.txt``; ``log`` gets every message.
    ``jobs``: how many runs train at a time, each in its own process (module docstring)."""
    from bnrhn.training import FolderLock

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a whole number ≥ 1, got {jobs!r}")
    out = Path(out_dir)
    check_folder(spec, out, resume=resume, overwrite=overwrite)
    spec.check(log)
    runs = spec.runs()
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{type(spec).__name__}: two runs share a name: {names}")
    with FolderLock(out, "experiment folder"):
        if spec.settings_file is not None:
            write_json_atomically(out / spec.settings_file, spec.settings())
        # an experiment without settings of its own keeps earlier runs across calls: its commands accumulate
        record_command(out, command, resume or spec.settings_file is None)
        if jobs > 1:
            results = results_side_by_side(spec, runs, resume, jobs, log)
        else:
            results = {}
            for k, run in enumerate(runs, 1):
                tag = f"{spec.log_name} [{k}/{len(runs)}]"
                results[run.name] = result_of_run(spec, run, resume, lambda msg, tag=tag: log(f"{tag}: {msg}"))
        return spec.report(results, out, log)


def results_side_by_side(spec: ExperimentSpec, runs: list[Run], resume: bool, jobs: int, log: Log) -> dict[str, dict]:
    """:func:`result_of_run` for every run, up to ``jobs`` at a time, each in a process of its own (started with
    "spawn", ending with its run); the results in run order. Finished runs (``resume``) are reused here.

    A run that fails stops new runs from starting; the running ones finish and keep their results, then the
    failure is raised, naming the run's ``output.log``. Ctrl-C reaches every worker (one process group), whose
    trainer saves a resumable ``last.pt``; the runner waits for them and raises ``KeyboardInterrupt`` (also when
    only the workers got it: a background job may ignore SIGINT while its children take it).
    (``concurrent.futures``' pool is not used: its idle workers die on Ctrl-C and the pool then kills the busy
    ones before they save.)"""
    import torch

    from bnrhn import kernels
    from bnrhn.openmp_wait import workers_environment

    tags = {run.name: f"{spec.log_name} [{k}/{len(runs)}]" for k, run in enumerate(runs, 1)}
    results: dict[str, dict] = {}
    pending = []
    for run in runs:
        saved = spec.finished(run) if resume else None
        if saved is not None:
            log(f"{tags[run.name]}: {run.name} already done ({run.run_dir})")
            results[run.name] = saved
        else:
            pending.append(run)
    if not pending:
        return results
    spec.prepare(log)
    threads = max(1, torch.get_num_threads() // jobs)
    setup = {"threads": threads, "gate_kernels": kernels.settled_mode()}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    log(f"{spec.log_name}: {len(pending)} run(s), up to {jobs} at a time with {threads} thread(s) each, longest "
        f"first; each run's messages go to {OUTPUT_FILE} in its folder")
    context = multiprocessing.get_context("spawn")
    waiting = sorted(pending, key=spec.cost, reverse=True)  # longest first (stable: ties in run order)
    running: dict[Any, Run] = {}
    failed: list[Run] = []
    interrupted: list[Run] = []
    with workers_environment(min(jobs, len(pending)), threads, cpus):  # what the workers inherit
        try:
            while waiting or running:
                while waiting and len(running) < jobs and not failed and not interrupted:
                    run = waiting.pop(0)
                    continuing = start_run(spec, run, resume, lambda msg, tag=tags[run.name]: log(f"{tag}: {msg}"))
                    worker = context.Process(target=_train_in_worker, args=(spec, run, continuing, setup),
                                             name=f"bnrhn {run.name}")
                    worker.start()
                    running[worker] = run
                if not running:
                    break
                multiprocessing.connection.wait([w.sentinel for w in running])
                for worker in [w for w in running if not w.is_alive()]:
                    worker.join()
                    run = running.pop(worker)
                    result = spec.finished(run) if worker.exitcode == 0 else None
                    # Ctrl-C reached it (and maybe not us: a job with SIGINT ignored)
                    if worker.exitcode == INTERRUPTED:
                        interrupted.append(run)
                        log(f"{tags[run.name]}: {run.name} interrupted; its last checkpoint is kept")
                    elif result is None:
                        failed.append(run)
                        log(f"{tags[run.name]}: {run.name} failed (exit code {worker.exitcode}); see "
                            f"{run.run_dir / OUTPUT_FILE}")
                    else:
                        results[run.name] = result
                        log(f"{tags[run.name]}: {run.name} finished")
        except KeyboardInterrupt:
            for worker in running:  # they got the Ctrl-C too: each saves its last.pt and stops
                worker.join()
            raise
    if interrupted:
        raise KeyboardInterrupt
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: " + "; ".join(
            f"{run.name} (see {run.run_dir / OUTPUT_FILE})" for run in failed)
            + (f"; {len(waiting)} not started" if waiting else "") + ". Fix the cause and repeat the command "
            "with --resume: finished runs are kept")
    return {run.name: results[run.name] for run in runs if run.name in results}


def _train_in_worker(spec: ExperimentSpec, run: Run, continuing: bool, setup: dict) -> None:
    """A worker process: trains one run with the parent's kernel choice, its share of the threads and no
    progress bars (their frames would fill the log), its messages in ``output.log`` in its folder, and writes
    the run's result file (a divergence is a result). Exit code 0 when the result is written, 130 after
    Ctrl-C, 1 after an error (its traceback in ``output.log``)."""
    import traceback

    os.environ["BNRHN_GATE_KERNELS"] = setup["gate_kernels"]
    os.environ["TQDM_DISABLE"] = "1"  # before tqdm is imported: bars that do not ask for themselves stay off
    import torch

    torch.set_num_threads(setup["threads"])
    run = spec.without_progress(run)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir / OUTPUT_FILE, "a", encoding="utf-8") as out, redirect_stderr(out), redirect_stdout(out):
        def log(msg: str) -> None:
            print(msg, file=out, flush=True)

        try:
            write_json_atomically(run.run_dir / spec.result_file, trained_result(spec, run, continuing, log))
        except KeyboardInterrupt:
            log(f"{run.name} interrupted; its last checkpoint is kept")
            sys.exit(INTERRUPTED)
        except BaseException:  # noqa: BLE001 — the parent names this log; the traceback is the message
            traceback.print_exc(file=out)
            sys.exit(1)


def follow_experiment(spec: ExperimentSpec, *, resume: bool) -> None:
    """A data-parallel rank other than 0: trains every run that rank 0 trains, in the same order (their
    training is collective), and writes nothing; rank 0 checks, scores, records divergence and reports."""
    from bnrhn.training import TrainingDiverged

    for run in spec.runs():
        if resume and spec.finished(run) is not None:
            continue
        try:
            spec.follow(run, resume and spec.can_continue(run))
        except TrainingDiverged:
            pass  # rank 0 records it


def result_of_run(spec: ExperimentSpec, run: Run, resume: bool, log: Log) -> dict:
    """The result of one run: reused when it has finished (``resume``), else trained (continued when it was
    interrupted) and saved in its folder; a divergence is a result."""
    saved = spec.finished(run) if resume else None
    if saved is not None:
        log(f"{run.name} already done ({run.run_dir})")
        return saved
    continuing = start_run(spec, run, resume, log)
    result = trained_result(spec, run, continuing, log)
    return json.loads(write_json_atomically(run.run_dir / spec.result_file, result))  # as a later resume reads it


def start_run(spec: ExperimentSpec, run: Run, resume: bool, log: Log) -> bool:
    """Before a run is trained: its old result removed (it is not the new run's), the start said; whether it
    continues an interrupted run."""
    (run.run_dir / spec.result_file).unlink(missing_ok=True)
    continuing = resume and spec.can_continue(run)
    log(f"{'resuming' if continuing else 'training'} {run.name} -> {run.run_dir}")
    return continuing


def trained_result(spec: ExperimentSpec, run: Run, continuing: bool, log: Log) -> dict:
    """The result of training ``run``: :meth:`ExperimentSpec.train`'s, or :meth:`ExperimentSpec.diverged`'s when
    its loss diverged."""
    from bnrhn.training import TrainingDiverged

    try:
        return spec.train(run, continuing, log)
    except TrainingDiverged as exc:
        log(f"{run.name} diverged: {exc}")
        return spec.diverged(run, exc, log)


# -- the folder ----------------------------------------------------------------------------------------------
def check_folder(spec: ExperimentSpec, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that the experiment may not write into."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a folder")
    if resume:
        check_resume(spec, out)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {out} already exists; choose another --out, pass --resume to finish or extend the "
            f"{spec.noun} there, or --overwrite to run it again there (bnrhn replaces only its own report files "
            "and runs; nothing else there is deleted)"
        )


def check_resume(spec: ExperimentSpec, out: Path) -> None:
    """The experiment saved in ``out`` is this one: the settings it must match are unchanged, the lists in
    ``spec.may_grow`` at most extended; a ``ValueError`` naming every other setting that changed."""
    if spec.settings_file is None:
        return
    path = out / spec.settings_file
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found; {out} holds no {spec.noun} to resume")
    saved = spec.must_match(json.loads(path.read_text(encoding="utf-8")))
    now = spec.must_match(json.loads(json.dumps(spec.settings())))  # the JSON types of the saved file
    refused = refused_changes(saved, now, spec.may_grow)
    if refused:
        raise ValueError(
            f"--resume: the settings differ from those of the {spec.noun} in {out} ({', '.join(refused)}); "
            f"repeat its command (see {out / COMMAND_FILE}) with --resume"
            + (f" ({spec.resume_note})" if spec.resume_note else "")
        )


def refused_changes(saved: dict, now: dict, may_grow: tuple[str, ...] = ()) -> list[str]:
    """The keys whose values differ between ``saved`` and ``now``, less the lists named in ``may_grow`` that
    only grew (the saved list is the start of the new one); sorted."""

    def grew(before: Any, after: Any) -> bool:
        return isinstance(before, list) and isinstance(after, list) and after[: len(before)] == before

    changed = (k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return sorted(k for k in changed if not (k in may_grow and grew(saved.get(k), now.get(k))))


def record_command(out: Path, command: str, keep_earlier: bool) -> None:
    """``command.txt``: the commands that worked on the folder, each once, in order (a fresh start begins the
    list; with ``keep_earlier`` — a resume — the command is added to it). No command (a call from Python), no
    line."""
    if not command:
        return
    path = out / COMMAND_FILE
    earlier = path.read_text(encoding="utf-8").splitlines() if keep_earlier and path.is_file() else []
    if command not in earlier:
        path.write_text("\n".join([*earlier, command]) + "\n", encoding="utf-8")


def write_json_atomically(path: Path, obj: Any) -> str:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename, so that readers see the old
    file or the whole new one, never a torn one; returns the text written."""
    text = json.dumps(obj, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


def command_line(argv: list[str]) -> str:
    """The shell command that runs ``bnrhn`` with ``argv`` (arguments after the program name), quoted."""
    return " ".join(["bnrhn", *(shlex.quote(a) for a in argv)])
