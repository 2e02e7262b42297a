"""Every command of both console scripts explains itself with --help (imports only that command)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from student_trainer.cli import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help(name):
    proc = subprocess.run(
        [sys.executable, "-m", "student_trainer", name, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"student-trainer {name}" in proc.stdout and len(proc.stdout) > 200


def test_top_level_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "student_trainer", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS)
    bad = subprocess.run([sys.executable, "-m", "student_trainer", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stdout


def test_teacher_server_console_script_help():
    out = subprocess.run([sys.executable, "-m", "teacher_server", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--backend" in out.stdout
