"""`train`, `hybrid` and `init-weights`: one training run, or the weights file runs start from."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from commands.common import (
    NOT_REQUIRED,
    OVERWRITE,
    RECIPE,
    RESUME,
    UserError,
    user_errors,
)
from training.config import HYBRID_RECIPE, TrainConfig
from training.options import (
    GroupedCommand,
    click_options,
    config_file_option,
)


@click.command(cls=GroupedCommand)
@click_options(TrainConfig, overrides=NOT_REQUIRED)
@config_file_option(TrainConfig)
@RECIPE
@RESUME
@OVERWRITE
@user_errors
def train(**options) -> None:
    """Fine-tune the ResNet50 classifier (or the hybrid) and write a run directory."""
    _train(options)


@click.command(cls=GroupedCommand)
@click_options(TrainConfig, overrides={**HYBRID_RECIPE, **NOT_REQUIRED})
@config_file_option(TrainConfig)
@RECIPE
@RESUME
@OVERWRITE
@user_errors
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
    from backend.startup import start_environment

    os.environ.update(start_environment(cfg.deterministic, cfg.devices))
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



# The options that decide a weights file's contents: the model's shape, the backbone's start, the seed.
WEIGHTS_FILE_OPTIONS = ("image_size", "weights", "seed", "arch", "model", "cut", "head_blocks", "head_filters", "se")


@click.command("init-weights", cls=GroupedCommand)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--num-classes", default=4, show_default=True, type=click.IntRange(2))
@click_options(TrainConfig, WEIGHTS_FILE_OPTIONS)
@user_errors
def init_weights(path: str, num_classes: int, image_size: int, weights: str, seed: int, **architecture) -> None:
    """Build the model once and save its weights to PATH (*.weights.h5), for --init-weights."""
    if not path.endswith(".weights.h5"):
        raise UserError(f"{path}: the file name must end in .weights.h5")
    import keras

    from training.train import save_initial_weights

    model = save_initial_weights(Path(path), num_classes, image_size, weights, seed, **architecture)
    click.echo(f"wrote {path} ({keras.backend.backend()}, {model.count_params():,} parameters)")


COMMANDS = (train, hybrid, init_weights,)
