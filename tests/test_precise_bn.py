"""`--precise-bn N`: BatchNorm's moving statistics recomputed from N batches through fixed weights."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
from click.testing import CliRunner

from cli import cli
from tests.conftest import SMALL_MODEL_FLAGS, active_backend
from training.callbacks import seed_states
from training.precise_bn import batchnorm_layers, recompute_batchnorm_statistics


def _small_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 1, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="frozen_bn")(x)
    x = keras.layers.Dropout(0.5, seed=1)(keras.layers.GlobalAveragePooling2D()(x))
    outputs = keras.layers.Dense(2)(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("frozen_bn").trainable = False
    return model


def test_moving_statistics_become_the_mean_of_the_batch_statistics():
    keras.utils.set_random_seed(3)
    model = _small_model()
    bn, frozen = model.get_layer("bn"), model.get_layer("frozen_bn")
    bn.moving_mean.assign(np.full(4, 50.0, "float32"))  # far from anything the batches give
    bn.moving_variance.assign(np.full(4, 9.0, "float32"))
    frozen_before = [np.array(v) for v in frozen.weights]
    weights_before = [np.array(v) for v in model.trainable_weights]
    batches = [np.random.default_rng(i).normal(i, 1 + i, (6, 8, 8, 3)).astype("float32") for i in range(3)]
    conv = keras.Model(model.input, model.get_layer("conv").output)
    features = [np.asarray(keras.ops.convert_to_numpy(conv(b))) for b in batches]
    expected_mean = np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0)
    expected_var = np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0)  # biased, as Keras normalises

    generators = seed_states(model)
    assert batchnorm_layers(model) == [bn]
    assert recompute_batchnorm_statistics(model, iter(batches)) == (3, 1)
    # Training-mode passes draw dropout masks; the generator is put back, so training between
    # epochs draws the masks it would have drawn without them.
    assert seed_states(model) == generators and len(generators) == 1
    np.testing.assert_allclose(np.array(bn.moving_mean), expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(bn.moving_variance), expected_var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.9  # put back
    for old, new in zip(frozen_before, frozen.weights, strict=True):  # trained on its moving statistics: kept
        np.testing.assert_array_equal(old, np.array(new))
    for old, new in zip(weights_before, model.trainable_weights, strict=True):  # the weights stay fixed
        np.testing.assert_array_equal(old, np.array(new))


def test_the_same_weights_with_different_moving_statistics_score_alike_afterwards():
    """What the option is for: two models whose weights agree and whose moving averages do not
    (the BatchNorm-momentum step of `reproduce`) give the same inference outputs after it."""
    keras.utils.set_random_seed(5)
    a = _small_model()
    b = _small_model()
    b.set_weights(a.get_weights())
    b.get_layer("bn").moving_mean.assign(np.full(4, -3.0, "float32"))
    x = np.random.default_rng(0).normal(0, 1, (4, 8, 8, 3)).astype("float32")
    assert not np.allclose(keras.ops.convert_to_numpy(a(x)), keras.ops.convert_to_numpy(b(x)), atol=1e-3)
    batches = [np.random.default_rng(10 + i).normal(0, 1, (6, 8, 8, 3)).astype("float32") for i in range(2)]
    for model in (a, b):
        recompute_batchnorm_statistics(model, iter(batches))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a(x)), keras.ops.convert_to_numpy(b(x)), atol=1e-5)


def test_no_batches_change_nothing():
    model = _small_model()
    before = [np.array(v) for v in model.weights]
    assert recompute_batchnorm_statistics(model, iter([])) == (0, 0)
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, np.array(new))


def test_with_precise_bn_the_batchnorm_momentum_step_no_longer_moves_the_scores(demo_dir, tmp_path, monkeypatch):
    """`reproduce`'s bn-momentum step: the momentum changes only the moving averages, so its two
    arms train the same weights; with precise BN the statistics come from the same batches
    through those weights, and the two score alike. One arm trains with --precise-bn, the other
    without and is scored by `evaluate --precise-bn` afterwards: the same scores, so a finished
    run scored that way is one trained with the option. Also what the run records and keeps."""
    import training.precise_bn
    from inference.run import load_run

    epochs_recomputed = []  # each epoch's statistics once: the last epoch's are the final weights'
    recompute = training.precise_bn.recompute_after_epoch

    def counted(model, batches, epoch, n):
        epochs_recomputed.append(epoch)
        return recompute(model, batches, epoch, n)

    for module in ("training.precise_bn", "training.train"):  # the callback's and the run's end
        monkeypatch.setattr(f"{module}.recompute_after_epoch", counted)
    runs = {}
    for momentum, precise in (("0.99", ["--precise-bn", "3", "--keep-checkpoints", "all"]), ("0.5", [])):
        runs[momentum] = tmp_path / momentum
        result = CliRunner().invoke(cli, ["train", "--data-dir", str(demo_dir), "--image-size", "32", "--epochs", "2",
                                          "--weights", "none", "--batch-size", "8", "--bn-momentum", momentum,
                                          "--bn-train", *precise, "--out", str(runs[momentum]),
                                          "--verbose", "0", *SMALL_MODEL_FLAGS])
        assert result.exit_code == 0, result.output
    run, later = runs["0.99"], runs["0.5"]
    resumed = tmp_path / "resumed"  # stopped after its last checkpoint, before model.keras: a full disk
    shutil.copytree(run, resumed)
    for name in ("model.keras", "metrics.json"):
        (resumed / name).unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    final, best = load_run(run), load_run(run, "best")
    # Every BatchNorm layer of the cut ResNet50 (trained on batch statistics: --bn-train) and the head's.
    every = [layer for layer in final.model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert metrics["precise_bn"] == {"batches": 3, "layers": len(batchnorm_layers(final.model)), "epoch": 2}
    assert epochs_recomputed == [1, 2]
    assert metrics["precise_bn"]["layers"] == len(every) > 20
    assert json.loads((run / "config.json").read_text())["options"]["precise_bn"] == 3
    if metrics["best"]["epoch"] == 2:  # the best epoch is the last: model.keras and best.weights.h5 agree
        for x, y in zip(final.model.weights, best.model.weights, strict=True):
            np.testing.assert_array_equal(np.array(x), np.array(y))
    a, b = (load_run(r).model for r in runs.values())
    for va, vb in zip(a.trainable_weights, b.trainable_weights, strict=True):
        np.testing.assert_allclose(np.array(va), np.array(vb), rtol=1e-5, atol=1e-6, err_msg=va.path)
    # The validation that picked the best checkpoint read the recomputed statistics: the last
    # epoch's, in history.csv, is the final weights' validation score in metrics.json.
    history = (run / "history.csv").read_text().splitlines()
    last_epoch = dict(zip(history[0].split(","), history[-1].split(","), strict=True))
    assert abs(float(last_epoch["val_accuracy"]) - metrics["val"]["accuracy"]) < 1e-6
    assert abs(float(last_epoch["val_loss"]) - metrics["val"]["loss"]) < 1e-5
    # And best.weights.h5 holds the statistics of its own epoch's end (the first batches of the
    # epoch after it): evaluate's rule for the best weights finds the same scores.
    result = CliRunner().invoke(cli, ["evaluate", str(run), "--checkpoint", "best", "--precise-bn", "3"])
    assert result.exit_code == 0, result.output
    best_rescored = json.loads((run / f"eval-test-{active_backend()}-best-precise-bn3.json").read_text())
    assert best_rescored["precise_bn"]["epoch"] == metrics["best"]["epoch"]
    assert best_rescored["accuracy"] == metrics["best"]["test"]["accuracy"]
    assert abs(best_rescored["loss"] - metrics["best"]["test"]["loss"]) < 1e-5
    assert json.loads((later / "metrics.json").read_text())["precise_bn"] is None
    files = {p: p.read_bytes() for p in later.iterdir() if p.is_file()}

    result = CliRunner().invoke(cli, ["evaluate", str(later), "--precise-bn", "3"])
    assert result.exit_code == 0, result.output
    assert f"{len(every)} layers' moving statistics recomputed from 3 training batches" in result.output
    written = later / f"eval-test-{active_backend()}-precise-bn3.json"
    assert {p: p.read_bytes() for p in later.iterdir() if p.is_file() and p != written} == files  # in memory only
    rescored = json.loads(written.read_text())
    assert rescored["precise_bn"] == {"requested": 3, "batches": 3, "layers": len(every), "epoch": 2}
    trained = metrics["test"]
    assert rescored["accuracy"] == trained["accuracy"]
    assert abs(rescored["loss"] - trained["loss"]) < 1e-5
    # More batches than an epoch holds: all of them are used, and the file keeps the name asked for
    # (reproduce --rescore-precise-bn looks for it by that name).
    result = CliRunner().invoke(cli, ["evaluate", str(later), "--precise-bn", "500"])
    assert result.exit_code == 0, result.output
    whole = json.loads((later / f"eval-test-{active_backend()}-precise-bn500.json").read_text())["precise_bn"]
    assert whole["requested"] == 500 and 3 < whole["batches"] < 500
    # Resumed after its last epoch, the process trains none: the run's end recomputes the last
    # epoch's statistics itself, from the same batches, so it ends as the uninterrupted run did.
    epochs_recomputed.clear()
    result = CliRunner().invoke(cli, ["train", "--resume", str(resumed)])
    assert result.exit_code == 0, result.output
    assert epochs_recomputed == [2]
    again = json.loads((resumed / "metrics.json").read_text())
    assert again["precise_bn"] == metrics["precise_bn"]
    assert (again["test"]["accuracy"], again["test"]["loss"]) == (metrics["test"]["accuracy"], metrics["test"]["loss"])
    for x, y in zip(final.model.weights, load_run(resumed).model.weights, strict=True):
        np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=x.path)
