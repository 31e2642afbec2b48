"""Resume that loses nothing: a training process stopped by SIGTERM once its first epoch is
checkpointed, then resumed, ends with the same weights, bit for bit, as one that was never
interrupted (CPU, --deterministic), with every epoch in history.csv exactly once. Two runs that
agree bit for bit also show that deterministic mode is deterministic."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import keras
import pytest

from data.demo import make_demo_data
from studies.compare import _resumable, train_args
from tests.conftest import ROOT, SMALL_MODEL_FLAGS, active_backend, cli_env
from tests.test_cli import run_cli
from tests.test_compare import cli, final_weights, h5_arrays
from training.rundir import atomic_write, checkpoint_state


def _train_args(demo_dir, command: str = "train") -> list[str]:
    args = [command, "--data-dir", str(demo_dir), "--image-size", "32", "--batch-size", "4", "--weights", "none",
            "--workers", "2", "--val-split", "0", "--deterministic", "--keep-checkpoints", "all", "--verbose", "0"]
    if command == "hybrid":  # its own defaults but the smallest cut and head
        return [*args, "--head-epochs", "1", "--finetune-epochs", "1", "--cut", "conv3", "--head-blocks", "1",
                "--head-filters", "16"]
    return [*args, "--epochs", "2", *SMALL_MODEL_FLAGS]


# The child sends itself SIGTERM at a known step, so no timing decides where it stops: when
# the first checkpoint is put in place (the audit event of `atomic_write`'s os.replace onto
# last.weights.h5: `training.rundir`). The run then stops at its next safe point, the end of
# that epoch (`training.callbacks.SignalStop`), and exits 128 + SIGTERM.
STOP_AT_FIRST_CHECKPOINT = """
import runpy, signal, sys

def stop_at_first_checkpoint(event, args):
    if event == "os.rename" and str(args[1]).endswith("last.weights.h5") and not sent:
        sent.append(True)
        signal.raise_signal(signal.SIGTERM)

