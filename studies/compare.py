"""`compare`: one training configuration on every backend, from one weights file.

The parent process imports no backend. For each starting point (weights option x
seed) it builds the initial weights once, in a subprocess of the first backend;
then it runs `cli.py train --init-weights FILE` once per backend, factor level and
seed, each in its own subprocess, and summarises the run directories: the results
table per backend, the per-epoch divergence between backends, and the main effect
of each factor next to the backend effect and the seed-to-seed spread.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from markdown_tables import markdown_table
from model.weights import resolve_arch
from studies import stats
from studies.processes import command, in_process
from training.metrics import LEAKAGE_ROWS, RESULT_ROWS, format_table, results_row
from training.rundir import (
    PREDICTIONS_FILE,
    atomic_write,
    checkpoint_state,
    read_csv_rows,
    read_history,
    write_json,
)

FACTORS = ("model", "preprocess", "augment", "weights", "precision", "precise_bn")
STABILITY_ROWS = ["Grad norm ratio (min/max)", "Lowest grad norm ratio"]
SUMMARY_ROWS = [*RESULT_ROWS, *STABILITY_ROWS, "Seconds per epoch", "Training img/s", "Peak memory (MiB)"]
_ONE_DECIMAL = ("Peak memory (MiB)", "Seconds per epoch", "Training img/s")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    backend: str
    levels: tuple[tuple[str, Any], ...]  # ((option, value), ...): a grid's factor levels, a reproduce step's changes
    seed: int
    label: str = ""  # a name for the cell (a reproduce step); default: its levels

    @property
    def cell(self) -> str:
        return self.label or ",".join(f"{f}={v}" for f, v in self.levels)

    @property
    def dirname(self) -> str:
        cell = f"{self.label}-" if self.label else "".join(_level_name(f, v) + "-" for f, v in self.levels)
        return f"{cell}seed{self.seed}/{self.backend}"


def _level_name(factor: str, value: Any) -> str:
    """A level as a folder name: a word level as itself (`caffe`), a number with its factor's name
    (`precise-bn100`, where a bare `100` would not say what it is)."""
    if isinstance(value, int | float):
        return f"{factor.replace('_', '-')}{value}"
    return str(value).replace("/", "_")


class CompareError(RuntimeError):
    """A compare run could not produce a summary."""


def plan_runs(backends: tuple[str, ...], factors: dict[str, list[str]], seeds: list[int]) -> list[Run]:
    """Every (factor levels, seed, backend) combination, backends innermost."""
    names = [f for f in FACTORS if f in factors]
    runs = []
    for values in itertools.product(*(factors[f] for f in names)):
        for seed in seeds:
            for backend in backends:
                runs.append(Run(backend, tuple(zip(names, values, strict=True)), seed))
    return runs


def child_options(options: dict, run: Run, init_weights: Path) -> dict:
    """The options of one run of the grid: the fixed ones, the run's cell, seed and starting file."""
    return dict(options, **dict(run.levels), seed=run.seed, init_weights=str(init_weights))


def changed_levels(run_dir: Path, options: dict, run: Run) -> list[str]:
    """The options that define `run`'s cell (its levels, and its seed) on which the finished run
    in `run_dir` differs from `options`: `name: recorded, not wanted`. Both sides are read as
    `TrainConfig` reads them, so an option a run predates counts at its default."""
    from training.config import TrainConfig

    recorded = TrainConfig.from_record(json.loads((run_dir / "config.json").read_text())["options"])
    wanted = TrainConfig.from_record(options)
    names = [name for name, _ in run.levels] + ["seed"]
    return [f"{n}: {getattr(recorded, n)!r}, not {getattr(wanted, n)!r}" for n in names
            if getattr(recorded, n) != getattr(wanted, n)]


