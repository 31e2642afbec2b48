"""The user's files are never deleted, overwritten or mixed, and a run reads only its own data.

Each test is one fault a user met (issue 21): `--overwrite` on a dataset or a folder of other
files, a relative --data-dir that names other data from another folder, two runs racing into
one folder, a signal or a full disk mid-run, a damaged model.keras, an output path that is a
run's own file, and CSV cells a spreadsheet would run. Folders are hashed before and after.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, SMALL_MODEL_FLAGS, active_backend, cli_env
from test_bad_inputs import TF_STARTUP_LINES

from cli import cli
from data.demo import make_demo_data
from data.fingerprint import differences, fingerprint
from training.rundir import (
    LOCK_FILE,
    OutputDirError,
    RunDirBusyError,
    checkpoint_state,
    claim_run_dir,
    read_csv_rows,
    reopen_run_dir,
    spreadsheet_safe,
    write_csv,
)

TINY = ["--image-size", "32", "--batch-size", "8", "--weights", "none", "--verbose", "0", *SMALL_MODEL_FLAGS]


def tree_hash(root: Path) -> dict[str, str]:
    """Every file below `root` by relative path: its SHA-256 (a symlink: its target)."""
    return {p.relative_to(root).as_posix(): os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def cli_process(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=cli_env(active_backend()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finished(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def one_line(output: str) -> str:
    """The one line a command said, past tensorflow's own start-up lines (printed by its C++ runtime
    before any setting can hold them back; docs/bad-inputs.md)."""
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(TF_STARTUP_LINES)]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# 1. Deleting only what the project wrote ------------------------------------------------------

@pytest.mark.parametrize("where", ["data", "inside-data", "other-files"])
def test_overwrite_never_removes_a_dataset_or_other_files(demo_dir, tmp_path, where):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    other = tmp_path / "mine"
    (other / "sub").mkdir(parents=True)
    (other / "thesis.txt").write_text("three years of work")
    (other / "sub" / "notes.md").write_text("more")
    out = {"data": data, "inside-data": data / "Training" / "myrun", "other-files": other}[where]
    before = tree_hash(tmp_path)
    result = run_cli("train", "--data-dir", str(data), "--out", str(out), "--overwrite", *TINY)
    assert result.exit_code == 2
    line = one_line(result.output)
    assert {"data": "is the data folder", "inside-data": "lies inside the data folder",
            "other-files": "is not a run of this project (2 entries: sub, thesis.txt)"}[where] in line
    assert tree_hash(tmp_path) == before and not (data / "Training" / "myrun").exists()


def test_overwrite_of_a_run_holding_a_file_of_the_user_removes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run_id": "0123456789abcdef", "options": {}}))
    (run / "model.keras").write_text("the old model")
    (run / "my-notes.txt").write_text("keep me")
    before = tree_hash(tmp_path)
    with pytest.raises(OutputDirError, match=r"holds files this project did not write \(1 entry: my-notes.txt\)"):
        claim_run_dir(run, "torch", overwrite=True)
    assert {k: v for k, v in tree_hash(tmp_path).items() if not k.endswith(LOCK_FILE)} == before


def test_overwrite_removes_exactly_the_files_of_a_run(tmp_path):
    run = tmp_path / "run"
    (run / "export" / "saved_model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"run_id": "0123456789abcdef", "options": {}}))
    for name in ("model.keras", "best.weights.h5", "eval-test-jax.json", ".tmp-last.weights.h5", "export/model.onnx"):
        (run / name).write_text("old")
    assert claim_run_dir(run, "torch", overwrite=True) == run
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]


def test_make_demo_data_refuses_an_existing_dataset(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (data / ".demo-data.json").unlink()  # a real dataset: no marker of make-demo-data
    before = tree_hash(data)
    result = run_cli("make-demo-data", str(data), "--train-per-class", "2", "--test-per-class", "1")
    assert result.exit_code == 2 and "is not empty" in one_line(result.output)
    result = run_cli("make-demo-data", str(data), "--replace")
    assert result.exit_code == 2 and "not a demo dataset made by make-demo-data" in one_line(result.output)
    assert tree_hash(data) == before


# 2. The data a run used, and nothing else ---------------------------------------------------------

def _swapped_copy(data: Path, to: Path) -> Path:
    """`data` copied to `to` with the same count per class but one test image of another class."""
    shutil.copytree(data, to)
    (to / ".demo-data.json").unlink(missing_ok=True)
    glioma, meningioma = (sorted((to / "Testing" / c).iterdir())[0] for c in ("glioma", "meningioma"))
    glioma.write_bytes(meningioma.read_bytes())
    return to


def test_a_relative_data_dir_from_another_folder_never_picks_other_data(trained_run, demo_dir, tmp_path):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / LOCK_FILE).unlink()
    shutil.copytree(demo_dir, here / "demo")
    config = json.loads((run / "config.json").read_text())
    config["options"]["data_dir"], config["data_dir_absolute"] = "demo", str(here / "demo")  # given as relative
    (run / "config.json").write_text(json.dumps(config))
    _swapped_copy(demo_dir, elsewhere / "demo")
    # From the other folder: the recorded absolute path is used, not ./demo.
    code, output = finished(cli_process("evaluate", str(run), cwd=elsewhere))
    assert code == 0 and str(here / "demo") in output, output
    # Its data gone, ./demo is tried and refused: same counts per class, other bytes.
    shutil.rmtree(here / "demo")
    code, output = finished(cli_process("evaluate", str(run), cwd=elsewhere))
    assert code == 2
    assert "is not the data the run" in one_line(output) and "1 file differs, first: Testing/glioma/" in output
    for name in ("model.keras", "metrics.json"):  # an interrupted run: --resume refuses it too
        (run / name).unlink()
    code, output = finished(cli_process("train", "--resume", str(run), cwd=elsewhere))
    assert code == 2 and "1 file differs" in one_line(output)
    assert json.loads((run / "config.json").read_text()) == config


def test_the_fingerprint_names_what_differs(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    recorded = fingerprint(data)
    assert len(recorded) == 4 * (8 + 3) and differences(recorded, fingerprint(data)) is None
    first = sorted(recorded)[0]
    (data / first).write_bytes((data / first).read_bytes() + b"\0")
    (data / sorted(recorded)[1]).unlink()
    shutil.copy(data / sorted(recorded)[2], data / "Training" / "glioma" / "new.jpg")
    assert differences(recorded, fingerprint(data)) == (
        f"1 file differs, 1 missing, 1 not in the run's data, first: {first}")


# 3. One writer per run folder --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("apart", [0.0, 1.5])
def test_two_runs_into_one_folder_one_runs_and_the_other_names_the_holder(demo_dir, tmp_path, apart):
    if apart and active_backend() != "torch":
        pytest.skip("the lock is the same code on every backend: the staggered start runs in the torch pass, "
                    "the simultaneous one in every pass")
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(demo_dir), "--out", str(out), "--epochs", "1", *TINY]
    first = cli_process(*args)
    time.sleep(apart)
    second = cli_process(*args)
    results = sorted([finished(first), finished(second)])
    assert [code for code, _ in results] == [0, 2], results
    line = one_line(results[1][1])
    assert "is in use by another run (pid " in line and "cli.py train" in line
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


def test_a_lock_held_by_a_live_process_refuses_and_a_dead_one_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write(json.dumps({'project': 'brain-mri-keras3', 'pid': os.getpid(), 'started': 'now', 'command': 'x'})); "
        "f.flush(); print('held', flush=True); time.sleep(60)"), str(run / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=f"in use by another run \\(pid {holder.pid}, "):
            reopen_run_dir(run)
    finally:
        holder.kill()
        holder.wait()
    notes: list[str] = []
    reopen_run_dir(run, notes=notes)  # the holder died: its lock is taken over, and said
    assert notes == [f"took over the lock of {run} from pid {holder.pid}, started now: x, which is no longer running"]
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


# 4. Signals and full disks end in one line -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_keeps_the_last_epoch_and_resume_runs_each_epoch_once(demo_dir, tmp_path, signum):
    if signum == signal.SIGINT and active_backend() != "torch":
        pytest.skip("both signals take one handler: SIGTERM stops a run on every backend, SIGINT in the torch pass")
    out = tmp_path / "run"
    process = cli_process("train", "--data-dir", str(demo_dir), "--out", str(out), "--epochs", "3",
                          *TINY, "--batch-size", "4")
    deadline = time.monotonic() + 300
    while not (out / "last.weights.h5").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signum)
    code, output = finished(process)
    assert code == 128 + signum, output
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped by {signal.Signals(signum).name}") and "Traceback" not in output
    done = checkpoint_state(out / "last.weights.h5")["epoch"]
    assert f"the checkpoint of epoch {done} ({out / 'last.weights.h5'}) is kept" in last_line
    assert f"python cli.py train --resume {out}" in last_line
    assert not list(out.glob(".tmp-*"))
    code, output = finished(cli_process("train", "--resume", str(out)))
    assert code == 0, output
    assert [r["epoch"] for r in read_csv_rows(out / "history.csv")] == ["0", "1", "2"]


def test_a_signal_during_a_checkpoint_write_finishes_the_write_then_stops(demo_dir, tmp_path, monkeypatch):
    import keras

    from training.config import TrainConfig
    from training.train import RunInterruptedError, run_training

    save_weights = keras.saving.save_weights

    def signalled_mid_write(model, filepath, *args, **kwargs):
        save_weights(model, filepath, *args, **kwargs)
        if Path(filepath).name == ".tmp-last.weights.h5":  # the temporary file exists, not yet renamed
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(keras.saving, "save_weights", signalled_mid_write)
    out = tmp_path / "run"
    cfg = TrainConfig(data_dir=str(demo_dir), out=str(out), image_size=32, batch_size=8, epochs=2, weights="none",
                      verbose=0)
    with pytest.raises(RunInterruptedError) as stopped:
        run_training(cfg, log=lambda _: None)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "the checkpoint of epoch 1" in str(stopped.value)
    assert checkpoint_state(out / "last.weights.h5")["epoch"] == 1  # written whole
    assert not list(out.glob(".tmp-*")) and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_temporary_file_left_by_a_killed_write_is_removed_and_said(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".tmp-last.weights.h5").write_bytes(b"\0" * 100)
    notes: list[str] = []
    reopen_run_dir(run, notes=notes)
    assert notes == [f"removed 1 temporary file(s) an interrupted write left in {run}: .tmp-last.weights.h5"]
    assert not (run / ".tmp-last.weights.h5").exists()


def test_a_disk_too_full_for_a_checkpoint_stops_in_one_line_before_writing(demo_dir, tmp_path, monkeypatch):
    import training.rundir

    real = shutil.disk_usage

    def nearly_full(path):  # room for the small files, not for a weights file
        usage = real(path)
        return usage._replace(free=10 * 2**20) if str(tmp_path) in str(path) else usage  # a weights file needs 14 MB

    monkeypatch.setattr(training.rundir.shutil, "disk_usage", nearly_full)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(demo_dir), "--out", str(out), "--epochs", "1", *TINY])
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "No space left on device (" in line and "MB free): " in line and "initial.weights.h5" in line
    assert f"start the run again with --out {out} --overwrite" in line and "Traceback" not in result.output
    assert not list(out.glob("*.h5")) and not list(out.glob(".tmp-*"))


# 5. Diagnoses that tell the truth ---------------------------------------------------------------

def test_a_damaged_or_missing_model_file_is_named_and_best_still_works(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model = run / "model.keras"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # cut short
    result = run_cli("evaluate", str(run))
    assert result.exit_code == 2
    line = one_line(result.output)
    assert f"{model} is damaged (" in line and "--checkpoint best uses best.weights.h5" in line
    assert "mixes" not in line and "--overwrite" not in line
    result = run_cli("evaluate", str(run), "--checkpoint", "best")
    assert result.exit_code == 0, result.output
    model.unlink()
    result = run_cli("evaluate", str(run))
    assert result.exit_code == 2
    assert one_line(result.output) == (f"error: {model} is missing (the run finished: metrics.json is there); "
                                       f"--checkpoint best uses best.weights.h5")


@pytest.mark.parametrize("command", ["predict", "report"])
def test_an_output_path_that_is_a_run_file_or_inside_the_data_is_refused(trained_run, demo_dir, command):
    before = tree_hash(trained_run), tree_hash(demo_dir)
    image = str(next((demo_dir / "Testing" / "glioma").iterdir()))
    for target, said in ((trained_run / "config.json", "is inside the run folder"),
                         (demo_dir / "Testing" / "out.csv", "lies inside the data folder")):
        args = ["predict", str(trained_run), image, "--csv", str(target)] if command == "predict" else \
            ["report", str(trained_run), "--out", str(target)]
        result = run_cli(*args)
        assert result.exit_code == 2 and said in one_line(result.output)
    assert (tree_hash(trained_run), tree_hash(demo_dir)) == before


# 6. Output that cannot attack its reader --------------------------------------------------------

FORMULAS = ["=cmd|' -C calc'!A0.jpg", "+SUM(1+1).jpg", "@HYPERLINK(x).jpg", "-2+3.jpg"]


def test_predict_csv_neutralises_formula_file_names(trained_run, demo_dir, tmp_path, monkeypatch):
    source = next((demo_dir / "Testing" / "glioma").iterdir())
    for name in FORMULAS:
        shutil.copy(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)  # `predict RUN *.jpg`: each file name starts its cell
    result = run_cli("predict", "--csv", "p.csv", str(trained_run), "--", *FORMULAS)
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert not [c for row in rows for c in row if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert [row[0] for row in rows[1:]] == [f"'{name}" for name in FORMULAS]


def test_write_csv_neutralises_text_keeps_numbers_and_reads_back_exactly(tmp_path):
    texts = [*FORMULAS, "'=already quoted", "\tTAB", "plain.jpg", "-x"]
    rows = [{"path": t, "class": "=evil", "loss": -0.25, "text_number": "-1.5e-3"} for t in texts]
    write_csv(tmp_path / "t.csv", rows)
    with open(tmp_path / "t.csv", newline="") as f:
        raw = list(csv.DictReader(f))
    assert [r["path"] for r in raw] == [spreadsheet_safe(t) for t in texts]
    assert all(r["path"].startswith("'") for r in raw if r["path"] != "plain.jpg")
    assert {r["class"] for r in raw} == {"'=evil"} and {r["loss"] for r in raw} == {"-0.25"}
    assert {r["text_number"] for r in raw} == {"-1.5e-3"}  # a number, not a formula
    back = read_csv_rows(tmp_path / "t.csv")
    assert [r["path"] for r in back] == texts and {r["class"] for r in back} == {"=evil"}


def test_make_demo_data_into_a_new_folder_still_works(tmp_path):
    assert make_demo_data(tmp_path / "new", train_per_class=1, test_per_class=1) == {"Training": 4, "Testing": 4}
