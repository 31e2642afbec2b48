"""Brain-tumor MRI classification with one Keras 3 codebase on torch, tensorflow and jax.

Pick the backend with KERAS_BACKEND, e.g.

    KERAS_BACKEND=torch python cli.py train --data-dir DIR
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from bench.train import BenchSettings
from data.audit import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_CORRELATION
from errors import UserInputError
from studies.compare import FACTORS  # Keras-free, like everything imported here
from studies.parity import ParityConfig
from training.config import AUGMENTATION, DATA, HYBRID_RECIPE, TrainConfig
from training.options import (
    GroupedCommand,
    GroupedOption,
    LevelList,
    click_options,
    config_file_option,
    field_names,
    level_lists,
    preset_option,
)
from training.recipes import RECIPES

RECIPE = preset_option({name: r.options for name, r in RECIPES.items()},
                       "Start from a named preset of options (options given here or by --config override it): "
                       + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items()) + ".")

# Quieter start-up for tensorflow; set before any backend import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(click.ClickException):
    """A problem with the user's input: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _user_errors(fn):
    """Turns the project's input errors (`errors.UserInputError`) into `UserError`: one line, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from backend.selection import check_backend

        try:
            check_backend()
            return fn(*args, **kwargs)
        except UserInputError as e:
            raise UserError(str(e)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Brain-tumor MRI classification on any Keras 3 backend (set KERAS_BACKEND)."""


# --data-dir may come from --config or, with --resume, from the run itself: checked in _train.
NOT_REQUIRED = {"data_dir": {"default": None}}
RESUME = click.option("--resume", default=None, type=click.Path(file_okay=False), cls=GroupedOption, group="Run", help="Continue the interrupted run in this directory after its last finished epoch (its config.json's options are used; --data-dir may name the data's new place).")
OVERWRITE = click.option("--overwrite", is_flag=True, cls=GroupedOption, group="Run", help="Replace the run in --out: the files this project wrote there are removed before anything new is written; a folder holding anything else is refused (without --overwrite, so is any non-empty --out).")


@cli.command(cls=GroupedCommand)
@click_options(TrainConfig, overrides=NOT_REQUIRED)
@config_file_option(TrainConfig)
@RECIPE
@RESUME
@OVERWRITE
@_user_errors
def train(**options) -> None:
    """Fine-tune the ResNet50 classifier (or the hybrid) and write a run directory."""
    _train(options)


@cli.command(cls=GroupedCommand)
@click_options(TrainConfig, overrides={**HYBRID_RECIPE, **NOT_REQUIRED})
@config_file_option(TrainConfig)
@RECIPE
@RESUME
@OVERWRITE
@_user_errors
def hybrid(**options) -> None:
    """Train the hybrid: ResNet50 cut at --cut plus a custom CNN head, in two phases.

    Phase 1 trains the head with the backbone frozen (--head-epochs, --head-lr); phase 2
    also trains the top --unfreeze-blocks residual blocks (--finetune-epochs, --finetune-lr,
    warmup and cosine decay). The backbone's BatchNorm stays on its moving statistics
    (--bn-train to change). Writes a train run directory plus stability.csv/png.
    """
    _train(options)


def _train(options: dict) -> None:
    from training.config import preflight

    resume, overwrite, _ = options.pop("resume"), options.pop("overwrite"), options.pop("config_file")
    if resume:
        cfg = _resumed_config(resume, options)
        if cfg is None:
            return
    elif options["data_dir"] is None:
        raise click.UsageError("Missing option '--data-dir' (or --config FILE, or --resume RUN_DIR).")
    else:
        cfg = TrainConfig(**options)
    checked = preflight(cfg, resume=bool(resume), overwrite=overwrite)  # Before the backend loads: bad input fails fast.
    if cfg.deterministic:
        from backend.determinism import deterministic_environment

        os.environ.update(deterministic_environment())  # XLA reads its flags at import.
    from backend.parallel import data_parallel_environment

    os.environ.update(data_parallel_environment(cfg.devices))  # jax on a CPU: N host devices, set before jax starts
    from training.train import DivergedError, RunInterruptedError, RunStoppedError, run_training

    try:
        run_training(cfg, checked, resume=bool(resume))
    except (DivergedError, RunStoppedError) as e:
        raise click.ClickException(str(e)) from None
    except RunInterruptedError as e:  # the shell's code for a signal (130, 143), one line
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)