def train_args(config_file: Path, out: Path, resume: bool = False) -> list[str]:
    """The `train` task of one run (`studies.worker`): its options come from `config_file` (a
    file, not a rebuilt flag list, so every option reaches the run as declared); `--resume`
    continues it in `out`."""
    args = ["--config", str(config_file), "--out", str(out)]
    return [*args, "--resume", str(out)] if resume else args


def _resumable(run_dir: Path) -> bool:
    last = run_dir / "last.weights.h5"
    try:
        return last.is_file() and checkpoint_state(last) is not None
    except OSError:  # a checkpoint cut short by the interruption
        return False


def summary_row(metrics: dict) -> dict[str, float | None]:
    """The study's results-table values of one run, plus stability, speed and memory.

    The gradient norm ratio is the smallest over the largest layer-group gradient norm
    on the stability log's probe batch: at the last epoch, and the lowest of any epoch.
    """
    stability = metrics.get("stability") or {}
    return {
        **results_row(metrics),
        "Grad norm ratio (min/max)": stability.get("grad_ratio_last"),
        "Lowest grad norm ratio": stability.get("grad_ratio_min"),
        "Seconds per epoch": metrics["seconds_per_epoch"],
        "Training img/s": metrics["train_images_per_second"],
        "Peak memory (MiB)": metrics["peak_memory_mb"],
    }


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def cell_table(results: list[dict], backends: tuple[str, ...]) -> tuple[str, dict]:
    """One cell's results table, a column per backend (mean ± std over seeds)."""
    leakage = any(r["row"].get(LEAKAGE_ROWS[0]) is not None for r in results)  # --dedup runs
    names = [*RESULT_ROWS, *(LEAKAGE_ROWS if leakage else []), *SUMMARY_ROWS[len(RESULT_ROWS):]]
    columns, data = {}, {}
    for backend in backends:
        rows = [r["row"] for r in results if r["backend"] == backend]
        stats = {name: _mean_std([row.get(name) for row in rows]) for name in names}
        data[backend] = stats
        columns[backend] = {
            name: _format_mean_std(*stats[name], digits=1 if name in _ONE_DECIMAL else "e" if name in STABILITY_ROWS
                                   else 0 if name == LEAKAGE_ROWS[1] else 4)
            for name in names
        }
    return format_table(columns, names), data


def _format_mean_std(mean: float | None, std: float | None, digits: int | str) -> str:
    """`digits` decimals, or "e": two significant digits in scientific notation."""
    if mean is None:
        return "-"
    spec = ".1e" if digits == "e" else f".{digits}f"
    return f"{mean:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")


def run_test_accuracy(result: dict) -> float:
    return result["row"]["Test Accuracy"]


def correct_answers(result: dict) -> np.ndarray | None:
    """Per test image: did the final weights get it right (None when the run did not write it);
    a rescored result (`studies.reproduce.rescored_results`) carries its own."""
    if "correct" in result:
        return result["correct"]
    rows = read_csv_rows(Path(result["run_dir"]) / PREDICTIONS_FILE) if result.get("run_dir") else []
    return np.array([r["label"] == r["final"] for r in rows]) if rows else None


def paired_comparison(a: list[dict], b: list[dict], target: str = "Test Accuracy") -> dict:
    """`a` minus `b` in `target`, paired by seed (same seed: same starting file and batches).
    Two or more shared seeds: a t interval over seeds. One seed, on test accuracy: a paired
    bootstrap interval over the test images and McNemar's exact test, from each run's
    test_predictions.csv."""
    by_seed_a, by_seed_b = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        return {"seeds": [], "interval": None}
    values_a, values_b = [by_seed_a[s]["row"][target] for s in seeds], [by_seed_b[s]["row"][target] for s in seeds]
    over_seeds = {"seeds": seeds, "interval": stats.paired_difference(values_a, values_b), "basis": "seeds"}
    if len(seeds) > 1 or target != "Test Accuracy":
        return over_seeds
    correct_a, correct_b = correct_answers(by_seed_a[seeds[0]]), correct_answers(by_seed_b[seeds[0]])
    if correct_a is None or correct_b is None or len(correct_a) != len(correct_b):
        return over_seeds  # runs from before test_predictions.csv: no per-image test
    return {"seeds": seeds, "interval": stats.paired_bootstrap(correct_a, correct_b), "basis": "test images",
            "mcnemar": stats.mcnemar(correct_a, correct_b)}


