"""`evaluate`, `predict`, `gradcam`, `export`, `report` and `serve`: using a finished run."""

from __future__ import annotations

from pathlib import Path

import click

from backend.exports import EXPORT_FORMATS
from commands.common import (
    CHECKPOINT,
    RUN_DIR,
    UserError,
    data_dir_option,
    out_option,
    user_errors,
)
from inference.limits import MIB, Limits
from training.config import TrainConfig
from training.metrics import LOW_CONFIDENCE
from training.options import (
    click_options,
)


@click.command()
@RUN_DIR
@data_dir_option("Dataset folder (default: the run's own).")
@click.option("--split", default="test", show_default=True, help="test, val or train: the run's own split, rebuilt from its options; or a split folder of --data-dir, e.g. Testing.")
@CHECKPOINT
@click.option("--precise-bn", default=0, show_default=True, type=click.IntRange(0), metavar="N",
              help="First recompute every trainable BatchNorm layer's moving statistics from N of the run's training "
                   "batches, as `train --precise-bn N` does after its last epoch (in memory: the run's files are not "
                   "changed); writes eval-<split>-<backend>-precise-bn<N>.json. 0: off.")
@click_options(TrainConfig, ["batch_size", "workers"])
@user_errors
def evaluate(run_dir: str, data_dir: str | None, split: str, checkpoint: str, precise_bn: int, batch_size: int,
             workers: int) -> None:
    """Score a trained run on a labelled split under the active backend; writes eval-<split>-<backend>.json."""
    from inference.evaluate import evaluate_run, precise_batchnorm
    from inference.run import SPLITS, load_run, split_examples

    run = load_run(run_dir, checkpoint)
    examples, source = split_examples(run, data_dir, split)
    # The statistics come from the run's own training data, also when the scores are on another folder's split.
    training_data = data_dir if split in SPLITS else None
    recomputed = precise_batchnorm(run, training_data, precise_bn, workers) if precise_bn else None
    if recomputed:
        click.echo(f"Precise BatchNorm: {recomputed['layers']} layers' moving statistics recomputed from "
                   f"{recomputed['batches']} training batches (of the epoch after the last, as in training)")
    evaluate_run(run, examples, split, source, batch_size, workers, log=click.echo, recomputed=recomputed)


@click.command()
@RUN_DIR
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Also write the rows to this CSV file.")
@click.option("--threshold", default=LOW_CONFIDENCE, show_default=True, type=click.FloatRange(0, 1), help="Flag low_confidence when the top probability is below this (a classifier answers even for a non-MRI image).")
@CHECKPOINT
@click_options(TrainConfig, ["batch_size"])
@user_errors
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


@click.command()
@RUN_DIR
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@out_option("Folder for the overlays, gradcam.csv and heatmaps.npz.", path_type=click.Path(file_okay=False), required=True)
@click.option("--class", "class_name", default=None, help="Explain this class (default: each image's predicted class).")
@CHECKPOINT
@user_errors
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


@click.command()
@RUN_DIR
@click.option("--format", "format_", required=True, type=click.Choice(list(EXPORT_FORMATS)), help="onnx (torch or tensorflow backend; jax with jax2onnx) or savedmodel (tensorflow or jax backend).")
@out_option("Where to write (default RUN_DIR/export/model.onnx or RUN_DIR/export/saved_model).")
@click.option("--check-images", default=8, show_default=True, type=click.IntRange(1), help="Run the export on this many test images and compare with Keras.")
@CHECKPOINT
@user_errors
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


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--gradcam-samples", default=6, show_default=True, type=click.IntRange(0), help="Grad-CAM overlays of test images per run (misclassified first; 0: none).")
@data_dir_option("Where the test images are (default: the run's own data folder).")
@out_option("HTML file to write (default PATH/report.html).", path_type=click.Path(dir_okay=False))
@user_errors
def report(path: str, gradcam_samples: int, data_dir: str | None, out: str | None) -> None:
    """One self-contained HTML report for a run directory or a compare directory."""
    from inference.report import build_report
    from training.rundir import check_output_path, recorded_data_folder

    check_output_path(out or Path(path) / "report.html", "--out", path, data_dir or recorded_data_folder(path),
                      own="report.html")
    target = build_report(path, gradcam_samples, data_dir, out, log=click.echo)
    click.echo(f"Wrote {target}")



@click.command()
@RUN_DIR
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback makes the page reachable from other machines (no authentication).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@CHECKPOINT
@click.option("--threshold", default=LOW_CONFIDENCE, show_default=True, type=click.FloatRange(0, 1), help="Flag low_confidence below this top probability, as predict does.")
@click.option("--max-file-mb", default=Limits.max_file_bytes / MIB, show_default=True, type=click.FloatRange(0, min_open=True), help="Largest upload per file (413 beyond).")
@click.option("--max-files", default=Limits.max_files, show_default=True, type=click.IntRange(1), help="Most files per request (413 beyond).")
@click.option("--max-pixels", default=Limits.max_pixels, show_default=True, type=click.IntRange(1), help="Most pixels per image, checked before decoding (422 beyond).")
@click.option("--max-queue", default=Limits.max_queue, show_default=True, type=click.IntRange(1), help="Images that may wait for the model (503 with Retry-After beyond).")
@click.option("--max-batch", default=Limits.max_batch, show_default=True, type=click.IntRange(1), help="Most images per model call; requests waiting together are predicted as one batch.")
@click.option("--batch-wait-ms", default=Limits.batch_wait_ms, show_default=True, type=click.FloatRange(0), help="Once an image waits, how long the model waits for others to fill its batch (more throughput, that much more latency); it also waits, at most 1 s, for uploads already received and being decoded. 0: no waiting at all.")
@user_errors
def serve(run_dir: str, host: str, port: int, checkpoint: str, threshold: float, max_file_mb: float, max_files: int,
          max_pixels: int, max_queue: int, max_batch: int, batch_wait_ms: float) -> None:
    """A local web page and JSON API over a finished run (upload images, see each class's probability and
    its Grad-CAM): http://HOST:PORT/, the API at /api/predict and /api/health, its docs at /docs."""
    from backend.startup import start_serving_environment

    start_serving_environment()  # before the backend loads
    from inference.run import load_run
    from inference.serve import serve as run_server

    limits = Limits(max_file_bytes=int(max_file_mb * MIB), max_files=max_files, max_pixels=max_pixels,
                    max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    run_server(load_run(run_dir, checkpoint), host, port, limits, threshold, echo=click.echo)


COMMANDS = (evaluate, predict, gradcam, export, report, serve)
