"""Each framework's deterministic mode, and seeding without importing tensorflow under torch or jax."""

from __future__ import annotations

import os

from backend.selection import BackendError, tensorflow_kept_out


def deterministic_environment() -> dict[str, str]:
    """Environment variables deterministic mode needs, set before the backend is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags:
        flags = f"{flags} --xla_gpu_deterministic_ops=true".strip()
    # cuBLAS needs a fixed workspace for deterministic GEMMs (torch on GPU).
    return {"XLA_FLAGS": flags, "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),
            "TF_DETERMINISTIC_OPS": "1"}


def enable_determinism() -> dict[str, str]:
    """Turns on the active framework's deterministic mode; returns what was set.

    tensorflow: op determinism; torch: deterministic algorithms (cuDNN benchmark
    off); jax: XLA deterministic ops, which `deterministic_environment` must have
    put in XLA_FLAGS before jax was imported.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        return {"tensorflow": "tf.config.experimental.enable_op_determinism()"}
    if backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        return {"torch": "torch.use_deterministic_algorithms(True); cudnn.benchmark=False",
                "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")}
    if backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_gpu_deterministic_ops=true" not in flags:
            raise BackendError("jax deterministic mode needs XLA_FLAGS=--xla_gpu_deterministic_ops=true "
                               "set before jax is imported")
        return {"XLA_FLAGS": flags}
    raise BackendError(f"no deterministic mode for backend {backend!r}")




def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed` (Python, NumPy, Keras' global seed, the torch generator
    under torch), without importing tensorflow under torch or jax."""
    import keras

    with tensorflow_kept_out():
        keras.utils.set_random_seed(seed)