def comparison_cell(comparison: dict | None) -> str:
    """A table cell: the difference in points with its 95% interval (and McNemar's p with one seed)."""
    if not comparison or comparison.get("interval") is None:
        return "-"
    text = stats.cell(comparison["interval"])
    if "mcnemar" in comparison:
        text += f" (McNemar p={comparison['mcnemar']['p_value']:.3g})"
    return text


def comparison_noise(comparison: dict) -> str:
    return "test-set sampling noise" if comparison.get("basis") == "test images" else "seed-to-seed noise"


def epoch_divergence(results: list[dict]) -> list[dict]:
    """Per epoch: the largest difference between any two backends (same cell and seed)
    in validation accuracy and loss (training ones when there is no validation set)."""
    acc_key = "val_accuracy" if all("val_accuracy" in r["history"] for r in results) else "accuracy"
    loss_key = "val_loss" if acc_key == "val_accuracy" else "loss"
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["cell"], r["seed"]), []).append(r)
    epochs = max(len(r["history"][acc_key]) for r in results)
    rows = []
    for epoch in range(epochs):
        worst_acc = worst_loss = 0.0
        for members in groups.values():
            accs = [m["history"][acc_key][epoch] for m in members if epoch < len(m["history"][acc_key])]
            losses = [m["history"][loss_key][epoch] for m in members if epoch < len(m["history"][loss_key])]
            if len(accs) > 1:
                worst_acc = max(worst_acc, max(accs) - min(accs))
                worst_loss = max(worst_loss, max(losses) - min(losses))
        rows.append({"epoch": epoch + 1, f"max {acc_key} diff": worst_acc, f"max {loss_key} diff": worst_loss})
    return rows


def main_effects(results: list[dict], factors: dict[str, list[str]], target: str) -> list[dict]:
    """Each factor's (and the backend's) main effect on `target`: mean per level, range.

    Means are over every other factor, seed and backend (a balanced grid), so each
    factor's effect is read with the others averaged out.
    """
    axes = {"backend": sorted({r["backend"] for r in results}, key=[r["backend"] for r in results].index)}
    axes.update({f: levels for f, levels in factors.items() if len(levels) > 1})
    effects = []
    for axis, levels in axes.items():
        means = {}
        for level in levels:
            values = [r["row"][target] for r in results if _level(r, axis) == level and r["row"][target] is not None]
            means[level] = float(np.mean(values)) if values else None
        known = [m for m in means.values() if m is not None]
        effects.append({
            "factor": axis, "level_means": means,
            "effect": (max(known) - min(known)) if len(known) > 1 else None,
        })
    return effects


