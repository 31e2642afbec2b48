"""The hybrid model and the two-phase schedule: cut points, what trains in each phase,
BatchNormalization modes, the phase switch, the stability log and the non-finite stop."""

import csv
import json
import math

import keras
import numpy as np
import pytest

from model import CUTS, ModelSpec, build_hybrid, build_model
from model.spec import CUT_LAYERS
from model.structure import (
    activation_points,
    backbone_of,
    layer_group,
    residual_blocks,
    set_backbone_trainable,
)
from tests.conftest import active_backend
from tests.test_compare import cli
from training.callbacks import Checkpoints, NonFiniteGuard
from training.schedule import Phase, WarmupSchedule, carry_optimizer_state, phase_learning_rate
from training.stability import StabilityMonitor, gradient_ratio, group_gradient_norms
from training.train import fit_phases

SIZE = 32
RNG = np.random.default_rng(0)
IMAGES = RNG.normal(0, 50, (8, SIZE, SIZE, 3)).astype(np.float32)
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3], dtype=np.int32)


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def small_hybrid(**options) -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_hybrid(4, SIZE, head_filters=16, dropout=0.0, **options)


def compile_sgd(model: keras.Model, lr: float = 0.1) -> None:
    model.compile(optimizer=keras.optimizers.SGD(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def trainable_paths(model: keras.Model) -> set[str]:
    return {v.path for v in model.trainable_variables}


@pytest.mark.parametrize("cut, channels, blocks", [("conv3", 512, 7), ("conv4", 1024, 13), ("conv5", 2048, 16)])
def test_each_cut_ends_the_backbone_at_its_stage(cut, channels, blocks):
    model = small_hybrid(cut=cut, head_blocks=2)
    backbone = backbone_of(model)
    assert backbone.layers[-1].name == CUT_LAYERS[cut]
    assert backbone.output.shape[-1] == channels
    assert len(residual_blocks(backbone)) == blocks == ModelSpec("hybrid", cut=cut).backbone_blocks
    assert residual_blocks(backbone)[-1].startswith(f"{cut}_block")
    points = activation_points(model)
    assert list(points) == ["cut", "head_block1", "head_block2"]
    assert points["cut"].shape[-1] == channels and points["head_block2"].shape[-1] == 16
    logits = to_numpy(model(IMAGES[:2], training=False))
    assert logits.shape == (2, 4) and np.isfinite(logits).all()


def test_plain_classifier_keeps_the_whole_backbone():
    assert set(CUTS) == set(CUT_LAYERS)
    model = build_model(ModelSpec("resnet50", dropout=0.0), 4, SIZE)
    assert backbone_of(model).layers[-1].name == "conv5_block3_out"
    assert len(residual_blocks(backbone_of(model))) == ModelSpec().backbone_blocks == 16
    assert list(activation_points(model)) == ["cut"]


def test_head_blocks_are_he_initialised_and_optionally_squeeze_excite():
    with_se = small_hybrid(head_blocks=1, se=True)
    without = small_hybrid(head_blocks=1, se=False)
    conv = with_se.get_layer("head_block1_conv")
    assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal) and not conv.use_bias
    assert {"head_block1_se_reduce", "head_block1_se_expand"} <= {layer.name for layer in with_se.layers}
    assert not any("_se_" in layer.name for layer in without.layers)
    assert with_se.count_params() > without.count_params()


def test_phases_train_exactly_the_head_then_the_top_blocks():
    model = small_hybrid(cut="conv4")
    assert set_backbone_trainable(model, 0) == []
    head_only = trainable_paths(model)
    assert head_only and all(p.startswith(("head_block", "logits/")) for p in head_only)

    assert set_backbone_trainable(model, 2) == ["conv4_block5", "conv4_block6"]
    phase2 = trainable_paths(model)
    backbone_part = phase2 - head_only
    assert head_only < phase2
    assert backbone_part and all(p.startswith(("conv4_block5_", "conv4_block6_")) for p in backbone_part)
    # Every weight-carrying layer of those two blocks trains, BatchNorm gamma/beta included.
    assert "conv4_block6_3_bn/gamma" in backbone_part and "conv4_block5_1_conv/kernel" in backbone_part

    set_backbone_trainable(model, None)
    assert "conv1_conv/kernel" in trainable_paths(model)
    assert len(trainable_paths(model)) == len(model.trainable_variables) > len(phase2)
    with pytest.raises(ValueError, match=">= 0"):
        set_backbone_trainable(model, -1)


def _moving_means(model: keras.Model, names: list[str]) -> dict[str, np.ndarray]:
    layers = {layer.name: layer for layer in [*backbone_of(model).layers, *model.layers]}
    return {n: to_numpy(layers[n].moving_mean).copy() for n in names}


@pytest.mark.parametrize("bn_train", [False, True])
def test_backbone_batchnorm_stays_frozen_in_unfrozen_blocks_unless_bn_train(bn_train):
    model = small_hybrid(cut="conv4")
    set_backbone_trainable(model, 1, train_batchnorm=bn_train)  # conv4_block6 trains
    compile_sgd(model)
    bn = backbone_of(model).get_layer("conv4_block6_1_bn")
    assert ("conv4_block6_1_bn/gamma" in trainable_paths(model)) is bn_train
    assert "conv4_block6_1_conv/kernel" in trainable_paths(model)
    names = ["conv4_block6_1_bn", "conv4_block5_1_bn", "head_block1_bn"]
    before = _moving_means(model, names)
    gamma, conv = to_numpy(bn.gamma).copy(), to_numpy(backbone_of(model).get_layer("conv4_block6_1_conv").kernel).copy()
    model.train_on_batch(IMAGES, LABELS)  # fit's training=True
    after = _moving_means(model, names)
    assert not np.array_equal(to_numpy(backbone_of(model).get_layer("conv4_block6_1_conv").kernel), conv)
    assert not np.array_equal(after["head_block1_bn"], before["head_block1_bn"])  # the head's BN trains
    np.testing.assert_array_equal(after["conv4_block5_1_bn"], before["conv4_block5_1_bn"])  # frozen block
    assert (not np.array_equal(after["conv4_block6_1_bn"], before["conv4_block6_1_bn"])) is bn_train
    assert (not np.array_equal(to_numpy(bn.gamma), gamma)) is bn_train


def test_warmup_cosine_schedule_counts_from_the_phase_start():
    schedule = WarmupSchedule(1e-3, warmup_steps=10, total_steps=110, start_step=50)
    lr = lambda step: float(to_numpy(schedule(step)))  # noqa: E731
    assert lr(50) == pytest.approx(1e-4)  # first step of the phase: 1/10 of the peak
    assert lr(59) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(1e-3)
    assert lr(110) == pytest.approx(0.5e-3, rel=1e-5)  # half way through the decay
    assert lr(160) == pytest.approx(0.0, abs=1e-12)
    constant = WarmupSchedule(1e-3, 4, 100, decay="constant")
    assert float(to_numpy(constant(1))) == pytest.approx(0.5e-3) and float(to_numpy(constant(80))) == pytest.approx(1e-3)
    assert phase_learning_rate(Phase("train", 3, 1e-4), 10, 0) == 1e-4
    restored = WarmupSchedule.from_config(schedule.get_config())
    assert float(to_numpy(restored(55))) == pytest.approx(lr(55))


class ArrayBatches(keras.utils.PyDataset):
    def __init__(self, images, labels, batch_size):
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, i):
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.images[s], self.labels[s]


