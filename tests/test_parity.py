"""`parity`: the comparison arithmetic, and the real check across backends (and that it can fail)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from studies.parity import NOISE_FACTOR, QUANTITIES, compare_pair, worst_difference
from tests.conftest import ROOT, active_backend, cli_env


def fake_result(rng: np.random.Generator, scale: float = 1.0, digest: str = "abc") -> dict:
    """A worker's output: every quantity, plus its one-ulp 'noise/' twin."""
    base = {
        "inference logits": rng.normal(size=(4, 4)),
        "training logits": rng.normal(size=(4, 4)),
        "loss": np.array(1.2),
        "gradients/conv/kernel": rng.normal(size=(3, 3, 3, 8)) * 100,
        "gradients/conv/bias": rng.normal(size=8) * 1e-9,  # zero in exact arithmetic
        "gradients/bn/gamma": rng.normal(size=8),
        "weights after SGD step/conv/kernel": rng.normal(size=(3, 3, 3, 8)),
    }
    result = {k: v.astype(np.float32) * np.float32(scale) for k, v in base.items()}
    for key in list(result):
        if not key.startswith("weights"):
            result[f"noise/{key}"] = result[key] * np.float32(1 + 1e-6)
    result["batch_sha256"] = np.array(digest)
    return result


def perturbed(result: dict, key: str, relative: float) -> dict:
    """`result` with `key` (and its noise twin) moved by `relative` in relative L2."""
    out = dict(result)
    shift = relative * np.linalg.norm(result[key]) / np.sqrt(result[key].size)
    for k in (key, f"noise/{key}"):
        if k in out:
            out[k] = result[k] + np.float32(shift)
    return out


def rows_by_quantity(rows: list[dict]) -> dict[str, dict]:
    return {row["quantity"]: row for row in rows}


def test_identical_results_pass_every_quantity():
    a = fake_result(np.random.default_rng(0))
    rows = rows_by_quantity(compare_pair(a, dict(a), "float32"))
    assert set(rows) == {"batch bytes (sha256)", *QUANTITIES}
    assert all(row["passed"] for row in rows.values())
    assert rows["gradients"]["max_rel"] == 0.0


@pytest.mark.parametrize("quantity, key", [
    ("inference logits", "inference logits"),
    ("training logits", "training logits"),
    ("gradients", "gradients/bn/gamma"),
    ("weights after SGD step", "weights after SGD step/conv/kernel"),
])
def test_a_difference_above_tolerance_fails_and_names_the_tensor(quantity, key):
    a = fake_result(np.random.default_rng(0))
    b = perturbed(a, key, relative=1e-2)
    row = rows_by_quantity(compare_pair(a, b, "float32"))[quantity]
    assert row["passed"] is False
    assert row["max_rel"] == pytest.approx(1e-2, rel=0.2)
    if "/" in key:
        assert row["worst"] == key.partition("/")[2]


def test_a_zero_gradient_is_measured_against_the_largest_tensor_not_its_own_noise():
    a = fake_result(np.random.default_rng(0))
    b = dict(a)
    b["gradients/conv/bias"] = -a["gradients/conv/bias"]  # 200% of its own (rounding-level) norm
    row = rows_by_quantity(compare_pair(a, b, "float32"))["gradients"]
    assert row["passed"] and row["max_rel"] < 1e-6


def test_tolerance_grows_with_the_measured_noise_floor():
    a = fake_result(np.random.default_rng(0))
    b = perturbed(a, "training logits", relative=3e-4)
    assert rows_by_quantity(compare_pair(a, b, "float32"))["training logits"]["passed"] is False
    noisy = dict(a)
    noisy["noise/training logits"] = a["training logits"] + np.float32(1e-4) * np.linalg.norm(a["training logits"]) / 4
    row = rows_by_quantity(compare_pair(noisy, b, "float32"))["training logits"]
    assert row["noise_floor"] == pytest.approx(1e-4, rel=0.2)
    assert row["tolerance"] == pytest.approx(NOISE_FACTOR * row["noise_floor"])
    assert row["passed"] is True