def _resumed_config(run_dir: str, options: dict) -> TrainConfig | None:
    """The interrupted run's own options (None when it finished), with the data's new place
    when --data-dir is given; other options given with --resume are named as ignored."""
    from training.resume import resume_config

    ctx = click.get_current_context()
    given = [name for name in options if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    cfg = resume_config(run_dir, options["data_dir"] if "data_dir" in given else None)
    if cfg is None:
        click.echo(f"{run_dir} finished already (metrics.json is there); nothing to resume")
        return None
    ignored = [name for name in given if name not in ("out", "data_dir") and options[name] != getattr(cfg, name)]
    if ignored:
        click.echo(f"--resume: the run's own options are used; ignoring {', '.join('--' + n.replace('_', '-') for n in ignored)}",
                   err=True)
    return cfg


@cli.command("make-demo-data")
@click.argument("out_dir", type=click.Path())
@click.option("--train-per-class", default=40, show_default=True, type=click.IntRange(1))
@click.option("--test-per-class", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--replace", is_flag=True, help="Replace a demo dataset this command wrote before (only its own files; any other file there is refused).")
def make_demo_data_command(out_dir: str, train_per_class: int, test_per_class: int, seed: int, replace: bool) -> None:
    """Write the synthetic phantom dataset (a smoke test, not medical data) to OUT_DIR, a new or empty folder."""
    from data.demo import make_demo_data

    try:
        counts = make_demo_data(out_dir, train_per_class, test_per_class, seed, replace=replace)
    except UserInputError as e:
        raise UserError(str(e)) from None
    click.echo(f"Wrote {counts['Training']} training and {counts['Testing']} test images to {out_dir}")


@cli.command()
@click.option("--data-dir", required=True, type=click.Path(), help="Folder with Training/<class>/* and/or Testing/<class>/*.")
@click.option("--max-distance", default=DEFAULT_MAX_DISTANCE, show_default=True, type=click.IntRange(0, 64), help="Candidate near pair: dHash (64 bits, of the content box) within this many bits.")
@click.option("--min-correlation", default=DEFAULT_MIN_CORRELATION, show_default=True, type=click.FloatRange(-1, 1), help="A candidate is a near duplicate when the 64x64 thumbnails correlate this much.")
@click.option("--out", default="audit.json", show_default=True, type=click.Path(dir_okay=False), help="Where to write every group with its files.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1))
def audit(data_dir: str, max_distance: int, min_correlation: float, out: str, workers: int) -> None:
    """Find exact and near duplicate images, within and across splits, and label conflicts."""
    import time

    from data.audit import audit_dataset, format_audit, list_dataset
    from data.discovery import DatasetError
    from training.rundir import OutputDirError, check_output_path, write_json

    start = time.perf_counter()
    try:
        check_output_path(out, "--out", data_dir=data_dir)
    except OutputDirError as e:
        raise UserError(str(e)) from None
    try:
        total = len(list_dataset(data_dir)[0])
    except DatasetError as e:
        raise UserError(str(e)) from None
    with click.progressbar(length=total, label="Hashing images", file=sys.stderr) as bar:
        done = [0]

        def progress(count: int) -> None:
            bar.update(count - done[0])
            done[0] = count

        report = audit_dataset(data_dir, max_distance, min_correlation, workers, progress)
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    click.echo(format_audit(report))
    click.echo(f"\nWrote {out} ({len(report['groups'])} groups with their files) in {report['seconds']} s")


@cli.command()
@click.option("--dest", default=None, type=click.Path(file_okay=False), help="Folder to download into (default: kagglehub's cache, ~/.cache/kagglehub).")
@click.option("--dataset", default="masoudnickparvar/brain-tumor-mri-dataset", show_default=True, help="Kaggle dataset handle (owner/name[/versions/N]).")
def download(dest: str | None, dataset: str) -> None:
    """Fetch the Kaggle Brain Tumor MRI Dataset with kagglehub and check its layout."""
    from data.discovery import DatasetError
    from data.download import DownloadError
    from data.download import download as fetch

    try:
        root, notes = fetch(dataset, dest)
    except (DownloadError, DatasetError) as e:
        raise UserError(str(e)) from None
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(f"Dataset ready: {root} ({'layout and class counts as published' if not notes else 'see the warnings'})")
    click.echo(f"Train on it: python cli.py train --data-dir {root}")


@cli.command("pipeline-hash", cls=GroupedCommand)
@click_options(TrainConfig, field_names(TrainConfig, DATA, AUGMENTATION))
@click.option("--epoch", default=0, show_default=True, type=click.IntRange(0))
@click.option("--batches", "num_batches", default=4, show_default=True, type=click.IntRange(1), help="How many batches to hash.")
@config_file_option(TrainConfig)
@RECIPE
@_user_errors
def pipeline_hash_command(epoch: int, num_batches: int, config_file: str | None, **options) -> None:
    """Print a SHA-256 of the first training batches of an epoch, as `train` feeds them."""
    import keras

    from data.loader import pipeline_hash
    from training.train import scanned_training_batches

    cfg = TrainConfig(**options)
    batches = scanned_training_batches(cfg)
    num_batches = min(num_batches, len(batches))
    digest = pipeline_hash(batches, epoch, num_batches)
    click.echo(f"{digest}  backend={keras.backend.backend()} epoch={epoch} batches={num_batches} workers={cfg.workers}")


@cli.command("bench-pipeline")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False), help="Folder with Training/<class>/*.")
@click_options(TrainConfig, ["image_size", "batch_size"])
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(2), help="Epoch 1 is cold, the last warm.")
@click.option("--workers", "workers_levels", default="2", show_default=True, type=LevelList(click.IntRange(1)), help="Loader threads; several (e.g. 1,2,4) give a scaling table.")
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="Also measure the tf.data baseline (at the most workers).")
def bench_pipeline_command(data_dir: str, image_size: int, batch_size: int, epochs: int, workers_levels: list[int],
                           baseline: bool) -> None:
    """Measure input-pipeline throughput against a tf.data baseline, side by side, and how it scales with --workers."""
    from bench.pipeline import format_report, format_scaling, measure, warm_file_cache

    warm_file_cache(data_dir)
    ours = {}
    for workers in workers_levels:
        click.echo(f"measuring ours, {workers} workers ...", err=True)
        ours[workers] = measure("ours", data_dir, image_size, batch_size, epochs, workers)
    if len(ours) > 1:
        click.echo(format_scaling(ours, os.cpu_count()) + "\n")
    if baseline:
        click.echo("measuring tfdata ...", err=True)
        most = max(ours)
        click.echo(format_report(ours[most], measure("tfdata", data_dir, image_size, batch_size, epochs, most)))


