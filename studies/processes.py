"""Work a study runs under one backend, each piece in a process of its own.

A process keeps the backend it started with (Keras reads KERAS_BACKEND once), so a study over
backends starts a child process per run. This is the one way the studies do that: `in_process`
runs `python -m studies.worker TASK ARGS` (the tasks: `studies.worker`) with the backend's
environment (`backend.selection.backend_subprocess_env`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(task: str, *args: str) -> list[str]:
    """The command line of a task (what a study logs, so a user can rerun one piece alone)."""
    return [sys.executable, "-m", "studies.worker", task, *args]


def in_process(backend: str, task: str, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Runs a task in a child process under `backend`; its output is captured when `capture`."""
    if capture:
        return subprocess.run(command(task, *args), env=_child_env(backend), capture_output=True, text=True)
    return _run_to_its_end(command(task, *args), backend)


def _run_to_its_end(args: list[str], backend: str) -> subprocess.CompletedProcess:
    """Runs a child that stops at a safe point on a signal (a training run), and lets it: SIGTERM
    to this process (`kill`, a scheduler) is passed on to the child, which would otherwise train on
    alone into a folder the next study resumes; Ctrl-C reaches the child from the terminal, so this
    process waits for it rather than killing it midway. Then the study stops (SystemExit with the
    child's code), so no other run starts."""
    child = subprocess.Popen(args, env=_child_env(backend), text=True)
    with _sigterm_passed_to(child) as received:
        try:
            code = child.wait()
        except KeyboardInterrupt:
            try:
                child.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: the child stops at once too, and so does this
                child.kill()
                child.wait()
            raise
    if received:
        raise SystemExit(code or 128 + signal.SIGTERM)
    return subprocess.CompletedProcess(args, code)


@contextlib.contextmanager
def _sigterm_passed_to(child: subprocess.Popen) -> Iterator[list[int]]:
    """While the block runs, SIGTERM to this process goes to `child` too; yields the signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield received
        return

    def pass_on(signum, frame) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli_command(*args: str) -> list[str]:
    """The command line of one of the user's own commands (`python cli.py ARGS`)."""
    return [sys.executable, str(ROOT / "cli.py"), *args]


def cli_in_process(backend: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `python cli.py ARGS` under `backend`: a study's step that is a command the user has
    too (e.g. `evaluate RUN --precise-bn N`), so it is that command and not a copy of it."""
    return _run_to_its_end(cli_command(*args), backend)


def _child_env(backend: str) -> dict[str, str]:
    from backend.selection import backend_subprocess_env

    env = backend_subprocess_env(backend)
    # The caller's folder stays the child's (relative paths keep their meaning); the project is found by path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env
