"""What Keras' `model.export` needs beyond the lock, per format and backend."""

from __future__ import annotations

import importlib.metadata
import importlib.util

# What Keras' `model.export` needs beyond the CPU lock, per (format, backend); None: nothing.
_EXPORT_NEEDS = {
    ("onnx", "tensorflow"): "tf2onnx",
    ("onnx", "torch"): "onnxscript",
    ("onnx", "jax"): "jax2onnx",
    ("savedmodel", "tensorflow"): None,
    ("savedmodel", "jax"): "tensorflow",
    ("savedmodel", "torch"): "torch_xla",
}


def missing_export_module(format: str) -> str | None:
    """The module Keras would need to export `format` under the active backend and that
    is not installed, or None when the export can run."""
    import keras

    module = _EXPORT_NEEDS[(format, keras.backend.backend())]
    return module if module and importlib.util.find_spec(module) is None else None


def backends_that_export(format: str) -> list[str]:
    """The backends that can export `format` with what is installed here."""
    return [backend for (f, backend), module in _EXPORT_NEEDS.items()
            if f == format and (module is None or importlib.util.find_spec(module) is not None)]