@cli.command("bench-train", cls=GroupedCommand)
@click_options(TrainConfig, ["image_size", "batch_size", "precision", "jit_compile", "steps_per_execution", "workers"])
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), cls=GroupedOption, group="Benchmark", help="Folder with Training/<class>/* for keras-fit (default: phantom demo images made for the run).")
@click.option("--warmup-steps", default=BenchSettings.warmup_steps, show_default=True, type=click.IntRange(1), cls=GroupedOption, group="Benchmark", help="Steps left out before timing (compilation, allocator growth).")
@click.option("--window-steps", default=BenchSettings.window_steps, show_default=True, type=click.IntRange(1), cls=GroupedOption, group="Benchmark", help="Steps per timed window.")
@click.option("--windows", default=BenchSettings.windows, show_default=True, type=click.IntRange(1), cls=GroupedOption, group="Benchmark", help="Timed windows; the median is reported.")
@click.option("--native/--no-native", default=True, show_default=True, cls=GroupedOption, group="Benchmark", help="Also time native torchvision (when it imports).")
@click.option("--torch-compile", is_flag=True, cls=GroupedOption, group="Benchmark", help="Native torchvision through torch.compile.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), cls=GroupedOption, group="Benchmark", help="Also write the results as JSON here.")
@_user_errors
def bench_train_command(out: str | None, native: bool, **settings) -> None:
    """Training images/s and peak memory: fit through the pipeline, the bare train step, native torchvision."""
    from backend.selection import backend_subprocess_env, selected_backend
    from bench.train import format_report, run_bench

    backend = selected_backend()
    report = run_bench(BenchSettings(**settings), backend, backend_subprocess_env(backend), native,
                       log=lambda line: click.echo(line, err=True))
    click.echo(format_report(report))
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


def _installed_backends() -> str:
    import importlib.util

    from backend.selection import SUPPORTED_BACKENDS

    return ",".join(b for b in SUPPORTED_BACKENDS if importlib.util.find_spec(b) is not None)


class BackendList(click.ParamType):
    name = "B1,B2,..."

    def convert(self, value, param, ctx):
        from backend.selection import SUPPORTED_BACKENDS

        items = value if isinstance(value, tuple | list) else str(value).split(",")  # a list from --config
        names = tuple(str(v).strip() for v in items if str(v).strip())
        unknown = [n for n in names if n not in SUPPORTED_BACKENDS]
        if unknown or not names:
            self.fail(f"{value!r}: choose from {', '.join(SUPPORTED_BACKENDS)}", param, ctx)
        return tuple(dict.fromkeys(names))


@cli.command(cls=GroupedCommand)
@click.option("--backends", default=_installed_backends, show_default="all installed", type=BackendList(), cls=GroupedOption, group="What is checked")
@click_options(ParityConfig)
@click.option("--out", default=None, type=click.Path(), help="Folder for parity.json, parity.md and the weights file (default runs/parity-<time>).")
@click.option("--plant", multiple=True, hidden=True, help="BACKEND:weight|preprocess, a deliberate difference (tests the check).")
@_user_errors
def parity(backends, out, plant, **options) -> None:
    """Check that the backends agree: logits, loss, gradients, one SGD step. Exit 1 on FAIL."""
    import time

    from studies.parity import PLANTS, ParityError, format_parity_table, run_parity

    if len(backends) < 2:
        raise UserError("parity needs at least two backends")
    planted = {}
    for item in plant:
        backend, _, what = item.partition(":")
        if backend not in backends or what not in PLANTS:
            raise UserError(f"--plant {item!r}: expected BACKEND:{'|'.join(PLANTS)} with a compared backend")
        planted[backend] = what
    cfg = ParityConfig(backends=backends, plant=planted, **options)
    out_dir = Path(out or f"runs/parity-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        report = run_parity(cfg, out_dir, log=lambda m: click.echo(m, err=True))
    except ParityError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_parity_table(report))
    click.echo(f"\nlosses: {', '.join(f'{b} {v:.6f}' for b, v in report['losses'].items())}")
    click.echo(f"{'PASS' if report['passed'] else 'FAIL'}: {out_dir / 'parity.json'}")
    if not report["passed"]:
        raise SystemExit(1)


# The options that decide a weights file's contents: the model's shape, the backbone's start, the seed.
WEIGHTS_FILE_OPTIONS = ("image_size", "weights", "seed", "arch", "model", "cut", "head_blocks", "head_filters", "se")


@cli.command("init-weights", cls=GroupedCommand)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--num-classes", default=4, show_default=True, type=click.IntRange(2))
@click_options(TrainConfig, WEIGHTS_FILE_OPTIONS)
@_user_errors
def init_weights(path: str, num_classes: int, image_size: int, weights: str, seed: int, **architecture) -> None:
    """Build the model once and save its weights to PATH (*.weights.h5), for --init-weights."""
    if not path.endswith(".weights.h5"):
        raise UserError(f"{path}: the file name must end in .weights.h5")
    import keras

    from backend.determinism import set_random_seed
    from model import ModelSpec, build_model
    from model.weights import resolve_arch

    architecture["arch"] = resolve_arch(architecture["arch"], weights)  # the default: what --weights implies
    set_random_seed(seed)
    model = build_model(ModelSpec(architecture.pop("model"), **architecture), num_classes, image_size, weights)
    model.save_weights(path)
    click.echo(f"wrote {path} ({keras.backend.backend()}, {model.count_params():,} parameters)")


@cli.command(cls=GroupedCommand)
@click_options(TrainConfig, [n for n in field_names(TrainConfig) if n != "seed"], overrides=level_lists(TrainConfig, *FACTORS))
@click.option("--backends", default=_installed_backends, show_default="all installed", type=BackendList(), cls=GroupedOption, group="Comparison")
@click.option("--seeds", default="0", show_default=True, type=LevelList(click.INT), cls=GroupedOption, group="Comparison", help="Repeat every cell over these seeds (batch order, augmentation, head init).")
@config_file_option(TrainConfig)
@RECIPE
@_user_errors
def compare(backends, seeds, out, config_file, **options) -> None:
    """Train one configuration on each backend from one weights file; tables, effects, curves.

    --model, --preprocess, --augment, --weights and --precision take comma-separated levels: the run becomes
    a grid (backend x levels x seeds) and the summary gives each factor's main effect.
    """
    from data.discovery import make_splits
    from model.weights import check_weights_file, resolve_backbone_weights
    from studies.compare import run_compare

    factors = {f: options[f] for f in FACTORS}
    for level in factors["weights"]:
        resolve_backbone_weights(level)  # Offline ImageNet fails here, before any run.
    if options["init_weights"]:
        check_weights_file(Path(options["init_weights"]), "--init-weights file")
    splits = make_splits(options["data_dir"], options["val_split"], options["test_split"], options["split_seed"])
    fixed = {k: v for k, v in options.items() if k not in FACTORS}
    fixed.update({f: levels[0] for f, levels in factors.items()})
    for model in factors["model"]:  # e.g. --unfreeze-blocks that one model's backbone lacks
        TrainConfig(**dict(fixed, model=model)).check_schedule()
    grid = {f: levels for f, levels in factors.items() if len(levels) > 1}
    _grid_command("compare", out, ("compare.md", "compare.json", "curves.png"), lambda out_dir: run_compare(
        fixed, backends, grid, seeds, out_dir, len(splits.classes), log=click.echo))


def _grid_command(kind: str, out: str | None, files: tuple[str, ...], run: Callable[[Path], dict]) -> None:
    """What compare and reproduce share once their options are checked: the output folder, the
    runs (`run(out_dir)`), the report printed, exit 1 when a run failed."""
    import time

    from studies.compare import CompareError
    from training.rundir import prepare_run_dir

    out_dir = Path(prepare_run_dir(out or f"runs/{kind}-{time.strftime('%Y%m%d-%H%M%S')}", kind))
    try:
        report = run(out_dir)
    except CompareError as e:
        raise click.ClickException(str(e)) from None
    click.echo("\n" + report["markdown"])
    click.echo(f"\nWrote {', '.join(str(out_dir / name) for name in files)}")
    if report["failures"]:
        raise SystemExit(1)


@cli.command(cls=GroupedCommand)
@click_options(TrainConfig, [n for n in field_names(TrainConfig) if n != "seed"], overrides=NOT_REQUIRED)
@click.option("--backends", default=_installed_backends, show_default="all installed", type=BackendList(), cls=GroupedOption, group="Comparison")
@click.option("--seeds", default="0,1", show_default=True, type=LevelList(click.INT), cls=GroupedOption, group="Comparison", help="Repeat every step over these seeds (two or more give 95% intervals).")
@config_file_option(TrainConfig)
@_user_errors
def reproduce(backends, seeds, out, config_file, **options) -> None:
    """The study's gap, one factor at a time: seed-keras, then each factor changed toward seed-pytorch.

    Steps: preprocessing, augmentation, BatchNorm momentum, architecture with its checkpoint
    (the last step is the seed-pytorch recipe). Options given here hold on every step (e.g.
    --weights none --image-size 64 --epochs 2 for an offline run). Writes reproduce.md/json,
    waterfall.png: each step's effect and the framework effect, with 95% intervals.
    """
    from data.discovery import make_splits
    from studies.reproduce import run_reproduce

    if options["data_dir"] is None:
        raise click.UsageError("Missing option '--data-dir' (or --config FILE).")
    ctx = click.get_current_context()
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                                   click.core.ParameterSource.DEFAULT_MAP)}
    given.pop("recipe", None)
    _check_reproduce_options(options, given)
    splits = make_splits(options["data_dir"], options["val_split"], options["test_split"], options["split_seed"])
    if not splits.test:  # every effect is a difference in test accuracy
        raise UserError(f"{options['data_dir']} has no Testing/ folder: give --test-split (e.g. 0.2) to hold out a test set")
    _grid_command("reproduce", out, ("reproduce.md", "reproduce.json", "waterfall.png", "curves.png"), lambda out_dir: run_reproduce(
        options, given, backends, seeds, out_dir, len(splits.classes), log=click.echo))


