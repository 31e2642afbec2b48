"""`compare` and `--deterministic`: the summary arithmetic, a real grid, bit-identical reruns."""

import io
import json
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from checksums import file_sha256
from studies.compare import (
    FACTORS,
    Run,
    child_options,
    epoch_divergence,
    main_effects,
    plan_runs,
    seed_spread,
    summarise,
    train_args,
    unshared_starts,
)
from tests.conftest import ROOT, active_backend, cli_env
from tests.test_cli import error_lines, go_offline, run_cli


def fake_result(backend: str, preprocess: str, seed: int, test_accuracy: float, val_acc: list[float]) -> dict:
    row = dict.fromkeys(
        ["Train Loss", "Train Accuracy", "Val Accuracy", "Test Loss", "Test macro-F1",
         "Seconds per epoch", "Training img/s", "Peak memory (MiB)", "Lowest grad norm ratio"], 1.0)
    row["Grad norm ratio (min/max)"] = 0.00123 if backend == "torch" else None
    row["Test Accuracy"] = test_accuracy
    return {
        "backend": backend, "cell": f"preprocess={preprocess}", "levels": (("preprocess", preprocess),),
        "seed": seed, "row": row,
        "history": {"accuracy": val_acc, "val_accuracy": val_acc, "loss": [1.0] * len(val_acc),
                    "val_loss": [2 - a for a in val_acc]},
    }


def test_plan_runs_is_the_full_grid_with_backends_innermost():
    runs = plan_runs(("torch", "jax"), {"preprocess": ["caffe", "imagenet"], "augment": ["none", "standard"]}, [0, 1])
    assert len(runs) == 2 * 2 * 2 * 2
    assert [r.backend for r in runs[:2]] == ["torch", "jax"]
    assert runs[0].levels == (("preprocess", "caffe"), ("augment", "none"))
    assert len({r.dirname for r in runs}) == len(runs)
    assert runs[0].dirname == "caffe-none-seed0/torch"
    assert plan_runs(("jax",), {}, [2])[0].dirname == "seed2/jax"


