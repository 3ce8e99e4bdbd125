"""The OpenMP wait policy chosen as a command starts (bnrhn.openmp_wait): spin on idle CPUs, sleep on busy ones,
the user's setting kept; the busy-CPU measurement against a process we keep busy ourselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnrhn.openmp_wait import busy_cpus, choose_wait_policy, share_cores, workers_environment


def test_idle_cpus_keep_libgomps_spinning_default():
    env = {}
    choice = choose_wait_policy(env, measure=lambda: 0.1)
    assert "OMP_WAIT_POLICY" not in env
    assert choice.startswith("spin") and env["BNRHN_OMP_WAIT"] == choice


@pytest.mark.parametrize("busy", [0.9, 1.7, None])
def test_busy_or_unknown_cpus_make_the_workers_sleep(busy):
    env = {}
    choice = choose_wait_policy(env, measure=lambda: busy)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert choice.startswith("sleep") and env["BNRHN_OMP_WAIT"] == choice
    assert ("no CPU load figures" in choice) == (busy is None)


@pytest.mark.parametrize("setting", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}])
def test_a_users_setting_is_kept_without_measuring(setting):
    env = dict(setting)

    def measure():
        raise AssertionError("measured although the user chose")

    choose_wait_policy(env, measure=measure)
    assert {k: env[k] for k in setting} == setting and env.get("OMP_WAIT_POLICY", "ACTIVE") == "ACTIVE"


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_getaffinity"),
                    reason="reads Linux's /proc/stat")
def test_a_process_that_keeps_a_cpu_busy_is_measured():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # the interpreter has started and spins
        assert busy_cpus(sample_s=0.3) >= 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_the_cli_chooses_before_torch_is_imported(tmp_path):
    """A command run in a fresh interpreter leaves its choice in BNRHN_OMP_WAIT (it chooses only while torch is
    not yet imported: afterwards libgomp has read its settings)."""
    code = ("import os, sys\nfrom bnrhn.cli import main\nassert 'torch' not in sys.modules\n"
            f"main(['lm', 'train', '--text', {str(tmp_path / 'missing.txt')!r}, "
            f"'--run-dir', {str(tmp_path / 'r')!r}])\n"
            "print('choice:', os.environ.get('BNRHN_OMP_WAIT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "BNRHN_OMP_WAIT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    choice = out.stdout.split("choice:")[-1].strip()
    assert choice.startswith(("spin", "sleep")), out.stdout + out.stderr[-2000:]


def test_workers_that_share_cores_sleep_unless_the_user_chose():
    spun = {}
    choose_wait_policy(spun, measure=lambda: 0.0)  # the parent chose to spin
    fits = dict(spun)
    assert not share_cores(fits, workers=2, threads_each=1, cpus=2) and "OMP_WAIT_POLICY" not in fits
    crowded = dict(spun)
    assert share_cores(crowded, workers=2, threads_each=2, cpus=2)
    assert crowded["OMP_WAIT_POLICY"] == "PASSIVE" and "2 runs × 2 threads share 2 CPUs" in crowded["BNRHN_OMP_WAIT"]
    slept = {}
    choose_wait_policy(slept, measure=lambda: 1.5)  # the parent chose to sleep: the workers sleep too
    assert share_cores(slept, workers=3, threads_each=1, cpus=2) and slept["OMP_WAIT_POLICY"] == "PASSIVE"
    for users in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "500"}):
        env = dict(users)
        choose_wait_policy(env, measure=lambda: 0.0)
        assert not share_cores(env, workers=4, threads_each=2, cpus=2)
        assert env.get("OMP_WAIT_POLICY", "ACTIVE") == "ACTIVE"


def test_the_workers_environment_is_restored_after_the_block():
    env = {"BNRHN_OMP_WAIT": "spin while they wait (the CPUs were idle at start)"}
    with workers_environment(2, 2, 2, environ=env) as set_passive:
        assert set_passive and env["OMP_WAIT_POLICY"] == "PASSIVE"  # what workers started here inherit
    assert env == {"BNRHN_OMP_WAIT": "spin while they wait (the CPUs were idle at start)"}


def test_unreadable_or_foreign_proc_stat_lines_give_no_measurement(monkeypatch, tmp_path):
    from bnrhn import openmp_wait

    fake = tmp_path / "stat"
    fake.write_text("cpu  1 2 3 4 5 6 7 8\ncpu7 1 2\ncpuX 1 2 3 4 5\n\nintr 5\n", encoding="ascii")
    real_open = open
    monkeypatch.setattr(openmp_wait, "open", lambda path, *a, **k: real_open(fake, *a, **k), raising=False)
    assert openmp_wait._cpu_times({0, 1}) is None  # no line for CPU 0 or 1, none that breaks the parser