def test_phase_switch_recompiles_and_carries_the_optimizer_state(tmp_path):
    model = small_hybrid(cut="conv3", head_blocks=1)
    phases = [Phase("head", 2, 1e-3, backbone_blocks=0),
              Phase("finetune", 1, 1e-4, "cosine", warmup_epochs=0.5, backbone_blocks=1)]
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            optimizer = self.model.optimizer
            kernel = next(v for v in optimizer.variables if v.name == "head_block1_conv_kernel_momentum")
            seen.append({"trainable": len(self.model.trainable_variables),
                         "iterations": int(to_numpy(optimizer.iterations)),
                         "momentum": to_numpy(kernel).copy(), "optimizer": optimizer})

    history_csv = tmp_path / "history.csv"
    history = fit_phases(model, phases, ArrayBatches(IMAGES, LABELS, 4), None, [Spy()], history_csv,
                         verbose=0, log=lambda m: None)
    assert len(history["loss"]) == 3
    head, finetune = seen
    assert head["iterations"] == 0 and not head["momentum"].any()
    assert finetune["iterations"] == 2 * 2  # two epochs of two steps: the step count runs on
    assert finetune["trainable"] > head["trainable"]
    assert finetune["optimizer"] is not head["optimizer"]
    assert finetune["momentum"].any()  # the head's Adam moments came along
    assert int(to_numpy(finetune["optimizer"].iterations)) == 6
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]