def test_precise_bn_levels_make_a_grid_whose_runs_train_with_them(demo_dir, tmp_path, monkeypatch):
    """`compare --precise-bn 0,3`: a factor like the others, each run's options carry its level and
    its folder says which (`precise-bn3`, not a bare `3`)."""
    import studies.compare

    asked = {}

    def fake_run_compare(fixed, backends, grid, seeds, out_dir, classes, log):
        asked.update(fixed=fixed, grid=grid)
        return {"markdown": "", "failures": []}

    monkeypatch.setattr(studies.compare, "run_compare", fake_run_compare)
    result = run_cli("compare", "--data-dir", str(demo_dir), "--precise-bn", "0,3", "--weights", "none", "--backends", "torch",
                     "--out", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    assert asked["grid"] == {"precise_bn": [0, 3]}
    runs = plan_runs(("torch",), asked["grid"], [0])
    assert [r.dirname for r in runs] == ["precise-bn0-seed0/torch", "precise-bn3-seed0/torch"]
    options = child_options(asked["fixed"], runs[1], tmp_path / "init.weights.h5")
    assert options["precise_bn"] == 3 and options["seed"] == 0


def test_a_child_run_gets_its_cell_seed_and_weights_file_through_a_config_file(tmp_path):
    run = Run("jax", (("preprocess", "imagenet"),), seed=3)
    options = {"data_dir": "d", "preprocess": "caffe", "learning_rate": 5e-4, "cache": False,
               "crop_scale": (0.5, 1.0), "init_weights": None, "deterministic": True}
    child = child_options(options, run, tmp_path / "w.weights.h5")
    assert child["preprocess"] == "imagenet" and child["seed"] == 3 and child["deterministic"] is True
    assert child["init_weights"] == str(tmp_path / "w.weights.h5") and options["preprocess"] == "caffe"
    args = train_args(tmp_path / "child.json", tmp_path / "out")
    assert args == ["--config", str(tmp_path / "child.json"), "--out", str(tmp_path / "out")]
    assert train_args(tmp_path / "child.json", tmp_path / "out", resume=True)[-2:] == ["--resume", str(tmp_path / "out")]


def test_runs_of_a_cell_that_started_from_different_files_are_reported():
    same = [{"cell": "preprocess=caffe", "seed": 0, "start_sha256": "a"}, {"cell": "preprocess=caffe", "seed": 0, "start_sha256": "a"},
            {"cell": "preprocess=caffe", "seed": 1, "start_sha256": "b"}]
    assert unshared_starts(same) == []
    mixed = [*same, {"cell": "preprocess=caffe", "seed": 1, "start_sha256": "c"}]
    (problem,) = unshared_starts(mixed)
    assert problem["run"] == "preprocess=caffe seed 1" and "SHA-256 b, c" in problem["reason"]


def test_main_effects_average_over_the_other_axes():
    results = [
        fake_result("torch", "caffe", 0, 0.90, [0.5]), fake_result("jax", "caffe", 0, 0.80, [0.5]),
        fake_result("torch", "imagenet", 0, 0.70, [0.5]), fake_result("jax", "imagenet", 0, 0.60, [0.5]),
    ]
    effects = {e["factor"]: e for e in main_effects(results, {"preprocess": ["caffe", "imagenet"]}, "Test Accuracy")}
    assert effects["preprocess"]["level_means"] == pytest.approx({"caffe": 0.85, "imagenet": 0.65})
    assert effects["preprocess"]["effect"] == pytest.approx(0.20)
    assert effects["backend"]["level_means"] == pytest.approx({"torch": 0.80, "jax": 0.70})
    assert effects["backend"]["effect"] == pytest.approx(0.10)


def test_seed_spread_and_divergence():
    results = [
        fake_result("torch", "caffe", 0, 0.90, [0.5, 0.7]), fake_result("jax", "caffe", 0, 0.80, [0.6, 0.7]),
        fake_result("torch", "caffe", 1, 0.70, [0.5, 0.9]), fake_result("jax", "caffe", 1, 0.80, [0.5, 0.6]),
    ]
    # std over seeds: torch [0.9, 0.7] -> 0.1414, jax [0.8, 0.8] -> 0
    assert seed_spread(results, "Test Accuracy") == pytest.approx((0.1414214 + 0.0) / 2, rel=1e-5)
    divergence = epoch_divergence(results)
    assert [round(d["max val_accuracy diff"], 6) for d in divergence] == [0.1, 0.3]
    assert [round(d["max val_loss diff"], 6) for d in divergence] == [0.1, 0.3]


def test_summary_markdown_holds_a_table_per_cell_and_the_effects():
    results = [fake_result(b, p, 0, acc, [0.5]) for b, p, acc in
               [("torch", "caffe", 0.9), ("jax", "caffe", 0.8), ("torch", "imagenet", 0.7), ("jax", "imagenet", 0.6)]]
    text, summary = summarise(results, ("torch", "jax"), {"preprocess": ["caffe", "imagenet"]}, "cli.py compare")
    assert text.count("| Metric | torch | jax |") == 2
    assert "| Test Accuracy | 0.9000 | 0.8000 |" in text
    assert "| Grad norm ratio (min/max) | 1.2e-03 | - |" in text
    assert "| preprocess | caffe: 0.8500, imagenet: 0.6500 | 0.2000 |" in text
    assert summary["target"] == "Test Accuracy"


def cli(*args: str, backend: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(backend or active_backend()), cwd=ROOT)


def h5_arrays(file) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(file, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def final_weights(run_dir) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(run_dir / "model.keras") as archive:
        return h5_arrays(io.BytesIO(archive.read("model.weights.h5")))


@pytest.mark.slow
# In the torch pass: the tensorflow pass ends last (2026-12-04: torch 23:43, jax 24:43, tensorflow 25:56).
@pytest.mark.skipif(active_backend() != "torch", reason="spawns two backends; runs once, in the torch pass")
def test_compare_grid_writes_the_summary_and_reuses_finished_runs(demo_dir, tmp_path):
    out = tmp_path / "compare"
    args = ["compare", "--data-dir", str(demo_dir), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
            "--weights", "none", "--model", "resnet50,hybrid", "--cut", "conv3", "--head-blocks", "1", "--head-filters", "16",
            "--backends", "torch,tensorflow",
            "--out", str(out), "--verbose", "0"]
    result = cli(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert len(report["runs"]) == 4 and not report["failures"]
    assert {r["cell"] for r in report["runs"]} == {"model=resnet50", "model=hybrid"}
    effects = {e["factor"]: e for e in report["summary"]["main_effects"]}
    assert set(effects) == {"backend", "model"}
    md = (out / "compare.md").read_text()
    assert md.count("| Metric | torch | tensorflow |") == 2 and "Peak memory (MiB)" in md
    assert "Grad norm ratio (min/max)" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every backend started from its model's one weights file, loaded bit for bit.
    for model in ("resnet50", "hybrid"):
        runs = [r for r in report["runs"] if r["cell"] == f"model={model}"]
        configs = [json.loads((ROOT / r["run_dir"] / "config.json").read_text()) for r in runs]
        assert {c["options"]["model"] for c in configs} == {model}
        (start,) = {c["options"]["init_weights"] for c in configs}  # one file, recorded, not copied
        assert not any((ROOT / r["run_dir"] / "initial.weights.h5").exists() for r in runs)
        assert {c["starting_weights"]["initial"]["sha256"] for c in configs} == {file_sha256(start)}
        assert {r["start_sha256"] for r in runs} == {file_sha256(start)}
        starts = [h5_arrays(start)]
        assert {c["environment"]["backend"] for c in configs} == {"torch", "tensorflow"}
    assert any(a.shape == (3, 3, 512, 16) for a in starts[0].values())  # the hybrid's head conv, after conv3

    result = cli("report", str(out), "--gradcam-samples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    page = (out / "report.html").read_text()
    assert "<h1>Compare report: compare</h1>" in page and page.count("test, final weights</figcaption>") == 4

    again = cli(*args)  # Interrupted or finished: a rerun reuses the finished runs.
    assert again.returncode == 0
    assert again.stdout.count("done earlier, reusing") == 4


def test_factor_levels_are_checked_before_anything_runs(demo_dir, tmp_path):
    result = cli("compare", "--data-dir", str(demo_dir), "--preprocess", "caffe,bgr", "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "'bgr' is not one of" in result.stderr
    assert not (tmp_path / "c").exists()
    result = cli("compare", "--data-dir", str(demo_dir), "--model", "resnet50,vgg", "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "'vgg' is not one of" in result.stderr
    assert set(FACTORS) == {"model", "preprocess", "augment", "weights", "precision", "precise_bn"}
    result = cli("compare", "--data-dir", str(demo_dir), "--precise-bn", "0,-1", "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "-1 is not in the range x>=0" in result.stderr
    result = cli("compare", "--data-dir", str(demo_dir), "--precision", "float32,float8", "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "'float8' is not one of" in result.stderr
    result = cli("compare", "--data-dir", str(demo_dir), "--model", "resnet50,hybrid", "--unfreeze-blocks", "14", "--weights", "none",
                 "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "the hybrid backbone cut at conv4 has 13 residual blocks" in result.stderr
    assert not (tmp_path / "c").exists()


def test_offline_imagenet_level_stops_compare_before_any_run(demo_dir, tmp_path, monkeypatch):
    tried = go_offline(monkeypatch)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))  # nothing cached
    result = run_cli("compare", "--data-dir", str(demo_dir), "--weights", "none,imagenet", "--out", str(tmp_path / "c"))
    assert result.exit_code == 2 and tried, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in lines[0]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_a_study_stops_its_running_child_first_then_the_study(monkeypatch, tmp_path, signal_name):
    """`kill` or Ctrl-C on compare or reproduce: the training child gets the signal once (it runs in
    a session of its own, so a signal to the group does not reach it twice and skip its safe point),
    the study waits for it to stop, then stops; before, a killed study's child trained on alone."""
    import os
    import signal
    import threading

    from studies import processes

    log = tmp_path / "child.log"
    child = ("import signal, sys, time\n"
             f"def stop(signum, frame):\n    open({str(log)!r}, 'a').write(f'stopping on {{signum}}\\n'); sys.exit(7)\n"
             "signal.signal(signal.SIGTERM, stop); signal.signal(signal.SIGINT, stop)\n"
             f"open({str(log)!r}, 'a').write('ready\\n')\n"
             "time.sleep(60)\n")
    monkeypatch.setattr(processes, "command", lambda task, *args: [sys.executable, "-c", child])
    signum = getattr(signal, signal_name)

    def signal_when_ready():
        for _ in range(200):
            if log.exists():
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threading.Thread(target=signal_when_ready, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        processes.in_process("torch", "train")
    assert stopped.value.code == 7  # the child's own exit code, after its handler ran
    assert log.read_text() == f"ready\nstopping on {int(signum)}\n"  # once
    assert {s: signal.getsignal(s) for s in before} == before  # this process's own handlers are back
