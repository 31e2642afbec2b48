"""Brain-tumor MRI classification with one Keras 3 codebase on torch, tensorflow and jax.

Pick the backend with KERAS_BACKEND, e.g.

    KERAS_BACKEND=torch python cli.py train --data-dir DIR
"""

from __future__ import annotations

import functools
import os

import click

# Quieter start-up for tensorflow; set before any backend import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(click.ClickException):
    """A problem with the user's input: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _user_errors(fn):
    """Turns the project's own input errors into `UserError` (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from engine.backend import BackendError, check_backend

        try:
            check_backend()
            from data.discovery import DatasetError
            from engine.rundir import OutputDirError
            from model.weights import WeightsError

            try:
                return fn(*args, **kwargs)
            except (DatasetError, WeightsError, OutputDirError) as e:
                raise UserError(str(e)) from None
        except BackendError as e:
            raise UserError(str(e)) from None

    return wrapper


class FloatPair(click.ParamType):
    name = "LOW,HIGH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            low, high = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not two comma-separated numbers", param, ctx)
        if low > high:
            self.fail(f"{value!r}: the first number must not exceed the second", param, ctx)
        return (low, high)


def data_options(fn):
    """Options that choose the data and how it is split and fed."""
    options = [
        click.option("--data-dir", required=True, type=click.Path(), help="Folder with Training/<class>/* (and optionally Testing/<class>/*)."),
        click.option("--image-size", default=224, show_default=True, type=click.IntRange(32), help="Square input side in pixels."),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1)),
        click.option("--preprocess", default="caffe", show_default=True, type=click.Choice(["caffe", "imagenet"]), help="caffe: BGR minus ImageNet mean, 0-255 (Keras ImageNet weights); imagenet: x/255 then mean/std (torchvision)."),
        click.option("--val-split", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Stratified fraction of Training used for validation."),
        click.option("--test-split", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Without Testing/: stratified fraction of Training held out as the test set."),
        click.option("--split-seed", default=0, show_default=True, type=int, help="Seed of the validation and test splits."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the batch order, augmentation and model randomness."),
        click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="Loader threads (0: load in the training thread)."),
        click.option("--cache/--no-cache", default=True, show_default=True, help="Keep decoded images in memory (n * size^2 * 3 bytes)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def train_options(fn):
    """Options of the model, the optimizer and the augmentation."""
    options = [
        click.option("--epochs", default=10, show_default=True, type=click.IntRange(1)),
        click.option("--lr", "learning_rate", default=1e-4, show_default=True, type=float, help="Adam learning rate."),
        click.option("--weights", default="imagenet", show_default=True, help="Backbone start: imagenet, none (random) or PATH to a ResNet50 notop .h5 file."),
        click.option("--init-weights", default=None, type=click.Path(), help="Start the whole model from a .weights.h5 file (e.g. another run's initial.weights.h5)."),
        click.option("--freeze", default="none", show_default=True, type=click.Choice(["none", "backbone"]), help="backbone: train only the head; the backbone's BatchNorm stays in inference mode."),
        click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
        click.option("--bn-momentum", default=None, type=click.FloatRange(0, 1, max_open=True), help="Backbone BatchNorm moving-average momentum (default: Keras' 0.99; torchvision's is 0.9)."),
        click.option("--augment", default="standard", show_default=True, type=click.Choice(["standard", "none"]), help="Training augmentation: random resized crop, horizontal flip, rotation."),
        click.option("--crop-scale", default="0.08,1.0", show_default=True, type=FloatPair(), help="Random resized crop: area fraction range."),
        click.option("--crop-ratio", default="0.75,1.3333", show_default=True, type=FloatPair(), help="Random resized crop: aspect ratio range."),
        click.option("--flip-prob", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="Horizontal flip probability (0: off)."),
        click.option("--rotate-degrees", default=10.0, show_default=True, type=click.FloatRange(0, 180), help="Rotation range +-degrees (0: off)."),
        click.option("--out", default=None, type=click.Path(), help="Run directory (default runs/<time>-<backend>/)."),
        click.option("--verbose", default=1, show_default=True, type=click.IntRange(0, 2), help="Keras progress: 0 silent, 1 bar, 2 a line per epoch."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Brain-tumor MRI classification on any Keras 3 backend (set KERAS_BACKEND)."""


@cli.command()
@data_options
@train_options
@_user_errors
def train(**options) -> None:
    """Fine-tune the ResNet50 classifier and write a run directory."""
    from engine.config import TrainConfig, preflight

    cfg = TrainConfig(**options)
    checked = preflight(cfg)  # Before the backend loads: bad input fails fast.
    from engine.train import run_training

    run_training(cfg, checked)


@cli.command("make-demo-data")
@click.argument("out_dir", type=click.Path())
@click.option("--train-per-class", default=40, show_default=True, type=click.IntRange(1))
@click.option("--test-per-class", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
def make_demo_data_command(out_dir: str, train_per_class: int, test_per_class: int, seed: int) -> None:
    """Write the synthetic phantom dataset (a smoke test, not medical data) to OUT_DIR."""
    from data.demo import make_demo_data

    counts = make_demo_data(out_dir, train_per_class, test_per_class, seed)
    click.echo(f"Wrote {counts['Training']} training and {counts['Testing']} test images to {out_dir}")


@cli.command("pipeline-hash")
@data_options
@click.option("--epoch", default=0, show_default=True, type=click.IntRange(0))
@click.option("--batches", "num_batches", default=4, show_default=True, type=click.IntRange(1), help="How many batches to hash.")
@click.option("--augment", default="standard", show_default=True, type=click.Choice(["standard", "none"]))
@_user_errors
def pipeline_hash_command(epoch: int, num_batches: int, augment: str, **options) -> None:
    """Print a SHA-256 of the first training batches of an epoch, as `train` feeds them."""
    import keras

    from data.discovery import make_splits
    from data.loader import DecodedCache, pipeline_hash, scan_examples
    from engine.config import TrainConfig
    from engine.train import training_batches

    cfg = TrainConfig(augment=augment, **options)
    splits = make_splits(cfg.data_dir, cfg.val_split, cfg.test_split, cfg.split_seed)
    cache = DecodedCache() if cfg.cache else None
    train_examples, _ = scan_examples(splits.train, cfg.image_size, cache, cfg.workers)
    batches = training_batches(cfg, train_examples, cache)
    num_batches = min(num_batches, len(batches))
    digest = pipeline_hash(batches, epoch, num_batches)
    click.echo(f"{digest}  backend={keras.backend.backend()} epoch={epoch} batches={num_batches} workers={cfg.workers}")


@cli.command("bench-pipeline")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False), help="Folder with Training/<class>/*.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(2), help="Epoch 1 is cold, the last warm.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1))
def bench_pipeline_command(data_dir: str, image_size: int, batch_size: int, epochs: int, workers: int) -> None:
    """Measure input-pipeline throughput against a tf.data baseline, side by side."""
    from data.benchmark import format_report, measure, warm_file_cache

    warm_file_cache(data_dir)
    results = {}
    for side in ("ours", "tfdata"):
        click.echo(f"measuring {side} ...", err=True)
        results[side] = measure(side, data_dir, image_size, batch_size, epochs, workers)
    click.echo(format_report(results["ours"], results["tfdata"]))


if __name__ == "__main__":
    cli()
