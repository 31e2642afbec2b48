"""The bad-input matrix: every kind of bad input a user's folders hold, through the real
commands. Each is either read, skipped and reported (training goes on), or refused before
training with one line and exit code 2. The README's table lists the same behaviours."""

import io
import json
import os
import shutil
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from checksums import file_sha256
from tests.conftest import ROOT, SMALL_MODEL_FLAGS, active_backend, cli_env
from tests.test_cli import error_lines, run_cli

RNG = np.random.default_rng(0)
TF_STARTUP_LINES = ("WARNING: All log messages before absl::InitializeLog()", "I0000 ")
GRAY = RNG.integers(0, 256, (48, 48), dtype=np.uint8)


def _jpeg_bytes(mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(GRAY).convert(mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png(path, array, mode=None):
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


# name -> (how to write it, None if it is read, or the reason it is skipped)
FILES = {
    "corrupt.jpg": (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(RNG.integers(0, 256, 500, dtype=np.uint8))),
                    "cannot decode"),
    "truncated.jpg": (lambda p: p.write_bytes(_jpeg_bytes()[:300]), "cannot decode"),
    "zero-bytes.jpg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "text.jpg": (lambda p: p.write_text("not an image, just text\n"), "cannot identify image file"),
    "one-pixel.png": (lambda p: _png(p, np.full((1, 1), 128, np.uint8)), "1x1 px, smaller than 8 px"),
    "huge-10000x10000.png": (lambda p: Image.new("L", (10_000, 10_000)).save(p), "decompression bomb"),
    "alpha.png": (lambda p: _png(p, np.dstack([np.stack([GRAY] * 3, -1), np.full((48, 48), 128, np.uint8)])), None),
    "sixteen-bit.png": (lambda p: Image.fromarray(GRAY.astype(np.uint16) * 257).save(p), None),
    "cmyk.jpg": (lambda p: p.write_bytes(_jpeg_bytes("CMYK")), None),
    "float-0-to-1.tif": (lambda p: Image.fromarray(GRAY.astype(np.float32) / 255, "F").save(p), None),
    "twelve-bit.png": (lambda p: Image.fromarray(GRAY.astype(np.uint16) * 16).save(p), None),
    "float-nan.tif": (lambda p: Image.fromarray(np.full((48, 48), np.nan, np.float32), "F").save(p), "holds NaN"),
    "nested/deeper/scan.jpg": (lambda p: p.write_bytes(_jpeg_bytes()), None),
}
IGNORED = [".DS_Store", "__MACOSX/._scan.jpg", ".hidden.jpg", "notes.txt"]


@pytest.fixture(scope="module")
def messy_data(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("messy") / "data"
    shutil.copytree(demo_dir, root)
    folder = root / "Training" / "glioma"
    for name, (write, _) in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write(folder / name)
    for name in IGNORED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_jpeg_bytes())
    os.symlink(folder, folder / "loop")  # a symlink loop: never followed
    return root


@pytest.mark.slow
def test_bad_files_are_skipped_and_reported_and_the_rest_train(messy_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "--data-dir", str(messy_data), "--image-size", "32", "--batch-size", "8",
                     "--epochs", "1", "--weights", "none", "--out", str(run_dir), "--verbose", "0", *SMALL_MODEL_FLAGS)
    assert result.exit_code == 0, result.output
    skipped = dict(line.split("\t", 1) for line in (run_dir / "skipped.txt").read_text().splitlines())
    folder = messy_data / "Training" / "glioma"
    expected_skips = {str(folder / n): reason for n, (_, reason) in FILES.items() if reason}
    assert set(skipped) == set(expected_skips)
    for path, reason in expected_skips.items():
        assert reason in skipped[path], (path, skipped[path])
    config = json.loads((run_dir / "config.json").read_text())
    readable = sum(1 for _, reason in FILES.values() if reason is None)
    assert sum(config["counts"]["train"]) + sum(config["counts"]["val"]) == 4 * 8 + readable
    # notes.txt and the symlinked folder (not followed: it loops); hidden files and __MACOSX are not listed
    assert sorted(config["ignored"]) == [str(folder / "loop") + "/", str(folder / "notes.txt")]
    assert config["ignored_files"] == 2
    assert f"Skipped {len(expected_skips)} unreadable files" in result.output
    assert len((run_dir / "history.csv").read_text().splitlines()) == 2  # the epoch finished
    rescaled = dict(line.split("\t", 1) for line in (run_dir / "decode-report.txt").read_text().splitlines())
    assert rescaled == {str(folder / "float-0-to-1.tif"): "float image in 0..1: scaled by 255",
                        str(folder / "twelve-bit.png"): "16-bit image with values up to 4080: scaled as 12-bit"}
    assert config["rescaled_images"] == 2


def _weights_file(tmp_path, truncate: bool):
    path = tmp_path / "w.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(1000))
    if truncate:
        path.write_bytes(path.read_bytes()[:500])
    return path


def _setup_error(case: str, tmp_path, demo_dir) -> tuple[list[str], str]:
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    if case == "empty class folder":
        (data / "Training" / "extra").mkdir()
        return [], "holds no image files"
    if case == "class folder in one split only":
        shutil.copytree(data / "Training" / "glioma", data / "Training" / "other")
        return [], "class folders differ"
    if case in ("missing --weights file", "missing --init-weights file"):
        flag = case.split()[1]
        return [flag, str(tmp_path / "nowhere.weights.h5")], "does not exist"
    if case in ("truncated --weights file", "truncated --init-weights file"):
        flag = case.split()[1]
        return [flag, str(_weights_file(tmp_path, truncate=True))], "is not a readable HDF5 weights file"
    if case == "one class folder (data) under Training":  # --data-dir one level too high
        nested = tmp_path / "nested"
        shutil.move(str(data / "Training"), str(tmp_path / "classes"))
        (nested / "Training").mkdir(parents=True)
        shutil.move(str(tmp_path / "classes"), str(nested / "Training" / "data"))
        shutil.rmtree(data)
        shutil.move(str(nested), str(data))
        shutil.rmtree(data / "Testing", ignore_errors=True)
        return ["--test-split", "0.2"], "1 class folder (data) under"
    if case == "a class with one training image":
        for extra in sorted((data / "Training" / "glioma").iterdir())[1:]:
            extra.unlink()
        return ["--val-split", "0"], "class glioma has fewer than 2 training images"
    if case == "whole-model file as --weights":
        path = tmp_path / "model.weights.h5"
        with h5py.File(path, "w") as f:  # the shape of Keras 3's save_weights of the classifier
            f.create_group("layers/functional/layers/conv2d/vars").create_dataset("0", data=np.zeros(3))
            f.create_group("layers/dense/vars").create_dataset("0", data=np.zeros(3))
        return ["--weights", str(path)], "holds a whole model's weights"
    if case == "unwritable output folder":
        (tmp_path / "a-file").write_text("x")
        return ["--out", str(tmp_path / "a-file" / "run")], "is not writable"
    raise ValueError(case)


@pytest.mark.parametrize("case", [
    "empty class folder", "class folder in one split only", "missing --weights file", "missing --init-weights file",
    "truncated --weights file", "truncated --init-weights file", "unwritable output folder",
    "one class folder (data) under Training", "a class with one training image",
    "whole-model file as --weights",
])
def test_input_errors_stop_before_training_with_one_line(case, tmp_path, demo_dir):
    extra, message = _setup_error(case, tmp_path, demo_dir)
    args = ["train", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--image-size", "32"]
    if "--weights" not in extra:
        args += ["--weights", "none"]
    if "--out" not in extra:
        args += ["--out", str(tmp_path / "run")]
    result = run_cli(*args, *extra)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()  # a run that never started leaves no folder


@pytest.mark.slow
@pytest.mark.skipif(active_backend() == "tensorflow", reason="tensorflow is the backend there")
def test_a_training_run_under_torch_or_jax_never_imports_tensorflow(demo_dir, tmp_path):
    script = ("import sys; from cli import cli\n"
              "try:\n    cli(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
              "print('tensorflow imported:', 'tensorflow' in sys.modules)")
    result = subprocess.run(
        [sys.executable, "-c", script, "train", "--data-dir", str(demo_dir), "--image-size", "32", "--epochs", "1",
         "--weights", "none", "--out", str(tmp_path / "run"), "--verbose", "0", *SMALL_MODEL_FLAGS],
        capture_output=True, text=True, env=cli_env(active_backend()), cwd=ROOT, timeout=600)
    assert (tmp_path / "run" / "metrics.json").exists(), result.stderr[-2000:]
    assert "tensorflow imported: False" in result.stdout
    assert "oneDNN" not in result.stderr  # tensorflow's start-up lines


@pytest.mark.slow
def test_init_weights_of_another_architecture_is_one_line_and_no_run_folder(demo_dir, tmp_path):
    other = tmp_path / "hybrid.weights.h5"
    result = run_cli("init-weights", str(other), "--model", "hybrid", "--image-size", "32", "--weights", "none")
    assert result.exit_code == 0, result.output
    run = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--data-dir", str(demo_dir), "--image-size",
                          "32", "--weights", "none", "--init-weights", str(other), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, env=cli_env(active_backend()), cwd=ROOT, timeout=300)
    assert run.returncode == 2
    # Under the tensorflow backend, tensorflow's C++ runtime prints its start-up lines first
    # (before absl's logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot hold them back).
    lines = [line for line in error_lines(run.stderr) if not line.startswith(TF_STARTUP_LINES)]
    assert len(lines) == 1 and "does not fit this model, so it was saved from another one" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_an_unwritable_csv_is_refused_before_any_prediction(trained_run, tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = run_cli("predict", str(trained_run), str(trained_run / "stability.png"), "--csv",
                     str(tmp_path / "a-file" / "out.csv"))
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error: --csv") and "cannot be written" in lines[0], lines


def test_a_keras_file_with_a_lambda_layer_is_refused(tmp_path, trained_run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    inputs = keras.Input((64, 64, 3), name="image")
    keras.Model(inputs, keras.layers.Lambda(lambda x: x[:, 0, 0, :])(inputs)).save(run_dir / "model.keras")
    metrics = json.loads((run_dir / "metrics.json").read_text())  # the run's own model file, as far as it knows
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "model_sha256": file_sha256(run_dir / "model.keras")}))
    result = run_cli("predict", str(run_dir), str(run_dir / "stability.png"))
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and "refused by Keras safe_mode" in lines[0] and "Lambda" in lines[0]


def test_class_imbalance_beyond_the_threshold_is_reported_not_refused(tmp_path):
    from data.discovery import Example, Splits
    from training.config import IMBALANCE_REPORTED, TrainConfig, check_splits

    assert IMBALANCE_REPORTED == 10.0  # the figures below

    def splits(big: int, small: int) -> Splits:
        train = [Example(f"a{i}.jpg", 0) for i in range(big)] + [Example(f"b{i}.jpg", 1) for i in range(small)]
        return Splits(["a", "b"], train, [], [], "none", [])

    cfg = TrainConfig(data_dir=str(tmp_path))
    (note,) = check_splits(cfg, splits(22, 2))
    assert "class imbalance: the largest training class has 11.0x" in note and "'b': 2" in note
    assert check_splits(cfg, splits(20, 2)) == []  # 10x: at the threshold, not beyond it
