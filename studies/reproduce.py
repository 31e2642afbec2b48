"""`reproduce`: the study's Keras-vs-PyTorch gap, one factor at a time.

It trains the seed-keras recipe, then changes one factor at a time toward seed-pytorch
(preprocessing, augmentation, BatchNorm momentum, Adam's epsilon, architecture with its checkpoint), each
step keeping the changes before it, on every backend asked for and over several seeds. The
last step is the seed-pytorch recipe. Each step's effect is the paired difference from the
step before (same seed: same batch order; same starting file when the architecture did not
change), and the framework effect is the paired difference between backends at one step:
both with their 95% interval over seeds, on one scale, so a reader sees which change
explains the gap and whether the framework does at all.

The runs are `compare`'s (`studies.compare.run_grid`): each in its own process, reused when
finished, resumed when interrupted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data.augment import torchvision_decode_size
from markdown_tables import markdown_table
from studies import stats
from studies.compare import (
    CompareError,
    Run,
    comparison_cell,
    comparison_noise,
    invoked_command,
    paired_comparison,
    plot_curves,
    run_grid,
    run_test_accuracy,
)
from studies.processes import cli_command, cli_in_process
from training.config import TORCHVISION_DECODE
from training.recipes import recipe_options
from training.rundir import atomic_write, write_json

BASELINE, TARGET = "seed-keras", "seed-pytorch"
# The factors the two recipes differ in, in the order they change; every option in which the
# recipes differ belongs to one (tests/test_reproduce.py checks it).
FACTOR_STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("preprocess", ("preprocess",)),
    # The augmentation as torchvision runs it: its transforms, each resampled on its own, the crop
    # from a larger decode (and evaluation on the centre of it).
    ("augment", ("augment", "augment_steps", "rotate_interpolation", "decode_size")),
    ("bn-momentum", ("bn_momentum",)),
    ("adam-epsilon", ("adam_epsilon",)),
    ("checkpoint", ("arch", "weights")),  # the architecture and the weights trained for it go together
]


# Other readings of the study's Keras text (docs/recipes.md, "Where the study's text allows more
# than one reading"), each the baseline with one option changed: "normalization based on
# ResNet50.preprocess_input" and "rescale" read as one of the two alone, and "transfer learning
# and feature extraction" read as the backbone frozen (the head trains; BatchNorm in inference mode).
READINGS: list[tuple[str, str, dict[str, Any]]] = [  # (cell name, what it reads the text as, options)
    ("reading-caffe", "preprocess_input alone (caffe)", {"preprocess": "caffe"}),
    ("reading-rescale", "rescale alone (x/255)", {"preprocess": "rescale"}),
    ("reading-frozen", "feature extraction: backbone frozen", {"freeze": "backbone"}),
]
READING_NAMES = {cell: what for cell, what, _ in READINGS}
# Options given by the user that a reading cannot be read with (a frozen backbone has no top blocks to unfreeze).
READING_CONFLICTS = {"reading-frozen": {"unfreeze_blocks", "head_epochs"}}
RECIPE_READING = "caffe then rescale, every layer trains (the recipe's)"


@dataclasses.dataclass(frozen=True)
class Step:
    """One cell of the path: its name, and the options it changes from the baseline so far."""

    name: str
    changes: tuple[tuple[str, Any], ...]


def plan_steps(fixed: dict[str, Any]) -> list[Step]:
    """The baseline and one step per factor (cumulative). Options in `fixed` (given by the user,
    e.g. --weights none or --image-size 64) hold on every step; a factor left with nothing to
    change is dropped (e.g. bn-momentum when the user fixes it)."""
    target = recipe_options(TARGET)
    if target.get("decode_size") == TORCHVISION_DECODE:  # in pixels, at the size the steps train at
        target["decode_size"] = torchvision_decode_size(fixed.get("image_size", target["image_size"]))
    steps, changes = [Step(BASELINE, ())], {}
    for name, keys in FACTOR_STEPS:
        moved = {k: target[k] for k in keys if k not in fixed}
        if not moved:
            continue
        changes.update(moved)
        steps.append(Step(name, tuple(changes.items())))
    return steps


def plan_readings(fixed: dict[str, Any]) -> list[Step]:
    """The baseline under each other reading (those on an option the user fixed are left out)."""
    return [Step(cell, tuple(changes.items())) for cell, _, changes in READINGS
            if not (set(changes) | READING_CONFLICTS.get(cell, set())) & set(fixed)]


def step_options(options: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """The options every step shares: the defaults, then the baseline recipe, then `fixed`."""
    return {**options, **recipe_options(BASELINE), **fixed, "recipe": BASELINE}


def plan_runs(steps: list[Step], backends: tuple[str, ...], seeds: list[int]) -> list[Run]:
    """Every (step, seed, backend), backends innermost."""
    return [Run(backend, step.changes, seed, label=step.name) for step in steps for seed in seeds
            for backend in backends]


def _within_0_and_1(interval: stats.Interval) -> stats.Interval:
    """An accuracy's t interval cut to [0, 1]: with two seeds far apart it reaches past both ends."""
    if not interval.has_interval:
        return interval
    return dataclasses.replace(interval, low=max(interval.low, 0.0), high=min(interval.high, 1.0))


