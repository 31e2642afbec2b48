"""Work a study runs under one backend, each piece in a process of its own.

A process keeps the backend it started with (Keras reads KERAS_BACKEND once), so a study over
backends starts a child process per run. This is the one way the studies do that: `in_process`
runs `python -m studies.worker TASK ARGS` (the tasks: `studies.worker`) with the backend's
environment (`backend.selection.backend_subprocess_env`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(task: str, *args: str) -> list[str]:
    """The command line of a task (what a study logs, so a user can rerun one piece alone)."""
    return [sys.executable, "-m", "studies.worker", task, *args]


def in_process(backend: str, task: str, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Runs a task in a child process under `backend`; its output is captured when `capture`."""
    return subprocess.run(command(task, *args), env=_child_env(backend), capture_output=capture, text=True)


def cli_command(*args: str) -> list[str]:
    """The command line of one of the user's own commands (`python cli.py ARGS`)."""
    return [sys.executable, str(ROOT / "cli.py"), *args]


def cli_in_process(backend: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `python cli.py ARGS` under `backend`: a study's step that is a command the user has
    too (e.g. `evaluate RUN --precise-bn N`), so it is that command and not a copy of it."""
    return subprocess.run(cli_command(*args), env=_child_env(backend), text=True)


def _child_env(backend: str) -> dict[str, str]:
    from backend.selection import backend_subprocess_env

    env = backend_subprocess_env(backend)
    # The caller's folder stays the child's (relative paths keep their meaning); the project is found by path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env