def seed_spread(results: list[dict], target: str) -> float | None:
    """The mean over cells and backends of the seed-to-seed standard deviation of `target`."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        if r["row"][target] is not None:
            groups.setdefault((r["cell"], r["backend"]), []).append(r["row"][target])
    stds = [float(np.std(v, ddof=1)) for v in groups.values() if len(v) > 1]
    return float(np.mean(stds)) if stds else None


def _level(result: dict, axis: str) -> str:
    return result["backend"] if axis == "backend" else dict(result["levels"])[axis]


def plot_curves(results: list[dict], path: Path) -> None:
    """Training and validation loss and accuracy per epoch: a line per backend (and cell),
    averaged over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("loss", "training loss"), ("val_loss", "validation loss"),
              ("accuracy", "training accuracy"), ("val_accuracy", "validation accuracy")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    backends = list(dict.fromkeys(r["backend"] for r in results))
    cells = list(dict.fromkeys(r["cell"] for r in results))
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for ci, cell in enumerate(cells):
            for backend in backends:
                runs = [r for r in results if r["cell"] == cell and r["backend"] == backend and key in r["history"]]
                if not runs:
                    continue
                n = min(len(r["history"][key]) for r in runs)
                curve = np.mean([r["history"][key][:n] for r in runs], axis=0)
                label = backend if len(cells) == 1 else f"{backend} {cell}"
                ax.plot(range(1, n + 1), curve, styles[ci % len(styles)], marker="o", markersize=3,
                        color=f"C{backends.index(backend)}", label=label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 4), 1, 1))
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _format_effects(effects: list[dict], spread: float | None, target: str) -> str:

    rows = []
    for e in effects:
        means = ", ".join(f"{k}: {v:.4f}" if v is not None else f"{k}: -" for k, v in e["level_means"].items())
        rows.append([e["factor"], means, f"{e['effect']:.4f}" if e["effect"] is not None else "-"])
    rows.append(["seed-to-seed std (mean over cells and backends)", "", f"{spread:.4f}"] if spread is not None
                else ["seed-to-seed std", "one seed: not measured", "-"])
    return markdown_table(["factor", f"level means of {target}", "main effect (max - min)"], rows, "llr")


def _format_divergence(rows: list[dict]) -> str:

    keys = list(rows[0])
    cells = [[str(row[k]) if k == "epoch" else f"{row[k]:.4f}" for k in keys] for row in rows]
    return markdown_table(keys, cells, "r" * len(keys))


def summarise(results: list[dict], backends: tuple[str, ...], factors: dict[str, list[str]], command: str) -> tuple[str, dict]:
    """compare.md's text and compare.json's summary section."""
    target = "Test Accuracy" if all(r["row"]["Test Accuracy"] is not None for r in results) else "Val Accuracy"
    md = ["# Backend comparison", "", f"Command: `{command}`", ""]
    summary: dict = {"target": target, "cells": {}}
    for cell in dict.fromkeys(r["cell"] for r in results):
        members = [r for r in results if r["cell"] == cell]
        table, data = cell_table(members, backends)
        seeds = sorted({r["seed"] for r in members})
        about = f"seeds {', '.join(map(str, seeds))}; mean ± std over seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
        md += [f"## {cell or 'Results'} ({about})", "", table, ""]
        summary["cells"][cell] = data
    md += backend_effects(results, backends, target, summary)
    effects = main_effects(results, factors, target)
    spread = seed_spread(results, target)
    divergence = epoch_divergence(results)
    md += ["## Effects on " + target, "", _format_effects(effects, spread, target), "",
           "## Per-epoch divergence between backends (same cell and seed)", "", _format_divergence(divergence), "",
           "![curves](curves.png)", ""]
    summary.update({"main_effects": effects, "seed_std": spread, "divergence": divergence})
    return "\n".join(md), summary


def backend_effects(results: list[dict], backends: tuple[str, ...], target: str, summary: dict) -> list[str]:
    """compare.md's section on the backend effect: per cell, each backend minus the first, paired
    by seed, with its interval and a sentence on whether it exceeds the noise (also into `summary`)."""
    if len(backends) < 2:
        return []
    rows, sentences, found = [], [], {}
    for cell in dict.fromkeys(r["cell"] for r in results):
        first = [r for r in results if r["cell"] == cell and r["backend"] == backends[0]]
        for backend in backends[1:]:
            other = [r for r in results if r["cell"] == cell and r["backend"] == backend]
            comparison = paired_comparison(other, first, target)
            if comparison["interval"] is None:
                continue
            found[f"{cell or 'baseline'}: {backend} - {backends[0]}"] = comparison
            rows.append([cell or "baseline", f"{backend} - {backends[0]}", comparison_cell(comparison),
                         str(len(comparison["seeds"]))])
            sentences.append(f"- {cell or 'baseline'}: " + stats.verdict(
                comparison["interval"], backend, backends[0], noise=comparison_noise(comparison)))
    summary["backend_effects"] = {k: {**v, "interval": dataclasses.asdict(v["interval"])} for k, v in found.items()}
    if not rows:
        return []
    return [f"## Backend effect on {target} (paired by seed; points, 95% interval)", "",
            markdown_table(["cell", "difference", "points [95% interval]", "seeds"], rows, "llrr"), "",
            *sentences, ""]