def decompose(results: list[dict], steps: list[Step], backends: tuple[str, ...]) -> dict:
    """Per step and backend: the mean test accuracy with its interval over seeds, the step's
    effect (paired difference from the previous step) and the framework effect (each backend
    minus the first, paired)."""
    cells = {(s.name, b): [r for r in results if r["cell"] == s.name and r["backend"] == b]
             for s in steps for b in backends}
    table = []
    for i, step in enumerate(steps):
        for backend in backends:
            runs = cells[(step.name, backend)]
            if not runs:
                continue
            row = {"step": step.name, "backend": backend,
                   "accuracy": _within_0_and_1(stats.mean_interval([run_test_accuracy(r) for r in runs]))}
            if i:
                row["step_effect"] = paired_comparison(runs, cells[(steps[i - 1].name, backend)])
            if backend != backends[0]:
                row["framework_effect"] = paired_comparison(runs, cells[(step.name, backends[0])])
            table.append(row)
    return {"rows": table}


def readings_table(results: list[dict], steps: list[Step], readings: list[Step], backends: tuple[str, ...]) -> list:
    """Per reading (the recipe's first) and backend: the baseline's test accuracy under it, and
    the first step's effect measured from it (that step's runs minus the reading's, by seed)."""
    def runs(name: str, backend: str) -> list[dict]:
        return [r for r in results if r["cell"] == name and r["backend"] == backend]

    first = steps[1].name if len(steps) > 1 else None
    rows = []
    for reading in [steps[0], *readings]:
        for backend in backends:
            mine = runs(reading.name, backend)
            if not mine:
                continue
            rows.append({
                "reading": RECIPE_READING if reading is steps[0] else READING_NAMES[reading.name],
                "backend": backend,
                "accuracy": _within_0_and_1(stats.mean_interval([run_test_accuracy(r) for r in mine])),
                "first_step": first and paired_comparison(runs(first, backend), mine),
            })
    return rows


def format_readings(rows: list[dict], first_step: str | None, rescored: list[dict] | None = None) -> list[str]:
    """The readings table; with `rescored` (the same table from the runs scored with precise
    BatchNorm), each number as trained and with precise BN side by side."""
    if not rows:
        return []
    step = f"{first_step} step measured from it" if first_step else "first step"
    header = ["reading of the Keras text", "backend", "baseline test accuracy", step]
    table = [[r["reading"], r["backend"], stats.cell(r["accuracy"]), comparison_cell(r["first_step"] or None)]
             for r in rows]
    if rescored:
        header = ["reading of the Keras text", "backend", "baseline test accuracy, as trained", "with precise BN",
                  f"{step}, as trained", "with precise BN"]
        table = [[r["reading"], r["backend"], stats.cell(r["accuracy"]), stats.cell(p["accuracy"]),
                  comparison_cell(r["first_step"] or None), comparison_cell(p["first_step"] or None)]
                 for r, p in zip(rows, rescored, strict=True)]
    return ["## The study's Keras text, read other ways", "",
            "The baseline (seed-keras) under each reading of its text, and how large the first step looks "
            "when measured from that reading (the step's runs minus the reading's, paired by seed)"
            + (" as trained, and with every run scored with precise BatchNorm (below)" if rescored else "") + ":", "",
            markdown_table(header, table, "llrr" + "rr" * bool(rescored)), ""]


