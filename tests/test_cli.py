"""The command-line entry points: `bnrhn` and `python -m bnrhn`, --help and --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bnrhn
from bnrhn.cli import COMMAND_MODULES, main

BNRHN = Path(sys.executable).with_name("bnrhn")


@pytest.mark.parametrize("launcher", ["script", "module"])
def test_version_and_help_from_both_entry_points(launcher):
    if launcher == "script" and not BNRHN.exists():
        pytest.skip(f"the console script is not installed beside {sys.executable} (pip install -e .)")
    cmd = [str(BNRHN)] if launcher == "script" else [sys.executable, "-m", "bnrhn"]
    version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"bnrhn {bnrhn.__version__}"
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for command in ("demo", "compare", "train", "caption", "evaluate", "score", "lm", "analyze", "cells"):
        assert f"    {command} " in helped.stdout, command


def test_every_command_has_help(capsys):
    names = [m.rsplit(".", 1)[-1] for m in COMMAND_MODULES]
    assert len(names) >= 9
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: bnrhn" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
