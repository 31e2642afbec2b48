"""Brain-tumor MRI classification with one Keras 3 codebase on torch, tensorflow and jax.

Pick the backend with KERAS_BACKEND, e.g.

    KERAS_BACKEND=torch python cli.py train --data-dir DIR
"""

from __future__ import annotations

import os

import click

# Quieter start-up for tensorflow; set before any backend import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from commands import bench, data, runs, studies, training


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Brain-tumor MRI classification on any Keras 3 backend (set KERAS_BACKEND)."""


for group in (training, data, bench, studies, runs):
    for command in group.COMMANDS:
        cli.add_command(command)


if __name__ == "__main__":
    cli()