def rescored_path(result: dict, batches: int) -> Path:
    """Where `evaluate --precise-bn N` writes a run's rescored test evaluation."""
    return Path(result["run_dir"]) / f"eval-test-{result['backend']}-precise-bn{batches}.json"


def _rescored_report(result: dict, batches: int) -> dict | None:
    """The run's rescored evaluation, if one was written for this very run (its run_id)."""
    path = rescored_path(result, batches)
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    config = json.loads((Path(result["run_dir"]) / "config.json").read_text())
    return report if report.get("run_id") == config.get("run_id") else None


def rescored_results(results: list[dict], batches: int, log: Callable[[str], None] = print) -> list[dict]:
    """`--rescore-precise-bn N`: each run's final weights scored again on its test split with every
    trainable BatchNorm layer's moving statistics recomputed from N of its training batches
    (`evaluate RUN --precise-bn N` under the run's backend; reused when done earlier). Training
    with `--precise-bn N` changes nothing before that point, so these are the scores such runs get
    (tests/test_precise_bn.py checks it). Returns the results with those scores."""
    todo = [r for r in results if _rescored_report(r, batches) is None]
    for i, result in enumerate(todo, 1):
        args = ("evaluate", result["run_dir"], "--precise-bn", str(batches))
        log(f"[{i}/{len(todo)}] rescoring with precise BatchNorm\n  KERAS_BACKEND={result['backend']} "
            f"python {shlex.join(cli_command(*args)[1:])}")
        if cli_in_process(result["backend"], *args).returncode:
            raise CompareError(f"rescoring {result['run_dir']} with precise BatchNorm failed (its output is above)")
    rescored = []
    for result in results:
        report = _rescored_report(result, batches)
        if report is None:
            raise CompareError(f"{rescored_path(result, batches)} was not written")
        rescored.append({**result, "row": {**result["row"], "Test Accuracy": report["accuracy"],
                                           "Test Loss": report["loss"]},
                         "correct": np.array([p["label"] == p["predicted"] for p in report["predictions"]])})
    return rescored


def per_seed_step_effects(results: list[dict], steps: list[Step], backends: tuple[str, ...]) -> dict:
    """{(step, backend): {seed: that step's test accuracy minus the step before's}}."""
    accuracy = {(r["cell"], r["backend"], r["seed"]): run_test_accuracy(r) for r in results}
    effects = {}
    for before, step in itertools.pairwise(steps):
        for backend in backends:
            effects[(step.name, backend)] = {
                seed: accuracy[(step.name, backend, seed)] - accuracy[(before.name, backend, seed)]
                for (cell, b, seed) in accuracy if cell == step.name and b == backend
                and (before.name, backend, seed) in accuracy}
    return effects


def precise_bn_table(before: list[dict], after: list[dict], steps: list[Step], backends: tuple[str, ...]) -> list[dict]:
    """Per step and backend: test accuracy and the step's effect (with its interval, and per
    seed) as trained, and with the BatchNorm statistics recomputed."""
    tables = [decompose(results, steps, backends)["rows"] for results in (before, after)]
    seeds = [per_seed_step_effects(results, steps, backends) for results in (before, after)]
    rows = []
    for row_before, row_after in zip(*tables, strict=True):
        key = (row_before["step"], row_before["backend"])
        rows.append({"step": key[0], "backend": key[1],
                     "accuracy": [row_before["accuracy"], row_after["accuracy"]],
                     "step_effect": [row_before.get("step_effect"), row_after.get("step_effect")],
                     "per_seed": [seeds[0].get(key, {}), seeds[1].get(key, {})]})
    return rows


