"""What a training process sets in its environment before the framework loads."""

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
