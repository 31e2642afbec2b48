"""`export`: ONNX and SavedModel round trips where the active backend can produce them,
and a one-line refusal where it cannot."""

import json

import numpy as np
import pytest

from backend.exports import missing_export_module
from data.augment import normalize
from inference.export import PROBABILITY_ATOL
from inference.run import load_run, read_images
from tests.test_cli import error_lines, run_cli


def run_export(run_dir, format, out):
    return run_cli("export", str(run_dir), "--format", format, "--out", str(out), "--check-images", "6")


@pytest.mark.parametrize("format, filename", [("onnx", "model.onnx"), ("savedmodel", "saved_model")])
def test_export_round_trips_or_says_what_is_missing(trained_run, demo_dir, tmp_path, format, filename):
    out = tmp_path / filename
    result = run_export(trained_run, format, out)
    missing = missing_export_module(format)
    if missing:
        assert result.exit_code == 2, result.output
        line = error_lines(result.output)[-1]
        assert line.startswith("error: ") and missing in line and "KERAS_BACKEND=" in line
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / f"{filename}.json").read_text())
    assert record["check"]["passed"] and record["check"]["same_predictions"]
    assert record["check"]["max_abs_probability_difference"] <= PROBABILITY_ATOL
    assert record["output"]["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]

    # Independently of the command's own check: the artifact, outside Keras, on other images.
    run = load_run(trained_run)
    images, _ = read_images(run, sorted(str(p) for p in (demo_dir / "Training" / "pituitary").iterdir())[:5])
    assert (record["input"]["decode_size"], record["input"]["crop"]) == (run.image_size, "centre")
    inputs = normalize(images, record["input"]["preprocess"])
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    else:
        import tensorflow as tf

        loaded = tf.saved_model.load(str(out))
        got = loaded.serve(tf.constant(inputs)).numpy()
    np.testing.assert_allclose(got, run.probabilities(images), atol=PROBABILITY_ATOL)
    np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-5)
