"""`reproduce`: the path from seed-keras to seed-pytorch, its statistics, and a small real run."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studies.compare import backend_effects, paired_comparison
from studies.reproduce import (
    BASELINE,
    FACTOR_STEPS,
    TARGET,
    decompose,
    format_report,
    plan_runs,
    plan_steps,
    plot_waterfall,
    step_options,
)
from tests.conftest import ROOT, active_backend, cli_env
from training.config import TrainConfig
from training.recipes import recipe_options
from training.rundir import PREDICTIONS_FILE, write_csv


def test_the_steps_change_every_option_in_which_the_two_recipes_differ_and_end_at_the_target():
    baseline, target = recipe_options(BASELINE), recipe_options(TARGET)
    differing = {k for k in baseline.keys() | target.keys() if baseline.get(k) != target.get(k)}
    covered = {k for _, keys in FACTOR_STEPS for k in keys}
    assert differing <= covered, f"options the recipes differ in but no step changes: {differing - covered}"
    steps = plan_steps({})
    assert [s.name for s in steps] == [BASELINE, *(name for name, _ in FACTOR_STEPS)]
    assert steps[0].changes == ()
    last = {**baseline, **dict(steps[-1].changes)}
    target["decode_size"] = TrainConfig(data_dir="d", **target).decode_size  # "torchvision", in pixels: 256
    assert {k: last[k] for k in differing} == {k: target[k] for k in differing}
    # Each step keeps the changes of the ones before it and adds its own.
    for before, after in itertools.pairwise(steps):
        assert set(before.changes) < set(after.changes)


def test_options_the_user_gives_hold_on_every_step():
    fixed = {"weights": "none", "bn_momentum": 0.9, "image_size": 64}
    steps = plan_steps(fixed)
    assert "bn-momentum" not in [s.name for s in steps]  # nothing left to change
    assert all(dict(s.changes).get("weights", "none") == "none" for s in steps)
    assert dict(steps[-1].changes)["arch"] == recipe_options(TARGET)["arch"]
    shared = step_options({"epochs": 10, "weights": "imagenet", "image_size": 224}, fixed)
    assert shared["weights"] == "none" and shared["image_size"] == 64 and shared["recipe"] == BASELINE
    runs = plan_runs(steps, ("torch", "jax"), [0, 1])
    assert len(runs) == len(steps) * 4 and runs[0].dirname == f"{BASELINE}-seed0/torch"
    assert len({r.dirname for r in runs}) == len(runs)


def _result(tmp_path, step: str, backend: str, seed: int, correct: np.ndarray) -> dict:
    run_dir = tmp_path / f"{step}-{seed}-{backend}"
    run_dir.mkdir()
    write_csv(run_dir / PREDICTIONS_FILE, [{"path": f"{i}.jpg", "label": 1, "final": 1 if ok else 0, "best": 1,
                                            "twin_in_training": 0} for i, ok in enumerate(correct)])
    return {"cell": step, "backend": backend, "seed": seed, "run_dir": str(run_dir),
            "row": {"Test Accuracy": float(np.mean(correct))}}


def test_two_seeds_give_paired_intervals_and_one_seed_a_test_on_the_images(tmp_path):
    rng = np.random.default_rng(0)
    steps = plan_steps({"weights": "none"})[:2]
    results = []
    for seed in (0, 1, 2):
        base = rng.random(400) < 0.80 + 0.02 * seed  # seed noise shared by every cell of that seed
        better = base | (rng.random(400) < 0.5)       # the second step fixes half of the errors
        for backend in ("torch", "jax"):
            results += [_result(tmp_path, steps[0].name, backend, seed, base),
                        _result(tmp_path, steps[1].name, backend, seed, better)]
    rows = decompose(results, steps, ("torch", "jax"))["rows"]
    step_row = next(r for r in rows if r["step"] == steps[1].name and r["backend"] == "torch")
    effect = step_row["step_effect"]["interval"]
    assert step_row["step_effect"]["basis"] == "seeds" and effect.n == 3
    assert effect.excludes_zero and effect.mean > 0.05
    framework = next(r for r in rows if r["backend"] == "jax" and r["step"] == steps[1].name)["framework_effect"]
    assert framework["interval"].mean == 0.0  # identical predictions on both backends
    # The report and the chart, from these intervals.
    text = format_report({"rows": rows}, steps, ("torch", "jax"), [0, 1, 2], "reproduce ...", [])
    assert f"{steps[1].name} higher by" in text and "not distinguishable from seed-to-seed noise" in text
    plot_waterfall({"rows": rows}, steps, ("torch", "jax"), tmp_path / "waterfall.png")
    assert (tmp_path / "waterfall.png").stat().st_size > 10_000
    # One seed: McNemar and a bootstrap over the 400 test images.
    single = paired_comparison([r for r in results if r["seed"] == 0 and r["cell"] == steps[1].name][:1],
                               [r for r in results if r["seed"] == 0 and r["cell"] == steps[0].name][:1])
    assert single["basis"] == "test images" and single["mcnemar"]["p_value"] < 1e-6
    assert single["mcnemar"]["b10"] > 0 and single["mcnemar"]["b01"] == 0


def test_compare_reports_the_backend_effect_with_a_verdict(tmp_path):
    rng = np.random.default_rng(1)
    results = []
    for seed in (0, 1, 2):
        base = rng.random(300) < 0.85
        results += [_result(tmp_path, "", "torch", seed, base), _result(tmp_path, "", "jax", seed, base)]
    summary = {}
    lines = backend_effects(results, ("torch", "jax"), "Test Accuracy", summary)
    text = "\n".join(lines)
    assert "jax - torch" in text and "0.0 [0.0, 0.0]" in text
    assert summary["backend_effects"]["baseline: jax - torch"]["interval"]["n"] == 3


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="one subprocess per step; runs once, in the torch pass")
def test_reproduce_runs_every_step_offline_and_writes_its_report(demo_dir, tmp_path):
    """The command end to end on the demo data: one backend, one seed, 32 px, one epoch; the
    BatchNorm momentum and Adam's epsilon fixed, so four steps run (what the others change is
    checked by the planning tests above)."""
    backend = active_backend()
    out = tmp_path / "rep"
    fixed = {"weights": "none", "image_size": 32, "epochs": 1, "bn_momentum": 0.9, "adam_epsilon": 1e-8}
    command = [sys.executable, str(ROOT / "cli.py"), "reproduce", "--data-dir", str(demo_dir), "--image-size", "32",
               "--epochs", "1", "--weights", "none", "--batch-size", "8", "--bn-momentum", "0.9", "--adam-epsilon",
               "1e-8", "--seeds", "0", "--backends", backend, "--verbose", "0", "--out", str(out)]
    result = subprocess.run(command, env=cli_env(backend), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "reproduce.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert names == [s.name for s in plan_steps(fixed)] == [BASELINE, "preprocess", "augment", "checkpoint"]
    assert len(report["runs"]) == len(names) and not report["failures"]
    for run in report["runs"]:
        config = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        step = next(s for s in report["steps"] if s["name"] == run["cell"])
        for key, value in {**recipe_options(BASELINE), **fixed, "batch_size": 8, **step["changes"]}.items():
            assert config["options"][key] == value, (run["cell"], key)
    text = (out / "reproduce.md").read_text()
    assert "McNemar p=" in text and (out / "waterfall.png").stat().st_size > 10_000
    # Finished runs are reused: a second call trains nothing.
    again = subprocess.run(command, env=cli_env(backend), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.count("done earlier, reusing") == len(names)


def test_reproduce_without_a_test_set_is_one_line_before_any_run(tmp_path):
    from click.testing import CliRunner

    import cli
    from tests.conftest import make_layout

    data = make_layout(tmp_path / "data", {"Training": {"a": 4, "b": 4}})
    result = CliRunner().invoke(cli.cli, ["reproduce", "--data-dir", str(data), "--weights", "none",
                                          "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2 and "--test-split" in result.output
    assert not (tmp_path / "rep").exists()


def test_an_accuracy_interval_stays_within_0_and_100_percent(tmp_path):
    """Two seeds far apart: the t interval (t = 12.7) reaches below 0; reported, it stops at 0."""
    steps = plan_steps({"weights": "none"})[:1]
    results = [_result(tmp_path, steps[0].name, "torch", seed, np.arange(400) < n) for seed, n in ((0, 100), (1, 130))]
    (row,) = decompose(results, steps, ("torch",))["rows"]
    assert row["accuracy"].low == 0.0 and row["accuracy"].high == pytest.approx(0.2875 + 12.7062 * 0.0375, abs=1e-3)  # s.e. 0.0375


def test_the_other_readings_of_the_keras_text_are_the_baseline_with_one_option_changed(tmp_path):
    from studies import stats
    from studies.compare import comparison_cell
    from studies.reproduce import READINGS, RECIPE_READING, format_readings, plan_readings, readings_table

    readings = plan_readings({"weights": "none"})
    assert [dict(r.changes) for r in readings] == [changes for _, _, changes in READINGS]
    assert [r.name for r in plan_readings({"preprocess": "caffe"})] == ["reading-frozen"]  # the user fixed it
    steps = plan_steps({"weights": "none"})[:2]
    rng = np.random.default_rng(3)
    results = []
    for seed in (0, 1):
        base = rng.random(200) < 0.6
        results += [_result(tmp_path, steps[0].name, "torch", seed, base),
                    _result(tmp_path, steps[1].name, "torch", seed, base | (rng.random(200) < 0.5)),
                    _result(tmp_path, "reading-caffe", "torch", seed, base | (rng.random(200) < 0.4))]
    rows = readings_table(results, steps, readings, ("torch",))
    assert [r["reading"] for r in rows] == [RECIPE_READING, "preprocess_input alone (caffe)"]  # no runs: no row
    recipe, caffe = rows
    assert recipe["first_step"]["interval"].mean > caffe["first_step"]["interval"].mean > 0
    assert abs(recipe["accuracy"].mean + recipe["first_step"]["interval"].mean
               - (caffe["accuracy"].mean + caffe["first_step"]["interval"].mean)) < 1e-9  # the same step runs
    text = "\n".join(format_readings(rows, steps[1].name))
    assert "read other ways" in text and "preprocess_input alone (caffe)" in text and "preprocess step" in text
    # With precise BN (`--rescore-precise-bn`): the same table from the rescored runs, beside it.
    rescored = [dict(r, row={"Test Accuracy": 1 - r["row"]["Test Accuracy"]}) for r in results]  # each score: 1 - it
    after = readings_table(rescored, steps, readings, ("torch",))
    assert after[1]["accuracy"].mean == pytest.approx(1 - caffe["accuracy"].mean)
    lines = "\n".join(format_readings(rows, steps[1].name, after)).splitlines()
    table = [line for line in lines if line.startswith("| preprocess_input alone")]
    header = next(line for line in lines if line.startswith("| reading of the Keras text"))
    assert len(table) == 1 and header.count("with precise BN") == 2
    assert after[1]["first_step"]["interval"].mean == pytest.approx(-caffe["first_step"]["interval"].mean)
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[2:4] == [stats.cell(caffe["accuracy"]), stats.cell(after[1]["accuracy"])]  # as trained, then precise
    assert cells[4:6] == [comparison_cell(caffe["first_step"]), comparison_cell(after[1]["first_step"])]


def test_a_finished_run_of_a_cell_whose_definition_changed_is_not_reused(tmp_path):
    """A reproduce folder from before a step grew (the augment step now also sets the torchvision
    steps and a decode size): its old run of that cell differs, the others still fit."""
    from studies.compare import Run, changed_levels, child_options

    steps = plan_steps({"weights": "none", "image_size": 32})
    shared = step_options({"data_dir": str(tmp_path), "weights": "none", "image_size": 32}, {"weights": "none"})
    augment = next(s for s in steps if s.name == "augment")
    run = Run("torch", augment.changes, 0, label=augment.name)
    wanted = child_options(shared, run, tmp_path / "start.weights.h5")
    old = {k: v for k, v in wanted.items() if k not in ("augment_steps", "rotate_interpolation", "decode_size")}
    (tmp_path / "config.json").write_text(json.dumps({"options": old}))
    changed = changed_levels(tmp_path, wanted, run)
    assert [c.split(":")[0] for c in changed] == ["augment_steps", "rotate_interpolation", "decode_size"]
    assert "'fused', not 'torchvision'" in changed[0]
    recorded = dataclasses_asdict(TrainConfig.from_record(wanted))
    (tmp_path / "config.json").write_text(json.dumps({"options": recorded}))
    assert changed_levels(tmp_path, wanted, run) == []  # the same definition: reused


def dataclasses_asdict(config) -> dict:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def test_rescoring_with_precise_bn_tabulates_each_step_as_trained_and_after(tmp_path, monkeypatch):
    """`--rescore-precise-bn N`: each run scored again by `evaluate --precise-bn N` (only the runs
    without a rescored evaluation of their own run_id), and the table before and after. The
    bn-momentum arms differ as trained and agree after, as their weights do."""
    import studies.reproduce as reproduce

    steps = plan_steps({"weights": "none"})[:4]
    assert [s.name for s in steps][-1] == "bn-momentum"
    rng = np.random.default_rng(5)
    results, after = [], {}
    for seed in (0, 1):
        base = rng.random(300) < 0.7
        for step in steps:
            trained = base if step.name != "bn-momentum" else base & (rng.random(300) < 0.8)  # its statistics lag
            result = _result(tmp_path, step.name, "torch", seed, trained)
            (Path(result["run_dir"]) / "config.json").write_text(json.dumps({"run_id": f"{step.name}-{seed}"}))
            results.append(result)
            after[result["run_dir"]] = base if step.name in ("augment", "bn-momentum") else trained
    stale = reproduce.rescored_path(results[0], 7)
    stale.write_text(json.dumps({"run_id": "an earlier run", "accuracy": 0.0}))
    calls = []

    def evaluate(backend, command, run_dir, flag, batches):  # what `evaluate RUN --precise-bn N` writes
        calls.append((backend, command, run_dir, flag, batches))
        correct = after[run_dir]
        report = {"run_id": json.loads((Path(run_dir) / "config.json").read_text())["run_id"],
                  "accuracy": float(correct.mean()), "loss": 0.5,
                  "predictions": [{"label": "a", "predicted": "a" if ok else "b"} for ok in correct]}
        (Path(run_dir) / f"eval-test-{backend}-precise-bn{batches}.json").write_text(json.dumps(report))
        return subprocess.CompletedProcess([], 0)

    monkeypatch.setattr(reproduce, "cli_in_process", evaluate)
    rescored = reproduce.rescored_results(results, 7, log=lambda line: None)
    assert calls == [("torch", "evaluate", r["run_dir"], "--precise-bn", "7") for r in results]  # the stale one too
    again = reproduce.rescored_results(results, 7, log=lambda line: None)
    assert len(calls) == len(results)  # done earlier: reused
    assert [r["row"] for r in again] == [r["row"] for r in rescored]
    rows = reproduce.precise_bn_table(results, rescored, steps, ("torch",))
    momentum = next(r for r in rows if r["step"] == "bn-momentum")
    assert all(v < 0 for v in momentum["per_seed"][0].values()) and momentum["per_seed"][1] == {0: 0.0, 1: 0.0}
    assert momentum["step_effect"][1]["interval"].mean == 0.0
    preprocess = next(r for r in rows if r["step"] == "preprocess")
    assert preprocess["accuracy"][0].mean == preprocess["accuracy"][1].mean  # its runs scored the same
    text = "\n".join(reproduce.format_precise_bn(rows, 7))
    assert "## With precise BatchNorm" in text and "--precise-bn 7" in text and "→ +0.0, +0.0" in text