def _check_reproduce_options(options: dict, fixed: dict) -> None:
    """Every step's options are checked before the first run: the starting weights of each step
    (offline ImageNet or torchvision weights fail here, in a second) and the schedule."""
    from model.weights import resolve_backbone_weights
    from studies.reproduce import plan_steps, step_options

    shared = step_options(options, fixed)
    for step in plan_steps(fixed):
        chosen = dict(shared, **dict(step.changes))
        step_config = TrainConfig(**chosen)
        step_config.check_schedule()
        step_config.resolved_arch  # noqa: B018 -- the architecture fits the weights
        resolve_backbone_weights(chosen["weights"])


RUN_DIR = click.argument("run_dir", type=click.Path(file_okay=False))
CHECKPOINT = click.option("--checkpoint", default="final", show_default=True, type=click.Choice(["final", "best", "last"]), help="final: model.keras as saved; best/last: with best.weights.h5 or last.weights.h5.")


@cli.command()
@RUN_DIR
@click.option("--data-dir", default=None, type=click.Path(), help="Dataset folder (default: the run's own).")
@click.option("--split", default="test", show_default=True, help="test, val or train: the run's own split, rebuilt from its options; or a split folder of --data-dir, e.g. Testing.")
@CHECKPOINT
@click_options(TrainConfig, ["batch_size", "workers"])
@_user_errors
def evaluate(run_dir: str, data_dir: str | None, split: str, checkpoint: str, batch_size: int, workers: int) -> None:
    """Score a trained run on a labelled split under the active backend; writes eval-<split>-<backend>.json."""
    from inference.evaluate import evaluate_run
    from inference.run import load_run, split_examples

    run = load_run(run_dir, checkpoint)
    examples, source = split_examples(run, data_dir, split)
    evaluate_run(run, examples, split, source, batch_size, workers, log=click.echo)


