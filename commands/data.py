"""`make-demo-data`, `audit`, `download` and `pipeline-hash`: the data, before any training."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from commands.common import (
    RECIPE,
    UserError,
    data_dir_option,
    out_option,
    user_errors,
)
from data import WORKERS
from data.audit import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_CORRELATION
from data.demo import DEMO_SEED, TEST_PER_CLASS, TRAIN_PER_CLASS
from data.download import DATASET
from errors import UserInputError
from training.config import AUGMENTATION, DATA, TrainConfig
from training.options import (
    GroupedCommand,
    click_options,
    config_file_option,
    field_names,
)


@click.command("make-demo-data")
@click.argument("out_dir", type=click.Path())
@click.option("--train-per-class", default=TRAIN_PER_CLASS, show_default=True, type=click.IntRange(1))
@click.option("--test-per-class", default=TEST_PER_CLASS, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=DEMO_SEED, show_default=True, type=int)
@click.option("--dicom", is_flag=True, help="Write every image as an MR DICOM file (12 bits stored; MONOCHROME1 and 2, with and without a window).")
@click.option("--replace", is_flag=True, help="Replace a demo dataset this command wrote before (only its own files; any other file there is refused).")
def make_demo_data_command(out_dir: str, train_per_class: int, test_per_class: int, seed: int, dicom: bool,
                           replace: bool) -> None:
    """Write the synthetic phantom dataset (a smoke test, not medical data) to OUT_DIR, a new or empty folder."""
    from data.demo import make_demo_data

    try:
        counts = make_demo_data(out_dir, train_per_class, test_per_class, seed, replace=replace, dicom=dicom)
    except UserInputError as e:
        raise UserError(str(e)) from None
    kind = "DICOM " if dicom else ""
    click.echo(f"Wrote {counts['Training']} training and {counts['Testing']} test {kind}images to {out_dir}")


@click.command()
@data_dir_option("Folder with Training/<class>/* and/or Testing/<class>/*.", required=True)
@click.option("--max-distance", default=DEFAULT_MAX_DISTANCE, show_default=True, type=click.IntRange(0, 64), help="Candidate near pair: dHash (64 bits, of the content box) within this many bits.")
@click.option("--min-correlation", default=DEFAULT_MIN_CORRELATION, show_default=True, type=click.FloatRange(-1, 1), help="A candidate is a near duplicate when the 64x64 thumbnails correlate this much.")
@out_option("Where to write every group with its files.", default="audit.json", path_type=click.Path(dir_okay=False), show_default=True)
@click.option("--workers", default=WORKERS, show_default=True, type=click.IntRange(1))
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


@click.command()
@click.option("--dest", default=None, type=click.Path(file_okay=False), help="Folder to download into (default: kagglehub's cache, ~/.cache/kagglehub).")
@click.option("--dataset", default=DATASET, show_default=True, help="Kaggle dataset handle (owner/name[/versions/N]).")
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


@click.command("pipeline-hash", cls=GroupedCommand)
@click_options(TrainConfig, field_names(TrainConfig, DATA, AUGMENTATION))
@click.option("--epoch", default=0, show_default=True, type=click.IntRange(0))
@click.option("--batches", "num_batches", default=4, show_default=True, type=click.IntRange(1), help="How many batches to hash.")
@config_file_option(TrainConfig)
@RECIPE
@user_errors
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


COMMANDS = (make_demo_data_command, audit, download, pipeline_hash_command,)