def format_precise_bn(rows: list[dict], batches: int) -> list[str]:
    if not rows:
        return []

    def per_seed(effects: dict) -> str:
        return ", ".join(f"{100 * v:+.1f}" for _, v in sorted(effects.items())) or "-"

    table = [[r["step"], r["backend"], stats.cell(r["accuracy"][0]), stats.cell(r["accuracy"][1]),
              comparison_cell(r["step_effect"][0]), comparison_cell(r["step_effect"][1]),
              f"{per_seed(r['per_seed'][0])} → {per_seed(r['per_seed'][1])}" if r["per_seed"][0] else "-"]
             for r in rows]
    return ["## With precise BatchNorm", "",
            f"Every run's final weights scored again after each trainable BatchNorm layer's moving mean and "
            f"variance were recomputed from {batches} of its training batches (`evaluate --precise-bn {batches}`: "
            f"the scores of runs trained with `--precise-bn {batches}`, whose training is the same up to that "
            "point). The weights do not change, only the statistics they are scored with:", "",
            markdown_table(["step", "backend", "test accuracy, as trained", "with precise BN",
                            "step effect, as trained", "with precise BN", "step effect per seed (as trained → with precise BN)"],
                           table, "llrrrrl"), ""]


def format_report(decomposition: dict, steps: list[Step], backends: tuple[str, ...], seeds: list[int],
                  command: str, failures: list[dict], readings: list[dict] | None = None,
                  precise: tuple[list[dict], int] | None = None, precise_readings: list[dict] | None = None) -> str:
    """reproduce.md: the path, the table, a sentence per effect, the chart."""
    md = ["# The Keras-vs-PyTorch gap, one factor at a time", "", f"Command: `{command}`", "",
          f"Backends {', '.join(backends)}; seeds {', '.join(map(str, seeds))}. Test accuracy in percent, "
          "mean [95% interval]: over seeds (Student t; paired by seed for the effects), or with one seed over "
          "the test images (paired bootstrap, with McNemar's exact test).", "", "Steps (each keeps the ones above):", ""]
    md += [f"- **{s.name}**: " + (", ".join(f"{k}={v}" for k, v in s.changes) if s.changes else f"the {BASELINE} recipe")
           for s in steps]
    rows = [[r["step"], r["backend"], stats.cell(r["accuracy"]), comparison_cell(r.get("step_effect")),
             comparison_cell(r.get("framework_effect"))] for r in decomposition["rows"]]
    md += ["", markdown_table(["step", "backend", "test accuracy", "step effect (vs the step above)",
                               f"framework effect (vs {backends[0]})"], rows, "llrrr"), "", "## What the differences mean", ""]
    for r in decomposition["rows"]:
        for key, what, other in (("step_effect", "step", None), ("framework_effect", "framework", backends[0])):
            comparison = r.get(key)
            if comparison and comparison.get("interval") is not None:
                first = f"{r['step']} on {r['backend']}" if key == "framework_effect" else r["step"]
                second = f"{r['step']} on {other}" if other else "the step before"
                sentence = stats.verdict(comparison["interval"], first, second, noise=comparison_noise(comparison))
                md.append(f"- {what} effect, {r['step']} ({r['backend']}): {sentence}")
    md += ["", *format_readings(readings or [], steps[1].name if len(steps) > 1 else None, precise_readings)]
    md += format_precise_bn(*precise) if precise else []
    md += ["![waterfall](waterfall.png)", "", "![curves](curves.png)", ""]
    if failures:
        md += ["## Failed runs", "", *[f"- {f['run']}: {f['reason']}" for f in failures], ""]
    return "\n".join(md)


