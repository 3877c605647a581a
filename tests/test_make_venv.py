"""tools/ensure_venv.sh, which `make demo` and `make test` run first: a Python too old for the
pinned stack, a missing one and an unusable .venv are said in one line, before pip runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD_PYTHON = """#!/bin/sh
case "$*" in *version_info*) exit 1;; *python_version*) echo 3.10.13;; *) exit 3;; esac
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _ensure(tmp_path: Path, python: str, venv: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "VENV": str(venv)}
    return subprocess.run(["bash", str(ROOT / "tools" / "ensure_venv.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_python_older_than_the_pins_is_refused_before_anything_is_made(tmp_path):
    old = tmp_path / "python3.10"
    old.write_text(OLD_PYTHON)
    old.chmod(0o755)
    venv = tmp_path / "venv"
    out = _ensure(tmp_path, str(old), venv)
    assert out.returncode == 1 and not venv.exists()
    assert "is Python 3.10.13, and the pinned stack in constraints.txt needs Python >= 3.11" in out.stderr
    assert "make PYTHON=python3.12" in out.stderr
    out = _ensure(tmp_path, "no-such-python3", venv)
    assert out.returncode == 1 and "'no-such-python3' is not installed" in out.stderr


def test_an_unusable_venv_is_kept_while_no_usable_python_can_make_it_again(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(OLD_PYTHON)  # a .venv of an older Python (or one without pip)
    (venv / "bin" / "python").chmod(0o755)
    old = tmp_path / "python3.10"
    old.write_text(OLD_PYTHON)
    old.chmod(0o755)
    out = _ensure(tmp_path, str(old), venv)  # it would be made again, but with a Python too old: said, kept
    assert out.returncode == 1 and "needs Python >= 3.11" in out.stderr and (venv / "bin" / "python").exists()


def test_a_folder_that_is_not_a_virtual_environment_is_never_removed(tmp_path):
    folder = tmp_path / "env"
    (folder / "bin").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")  # VENV=. or a conda env: not made by python -m venv
    out = _ensure(tmp_path, sys.executable, folder)
    assert out.returncode == 1 and "is not a usable virtual environment (no pyvenv.cfg)" in out.stderr
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_venv_made_without_pip_gets_pip_and_is_kept(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (venv / "mine.txt").write_text("kept")
    (venv / ".transferkit-installed").write_text(str(ROOT.resolve()) + "\n")  # installed for this checkout
    out = _ensure(tmp_path, sys.executable, venv)
    assert out.returncode == 0, out.stderr
    assert (venv / "mine.txt").exists() and "making it again" not in out.stderr
    assert subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True).returncode == 0
