"""`export`: a run's model as ONNX or a TensorFlow SavedModel, checked against Keras.

Keras' `model.export` does the work; the formats, their file names, what runs them and
which backends can produce them with which optional converters are one table,
`backend.exports.EXPORT_FORMATS`. The exported graph
takes normalized float32 NHWC images, as the Keras model does, and returns class
probabilities; `<name>.json` beside it records the classes, the preprocessing and the check.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from backend.exports import EXPORT_FORMATS, backends_that_export, missing_export_module
from data.augment import normalize
from errors import UserInputError
from inference.run import TrainedRun, read_images, split_examples
from training.rundir import write_json

# Exported probabilities against Keras' (measured on CPU: <= 1e-6).
PROBABILITY_ATOL = 1e-4


class ExportError(RuntimeError):
    """The export failed, or the exported model disagrees with Keras."""


class ExportUnsupportedError(UserInputError, ExportError):
    """The active backend cannot produce the format with what is installed."""


def probability_model(model: keras.Model) -> keras.Model:
    """The model with a softmax on its logits."""
    return keras.Model(model.input, keras.layers.Softmax(name="probabilities")(model.output))


def check_supported(format: str) -> None:
    """Raises `ExportError` naming what is missing when the active backend cannot export `format`."""
    missing = missing_export_module(format)
    if missing:
        backend = keras.backend.backend()
        raise ExportUnsupportedError(
            f"--format {format} under the {backend} backend needs the {missing!r} module, which is not "
            f"installed; model.keras is backend-neutral, so export it under KERAS_BACKEND="
            f"{' or '.join(backends_that_export(format)) or '(none here)'}, or pip install {missing.replace('_', '-')}"
        )


def sample_images(run: TrainedRun, count: int) -> tuple[np.ndarray, str]:
    """Up to `count` test images of the run spread over the classes, or seeded noise images
    when the run's data is not at hand; returns `(uint8 images, what they are)`."""
    try:
        examples, source = split_examples(run, None, "test")
        picks = np.linspace(0, len(examples) - 1, min(count, len(examples))).astype(int)
        images, _ = read_images(run, [examples[i].path for i in picks])
        if len(images):
            return images, f"{len(images)} test images ({source})"
    except (ValueError, OSError):  # the dataset moved or is on another machine
        pass
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, run.image_size, run.image_size, 3), dtype=np.uint8), f"{count} noise images"


def record_path(out: Path) -> Path:
    """The JSON file describing an export at `out` (e.g. model.onnx.json)."""
    return out.with_name(out.name + ".json")


def run_exported(path: Path, format: str, inputs: np.ndarray) -> np.ndarray:
    """The exported model's outputs for normalized inputs, from the format's runtime
    (`EXPORT_FORMATS[format].runtime`): onnxruntime, or TensorFlow's SavedModel loader."""
    runtime = EXPORT_FORMATS[format].runtime
    if runtime == "onnxruntime":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {session.get_inputs()[0].name: inputs})[0])
    if runtime != "tensorflow":
        raise ValueError(f"no runner for {format}'s runtime {runtime!r}")
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # kept referenced: its variables die with it
    return np.asarray(loaded.serve(tf.constant(inputs)))


def export_run(run: TrainedRun, format: str, out: Path | None = None, check_images: int = 8,
               log: Callable[[str], None] = print) -> dict:
    """Exports, runs the export on sample images against the Keras model, writes `<out>.json`."""
    check_supported(format)
    out = Path(out) if out else run.run_dir / "export" / EXPORT_FORMATS[format].file_name
    out.parent.mkdir(parents=True, exist_ok=True)
    model = probability_model(run.model)
    log(f"Exporting {run.run_dir / 'model.keras'} ({run.checkpoint} weights) as {format} under "
        f"{keras.backend.backend()} to {out}")
    images, what = sample_images(run, check_images)
    inputs = normalize(images, run.preprocess)
    expected = np.asarray(keras.ops.convert_to_numpy(model(inputs, training=False)), np.float32)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Constant folding")  # torch.onnx, harmless
            model.export(str(out), format=EXPORT_FORMATS[format].keras_format, verbose=False)
    except Exception as e:  # converter errors come in many types; say which step failed and why
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"Keras' {format} export failed under {keras.backend.backend()}: "
                          f"{type(e).__name__}: {reason}") from e
    try:
        got = run_exported(out, format, inputs)
    except Exception as e:  # onnxruntime and the SavedModel loader raise their own types
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"the exported {out} could not be run: {type(e).__name__}: {reason}") from e
    difference = float(np.abs(got - expected).max())
    record = {
        "format": format, "path": str(out), "backend": keras.backend.backend(), "checkpoint": run.checkpoint,
        "input": {"name": run.model.input.name, "shape": [None, run.image_size, run.image_size, 3],
                  "dtype": "float32", "layout": "NHWC, RGB decoded then normalized",
                  "preprocess": run.preprocess,
                  # How the run's images became that square: resized to decode_size, then the centre
                  # image_size square (the same when the two are equal).
                  "decode_size": run.decode_size, "crop": "centre"},
        "output": {"name": "probabilities", "classes": run.classes},
        "check": {"images": what, "max_abs_probability_difference": difference, "tolerance": PROBABILITY_ATOL,
                  "same_predictions": bool((got.argmax(1) == expected.argmax(1)).all()),
                  "passed": difference <= PROBABILITY_ATOL},
    }
    write_json(record_path(out), record)
    log(f"Checked on {what}: largest probability difference {difference:.2e} (tolerance {PROBABILITY_ATOL:g})")
    if not record["check"]["passed"]:
        raise ExportError(f"the exported model disagrees with Keras: probabilities differ by {difference:.2e} "
                          f"> {PROBABILITY_ATOL:g} (see {record_path(out)})")
    return record
