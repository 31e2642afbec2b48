"""`parity`, `compare` and `reproduce`: studies over backends, factors and seeds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from commands.common import (
    NOT_REQUIRED,
    RECIPE,
    UserError,
    backends_option,
    out_option,
    user_errors,
)
from studies.compare import FACTORS  # Keras-free, like everything imported here
from studies.parity import ParityConfig
from training.config import TrainConfig
from training.options import (
    GroupedCommand,
    GroupedOption,
    LevelList,
    click_options,
    config_file_option,
    field_names,
    level_lists,
)


@click.command(cls=GroupedCommand)
@backends_option("What is checked")
@click_options(ParityConfig)
@out_option("Folder for parity.json, parity.md and the weights file (default runs/parity-<time>).")
@click.option("--plant", multiple=True, hidden=True, help="BACKEND:weight|preprocess, a deliberate difference (tests the check).")
@user_errors
def parity(backends, out, plant, **options) -> None:
    """Check that the backends agree: logits, loss, gradients, one SGD step. Exit 1 on FAIL."""
    import time

    from studies.parity import PLANTS, ModelFileError, ParityError, format_parity_table, run_parity

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
    except ModelFileError as e:
        raise UserError(str(e)) from None
    except ParityError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_parity_table(report))
    click.echo(f"\nlosses: {', '.join(f'{b} {v:.6f}' for b, v in report['losses'].items())}")
    for pair, agreed in (report["folder_agreement"] or {}).items():
        click.echo(f"{pair}: the same prediction on {agreed['same_prediction']} of {agreed['images']} images of the "
                   f"folder, probabilities within {agreed['max_probability_difference']:.2e}")
    click.echo(f"{'PASS' if report['passed'] else 'FAIL'}: {out_dir / 'parity.json'}")
    if not report["passed"]:
        raise SystemExit(1)



@click.command(cls=GroupedCommand)
@click_options(TrainConfig, [n for n in field_names(TrainConfig) if n != "seed"], overrides=level_lists(TrainConfig, *FACTORS))
@backends_option("Comparison")
@click.option("--seeds", default="0", show_default=True, type=LevelList(click.INT), cls=GroupedOption, group="Comparison", help="Repeat every cell over these seeds (batch order, augmentation, head init).")
@config_file_option(TrainConfig)
@RECIPE
@user_errors
def compare(backends, seeds, out, config_file, **options) -> None:
    """Train one configuration on each backend from one weights file; tables, effects, curves.

    --model, --preprocess, --augment, --weights, --precision and --precise-bn take comma-separated levels: the
    run becomes a grid (backend x levels x seeds) and the summary gives each factor's main effect.
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
    for augment in factors["augment"]:  # e.g. keras-generator with a --decode-size larger than the input
        TrainConfig(**dict(fixed, augment=augment)).augment_config()
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


@click.command(cls=GroupedCommand)
@click_options(TrainConfig, [n for n in field_names(TrainConfig) if n != "seed"], overrides=NOT_REQUIRED)
@backends_option("Comparison")
@click.option("--seeds", default="0,1", show_default=True, type=LevelList(click.INT), cls=GroupedOption, group="Comparison", help="Repeat every step over these seeds (two or more give 95% intervals).")
@click.option("--readings/--no-readings", default=False, show_default=True, cls=GroupedOption, group="Comparison",
              help="Also train the baseline under the other readings of the study's Keras text (caffe only, rescale "
                   "only, backbone frozen) and write the readings table.")
@click.option("--rescore-precise-bn", default=0, show_default=True, type=click.IntRange(0), metavar="N",
              cls=GroupedOption, group="Comparison",
              help="Also score every run (the readings' too) with BatchNorm statistics recomputed from N training "
                   "batches (`evaluate --precise-bn N`: the scores of runs trained with --precise-bn N, without "
                   "training again) and write the tables before and after. 0: off.")
@config_file_option(TrainConfig)
@user_errors
def reproduce(backends, seeds, readings, rescore_precise_bn, out, config_file, **options) -> None:
    """The study's gap, one factor at a time: seed-keras, then each factor changed toward seed-pytorch.

    Steps: preprocessing, augmentation (as torchvision runs it), BatchNorm momentum, Adam's epsilon,
    architecture with its checkpoint (the last step is the seed-pytorch recipe). Options given here hold on every step (e.g.
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
    if rescore_precise_bn and options["precise_bn"]:
        raise click.UsageError("--rescore-precise-bn scores runs trained without --precise-bn again; give one of them")
    _check_reproduce_options(options, given, readings)
    splits = make_splits(options["data_dir"], options["val_split"], options["test_split"], options["split_seed"])
    if not splits.test:  # every effect is a difference in test accuracy
        raise UserError(f"{options['data_dir']} has no Testing/ folder: give --test-split (e.g. 0.2) to hold out a test set")
    _grid_command("reproduce", out, ("reproduce.md", "reproduce.json", "waterfall.png", "curves.png"), lambda out_dir: run_reproduce(
        options, given, backends, seeds, out_dir, len(splits.classes), log=click.echo, readings=readings,
        rescore_precise_bn=rescore_precise_bn))


def _check_reproduce_options(options: dict, fixed: dict, readings: bool) -> None:
    """Every step's options are checked before the first run: the starting weights of each step
    (offline ImageNet or torchvision weights fail here, in a second), the schedule and the
    augmentation with its decode size."""
    from model.weights import resolve_backbone_weights
    from studies.reproduce import plan_readings, plan_steps, step_options

    shared = step_options(options, fixed)
    for step in plan_steps(fixed) + (plan_readings(fixed) if readings else []):
        chosen = dict(shared, **dict(step.changes))
        step_config = TrainConfig(**chosen)
        step_config.check_schedule()
        step_config.augment_config()
        step_config.resolved_arch  # noqa: B018 -- the architecture fits the weights
        resolve_backbone_weights(chosen["weights"])


COMMANDS = (parity, compare, reproduce,)