def test_carry_optimizer_state_copies_shared_slots_only():
    model = small_hybrid(cut="conv3", head_blocks=1)
    set_backbone_trainable(model, 0)
    first = keras.optimizers.Adam(1e-3)
    first.build(model.trainable_variables)
    for v in first.variables:
        if v.name != "learning_rate":
            v.assign(np.full(v.shape, 7, dtype=v.dtype))
    set_backbone_trainable(model, 1)
    second = keras.optimizers.Adam(WarmupSchedule(1e-4, 2, 10, start_step=7))
    second.build(model.trainable_variables)
    copied = carry_optimizer_state(first, second)
    assert copied == len(first.variables) - 1  # all but the learning rate
    by_name = {v.name: to_numpy(v) for v in second.variables}
    assert int(by_name["iteration"]) == 7
    assert (by_name["head_block1_conv_kernel_velocity"] == 7).all()
    assert not by_name["conv3_block4_3_conv_kernel_momentum"].any()  # new in this phase: zero


def test_layer_groups():
    assert layer_group("conv1_conv/kernel") == "conv1"
    assert layer_group("conv4_block6_3_bn/gamma") == "conv4"
    assert layer_group("head_block2_se_reduce/kernel") == "head_block2"
    assert layer_group("logits/bias") == "classifier"
    assert layer_group("seed_generator/seed_generator_state") is None
    assert gradient_ratio({"a": 0.5, "b": 2.0}) == 0.25
    assert gradient_ratio({"a": float("nan"), "b": 1.0}) is None and gradient_ratio({}) is None


def test_gradient_probe_measures_groups_and_leaves_the_model_untouched():
    model = small_hybrid(cut="conv3", head_blocks=2)
    set_backbone_trainable(model, 1)
    state = {v.path: to_numpy(v).copy() for v in model.variables}
    norms = group_gradient_norms(model, IMAGES, LABELS)
    assert set(norms) == {"conv3", "head_block1", "head_block2", "classifier"}
    assert all(n > 0 and math.isfinite(n) for n in norms.values())
    for v in model.variables:  # moving statistics and the dropout seed included
        np.testing.assert_array_equal(to_numpy(v), state[v.path], err_msg=v.path)
    again = group_gradient_norms(model, IMAGES, LABELS)
    assert again == pytest.approx(norms, rel=1e-5)


