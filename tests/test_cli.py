"""The command line, as a user runs it: errors, the demo data, and a real one-epoch run."""

import csv
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from checksums import file_sha256
from cli import cli
from tests.conftest import BACKENDS, ROOT, active_backend, cli_env, make_layout


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def run_subprocess(*args: str, backend: str | None = None, timeout: float = 300, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        capture_output=True, text=True, timeout=timeout,
        env=env or cli_env(backend or active_backend()), cwd=ROOT,
    )


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "layout, message",
    [
        (None, "does not exist"),
        ({}, "has no Training/ folder"),
        ({"Training": {}}, "has no class folders"),
        ({"Training": {"a": 2, "b": 0}}, "holds no image files"),
        ({"Training": {"a": 2, "b": 2}, "Testing": {"a": 1}}, "class folders differ"),
    ],
    ids=["missing", "empty", "no-classes", "empty-class", "mismatched-classes"],
)
def test_layout_errors_exit_2_with_one_line(tmp_path, layout, message):
    data = tmp_path / "data"
    if layout is not None:
        data.mkdir()
        for split, classes in layout.items():
            (data / split).mkdir()
            for name, n in classes.items():
                (data / split / name).mkdir()
                make_layout(data, {split: {name: n}})
    result = run_cli("train", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--weights", "none")
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_unwritable_output_folder_exits_2_before_training(tmp_path, demo_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    start = time.perf_counter()
    result = run_cli("train", "--data-dir", str(demo_dir), "--out", str(blocker / "run"), "--weights", "none")
    assert result.exit_code == 2
    assert "is not writable" in result.output and str(blocker / "run") in result.output
    assert time.perf_counter() - start < 10


def test_unknown_backend_exits_2_with_one_line(demo_dir):
    env = dict(cli_env("torch"), KERAS_BACKEND="mxnet")
    result = run_subprocess("train", "--data-dir", str(demo_dir), env=env, timeout=60)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: unknown KERAS_BACKEND='mxnet'; use one of torch, tensorflow, jax"
    ]


def go_offline(monkeypatch) -> list:
    """Makes this process a machine without network access, whatever the machine: every
    internet connection fails at once as an unplugged machine's does (ENETUNREACH), through
    `socket.create_connection` (the project's reachability checks, urllib) or a bare socket
    (urllib3). Returns the addresses that something tried to reach."""
    tried = []

    def unreachable(address) -> OSError:
        tried.append(address)
        return OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

    def create_connection(address, *args, **kwargs):
        raise unreachable(address)

    connect = socket.socket.connect

    def connect_offline(sock, address):
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return connect(sock, address)  # local sockets (AF_UNIX) are not the network
        raise unreachable(address)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "connect", connect_offline)
    return tried


def test_imagenet_offline_exits_fast_with_the_file_to_fetch(demo_dir, tmp_path, monkeypatch):
    tried = go_offline(monkeypatch)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))  # nothing cached
    start = time.perf_counter()
    result = run_cli("train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "run"))
    assert time.perf_counter() - start < 30
    assert result.exit_code == 2, result.output
    assert tried, "the command failed before it looked for the network"
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in lines[0]
    assert str(tmp_path / "keras-home" / "models") in lines[0]


def test_make_demo_data_is_deterministic_and_mixes_modes(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        assert run_cli("make-demo-data", str(tmp_path / name), "--train-per-class", "4", "--test-per-class", "2").exit_code == 0
    # The images only: the marker .demo-data.json (what --replace may remove) is not one.
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").glob("*/*/*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").glob("*/*/*.*"))
    assert files_a == files_b and len(files_a) == 4 * 4 + 4 * 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    modes = {Image.open(tmp_path / "a" / f).mode for f in files_a}
    suffixes = {f.suffix for f in files_a}
    assert modes == {"L", "RGB"} and suffixes == {".jpg", ".png"}
    classes = sorted(p.name for p in (tmp_path / "a" / "Training").iterdir())
    assert classes == ["glioma", "meningioma", "notumor", "pituitary"]


@pytest.mark.slow
def test_one_epoch_train_writes_every_run_file(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    corrupt = data / "Training" / "glioma" / "zz_corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "--data-dir", str(data), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
        "--weights", "none", "--out", str(run_dir), "--verbose", "0",
    )
    assert result.exit_code == 0, result.output
    assert "Skipped 1 unreadable files" in result.output
    for row in ("Train Loss", "Train Accuracy", "Test Loss", "Test Accuracy"):
        assert f"| {row} |" in result.output

    names = {p.name for p in run_dir.iterdir()}
    assert names == {  # --keep-checkpoints best: last.weights.h5 went once the run finished
        "config.json", "history.csv", "initial.weights.h5", "model.keras", "best.weights.h5",
        "metrics.json", "skipped.txt", "stability.csv", "stability.png", "test_predictions.csv",
        "data-fingerprint.tsv", ".lock",
    }
    config = json.loads((run_dir / "config.json").read_text())
    assert config["starting_weights"]["initial"]["sha256"] == file_sha256(run_dir / "initial.weights.h5")
    assert config["starting_weights"]["backbone"] is None  # --weights none
    assert config["environment"]["backend"] == active_backend()
    assert config["environment"]["versions"]["keras"] == keras.__version__
    assert config["options"]["image_size"] == 32 and config["options"]["weights"] == "none"
    assert config["counts"]["test"] == [3, 3, 3, 3]

    with open(run_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 1
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second"} <= set(history[0])

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["backend"] == active_backend()
    assert metrics["test"]["count"] == 12
    assert np.asarray(metrics["test"]["confusion_matrix"]).sum() == 12
    # test_predictions.csv: one row per test image, whose final predictions give the reported accuracy.
    with open(run_dir / "test_predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 12 and set(predictions[0]) == {"path", "label", "final", "best", "twin_in_training"}
    assert np.mean([p["label"] == p["final"] for p in predictions]) == pytest.approx(metrics["test"]["accuracy"])
    assert set(metrics["test"]["per_class"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    assert metrics["skipped"][0]["path"] == str(corrupt)
    assert (run_dir / "skipped.txt").read_text().startswith(str(corrupt) + "\t")

    model = keras.saving.load_model(run_dir / "model.keras")
    assert model.output_shape == (None, 4)
    assert float(history[0]["loss"]) == pytest.approx(metrics["train"]["loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="spawns all three backends; runs once, in the torch pass")
def test_pipeline_bytes_are_identical_on_every_backend(demo_dir):
    hashes = {}
    for backend in BACKENDS:
        for epoch in ("0", "3"):
            for workers in ("1", "3"):
                result = run_subprocess(
                    "pipeline-hash", "--data-dir", str(demo_dir), "--image-size", "48", "--batch-size", "5",
                    "--epoch", epoch, "--workers", workers, "--batches", "6", backend=backend, timeout=120,
                )
                assert result.returncode == 0, result.stderr
                digest, *rest = result.stdout.split()
                assert f"backend={backend}" in rest
                hashes[(backend, epoch, workers)] = digest
    for epoch in ("0", "3"):
        assert len({h for (b, e, w), h in hashes.items() if e == epoch}) == 1, hashes
    assert hashes[("torch", "0", "1")] != hashes[("torch", "3", "1")]
