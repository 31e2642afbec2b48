"""Callbacks of a training run: timing, the non-finite-loss stop and the checkpoints."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import keras


class EpochTimer(keras.callbacks.Callback):
    """Adds `seconds` (the whole epoch) and `images_per_second` (the training phase,
    validation excluded) to each epoch's logs, and so to history.csv."""

    def __init__(self, num_images: int) -> None:
        super().__init__()
        self.num_images = num_images
        self._start = self._train_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._train_end = 0.0

    def on_test_begin(self, logs=None):
        if self._start and not self._train_end:  # validation inside fit
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        if logs is not None:
            logs["seconds"] = end - self._start
            logs["images_per_second"] = self.num_images / ((self._train_end or end) - self._start)


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite and records where."""

    def __init__(self) -> None:
        super().__init__()
        self.event: dict | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if self.event is None and loss is not None and not _finite(loss):
            self.event = {"epoch": self._epoch + 1, "batch": batch + 1, "loss": float(loss)}
            self.model.stop_training = True


class Checkpoints(keras.callbacks.Callback):
    """After each epoch whose loss is finite: `last.weights.h5`, and `best.weights.h5` when
    `monitor` improved. An epoch with a non-finite loss overwrites neither."""

    def __init__(self, run_dir: Path, monitor: str) -> None:
        super().__init__()
        self.last, self.best = run_dir / "last.weights.h5", run_dir / "best.weights.h5"
        self.monitor = monitor
        self.best_value = -math.inf
        self.last_epoch = self.best_epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not _finite(logs.get("loss")):
            return
        _save_weights(self.model, self.last)
        self.last_epoch = epoch + 1
        value = logs.get(self.monitor)
        if _finite(value) and float(value) > self.best_value:
            _save_weights(self.model, self.best)
            self.best_value, self.best_epoch = float(value), epoch + 1


def _save_weights(model: keras.Model, path: Path) -> None:
    """`save_weights` through a temporary file, so a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name[: -len('.weights.h5')]}.tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)