def build_initial_weights(backend: str, options: dict, start: Start, num_classes: int, path: Path,
                          log: Callable[[str], None]) -> None:
    """Builds the starting weights once, in a process of `backend` (`studies.worker`)."""
    spec = {"num_classes": num_classes, "image_size": options["image_size"], "weights": start.weights,
            "seed": start.seed, "model": start.model, "arch": start.arch, "cut": options["cut"],
            "head_blocks": options["head_blocks"], "head_filters": options["head_filters"], "se": options["se"]}
    log(f"building initial weights ({start.model}, {start.arch}, {start.weights}, seed {start.seed}) on {backend} -> {path}")
    result = in_process(backend, "init-weights", str(path), json.dumps(spec), capture=True)
    if result.returncode != 0:
        raise CompareError(f"building the initial weights failed on {backend}:\n{result.stderr[-2000:]}")


@dataclasses.dataclass(frozen=True)
class Start:
    """What decides a run's starting weights file: the model, its architecture, the backbone's
    weights and the seed. Runs with the same Start begin from one file."""

    model: str
    arch: str
    weights: str
    seed: int

    @property
    def filename(self) -> str:
        return f"{self.model}-{self.arch}-{self.weights.replace('/', '_')}-seed{self.seed}.weights.h5"


def start_of(options: dict, run: Run) -> Start:
    """The Start of one run: its levels where they set the model, arch or weights, else the options."""
    chosen = dict(options, **dict(run.levels))
    return Start(chosen["model"], resolve_arch(chosen.get("arch"), chosen["weights"]), chosen["weights"], run.seed)


def starting_points(options: dict, backend: str, runs: list[Run], out_dir: Path, num_classes: int,
                    log: Callable[[str], None]) -> dict[Start, Path]:
    """One starting weights file per Start of `runs`, built once on `backend` (or the user's
    --init-weights file for every run)."""
    starts = list(dict.fromkeys(start_of(options, run) for run in runs))
    if options.get("init_weights") and len({(s.model, s.arch) for s in starts}) > 1:
        raise CompareError("--init-weights fits one model and architecture; give one level of each with it")
    files = {}
    for start in starts:
        if options.get("init_weights"):
            files[start] = Path(options["init_weights"])
            continue
        path = out_dir / "initial" / start.filename
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            build_initial_weights(backend, options, start, num_classes, path, log)
        files[start] = path
    return files


def train_run(options: dict, run: Run, init_weights: Path, out_dir: Path, header: str,
              log: Callable[[str], None]) -> int:
    """Trains one run of the grid in its own process (reusing a finished run, resuming an
    interrupted one); returns the exit code."""
    run_dir = out_dir / "runs" / run.dirname
    if (run_dir / "metrics.json").exists():
        changed = changed_levels(run_dir, child_options(options, run, init_weights), run)
        if changed:  # e.g. a reproduce step whose definition grew since that run: its result would mislead
            log(f"{header}: {run_dir} was trained with other values of this cell's options "
                f"({', '.join(changed)}); not reused and left as it is: give another --out, or move it away")
            return 2
        log(f"{header}: done earlier, reusing {run_dir}")
        return 0
    resume = _resumable(run_dir)  # interrupted after an epoch: go on from there
    if run_dir.exists() and not resume:  # interrupted before: start again
        shutil.rmtree(run_dir)
    config_file = out_dir / "options" / f"{run.dirname.replace('/', '-')}.json"
    config_file.parent.mkdir(exist_ok=True)
    write_json(config_file, {"options": child_options(options, run, init_weights)})
    args = train_args(config_file, run_dir, resume)
    log(f"{header}\n  KERAS_BACKEND={run.backend} python {shlex.join(command('train', *args)[1:])}")
    start = time.perf_counter()
    code = in_process(run.backend, "train", *args).returncode
    log(f"{header}: FAILED (exit {code}); going on with the others" if code else
        f"{header}: finished in {time.perf_counter() - start:.0f} s")
    return code


