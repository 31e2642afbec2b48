"""Non-finite training: refused learning rates, a guard that also reads validation and the
weights, and checkpoints that only ever hold finite tensors."""

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from tests.conftest import active_backend
from tests.test_cli import run_subprocess
from training.callbacks import Checkpoints, NonFiniteGuard, nonfinite_variables


@pytest.mark.parametrize("option", ["--lr", "--head-lr"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1e-3", "0"])
def test_a_learning_rate_must_be_a_finite_number_above_zero(tmp_path, option, value):
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(tmp_path), option, value, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "must be a finite number above 0" in result.output
    assert not (tmp_path / "run").exists()


def _tiny_model() -> keras.Model:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _break(model: keras.Model) -> None:
    kernel = model.layers[-1].kernel
    value = keras.ops.convert_to_numpy(kernel).copy()
    value[0, 0] = np.nan
    kernel.assign(value)


def test_no_checkpoint_is_written_from_non_finite_weights_or_validation(tmp_path):
    model = _tiny_model()
    checkpoints = Checkpoints(tmp_path, "val_accuracy")
    checkpoints.set_model(model)
    checkpoints.on_epoch_end(0, {"loss": 1.0, "val_loss": float("nan"), "val_accuracy": 0.5})
    assert not (tmp_path / "last.weights.h5").exists()
    checkpoints.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5})
    assert (tmp_path / "last.weights.h5").exists() and checkpoints.last_epoch == 1
    _break(model)
    assert nonfinite_variables(model) == [model.layers[-1].kernel.path]
    checkpoints.on_epoch_end(1, {"loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.9})
    assert checkpoints.last_epoch == 1 and checkpoints.best_epoch == 1  # epoch 2 was not written


def test_the_guard_stops_on_a_non_finite_validation_loss_and_on_broken_weights():
    model = _tiny_model()
    guard = NonFiniteGuard()
    guard.set_model(model)
    guard.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.7})
    assert guard.event is None and not model.stop_training
    guard.on_epoch_end(1, {"loss": 0.5, "val_loss": float("inf")})
    assert guard.event["where"] == "validation val_loss" and guard.event["epoch"] == 2 and model.stop_training
    guard, model = NonFiniteGuard(), _tiny_model()
    guard.set_model(model)
    _break(model)
    guard.on_epoch_end(0, {"loss": 0.5})
    assert guard.event["where"].startswith("weights (1 tensors") and model.stop_training


def _all_finite(path) -> bool:
    finite = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, obj: finite.append(bool(np.isfinite(obj[()]).all()))
                     if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" else None)
    return all(finite)


# The diverging setting: Adam at 1e3 on batches of 4 (every checkpoint kept, to read them all).
DIVERGING = ("--image-size", "32", "--batch-size", "4", "--epochs", "3", "--lr", "1e3", "--weights", "none",
             "--keep-checkpoints", "all", "--verbose", "0")


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "jax", reason="trains to divergence once, in the jax pass")
def test_a_diverging_run_exits_1_and_leaves_only_finite_checkpoints(demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_subprocess("train", "--data-dir", str(demo_dir), *DIVERGING, "--out", str(run_dir))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "non-finite" in message and "training stopped" in message
    weights_files = sorted(run_dir.glob("*.weights.h5"))
    assert weights_files and all(_all_finite(f) for f in weights_files), [f.name for f in weights_files]
    named = run_dir / "last.weights.h5"
    assert (str(named) in message) == named.exists()  # names a finite checkpoint, or says none was written
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.keras").exists()