def test_the_noise_floor_pools_every_backend_of_the_run():
    """A pair whose own one-ulp samples came out small is judged by the largest sample of the run:
    the amplification is the model's and the batch's, each backend's nudge one sample of it."""
    a = fake_result(np.random.default_rng(0))
    b = perturbed(a, "training logits", relative=3e-4)
    third = dict(a)
    third["noise/training logits"] = a["training logits"] + np.float32(1e-4) * np.linalg.norm(a["training logits"]) / 4
    assert rows_by_quantity(compare_pair(a, b, "float32"))["training logits"]["passed"] is False
    row = rows_by_quantity(compare_pair(a, b, "float32", pool=[a, b, third]))["training logits"]
    assert row["noise_floor"] == pytest.approx(1e-4, rel=0.2) and row["passed"] is True


def test_a_quantity_drowned_in_noise_is_neither_pass_nor_fail():
    a = fake_result(np.random.default_rng(0))
    a["noise/loss"] = a["loss"] * np.float32(1.5)
    row = rows_by_quantity(compare_pair(a, dict(a), "mixed_bfloat16"))["loss"]
    assert row["passed"] is None


def test_different_batch_bytes_fail():
    rng = np.random.default_rng(0)
    a = fake_result(rng, digest="aaa")
    rows = rows_by_quantity(compare_pair(a, dict(a, batch_sha256=np.array("bbb")), "float32"))
    assert rows["batch bytes (sha256)"]["passed"] is False


def test_worst_difference_refuses_mismatched_tensor_sets():
    with pytest.raises(ValueError, match="different tensors"):
        worst_difference({"x": np.ones(2)}, {"y": np.ones(2)})


@pytest.mark.parametrize("quantity, key", [
    ("inference logits", "inference logits"),
    ("training logits", "training logits"),
    ("loss", "loss"),
    ("gradients", "gradients/bn/gamma"),
    ("weights after SGD step", "weights after SGD step/conv/kernel"),
])
def test_the_precision_sets_the_floor_a_difference_is_judged_by(quantity, key):
    """A 1e-3 difference with rounding-level noise: beyond float32's rounding, within bfloat16's."""
    a = fake_result(np.random.default_rng(0))
    b = perturbed(a, key, relative=1e-3)
    float32 = rows_by_quantity(compare_pair(a, b, "float32"))[quantity]
    bfloat16 = rows_by_quantity(compare_pair(a, b, "mixed_bfloat16"))[quantity]
    assert float32["max_rel"] == bfloat16["max_rel"] == pytest.approx(1e-3, rel=0.2)
    assert float32["passed"] is False and bfloat16["passed"] is True


def run_parity(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "parity"
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "parity", "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, env=cli_env(active_backend()), cwd=ROOT,
    )
    report = json.loads((out / "parity.json").read_text()) if (out / "parity.json").exists() else {}
    return result, report


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="spawns every backend; runs once, in the torch pass")
def test_parity_passes_on_every_backend(tmp_path):
    result, report = run_parity(tmp_path, "--backends", "torch,tensorflow,jax")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert report["passed"] and set(report["pairs"]) == {"torch vs tensorflow", "torch vs jax", "tensorflow vs jax"}
    for rows in report["pairs"].values():
        assert {row["quantity"] for row in rows} == {"batch bytes (sha256)", *QUANTITIES}
        logits = rows_by_quantity(rows)["inference logits"]
        assert 0 < logits["max_rel"] < 1e-5  # different frameworks, float32-close
    assert (tmp_path / "parity" / "parity.md").read_text().count("| PASS |") == 18
    assert (tmp_path / "parity" / "parity.weights.h5").is_file()


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "jax", reason="spawns every backend; runs once, in the jax pass")
def test_hybrid_model_passes_parity_on_every_backend(tmp_path):
    result, report = run_parity(tmp_path, "--model", "hybrid", "--backends", "torch,tensorflow,jax")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert report["passed"] and len(report["pairs"]) == 3
    for rows in report["pairs"].values():
        assert 0 < rows_by_quantity(rows)["inference logits"]["max_rel"] < 1e-5
    losses = list(report["losses"].values())
    assert max(losses) - min(losses) < 1e-5 * max(losses)
    assert report["config"]["model"] == "hybrid"


