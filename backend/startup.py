"""What a training or serving process sets in its environment before the framework loads."""

from __future__ import annotations

import os

from backend.determinism import deterministic_environment
from backend.parallel import data_parallel_environment


def start_environment(deterministic: bool, devices: int) -> dict[str, str]:
    """XLA reads its flags once, at import: deterministic ops, and jax's host devices for
    `--devices N` on a CPU. Returns the variables to set (the caller sets them)."""
    values = deterministic_environment() if deterministic else {}
    os.environ.update(values)  # the parallel flags add to the XLA_FLAGS just set
    return {**values, **data_parallel_environment(devices)}


# A server's model thread shares the cores with the HTTP event loop and the upload decoders. PyPI's
# torch runs its CPU kernels on GNU OpenMP threads, which by default spin for a while after each
# parallel region; on a 2-core machine the spinning took the CPU from the decoders, and `serve`
# reached 0.66-0.83 of `predict`'s images/s on torch against 1.00-1.07 with PASSIVE (sleeping)
# waits (scripts/load-test, docs/serve.md). tensorflow and jax use their own thread pools and
# do not read it. libgomp reads it once, when it loads: before the backend is imported.
SERVING_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def start_serving_environment() -> dict[str, str]:
    """Sets `SERVING_ENVIRONMENT` where the user has not set those variables; returns what it set."""
    values = {k: v for k, v in SERVING_ENVIRONMENT.items() if k not in os.environ}
    os.environ.update(values)
    return values