def plot_waterfall(decomposition: dict, steps: list[Step], backends: tuple[str, ...], path: Path) -> None:
    """Left: each step's change in test accuracy (first backend), stacked from the baseline, with
    its 95% interval. Right, on the same scale: the framework effect at every step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = decomposition["rows"]
    first = [r for r in rows if r["backend"] == backends[0]]
    others = [r for r in rows if r["backend"] != backends[0]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False,
                                      gridspec_kw={"width_ratios": [max(len(first), 1), max(len(steps), 1)]})
    level = 100 * first[0]["accuracy"].mean
    left.bar(0, level, color="0.6")
    changes = []
    for i, r in enumerate(first[1:], 1):
        interval = r["step_effect"]["interval"]
        delta = 100 * interval.mean
        changes.append(delta)
        left.bar(i, delta, bottom=level, color="C2" if delta >= 0 else "C3")
        if interval.has_interval:
            left.errorbar(i, level + delta, yerr=[[100 * (interval.mean - interval.low)],
                                                  [100 * (interval.high - interval.mean)]], color="k", capsize=4)
        level += delta
    left.set_xticks(range(len(first)), [r["step"] for r in first], rotation=20)
    left.set_ylabel("test accuracy (%)")
    left.set_title(f"{BASELINE} to {TARGET}, one factor at a time ({backends[0]})")
    spread = max([abs(c) for c in changes] + [1.0])
    left.set_ylim(max(0, 100 * first[0]["accuracy"].mean - 3 * spread), min(100, level + 3 * spread))
    for j, backend in enumerate(backends[1:]):
        mine = [r for r in others if r["backend"] == backend]
        x = np.arange(len(mine)) + 0.8 * j / max(len(backends) - 1, 1)
        for xi, r in zip(x, mine, strict=True):
            interval = r["framework_effect"]["interval"]
            right.bar(xi, 100 * interval.mean, width=0.8 / max(len(backends) - 1, 1), color=f"C{j}",
                      label=backend if xi == x[0] else None)
            if interval.has_interval:
                right.errorbar(xi, 100 * interval.mean, yerr=[[100 * (interval.mean - interval.low)],
                                                              [100 * (interval.high - interval.mean)]],
                               color="k", capsize=4)
    right.axhline(0, color="k", linewidth=0.8)
    right.set_xticks(range(len(steps)), [s.name for s in steps], rotation=20)
    right.set_title(f"framework effect (minus {backends[0]}), same scale")
    half = (left.get_ylim()[1] - left.get_ylim()[0]) / 2
    right.set_ylim(-half, half)
    right.set_ylabel("difference (points)")
    if others:
        right.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _json_ready(decomposition: dict) -> dict:
    """Intervals as plain dicts, for reproduce.json."""
    def plain(value):
        if isinstance(value, stats.Interval):
            return dataclasses.asdict(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(decomposition)


def run_reproduce(options: dict, fixed: dict, backends: tuple[str, ...], seeds: list[int], out_dir: Path,
                  num_classes: int, log: Callable[[str], None] = print, readings: bool = False,
                  rescore_precise_bn: int = 0) -> dict:
    """Trains every step on every backend and seed (reusing finished runs in `out_dir`), and with
    `readings` the baseline under each other reading too; with `rescore_precise_bn` N, scores every
    run (the readings' too) again with precise BatchNorm (`rescored_results`); writes reproduce.md, reproduce.json,
    waterfall.png and curves.png; returns the report."""
    command = invoked_command("reproduce")
    steps = plan_steps(fixed)
    other_readings = plan_readings(fixed) if readings else []
    shared = step_options(options, fixed)
    results, failures, _ = run_grid(shared, backends, plan_runs(steps + other_readings, backends, seeds), out_dir,
                                    num_classes, log)
    decomposition = decompose(results, steps, backends)
    reading_rows = readings_table(results, steps, other_readings, backends) if readings else []
    precise_rows, precise_reading_rows = [], []
    if rescore_precise_bn:  # every run, the readings' too: whether a reading differs beyond its statistics
        rescored = rescored_results(results, rescore_precise_bn, log)
        stepped = {s.name for s in steps}
        precise_rows = precise_bn_table([r for r in results if r["cell"] in stepped],
                                        [r for r in rescored if r["cell"] in stepped], steps, backends)
        precise_reading_rows = readings_table(rescored, steps, other_readings, backends) if readings else []
    text = format_report(decomposition, steps, backends, seeds, command, failures, reading_rows,
                         (precise_rows, rescore_precise_bn) if rescore_precise_bn else None, precise_reading_rows)
    plot_waterfall(decomposition, steps, backends, out_dir / "waterfall.png")
    plot_curves(results, out_dir / "curves.png")
    with atomic_write(out_dir / "reproduce.md") as tmp:
        tmp.write_text(text)
    report = {
        "command": command, "options": shared, "fixed": fixed, "backends": list(backends), "seeds": seeds,
        "steps": [{"name": s.name, "changes": dict(s.changes)} for s in steps],
        "runs": results, "failures": failures, "decomposition": _json_ready(decomposition),
        "readings": _json_ready({"rows": reading_rows})["rows"],
        "precise_bn": {"batches": rescore_precise_bn,
                       "rows": _json_ready({"rows": precise_rows})["rows"],
                       "readings": _json_ready({"rows": precise_reading_rows})["rows"]} if rescore_precise_bn else None,
    }
    write_json(out_dir / "reproduce.json", report)
    return report | {"markdown": text}