def _result(run: Run, run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    start = (config.get("starting_weights") or {}).get("initial") or {}
    return {
        "backend": run.backend, "cell": run.cell, "levels": run.levels, "seed": run.seed,
        "run_dir": str(run_dir), "start_sha256": start.get("sha256"),
        "row": summary_row(metrics), "history": read_history(run_dir),
    }


def unshared_starts(results: list[dict]) -> list[dict]:
    """The (cell, seed) groups whose runs did not all start from the same weights file
    (by the SHA-256 each run recorded): such a comparison measures the start, not the backend."""
    groups: dict[tuple[str, int], set] = {}
    for r in results:
        groups.setdefault((r["cell"], r["seed"]), set()).add(r["start_sha256"])
    return [{"run": f"{cell or 'baseline'} seed {seed}",
             "reason": f"the backends started from different weights files (SHA-256 {', '.join(sorted(map(str, shas)))})"}
            for (cell, seed), shas in groups.items() if len(shas) > 1]


def run_grid(options: dict, backends: tuple[str, ...], runs: list[Run], out_dir: Path, num_classes: int,
             log: Callable[[str], None] = print) -> tuple[list[dict], list[dict], dict[Start, Path]]:
    """Trains `runs` (reusing finished ones in `out_dir`), each from its Start's weights file;
    returns the results, the failures (a failed run, or a cell whose backends did not start from
    one file) and the starting files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    init_files = starting_points(options, backends[0], runs, out_dir, num_classes, log)
    results, failures = [], []
    for i, run in enumerate(runs, 1):
        header = f"[{i}/{len(runs)}] {run.backend}  {run.cell or 'baseline'}  seed {run.seed}"
        code = train_run(options, run, init_files[start_of(options, run)], out_dir, header, log)
        if code:
            failures.append({"run": run.dirname, "reason": f"exit {code}"})
        else:
            results.append(_result(run, out_dir / "runs" / run.dirname))
    if not results:
        raise CompareError(f"every run failed: {failures}")
    return results, failures + unshared_starts(results), init_files


def invoked_command(default: str) -> str:
    """The command line that started this process, to print beside its results."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else default


def run_compare(
    options: dict,
    backends: tuple[str, ...],
    factors: dict[str, list[str]],
    seeds: list[int],
    out_dir: Path,
    num_classes: int,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the grid (reusing finished runs in `out_dir`), writes compare.md/json and curves.png."""
    command = invoked_command("compare")
    results, failures, init_files = run_grid(options, backends, plan_runs(backends, factors, seeds), out_dir,
                                             num_classes, log)
    text, summary = summarise(results, backends, factors, command)
    if failures:
        text += "\n## Failed runs\n\n" + "\n".join(f"- {f['run']}: {f['reason']}" for f in failures) + "\n"
    plot_curves(results, out_dir / "curves.png")
    with atomic_write(out_dir / "compare.md") as tmp:
        tmp.write_text(text)
    report = {
        "command": command, "options": options, "backends": list(backends), "factors": factors, "seeds": seeds,
        "initial_weights": {start.filename: str(p) for start, p in init_files.items()},
        "runs": results, "failures": failures, "summary": summary,
    }
    write_json(out_dir / "compare.json", report)
    return report | {"markdown": text}