def test_stability_monitor_writes_a_row_per_epoch(tmp_path):
    model = small_hybrid(cut="conv3", head_blocks=1)
    phases = [Phase("head", 1, 1e-3, backbone_blocks=0), Phase("finetune", 1, 1e-4, backbone_blocks=1)]
    monitor = StabilityMonitor(IMAGES, LABELS, tmp_path)
    fit_phases(model, phases, ArrayBatches(IMAGES, LABELS, 4), None, [monitor], tmp_path / "history.csv",
               verbose=0, log=lambda m: None)
    with open(tmp_path / "stability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["head", "finetune"]
    assert rows[0]["grad_norm/conv3"] == "" and float(rows[1]["grad_norm/conv3"]) > 0  # frozen, then training
    assert float(rows[0]["learning_rate"]) == pytest.approx(1e-3)
    for key in ("act_std/cut", "act_std/head_block1", "grad_norm/classifier", "grad_ratio"):
        assert float(rows[1][key]) > 0
    assert rows[1]["nonfinite_loss"] == "0"
    assert (tmp_path / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = monitor.summary()
    assert summary["nonfinite_loss"] is False and 0 < summary["grad_ratio_last"] <= 1


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(inputs))
    x = RNG.normal(size=(24, 3)).astype(np.float32)
    y = np.arange(24) % 4
    x_bad = x.copy()
    x_bad[13] = np.nan  # epoch 1 is clean; the NaN is in batch 4 of epoch 2
    data = ArrayBatches(x, y, 4)

    class Spoil(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            data.images = x_bad

    guard, checkpoints = NonFiniteGuard(), Checkpoints(tmp_path, "accuracy")
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    model.fit(data, epochs=3, shuffle=False, verbose=0, callbacks=[guard, checkpoints, Spoil()])
    assert guard.event is not None and guard.event["epoch"] == 2 and guard.event["batch"] == 4
    assert not math.isfinite(guard.event["loss"])
    assert checkpoints.last_epoch == 1
    good = keras.Model(inputs, keras.layers.Dense(4, name="logits")(inputs))
    good.load_weights(tmp_path / "last.weights.h5")
    assert all(np.isfinite(to_numpy(w)).all() for w in good.weights)
    assert not np.isfinite(to_numpy(model.get_layer("logits").kernel)).all()  # the live model diverged


def test_unfreeze_blocks_beyond_the_cut_exits_2(demo_dir, tmp_path):
    result = cli("hybrid", "--data-dir", str(demo_dir), "--cut", "conv3", "--unfreeze-blocks", "8",
                 "--weights", "none", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --unfreeze-blocks 8: the hybrid backbone cut at conv3 has 7 residual blocks")


@pytest.mark.slow
def test_hybrid_command_trains_two_phases_and_writes_every_run_file(demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("hybrid", "--data-dir", str(demo_dir), "--image-size", "32", "--batch-size", "8",
                 "--head-epochs", "1", "--finetune-epochs", "2", "--unfreeze-blocks", "2", "--head-filters", "32",
                 "--weights", "none", "--out", str(run_dir), "--verbose", "0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Phase head: epochs 1-1" in result.stdout and "Phase finetune: epochs 2-3" in result.stdout
    assert {p.name for p in run_dir.iterdir()} == {
        "config.json", "history.csv", "initial.weights.h5", "model.keras", "best.weights.h5",
        "metrics.json", "skipped.txt", "stability.csv", "stability.png", "test_predictions.csv",
        "data-fingerprint.tsv", ".lock",
    }
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["model"] == "hybrid" and config["options"]["bn_train"] is None
    assert [p["name"] for p in config["phases"]] == ["head", "finetune"]
    assert config["phases"][1]["backbone_blocks"] == 2 and config["phases"][1]["schedule"] == "cosine"
    with open(run_dir / "stability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["head", "finetune", "finetune"]
    assert rows[0]["grad_norm/conv4"] == "" and float(rows[1]["grad_norm/conv4"]) > 0
    assert float(rows[1]["learning_rate"]) < 1e-5 < float(rows[0]["learning_rate"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "hybrid" and metrics["epochs"] == 3
    assert metrics["stability"]["nonfinite_loss"] is False
    model = keras.saving.load_model(run_dir / "model.keras")
    assert model.output_shape == (None, 4) and model.get_layer("head_block1_conv").filters == 32


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "jax", reason="trains to divergence once, in the jax pass")
def test_hybrid_run_that_diverges_exits_1_and_keeps_the_phase_1_weights(demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("hybrid", "--data-dir", str(demo_dir), "--image-size", "32", "--batch-size", "8",
                 "--head-epochs", "1", "--finetune-epochs", "2", "--finetune-lr", "1e30", "--head-filters", "16",
                 "--weights", "none", "--out", str(run_dir), "--verbose", "0")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "non-finite training loss" in message and "in epoch 2" in message
    assert f"the last finite weights (epoch 1) are in {run_dir / 'last.weights.h5'}" in message
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.keras").exists()
    with open(run_dir / "stability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["nonfinite_loss"] for r in rows] == ["0", "1"]
    with open(run_dir / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    model = build_model(ModelSpec("hybrid", head_filters=16), 4, 32)
    model.load_weights(run_dir / "initial.weights.h5")
    initial = to_numpy(model.get_layer("head_block1_conv").kernel).copy()
    model.load_weights(run_dir / "last.weights.h5")
    assert all(np.isfinite(to_numpy(w)).all() for w in model.weights)
    assert not np.array_equal(to_numpy(model.get_layer("head_block1_conv").kernel), initial)  # phase 1 trained it
