"""A run directory holds one run: a new run refuses another's folder (or replaces it with
--overwrite), a folder mixed from two runs is refused, and a run moves with its data."""

import json
import shutil

import pytest
from click.testing import CliRunner

from cli import cli
from tests.conftest import SMALL_MODEL_FLAGS
from training.rundir import check_run_files


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_new_run_refuses_a_folder_that_holds_files_and_overwrite_empties_it_first(demo_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # what a finished run leaves, but no sign that it is one
    args = ["train", "--data-dir", str(demo_dir), "--weights", "none", "--out", str(out)]
    result = run_cli(*args)
    assert result.exit_code == 2
    assert error_line(result) == (f"error: {out} is not empty and is not a run of this project (1 entry: "
                                  f"metrics.json); choose another --out (nothing was changed)")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # untouched
    (out / "config.json").write_text(json.dumps({"run_id": "0123456789abcdef", "options": {}}))  # a run of ours
    result = run_cli(*args)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"error: {out} is not empty") and f"--resume {out}" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "metrics.json"]  # only its lock added


@pytest.mark.slow
def test_overwrite_replaces_the_old_run_whole(demo_dir, tmp_path):
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"run_id": "0123456789abcdef", "options": {}}))  # a run of ours
    for name in ("metrics.json", "last.weights.h5", "eval-test-torch.json", "export/model.onnx"):
        (out / name).write_text("from the run before")
    result = run_cli("train", "--data-dir", str(demo_dir), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                     "--weights", "none", "--out", str(out), "--overwrite", "--verbose", "0", *SMALL_MODEL_FLAGS)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "config.json", "history.csv", "initial.weights.h5", "model.keras", "best.weights.h5", ".lock",
        "metrics.json", "skipped.txt", "stability.csv", "stability.png", "test_predictions.csv", "data-fingerprint.tsv",
    }
    check_run_files(out)
    assert json.loads((out / "metrics.json").read_text())["run_id"] == json.loads((out / "config.json").read_text())["run_id"]


def test_files_of_two_runs_in_one_folder_are_refused(trained_run, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(trained_run, mixed)
    check_run_files(mixed)  # one run: fine
    metrics = json.loads((mixed / "metrics.json").read_text())
    (mixed / "metrics.json").write_text(json.dumps({**metrics, "run_id": "0123456789abcdef"}))
    for args in (["evaluate", str(mixed)], ["train", "--resume", str(mixed)]):
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert "mixes files of different runs: metrics.json does not belong" in error_line(result)
    (mixed / "metrics.json").write_text(json.dumps(metrics))
    (mixed / "model.keras").write_bytes((mixed / "model.keras").read_bytes() + b"\0")  # another model file
    result = run_cli("evaluate", str(mixed))
    assert result.exit_code == 2 and "model.keras does not belong" in error_line(result)


def _moved(trained_run, tmp_path, demo_dir):
    """The run and its data in new places; the paths the run recorded lead nowhere."""
    run_dir, data = tmp_path / "run", tmp_path / "data-moved"
    shutil.copytree(trained_run, run_dir)
    shutil.copytree(demo_dir, data)
    config = json.loads((run_dir / "config.json").read_text())
    config["options"]["data_dir"] = "relative/to/where/it/started"
    config["data_dir_absolute"] = str(tmp_path / "gone")
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir, data


def test_evaluate_finds_moved_data_by_data_dir_and_checks_it_is_the_same(trained_run, tmp_path, demo_dir):
    run_dir, data = _moved(trained_run, tmp_path, demo_dir)
    result = run_cli("evaluate", str(run_dir))
    assert result.exit_code == 2 and "gone" in error_line(result)
    result = run_cli("evaluate", str(run_dir), "--data-dir", str(data))
    assert result.exit_code == 0, result.output
    next((data / "Testing" / "glioma").iterdir()).unlink()  # not the run's data any more
    result = run_cli("evaluate", str(run_dir), "--data-dir", str(data))
    line = error_line(result)
    assert result.exit_code == 2 and f"is not the data the run in {run_dir} used: 1 missing, first: Testing/glioma/" in line


def test_evaluate_uses_the_absolute_data_path_when_the_relative_one_leads_nowhere(trained_run, tmp_path, demo_dir):
    run_dir, _ = _moved(trained_run, tmp_path, demo_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["data_dir_absolute"] = str(demo_dir)
    (run_dir / "config.json").write_text(json.dumps(config))
    result = run_cli("evaluate", str(run_dir))
    assert result.exit_code == 0, result.output


def test_resume_takes_the_data_from_its_new_place(trained_run, tmp_path, demo_dir):
    run_dir, data = _moved(trained_run, tmp_path, demo_dir)
    for name in ("model.keras", "metrics.json"):  # stopped after its last checkpoint
        (run_dir / name).unlink()
    result = run_cli("train", "--resume", str(run_dir), "--data-dir", str(data))
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
