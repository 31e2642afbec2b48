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
    """Runs a child that stops at a safe point on a signal (a training run), and lets it. The child
    has a session of its own, so a signal reaches it once, from here: SIGINT (Ctrl-C) and SIGTERM
    (`kill`, a scheduler signalling the group) to this process are passed on, this process waits
    for the child to stop, then the study stops (SystemExit with the child's code) and no other run
    starts. Before, a killed study left its child training into a folder the next study resumes."""
    with _signals_passed_on() as forward:
        child = forward.child = subprocess.Popen(args, env=_child_env(backend), text=True, start_new_session=True)
        if forward.received:  # a signal that came while the child was starting
            child.send_signal(forward.received[0])
        code = child.wait()
    if forward.received:
        raise SystemExit(128 - code if code < 0 else code or 128 + forward.received[0])
    return subprocess.CompletedProcess(args, code)


class _Forward:
    """The signals received while a child runs, and the child to pass them to (once it exists)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.received: list[int] = []

    def __call__(self, signum, frame) -> None:
        self.received.append(signum)
        if self.child is not None:
            self.child.send_signal(signum)


@contextlib.contextmanager
def _signals_passed_on() -> Iterator[_Forward]:
    """While the block runs, SIGINT and SIGTERM to this process go to the block's child."""
    forward = _Forward()
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield forward
        return
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield forward
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
