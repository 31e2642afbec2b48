"""The devices a run uses, the memory it peaked at, and recognising a framework's out-of-memory
error without importing that framework."""

from __future__ import annotations

import sys


def devices() -> list[str]:
    """The accelerators the active backend sees, or `["cpu"]`."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return [g.name for g in gpus]
    elif backend == "jax":
        import jax

        accelerators = [str(d) for d in jax.devices() if d.platform != "cpu"]
        if accelerators:
            return accelerators
    return ["cpu"]


def peak_memory_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux and macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def device_peak_memory_mb() -> float | None:
    """Peak memory the active framework allocated on its first accelerator, in MiB; None on a
    CPU (there `peak_memory_mb`, the process's resident peak, is the figure)."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2**20 if gpus else None
    if backend == "jax":
        import jax

        accelerators = [d for d in jax.devices() if d.platform != "cpu"]
        stats = accelerators[0].memory_stats() if accelerators else None
        return stats["peak_bytes_in_use"] / 2**20 if stats else None
    return None


# How each framework says a device ran out of memory: torch.OutOfMemoryError (CUDA's caching
# allocator), tensorflow's ResourceExhaustedError, and XLA's RESOURCE_EXHAUSTED status in a jax
# XlaRuntimeError (also what tensorflow's XLA path raises). Matched by name and message, so that
# classifying an error never imports a framework the run does not use.
_OUT_OF_MEMORY_TYPES = ("OutOfMemoryError", "ResourceExhaustedError")
_OUT_OF_MEMORY_TEXT = ("RESOURCE_EXHAUSTED", "CUDA out of memory", "out of memory while trying to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is a device out-of-memory error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # a chain can loop back on itself
        if type(error).__name__ in _OUT_OF_MEMORY_TYPES or any(t in str(error) for t in _OUT_OF_MEMORY_TEXT):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