PLANTED = [
    pytest.param("torch", "tensorflow,jax", "jax:weight",
                 {"inference logits", "training logits", "loss", "weights after SGD step"}, id="one-weight"),
    pytest.param("jax", "jax,torch", "torch:preprocess", {"batch bytes (sha256)", "inference logits"},
                 id="other-preprocess"),
]


@pytest.mark.slow
@pytest.mark.parametrize("runs_in, backends, plant, must_fail", PLANTED)
def test_parity_catches_a_planted_difference(tmp_path, runs_in, backends, plant, must_fail):
    if active_backend() != runs_in:
        pytest.skip(f"spawns two backends; runs once, in the {runs_in} pass")
    result, report = run_parity(tmp_path, "--backends", backends, "--plant", plant)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    (rows,) = report["pairs"].values()
    failed = {row["quantity"] for row in rows if row["passed"] is False}
    assert must_fail <= failed, rows
    if "weight" in plant:
        assert "batch bytes (sha256)" not in failed  # the model differs, not the input
    assert "FAIL" in result.stdout


# --- parity --model-file: anyone's Keras 3 classifier ------------------------------------


def small_cnn(path) -> str:
    """A small MNIST-style CNN of the kind in keras-team/keras#20713: 28x28x1, two conv blocks,
    dropout, a softmax over 10 classes; saved under the active backend, loaded under each."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dropout(0.5), layers.Dense(10, activation="softmax"),
    ])
    model.save(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "jax", reason="spawns every backend; runs once, in the jax pass")
def test_parity_checks_a_users_model_file_and_fails_on_a_planted_weight(tmp_path):
    model_file = small_cnn(tmp_path / "small_cnn.keras")
    result, report = run_parity(tmp_path, "--model-file", model_file, "--preprocess", "rescale",
                                "--backends", "torch,tensorflow,jax")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert report["passed"] and (tmp_path / "parity" / "parity.md").read_text().count("| PASS |") == 18
    for rows in report["pairs"].values():
        assert 0 <= rows_by_quantity(rows)["inference logits"]["max_rel"] < 1e-5
    for agreed in report["folder_agreement"].values():  # every image of the generated folder (20)
        assert agreed["same_prediction"] == agreed["images"] == 20
        assert agreed["max_probability_difference"] < 1e-5
    assert "the same prediction on 20 of 20 images" in result.stdout
    planted, planted_report = run_parity(tmp_path / "planted", "--model-file", model_file, "--preprocess", "rescale",
                                         "--backends", "torch,jax", "--plant", "jax:weight")
    assert planted.returncode == 1 and "FAIL" in planted.stdout
    (rows,) = planted_report["pairs"].values()
    assert {"weights after SGD step"} <= {row["quantity"] for row in rows if row["passed"] is False}


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "jax", reason="spawns two backends; runs once, in the jax pass")
def test_parity_checks_a_keras_application_without_weights(tmp_path):
    import keras

    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=4,
                                                classifier_activation=None, include_preprocessing=False)
    model.save(tmp_path / "mobilenet.keras")
    result, report = run_parity(tmp_path, "--model-file", str(tmp_path / "mobilenet.keras"), "--preprocess",
                                "imagenet", "--backends", "torch,tensorflow")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert report["passed"] and report["folder_agreement"]["torch vs tensorflow"]["images"] == 20


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="spawns a backend per model; runs once, in the torch pass")
def test_a_model_file_a_backend_cannot_load_is_refused_in_one_line(tmp_path):
    import keras

    class Unregistered(keras.layers.Layer):  # a custom layer its file cannot name to another process
        def call(self, x):
            return x * 2.0

    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(Unregistered()(inputs)))
    keras.Model(inputs, outputs).save(tmp_path / "custom.keras")
    lambda_outputs = keras.layers.Dense(4)(keras.layers.Flatten()(keras.layers.Lambda(lambda x: x * 2.0)(inputs)))
    keras.Model(inputs, lambda_outputs).save(tmp_path / "lambda.keras")
    for name, reason in (("custom.keras", "Could not locate class 'Unregistered'"), ("lambda.keras", "safe_mode")):
        result, _ = run_parity(tmp_path / f"out-{name}", "--model-file", str(tmp_path / name), "--backends", "torch,jax")
        lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith(f"error: the torch backend cannot load {tmp_path / name}: ") and reason in lines[0]