@cli.command()
@RUN_DIR
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Also write the rows to this CSV file.")
@click.option("--threshold", default=0.6, show_default=True, type=click.FloatRange(0, 1), help="Flag low_confidence when the top probability is below this (a classifier answers even for a non-MRI image).")
@CHECKPOINT
@click_options(TrainConfig, ["batch_size"])
@_user_errors
def predict(run_dir: str, paths: tuple[str, ...], csv_path: str | None, threshold: float, checkpoint: str, batch_size: int) -> None:
    """Predict the class of images (files or folders). Exit 1 when some could not be read."""
    from inference.run import format_predictions, load_run, predict_files, write_predictions_csv
    from training.rundir import check_output_path, recorded_data_folder

    if csv_path:  # before the predictions, not after them
        check_output_path(csv_path, "--csv", run_dir, recorded_data_folder(run_dir))
    run = load_run(run_dir, checkpoint)
    rows = predict_files(run, list(paths), threshold, batch_size)
    if not rows:
        raise UserError(f"no files found under {', '.join(paths)}")
    click.echo(format_predictions(rows, run.classes))
    if csv_path:
        write_predictions_csv(rows, run.classes, csv_path)
        click.echo(f"\nWrote {csv_path}")
    failed = [r for r in rows if r.error]
    for row in failed:
        click.echo(f"error: {row.path}: {row.error}", err=True)
    if failed:
        click.echo(f"{len(failed)} of {len(rows)} files could not be read", err=True)
        raise SystemExit(1)


