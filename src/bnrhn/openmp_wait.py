"""How PyTorch's OpenMP worker threads wait between parallel regions, chosen as a command starts.

libgomp (the OpenMP runtime of PyTorch's CPU wheels) reads ``OMP_WAIT_POLICY`` once, when torch is imported.
Between two parallel regions a worker either spins for a while (libgomp's default) or sleeps at once
(``PASSIVE``). Neither is right everywhere; measured on a 2-core AVX-512 AMD EPYC, ms per training step at
hidden size 128 (benchmarks/cells.py, nn.LSTM / rnn / bn_rhn; docs/performance.md):

    CPUs idle:                2 threads spinning 8.3 / 3.4 / 16.7,  2 threads PASSIVE 17.3 / 9.4 / 32.6
    another process busy:     2 threads spinning 18.1 / 8.8 / 49.3, 2 threads PASSIVE 15.6 / 6.2 / 30.1

A recurrent training step is hundreds of small products with a few microseconds between them: a sleeping
worker must be woken for each, which doubles the step; a spinning one competes with any other job on its core
(a training step was once measured 20× slower that way). So the choice follows the machine as the command
starts: spin when the CPUs this process may use are idle, sleep when something else keeps them busy. An
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set by the user is kept. The choice is left in ``BNRHN_OMP_WAIT`` for
the training commands' log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager

# Busy CPUs (summed fractions of each CPU's time used by something else) below which the machine counts as idle:
# less than half of one CPU in all, whatever their number (measured on 2 cores only; on a many-core host the
# background load of the others may exceed it, and the workers then sleep, as they always did before)
IDLE_BELOW = 0.5
SAMPLE_S = 0.05  # /proc/stat counts in 10 ms ticks: 5 per CPU over the sample


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """(busy, total) ticks of each CPU in ``cpus`` from /proc/stat; None where it cannot be read or names none
    of them (a container's /proc/stat may number its CPUs otherwise than the affinity mask)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError):
        return None
    times = {}
    for line in lines:
        name, *fields = line.split() or [""]
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus or len(fields) < 5:
            continue
        try:
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        except ValueError:
            continue
        idle = ticks[3] + ticks[4]
        times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times or None


def busy_cpus(sample_s: float = SAMPLE_S) -> float | None:
    """How many of this process's CPUs other work kept busy over ``sample_s`` seconds (0 = all idle), from
    Linux's /proc/stat; None where that cannot be read. This process sleeps meanwhile, so it is not counted."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if after is None:
        return None
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        if t1 > t0:
            busy += (b1 - b0) / (t1 - t0)
    return busy


def choose_wait_policy(environ: MutableMapping[str, str] = os.environ,
                       measure: Callable[[], float | None] = busy_cpus) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` unless the CPUs are idle (then libgomp's default, spinning,
    stays); must run before torch is imported to take effect. Returns what was chosen and why."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        choice = "wait as OMP_WAIT_POLICY / GOMP_SPINCOUNT say"
    else:
        busy = measure()
        if busy is not None and busy < IDLE_BELOW:
            choice = "spin while they wait (the CPUs were idle at start)"
        else:
            environ["OMP_WAIT_POLICY"] = "PASSIVE"
            why = ("no CPU load figures in /proc/stat" if busy is None
                   else f"{busy:.1f} CPUs busy with other work at start")
            choice = f"sleep while they wait (OMP_WAIT_POLICY=PASSIVE: {why})"
    environ["BNRHN_OMP_WAIT"] = choice
    return choice


def share_cores(environ: MutableMapping[str, str], workers: int, threads_each: int, cpus: int) -> bool:
    """Before starting ``workers`` processes of ``threads_each`` threads at a time on ``cpus`` CPUs: when they
    are more threads than CPUs, set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (what the workers inherit) unless
    the user chose a policy — spinning workers that share cores slow each other down most. True when set."""
    if workers * threads_each <= cpus or "GOMP_SPINCOUNT" in environ:
        return False
    if "OMP_WAIT_POLICY" in environ and not environ.get("BNRHN_OMP_WAIT", "").startswith("sleep"):
        return False  # the user's setting
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ["BNRHN_OMP_WAIT"] = (f"sleep while they wait (OMP_WAIT_POLICY=PASSIVE: {workers} runs × {threads_each} "
                                 f"threads share {cpus} CPUs)")
    return True


@contextmanager
def workers_environment(workers: int, threads_each: int, cpus: int,
                        environ: MutableMapping[str, str] = os.environ) -> Iterator[bool]:
    """:func:`share_cores` for the workers started inside the block; ``environ`` is as it was afterwards."""
    saved = {key: environ.get(key) for key in ("OMP_WAIT_POLICY", "BNRHN_OMP_WAIT")}
    try:
        yield share_cores(environ, workers, threads_each, cpus)
    finally:
        for key, value in saved.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
