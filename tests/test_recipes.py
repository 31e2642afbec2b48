"""`--recipe`: presets that only supply defaults; label smoothing and weight decay they may set."""

import json

import click
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from commands.common import NOT_REQUIRED, RECIPE
from tests.conftest import SMALL_MODEL_FLAGS, active_backend
from training.config import TrainConfig
from training.options import cli_fields, click_options, config_file_option
from training.recipes import RECIPES, recipe_options
from training.schedule import Phase, phase_optimizer, plan_phases


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_option_is_a_training_option_with_a_valid_value(name):
    fields = {f.name: f for f in cli_fields(TrainConfig)}
    for key, value in RECIPES[name].options.items():
        assert key in fields, f"{name}: {key} is not a TrainConfig option"
        kind = fields[key].metadata["cli"]["type"]
        if isinstance(kind, click.ParamType):
            assert kind.convert(value, None, None) == (tuple(value) if isinstance(value, list) else value)


def _options_command():
    """A command with train's option plumbing (the real decorators) that returns its options."""
    @click.command()
    @click_options(TrainConfig, overrides=NOT_REQUIRED)
    @config_file_option(TrainConfig)
    @RECIPE
    def show(**options):
        click.echo(json.dumps(options))

    return show


def test_a_recipe_supplies_defaults_below_a_config_file_and_the_command_line(tmp_path):
    show = _options_command()
    run = CliRunner().invoke(show, ["--recipe", "seed-keras"])
    options = json.loads(run.output)
    for key, value in RECIPES["seed-keras"].options.items():
        assert options[key] == value
    assert options["recipe"] == "seed-keras"
    # The command line wins over the recipe.
    options = json.loads(CliRunner().invoke(show, ["--recipe", "seed-keras", "--lr", "0.003"]).output)
    assert options["learning_rate"] == 0.003 and options["augment"] == "keras-generator"
    # A --config file wins over the recipe, whichever comes first on the command line.
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"epochs": 3, "preprocess": "imagenet"}))
    for args in (["--recipe", "seed-keras", "--config", str(config)], ["--config", str(config), "--recipe", "seed-keras"]):
        options = json.loads(CliRunner().invoke(show, args).output)
        assert (options["epochs"], options["preprocess"], options["augment"]) == (3, "imagenet", "keras-generator")
    # A run's config.json that recorded its recipe restores the recipe's name and its resolved options.
    config.write_text(json.dumps({"options": {"recipe": "seed-keras", "epochs": 2}}))
    options = json.loads(CliRunner().invoke(show, ["--config", str(config)]).output)
    assert options["recipe"] == "seed-keras" and options["epochs"] == 2 and options["preprocess"] == "caffe-rescaled"


def test_an_unknown_recipe_is_refused_with_the_names():
    run = CliRunner().invoke(_options_command(), ["--recipe", "nope"])
    assert run.exit_code == 2 and "seed-keras" in run.output


def test_label_smoothing_matches_keras_one_hot_cross_entropy_on_this_backend():
    from training.schedule import SmoothedSparseCrossentropy, training_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype("float32") * 3
    labels = np.array([0, 1, 2, 3, 1, 0])
    ours = float(SmoothedSparseCrossentropy(0.1)(labels, logits))
    keras_own = float(keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        np.eye(4, dtype="float32")[labels], logits))
    assert ours == pytest.approx(keras_own, rel=1e-5)
    plain = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits))
    assert ours != pytest.approx(plain, rel=1e-3)  # the smoothing does something
    assert isinstance(training_loss(0.0), keras.losses.SparseCategoricalCrossentropy)


def test_weight_decay_shrinks_kernels_but_not_batchnorm_or_biases():
    inputs = keras.Input((3,))
    outputs = keras.layers.BatchNormalization()(keras.layers.Dense(2)(inputs))
    model = keras.Model(inputs, outputs)
    model.layers[1].bias.assign(np.ones(2, "float32"))
    before = [np.array(v) for v in model.trainable_variables]
    optimizer = phase_optimizer(Phase("train", 1, 0.1, weight_decay=0.5), 0.1, model.trainable_variables)
    optimizer.apply_gradients([(keras.ops.zeros(v.shape), v) for v in model.trainable_variables])
    after = {v.path: np.array(v) for v in model.trainable_variables}
    names = [v.path for v in model.trainable_variables]
    for name, old in zip(names, before, strict=True):
        if name.endswith("kernel"):
            np.testing.assert_allclose(after[name], old * (1 - 0.1 * 0.5), rtol=1e-6)  # AdamW: w -= lr * wd * w
        else:
            np.testing.assert_array_equal(after[name], old)


def test_adam_epsilon_default_is_keras_and_the_option_reaches_the_optimizer():
    from training.config import KERAS_ADAM_EPSILON

    assert keras.optimizers.Adam().epsilon == KERAS_ADAM_EPSILON == TrainConfig.adam_epsilon
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    cfg = TrainConfig(data_dir="d", recipe="seed-pytorch", **recipe_options("seed-pytorch"))
    (phase,) = plan_phases(cfg)
    assert phase.adam_epsilon == 1e-8
    assert phase_optimizer(phase, 0.1, model.trainable_variables).epsilon == 1e-8


@pytest.mark.skipif(active_backend() != "torch", reason="what config.json records does not depend on the backend; "
                    "runs once, in the torch pass")
def test_seed_pytorch_records_decode_size_interpolation_and_epsilon(demo_dir, tmp_path):
    """What the recipe sets reaches config.json (a one-epoch run at 32 px: the recipe's decode
    size, torchvision's 256/224 proportion, becomes 37 px)."""
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(demo_dir), "--recipe", "seed-pytorch",
                                      "--image-size", "32", "--weights", "none", "--epochs", "1",
                                      "--out", str(run), "--verbose", "0", *SMALL_MODEL_FLAGS])
    assert result.exit_code == 0, result.output
    options = json.loads((run / "config.json").read_text())["options"]
    assert (options["decode_size"], options["rotate_interpolation"], options["adam_epsilon"],
            options["augment_steps"]) == (37, "nearest", 1e-8, "torchvision")
    # What predict, evaluate, gradcam and serve show that run's model: the centre 32 of the 37 px decode.
    from data.decode import decode_and_resize
    from inference.run import load_run

    trained = load_run(run)
    image = str(next((demo_dir / "Testing" / "glioma").iterdir()))
    assert trained.decode_size == 37
    np.testing.assert_array_equal(trained.read(image), decode_and_resize(image, 37)[2:34, 2:34])


@pytest.mark.parametrize("flags,message", [
    (["--image-size", "64", "--decode-size", "48"], "smaller than --image-size 64"),
    (["--image-size", "64", "--decode-size", "200"], "at most 128 (torchvision's 256/224 at this size: --decode-size 73)"),
    (["--image-size", "64", "--decode-size", "80", "--augment", "keras-generator"], "ImageDataGenerator"),
    (["--image-size", "64", "--decode-size", "wide"], "not a whole number of pixels or one of torchvision"),
])
def test_decode_sizes_that_cannot_work_are_one_line_before_any_run(demo_dir, tmp_path, flags, message):
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(demo_dir), "--weights", "none",
                                      "--out", str(tmp_path / "run"), *flags])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
