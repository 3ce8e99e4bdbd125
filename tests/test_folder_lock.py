"""Run folders, experiment folders and feature caches are held by one process at a time; a lock dies
with its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bnrhn.cli import main
from bnrhn.training import FolderInUse, FolderLock

HOLD = """
import sys, time
from bnrhn.training import FolderLock
with FolderLock(sys.argv[1], "run folder"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_first_ones_pid(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(FolderInUse, match=f"process {proc.pid} "):
            with FolderLock(tmp_path / "run", "run folder"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / ".bnrhn.lock").exists()  # the file stays, the lock does not
    with FolderLock(tmp_path / "run", "run folder"):
        assert str(os.getpid()) in (tmp_path / "run" / ".bnrhn.lock").read_text()


def test_reentrant_in_one_process_and_released_after(tmp_path):
    with FolderLock(tmp_path / "f"):
        with FolderLock(tmp_path / "f"):
            pass
    proc = _holder(tmp_path / "f")  # another process can take it now
    proc.kill()
    proc.wait()


def test_a_waiting_lock_is_told_and_gets_the_folder(tmp_path):
    proc = _holder(tmp_path / "cache")
    messages = []
    t0 = time.time()

    def told(msg):
        messages.append(msg)
        proc.kill()  # the other writer finishes (here: is stopped)

    with FolderLock(tmp_path / "cache", "feature cache", wait=told):
        pass
    proc.wait()
    assert messages and "in use by process" in messages[0] and time.time() - t0 < 30


def test_two_trainers_on_one_run_folder(tmp_path, capsys):
    """bnrhn train and bnrhn lm train refuse a run folder another process holds, before reading any data."""
    proc = _holder(tmp_path / "run")
    try:
        assert main(["train", "--dataset", "karpathy:/nonexistent.json", "--run-dir", str(tmp_path / "run")]) != 0
        err = capsys.readouterr().err
        assert f"process {proc.pid}" in err and "nonexistent" not in err
        assert main(["lm", "train", "--text", "/nonexistent.txt", "--run-dir", str(tmp_path / "run")]) != 0
        assert f"process {proc.pid}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_unusable_run_folders_are_refused_in_words_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", "--dataset", "karpathy:/nonexistent.json", "--run-dir", str(a_file)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["train", "--dataset", "karpathy:/nonexistent.json", "--run-dir", "/proc/bnrhn-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot write into the run folder /proc/bnrhn-run" in err and "Traceback" not in err
    assert main(["lm", "train", "--text", "/nonexistent.txt", "--run-dir", "/proc/bnrhn-run"]) == 2
    assert "cannot write into the run folder" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--out", str(a_file)]) == 2
    assert "is not a folder" in capsys.readouterr().err
