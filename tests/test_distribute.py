"""Data-parallel training, `--devices N` (docs/distributed.md), on the backend the suite runs with.

The multi-device checks run in fresh processes: jax must see N host devices and tensorflow must
split the CPU before either starts, and torch needs one process per device (torchrun). Run as
`python -m tests.test_distribute step OUT` (under torchrun for torch), this file is that process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.demo import make_demo_data
from tests.conftest import ROOT, active_backend, cli_env

DEVICES = 2
# One SGD step on 2 devices against one on 1 device with the global batch, BatchNorm frozen: the
# largest weight difference may be this fraction of the largest weight change of the step
# (summing the gradient over shards changes only the order of float32 additions).
STEP_TOLERANCE = 1e-4
# A small model on tiny images: the hybrid cut at conv3 with one narrow head block, 32 px.
SMALL = {"model": "hybrid", "cut": "conv3", "head_blocks": 1, "head_filters": 8, "weights": "none"}


def launch(args: list[str], backend: str, cwd: Path = ROOT, timeout: float = 300,
           devices: int = DEVICES) -> subprocess.CompletedProcess:
    """`args` (a module and its arguments, or cli.py's) in a fresh process per device for torch
    (torchrun, gloo) or one process for jax and tensorflow."""
    args = [str(ROOT / args[0]), *args[1:]] if args[0].endswith(".py") else ["-m", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices),
                "--master-port", str(29500 + os.getpid() % 1000)]
    command = [*torchrun, *args] if backend == "torch" and devices > 1 else [sys.executable, *args]
    env = dict(cli_env(backend), PYTHONPATH=str(ROOT))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.slow
def test_one_step_on_two_devices_is_one_step_on_one_device(tmp_path, demo_dir):
    start = time.perf_counter()
    result = launch(["tests.test_distribute", "step", str(demo_dir), str(tmp_path)], active_backend())
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((tmp_path / "step.json").read_text())
    print(f"\n{active_backend()}: {found} ({time.perf_counter() - start:.1f} s)")
    assert found["devices"] == DEVICES and found["global_batch"] == 8
    assert found["max_update"] > 1e-4  # the step moved the weights: the comparison means something
    assert found["max_difference"] <= STEP_TOLERANCE * found["max_update"], found
    assert found["loss"] == pytest.approx(found["reference_loss"], rel=1e-5)  # torch: averaged over processes
    # BatchNorm training: the replicas agree on their statistics (a mean of the shares' means).
    assert found["moving_mean_change"] > 1e-3
    assert found["moving_mean_difference"] <= 1e-5 * found["moving_mean_change"], found
    assert found["prediction_difference"] <= 1e-5 * found["prediction_scale"], found
    assert found["replicas_agree"]
    # --precise-bn on the replicas: the statistics and predictions of one device recomputing them.
    assert found["precise_changed"] > 1e-4 * found["prediction_scale"]  # it changed something to compare
    assert found["precise_difference"] <= 1e-5 * found["precise_scale"], found
    assert found["precise_prediction_difference"] <= 1e-5 * found["prediction_scale"], found


# A setting that learns the phantoms in seconds and ends on a settled point (cosine decay): the
# hybrid cut at conv3, one 32-channel head block, 48 px, 8 epochs. Measured on this CPU, seeds 0
# and 1, final test accuracy of 1 vs 2 devices (40 test images): torch 1.00 vs 1.00 and 0.925 vs
# 0.875 (seed 1); seed 0: tensorflow 0.85 vs 0.975, jax 0.90 vs 0.85.
BAND_RUN = ["--model", "hybrid", "--cut", "conv3", "--head-blocks", "1", "--head-filters", "32", "--image-size", "48",
            "--batch-size", "16", "--epochs", "8", "--lr", "2e-3", "--lr-schedule", "cosine", "--warmup-epochs", "1",
            "--bn-momentum", "0.9", "--bn-train", "--weights", "none", "--val-split", "0", "--verbose", "0"]
BAND_FLOOR, BAND_WIDTH = 0.75, 0.2  # chance is 0.25; 39 test images, so 0.2 is about 8 of them


@pytest.mark.slow
def test_a_two_device_run_writes_its_run_and_reaches_the_accuracy_band_of_one_device(tmp_path):
    """The acceptance: the demo data trained on 2 devices (torch: 2 processes under torchrun), and
    the same run (seed, weights file, global batches) on one device. Both learn (final test
    accuracy >= 0.75) and end within 0.2 of each other; not equal, by design: BatchNorm statistics
    are per share on torch and tensorflow, and float sums run in another order. One test image
    fewer than 40, so the last evaluation batch (7 of 39 images) does not split evenly."""
    data = tmp_path / "data"
    make_demo_data(data, train_per_class=30, test_per_class=10)
    sorted((data / "Testing").rglob("*.jpg"))[0].unlink()
    accuracy, outputs = {}, {}
    for devices in (1, 2):
        result = launch(["cli.py", "train", "--data-dir", str(data), *BAND_RUN, "--devices", str(devices),
                         "--out", str(tmp_path / f"run-{devices}")], active_backend(), cwd=tmp_path, devices=devices)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = result.stdout
        accuracy[devices] = json.loads((tmp_path / f"run-{devices}" / "metrics.json").read_text())["test"]["accuracy"]
    print(f"\n{active_backend()}: final test accuracy, 1 device {accuracy[1]:.3f}, 2 devices {accuracy[2]:.3f}")
    assert min(accuracy.values()) >= BAND_FLOOR, accuracy
    assert abs(accuracy[1] - accuracy[2]) <= BAND_WIDTH, accuracy

    run = tmp_path / "run-2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data_parallel"]["devices"] == DEVICES and metrics["data_parallel"]["batch_per_device"] == 8
    assert json.loads((run / "config.json").read_text())["options"]["devices"] == DEVICES
    assert sum(metrics["counts"]["test"]) == metrics["test"]["count"] == 39
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 39  # the padding is not scored
    assert len((run / "test_predictions.csv").read_text().splitlines()) == 1 + 39
    # Only rank 0 printed and wrote: one results table, nothing written outside the run directory.
    assert outputs[2].count("| Test Accuracy |") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run-1", "run-2"]


@pytest.mark.slow
def test_an_error_in_one_torch_process_stops_the_others(tmp_path, demo_dir):
    if active_backend() != "torch":
        pytest.skip("torch runs one process per device")
    start = time.perf_counter()
    result = launch(["tests.test_distribute", "step", str(demo_dir), str(tmp_path), "--fail-rank", "1"], "torch",
                    timeout=120)
    assert result.returncode != 0 and "rank 1 fails on purpose" in result.stderr
    assert time.perf_counter() - start < 100  # rank 0, waiting in a collective, did not hang
    assert not (tmp_path / "step.json").exists()


def test_a_batch_that_does_not_split_over_the_devices_is_refused_in_one_line(tmp_path, demo_dir):
    from tests.test_cli import error_lines, run_cli

    result = run_cli("train", "--data-dir", str(demo_dir), "--batch-size", "9", "--devices", "2",
                     "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        "error: --batch-size 9 is the global batch and must split evenly over --devices 2 (e.g. --batch-size 8)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world", [None, "3"], ids=["no-torchrun", "other-world-size"])
def test_torch_devices_without_matching_torchrun_is_refused_in_one_line(tmp_path, demo_dir, monkeypatch, world):
    from tests.test_cli import error_lines, run_cli

    monkeypatch.setenv("KERAS_BACKEND", "torch")  # refused before any backend loads
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    result = run_cli("train", "--data-dir", str(demo_dir), "--devices", "2", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if world is None:
        assert "KERAS_BACKEND=torch torchrun --nproc-per-node 2 " in lines[0] and "--devices 2" in lines[0]
    else:
        assert "torchrun started 3 processes (WORLD_SIZE) but --devices is 2" in lines[0]
    assert not (tmp_path / "run").exists()


def test_replica_shares_are_the_global_batch_cut_to_a_multiple_of_the_devices(demo_dir):
    """The pipeline's bytes, split: the processes' shares put together are the global batch; the
    last, partial batch is cut to a multiple of N rows; evaluation batches are padded, weight 0."""
    from backend.distribute import EvenBatches, Replicas, ReplicaShares
    from training.config import TrainConfig
    from training.train import training_batches

    cfg = TrainConfig(data_dir=str(demo_dir), image_size=32, batch_size=8, workers=0)
    examples = cfg.splits().train[:21]  # batches of 8, 8 and 5 rows
    batches = training_batches(cfg, examples, None)
    for devices in (2, 4):
        shares = [ReplicaShares(batches, Replicas(devices, rank, devices)) for rank in range(devices)]
        one_process = ReplicaShares(batches, Replicas(devices))
        assert len(shares[0]) == len(one_process) == 3
        for index, rows in enumerate((8, 8, 5 // devices * devices)):
            images, labels = batches.batch(0, index)
            together = [np.concatenate(part) for part in zip(*(s[index] for s in shares), strict=True)]
            for got in (together, one_process[index]):
                assert np.array_equal(got[0], images[:rows]) and np.array_equal(got[1], labels[:rows])
    assert len(ReplicaShares(batches, Replicas(8))) == 2  # a last batch of 5 rows has no share for 8 devices
    images, labels, weights = EvenBatches(batches, 4)[2]
    assert len(labels) == 8 and weights.tolist() == [1] * 5 + [0] * 3
    assert np.array_equal(images[5:], np.repeat(images[4:5], 3, axis=0))


def test_one_device_changes_nothing(demo_dir):
    from backend.distribute import active, for_evaluation, for_training, replicas
    from training.config import TrainConfig
    from training.train import training_batches

    cfg = TrainConfig(data_dir=str(demo_dir), image_size=32, batch_size=8, workers=0)
    batches = training_batches(cfg, cfg.splits().train, None)
    with replicas(1) as replica:
        assert replica.writes and replica is active() and replica.devices == 1
        assert for_training(batches) is batches and for_evaluation(batches) is batches


def step(data_dir: str, out: str, fail_rank: int | None) -> None:
    """On DEVICES replicas, then (rank 0) on one device from the same weights, on one global batch
    of 8 demo images, the small model without dropout: one SGD step with BatchNorm frozen (the
    weights must agree), and one with BatchNorm training (the first BatchNorm layer's moving mean,
    whose input is the same on both, must agree after the replicas share their statistics; and the
    replicas' predictions of 5 images must be those of one device holding rank 0's weights). Then
    precise BatchNorm (`--precise-bn`) on the replicas from the batch: every moving statistic and
    the predictions must be those of one device recomputing them from the same weights.
    Writes out/step.json."""
    from backend.determinism import set_random_seed
    from backend.parallel import average_across_processes, data_parallel_environment

    os.environ.update(data_parallel_environment(DEVICES))  # before jax starts
    import keras

    from backend import distribute
    from data.loader import MRIBatches, iterate_epoch
    from model import build_model
    from training.config import TrainConfig
    from training.precise_bn import recompute_batchnorm_statistics
    from training.schedule import training_loss
    from training.train import training_batches

    cfg = TrainConfig(data_dir=data_dir, image_size=32, batch_size=8, augment="none", dropout=0.0, workers=0,
                      preprocess="imagenet", **SMALL)
    examples = cfg.splits().train
    batches = training_batches(cfg, examples[:8], None)
    five = MRIBatches(examples[8:13], cfg.image_size, cfg.batch_size, cfg.preprocess, workers=0)  # file order
    files = {name: Path(out) / f"{name}.weights.h5" for name in ("start", "trained")}

    def values(model) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables]

    def moving_statistics(model) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables if v.name.startswith("moving_")]

    def precise(model) -> list[np.ndarray]:  # what `--precise-bn` does at an epoch's end
        recompute_batchnorm_statistics(model, [images for images, _ in iterate_epoch(batches, 0)])
        return moving_statistics(model)

    def first_moving_mean(model) -> np.ndarray:
        return keras.ops.convert_to_numpy(next(v for v in model.non_trainable_variables if v.name == "moving_mean"))

    def one_step(model, frozen_batchnorm: bool) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        """The step's loss, and the trainable weights before and after it."""
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = not frozen_batchnorm  # frozen: inference mode, the same on every replica
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=training_loss())
        before = values(model)
        history = model.fit(distribute.for_training(batches), epochs=1, shuffle=False, verbose=0,
                            callbacks=distribute.replica_callbacks(model))
        return history.history["loss"][-1], before, values(model)

    def started(load: Path | None = None):
        set_random_seed(0)
        model = build_model(cfg.model_spec(), 4, cfg.image_size)
        if load is not None:
            model.load_weights(load)
        return model

    with distribute.replicas(DEVICES) as replica:
        if replica.rank == fail_rank:
            raise RuntimeError(f"rank {fail_rank} fails on purpose")
        model = started()
        distribute.same_start(model)
        if replica.writes:
            model.save_weights(files["start"])
        loss, _, trained = one_step(model, frozen_batchnorm=True)
        model = started(files["start"] if replica.writes else None)
        distribute.same_start(model)
        for layer in model._flatten_layers():  # torch: hooks put on while BatchNorm is frozen must serve after
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        distribute.replica_callbacks(model)
        one_step(model, frozen_batchnorm=False)
        total = float(sum(np.sum(v, dtype=np.float64) for v in values(model)))
        agreed = average_across_processes([total])[0] == total  # torch: every process holds the same weights
        moving_mean, predicted = first_moving_mean(model), distribute.predict(model, five, 5)
        if replica.writes:
            model.save_weights(files["trained"])
        precise_statistics, precise_predicted = precise(model), distribute.predict(model, five, 5)
    if not replica.writes:
        return
    reference_loss, before, after = one_step(started(files["start"]), frozen_batchnorm=True)
    reference = started(files["start"])
    one_step(reference, frozen_batchnorm=False)
    one_device = started(files["trained"])  # rank 0's weights on one device; precise BN changes it last
    (Path(out) / "step.json").write_text(json.dumps({
        "devices": replica.devices, "global_batch": cfg.batch_size, "engine": replica.engine,
        "max_difference": max(float(np.abs(a - t).max()) for a, t in zip(after, trained, strict=True)),
        "max_update": max(float(np.abs(a - b).max()) for a, b in zip(after, before, strict=True)),
        "loss": loss, "reference_loss": reference_loss,
        "moving_mean_difference": float(np.abs(first_moving_mean(reference) - moving_mean).max()),
        "moving_mean_change": float(np.abs(first_moving_mean(reference)).max()),  # it starts at 0
        "prediction_difference": float(np.abs(distribute.predict(one_device, five, 5) - predicted).max()),
        "prediction_scale": float(np.abs(predicted).max()), "replicas_agree": agreed,
        "precise_difference": max(float(np.abs(a - b).max())
                                  for a, b in zip(precise(one_device), precise_statistics, strict=True)),
        "precise_scale": max(float(np.abs(a).max()) for a in precise_statistics),
        "precise_prediction_difference": float(np.abs(distribute.predict(one_device, five, 5)
                                                      - precise_predicted).max()),
        "precise_changed": float(np.abs(precise_predicted - predicted).max()),
    }))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["step"])
    parser.add_argument("data_dir")
    parser.add_argument("out")
    parser.add_argument("--fail-rank", type=int, default=None)
    arguments = parser.parse_args()
    step(arguments.data_dir, arguments.out, arguments.fail_rank)