@cli.command()
@RUN_DIR
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the overlays, gradcam.csv and heatmaps.npz.")
@click.option("--class", "class_name", default=None, help="Explain this class (default: each image's predicted class).")
@CHECKPOINT
@_user_errors
def gradcam(run_dir: str, paths: tuple[str, ...], out: str, class_name: str | None, checkpoint: str) -> None:
    """Grad-CAM heatmaps on the last convolutional stage, saved as overlay PNGs."""

    from inference.gradcam import cam_layer, explain_files
    from inference.run import expand_paths, load_run
    from training.rundir import check_output_path, prepare_run_dir, recorded_data_folder

    check_output_path(out, "--out", run_dir, recorded_data_folder(run_dir), folder=True)
    run = load_run(run_dir, checkpoint)
    if class_name is not None and class_name not in run.classes:
        raise UserError(f"--class {class_name!r}: the model's classes are {', '.join(run.classes)}")
    files = expand_paths(paths)
    if not files:
        raise UserError(f"no files found under {', '.join(paths)}")
    out_dir = prepare_run_dir(out, "gradcam")
    rows = explain_files(run, files, Path(out_dir), class_name)
    layer, tensor = cam_layer(run.model)
    click.echo(f"Grad-CAM on {layer} ({tensor.shape[1]}x{tensor.shape[2]} maps), {len(rows)} files:")
    for r in rows:
        click.echo(f"  {r['path']}: " + (f"error: {r['error']}" if r["error"] else
                                         f"{r['explained_class']} {r['probability']:.3f} -> {r['overlay']}"))
    click.echo(f"Wrote {out_dir}/ (overlays, gradcam.csv, heatmaps.npz)")
    if any(r["error"] for r in rows):
        raise SystemExit(1)


