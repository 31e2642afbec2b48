"""Callbacks of a training run: timing, the non-finite-loss stop and the checkpoints."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from engine.rundir import atomic_write


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
    `monitor` improved. An epoch with a non-finite loss overwrites neither.

    `last.weights.h5` is what `--resume` continues from: the weights, the optimizer's
    state and, in the file's attributes (see `checkpoint_state`), the epoch count, the best
    epoch so far and the dropout generators' state, which Keras' weights files leave out.
    """

    def __init__(self, run_dir: Path, monitor: str, resumed: dict | None = None) -> None:
        super().__init__()
        self.last, self.best = run_dir / "last.weights.h5", run_dir / "best.weights.h5"
        self.monitor = monitor
        resumed = resumed or {}
        self.best_value = resumed.get("best_value", -math.inf)
        self.last_epoch = resumed.get("epoch", 0)
        self.best_epoch = resumed.get("best_epoch", 0)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not _finite(logs.get("loss")):
            return
        value = logs.get(self.monitor)
        improved = _finite(value) and float(value) > self.best_value
        best_value, best_epoch = (float(value), epoch + 1) if improved else (self.best_value, self.best_epoch)
        state = {"epoch": epoch + 1, "best_epoch": best_epoch, "best_value": best_value,
                 "monitor": self.monitor, "seed_states": seed_states(self.model)}
        _save_weights(self.model, self.last, state)  # the one file a resume needs, written atomically
        # Only now: if the write failed (e.g. a full disk), these still describe the files on disk.
        self.last_epoch, self.best_value, self.best_epoch = epoch + 1, best_value, best_epoch
        if improved:
            with atomic_write(self.best) as tmp:
                shutil.copyfile(self.last, tmp)


def _seed_variables(model: keras.Model) -> list:
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def seed_states(model: keras.Model) -> list[list]:
    """`[variable path, state]` of each random generator of the model (dropout's), in order."""
    return [[v.path, np.asarray(keras.ops.convert_to_numpy(v)).tolist()] for v in _seed_variables(model)]


def restore_seed_states(model: keras.Model, states: list[list]) -> None:
    variables = _seed_variables(model)
    # Matched by order: the paths carry a per-process counter (`seed_generator_1/...` for the
    # second model built in one process), so they differ when a run resumes in-process.
    if len(variables) != len(states):
        raise ValueError(f"the checkpoint holds {len(states)} random generators, the model {len(variables)}")
    for variable, (_, value) in zip(variables, states, strict=True):
        variable.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(variable.dtype)))


def _save_weights(model: keras.Model, path: Path, state: dict | None = None) -> None:
    """`save_weights` (plus `state` as a JSON attribute) through a temporary file, so a crash
    never leaves half a checkpoint."""
    import h5py

    with atomic_write(path) as tmp:
        model.save_weights(tmp)
        if state is not None:
            with h5py.File(tmp, "a") as f:
                f.attrs["training_state"] = json.dumps(state)