sent = []
sys.addaudithook(stop_at_first_checkpoint)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _stop_after_first_epoch(args: list[str], run_dir) -> int:
    """Runs `cli.py ARGS --out RUN_DIR` until its first checkpoint makes it SIGTERM itself;
    returns the epoch of the checkpoint it kept."""
    done = subprocess.run([sys.executable, "-c", STOP_AT_FIRST_CHECKPOINT, str(ROOT / "cli.py"), *args,
                           "--out", str(run_dir)], env=cli_env(active_backend()), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("stopped by SIGTERM: the checkpoint of epoch 1") and f"--resume {run_dir}" in message
    return checkpoint_state(run_dir / "last.weights.h5")["epoch"]


def _history(run_dir) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "hybrid", "train --precise-bn 2"])
def test_a_stopped_run_resumes_to_the_same_weights_bit_for_bit(command, demo_dir, tmp_path):
    """With --precise-bn, model.keras's moving statistics are the recomputed ones: a resumed run's
    callback recomputes only the epochs after the resume, the last as the uninterrupted run did."""
    if command != "train" and active_backend() != "torch":
        pytest.skip("the two-phase and the precise-BN resume run once, in the torch pass")
    args = _train_args(demo_dir, command.split()[0]) + command.split()[1:]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    result = cli(*args, "--out", str(whole))
    assert result.returncode == 0, result.stderr[-3000:]

    kept = _stop_after_first_epoch(args, cut)
    assert kept == 1 and not (cut / "metrics.json").exists()
    result = cli(*args, "--out", str(cut), "--resume", str(cut))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed after epoch 1" in result.stdout

    # model.keras: the model's weights; last.weights.h5: those and Adam's moments and step count.
    model_tensors = len(final_weights(whole))
    for first, second, at_least in ((final_weights(whole), final_weights(cut), 100),
                                    (h5_arrays(whole / "last.weights.h5"), h5_arrays(cut / "last.weights.h5"),
                                     model_tensors + 20)):
        assert first.keys() == second.keys() and len(first) > at_least
        different = [k for k in first if not (first[k] == second[k]).all()]
        assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"
    rows, reference = _history(cut), _history(whole)
    assert [r["epoch"] for r in rows] == ["0", "1"]  # every epoch exactly once
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    config = json.loads((cut / "config.json").read_text())
    assert [r["after_epoch"] for r in config["resumed"]] == [1]
    metrics = json.loads((cut / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["precise_bn"] == json.loads((whole / "metrics.json").read_text())["precise_bn"]
    with open(cut / "stability.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_atomic_write_keeps_the_old_file_whole_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(OSError), atomic_write(path) as tmp:
        tmp.write_text("half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.endswith(".json")
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_full_disk_stops_the_run_with_its_checkpoint_intact_and_resume_finishes_it(tmp_path, monkeypatch):
    make_demo_data(tmp_path / "data", train_per_class=3, test_per_class=1)
    run_dir = tmp_path / "run"
    args = ["train", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--batch-size", "4",
            "--weights", "none", "--val-split", "0", "--epochs", "2", "--verbose", "0", "--out", str(run_dir),
            *SMALL_MODEL_FLAGS]
    save_weights = keras.saving.save_weights  # what every checkpoint goes through
    checkpoints = []

    def disk_full_at_the_second_checkpoint(model, filepath, *a, **kw):
        name = os.path.basename(filepath)
        if name.startswith(".") and name.endswith("last.weights.h5"):  # the checkpoint's temporary file
            checkpoints.append(filepath)
            if len(checkpoints) == 2:
                with open(filepath, "wb") as f:  # what a full disk leaves: part of a file
                    f.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))
        return save_weights(model, filepath, *a, **kw)

    monkeypatch.setattr(keras.saving, "save_weights", disk_full_at_the_second_checkpoint)
    result = run_cli(*args)
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert "No space left on device" in message and "epoch 1" in message and f"--resume {run_dir}" in message
    assert "Traceback" not in result.output
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")) == []  # no partial file left
    assert checkpoint_state(run_dir / "last.weights.h5")["epoch"] == 1
    assert not (run_dir / "model.keras").exists() and not (run_dir / "metrics.json").exists()

    monkeypatch.undo()
    result = run_cli(*args[:-2], "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in _history(run_dir)] == ["0", "1"]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
    assert keras.saving.load_model(run_dir / "model.keras").count_params() > 1_000_000  # the whole (small) model


def test_a_run_stopped_after_its_last_epoch_resumes_to_the_end_and_restores_a_missing_best(trained_run, tmp_path):
    """The disk filled after the last checkpoint: while copying it to best.weights.h5, or
    while writing model.keras or metrics.json. Resuming trains nothing and finishes the run."""
    import h5py

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    for name in ("best.weights.h5", "model.keras", "metrics.json"):
        (run_dir / name).unlink()
    with h5py.File(run_dir / "last.weights.h5", "a") as f:  # epoch 2 was the best one
        state = json.loads(f.attrs["training_state"])
        f.attrs["training_state"] = json.dumps({**state, "best_epoch": 2})
    history = (run_dir / "history.csv").read_text()

    result = run_cli("train", "--resume", str(run_dir))  # its data: where the run found it
    assert result.exit_code == 0, result.output
    assert (run_dir / "best.weights.h5").read_bytes() == (run_dir / "last.weights.h5").read_bytes()
    assert (run_dir / "history.csv").read_text() == history  # no epoch trained again
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["best"]["epoch"] == 2
    assert metrics["test"] == metrics["best"]["test"]
    assert keras.saving.load_model(run_dir / "model.keras").count_params() > 100_000


def test_resume_says_what_it_cannot_do(trained_run, tmp_path):
    result = run_cli("train", "--data-dir", str(tmp_path), "--resume", str(trained_run))
    assert result.exit_code == 0 and "finished already" in result.output
    (tmp_path / "config.json").write_text((trained_run / "config.json").read_text())
    result = run_cli("train", "--data-dir", str(tmp_path), "--resume", str(tmp_path))
    assert result.exit_code == 2 and "no epoch finished there" in result.output
    result = run_cli("train", "--data-dir", str(tmp_path), "--resume", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "not a run directory" in result.output
    moved = tmp_path / "other-backend"
    shutil.copytree(trained_run, moved)
    (moved / "metrics.json").unlink()
    config = json.loads((moved / "config.json").read_text())
    config["environment"]["backend"] = next(b for b in ("torch", "jax") if b != active_backend())
    (moved / "config.json").write_text(json.dumps(config))
    result = run_cli("train", "--data-dir", str(tmp_path), "--resume", str(moved))
    assert result.exit_code == 2 and f"resume it with KERAS_BACKEND={config['environment']['backend']}" in result.output


def test_compare_resumes_an_interrupted_backend_and_restarts_one_without_a_checkpoint(trained_run, tmp_path):
    assert _resumable(trained_run)  # a checkpoint with its training state
    (tmp_path / "last.weights.h5").write_bytes(b"cut short")
    assert not _resumable(tmp_path) and not _resumable(tmp_path / "nowhere")
    args = train_args(tmp_path / "child.json", trained_run, resume=True)
    assert args[-2:] == ["--resume", str(trained_run)] and args[args.index("--out") + 1] == str(trained_run)