@cli.command()
@RUN_DIR
@click.option("--format", "format_", required=True, type=click.Choice(["onnx", "savedmodel"]), help="onnx (torch or tensorflow backend; jax with jax2onnx) or savedmodel (tensorflow or jax backend).")
@click.option("--out", default=None, type=click.Path(), help="Where to write (default RUN_DIR/export/model.onnx or RUN_DIR/export/saved_model).")
@click.option("--check-images", default=8, show_default=True, type=click.IntRange(1), help="Run the export on this many test images and compare with Keras.")
@CHECKPOINT
@_user_errors
def export(run_dir: str, format_: str, out: str | None, check_images: int, checkpoint: str) -> None:
    """Export the model (softmax probabilities out) and check it against Keras.

    Exit 2 when the active backend cannot produce the format, 1 when the export fails or disagrees.
    """

    from inference.export import ExportError, ExportUnsupportedError, check_supported, export_run, record_path
    from inference.run import load_run
    from training.rundir import check_output_path, recorded_data_folder

    if out:
        check_output_path(out, "--out", run_dir, recorded_data_folder(run_dir), own="export", folder=True)
    try:
        check_supported(format_)  # before loading anything
        record = export_run(load_run(run_dir, checkpoint), format_, Path(out) if out else None, check_images,
                            log=click.echo)
    except ExportUnsupportedError as e:
        raise UserError(str(e)) from None
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Wrote {record['path']} and {record_path(Path(record['path']))}")


@cli.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--gradcam-samples", default=6, show_default=True, type=click.IntRange(0), help="Grad-CAM overlays of test images per run (misclassified first; 0: none).")
@click.option("--data-dir", default=None, type=click.Path(), help="Where the test images are (default: the run's own data folder).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file to write (default PATH/report.html).")
@_user_errors
def report(path: str, gradcam_samples: int, data_dir: str | None, out: str | None) -> None:
    """One self-contained HTML report for a run directory or a compare directory."""
    from inference.report import build_report
    from training.rundir import check_output_path, recorded_data_folder

    check_output_path(out or Path(path) / "report.html", "--out", path, data_dir or recorded_data_folder(path),
                      own="report.html")
    target = build_report(path, gradcam_samples, data_dir, out, log=click.echo)
    click.echo(f"Wrote {target}")


@cli.command("_parity-worker", hidden=True)
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def parity_worker(spec: str, weights: str, out: str) -> None:
    """Compute the parity quantities under the active backend (used by `parity`)."""
    import json

    from studies.parity import ParityConfig, run_worker

    fields = json.loads(Path(spec).read_text())
    fields["backends"] = tuple(fields["backends"])
    run_worker(ParityConfig(**fields), Path(weights), Path(out))


if __name__ == "__main__":
    cli()
