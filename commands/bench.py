"""`bench-pipeline` and `bench-train`: speed and memory, side by side with their baselines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from bench.train import BenchSettings
from commands.common import (
    data_dir_option,
    out_option,
    user_errors,
)
from training.config import TrainConfig
from training.options import (
    GroupedCommand,
    GroupedOption,
    LevelList,
    click_options,
)


@click.command("bench-pipeline")
@data_dir_option("Folder with Training/<class>/*.", required=True, path_type=click.Path(exists=True, file_okay=False))
@click_options(TrainConfig, ["image_size", "batch_size"])
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(2), help="Epoch 1 is cold, the last warm.")
@click.option("--workers", "workers_levels", default=str(TrainConfig.workers), show_default=True, type=LevelList(click.IntRange(1)), help="Loader threads; several (e.g. 1,2,4) give a scaling table.")
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


@click.command("bench-train", cls=GroupedCommand)
@click_options(TrainConfig, ["image_size", "batch_size", "precision", "jit_compile", "steps_per_execution", "workers"])
@data_dir_option("Folder with Training/<class>/* for keras-fit (default: phantom demo images made for the run).", path_type=click.Path(exists=True, file_okay=False), cls=GroupedOption, group="Benchmark")
@click.option("--warmup-steps", default=BenchSettings.warmup_steps, show_default=True, type=click.IntRange(1), cls=GroupedOption, group="Benchmark", help="Steps left out before timing (compilation, allocator growth).")
@click.option("--window-steps", default=BenchSettings.window_steps, show_default=True, type=click.IntRange(1), cls=GroupedOption, group="Benchmark", help="Steps per timed window.")
@click.option("--windows", default=BenchSettings.windows, show_default=True, type=click.IntRange(1), cls=GroupedOption, group="Benchmark", help="Timed windows; the median is reported.")
@click.option("--native/--no-native", default=True, show_default=True, cls=GroupedOption, group="Benchmark", help="Also time native torchvision (when it imports).")
@click.option("--torch-compile", is_flag=True, cls=GroupedOption, group="Benchmark", help="Native torchvision through torch.compile.")
@out_option("Also write the results as JSON here.", path_type=click.Path(dir_okay=False), cls=GroupedOption, group="Benchmark")
@user_errors
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


COMMANDS = (bench_pipeline_command, bench_train_command,)
