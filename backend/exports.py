"""The export formats, in one table: each format's file name, what Keras calls it, what runs
the exported file, and what `model.export` needs beyond the lock under each backend.

`inference.export` exports and checks through this table; the command line takes its format
names (and their default file names) from it. Imports no framework.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One format of `python cli.py export --format NAME`."""

    file_name: str  # what it writes under RUN_DIR/export/ unless --out says otherwise
    keras_format: str  # `model.export(..., format=...)`
    runtime: str  # the module that runs the exported file for the check against Keras
    needs: dict[str, str | None]  # backend -> the module `model.export` needs beyond the lock (None: nothing)


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(
        file_name="model.onnx", keras_format="onnx", runtime="onnxruntime",
        needs={"tensorflow": "tf2onnx", "torch": "onnxscript", "jax": "jax2onnx"},
    ),
    "savedmodel": ExportFormat(
        file_name="saved_model", keras_format="tf_saved_model", runtime="tensorflow",
        needs={"tensorflow": None, "jax": "tensorflow", "torch": "torch_xla"},
    ),
}


def missing_export_module(format: str) -> str | None:
    """The module Keras would need to export `format` under the active backend and that
    is not installed, or None when the export can run."""
    import keras

    module = EXPORT_FORMATS[format].needs[keras.backend.backend()]
    return module if module and importlib.util.find_spec(module) is None else None


def backends_that_export(format: str) -> list[str]:
    """The backends that can export `format` with what is installed here."""
    return [backend for backend, module in EXPORT_FORMATS[format].needs.items()
            if module is None or importlib.util.find_spec(module) is not None]
