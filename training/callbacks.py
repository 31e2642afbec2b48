"""Callbacks of a training run: timing, the non-finite-loss stop and the checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

from training.rundir import BEST, LAST, atomic_write, check_free_space, read_csv_rows, write_csv


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


class HistoryCSV(keras.callbacks.Callback):
    """history.csv: a row per epoch, as Keras' CSVLogger writes it (epoch, then the logs' keys
    sorted; `val_*` columns of NA in a run without validation), but rewritten whole through
    `atomic_write` after each epoch, so a crash never leaves half a row. `append` keeps the
    rows already there (a later phase, a resumed run)."""

    def __init__(self, path: Path, append: bool = False) -> None:
        super().__init__()
        self.path, self.append = path, append
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        self.rows = read_csv_rows(self.path) if self.append else []

    def on_epoch_end(self, epoch, logs=None):
        keys = sorted(logs or {})
        if not any(k.startswith("val_") for k in keys):
            keys += [f"val_{k}" for k in keys]
        self.rows.append({"epoch": epoch, **{k: (logs or {}).get(k) for k in keys}})
        write_csv(self.path, self.rows, missing="NA")


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, or at the end of an
    epoch whose validation loss or metrics are (the training loss can stay finite while the
    moving BatchNorm statistics or the weights have already broken), and records where."""

    def __init__(self) -> None:
        super().__init__()
        self.event: dict | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if self.event is None and loss is not None and not _finite(loss):
            self.event = {"epoch": self._epoch + 1, "batch": batch + 1, "loss": float(loss), "where": "training"}
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.event is not None:
            return
        broken = {k: v for k, v in (logs or {}).items() if k.startswith("val_") and not _finite(v)}
        if broken:
            name, value = next(iter(broken.items()))
            self.event = {"epoch": epoch + 1, "batch": None, "loss": float(value), "where": f"validation {name}"}
        elif bad := nonfinite_variables(self.model):
            self.event = {"epoch": epoch + 1, "batch": None, "loss": None,
                          "where": f"weights ({len(bad)} tensors, e.g. {bad[0]})"}
        if self.event is not None:
            self.model.stop_training = True


def nonfinite_variables(model: keras.Model) -> list[str]:
    """The paths of the model's variables that hold NaN or infinity (none: [])."""
    return [v.path for v in model.variables
            if not np.isfinite(np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64)).all()]


class Checkpoints(keras.callbacks.Callback):
    """After each epoch whose losses and weights are all finite: `last.weights.h5`, and
    `best.weights.h5` when `monitor` improved. Any other epoch overwrites neither, so both
    files only ever hold finite tensors.

    `last.weights.h5` is what `--resume` continues from: the weights, the optimizer's
    state and, in the file's attributes (see `checkpoint_state`), the epoch count, the best
    epoch so far and the dropout generators' state, which Keras' weights files leave out.
    `best.weights.h5` holds the model's weights and that state, not Adam's moments (twice
    the weights again, and nothing reads them from there).
    """

    def __init__(self, run_dir: Path, monitor: str, resumed: dict | None = None, run_id: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.last, self.best = run_dir / LAST, run_dir / BEST
        self.monitor = monitor
        resumed = resumed or {}
        self.best_value = resumed.get("best_value", -math.inf)
        self.last_epoch = resumed.get("epoch", 0)
        self.best_epoch = resumed.get("best_epoch", 0)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        # A checkpoint is only ever finite: its losses and every tensor it would hold.
        if not all(_finite(v) for k, v in logs.items() if k == "loss" or k.startswith("val_")):
            return
        if nonfinite_variables(self.model):
            return
        value = logs.get(self.monitor)
        improved = _finite(value) and float(value) > self.best_value
        best_value, best_epoch = (float(value), epoch + 1) if improved else (self.best_value, self.best_epoch)
        state = {"epoch": epoch + 1, "best_epoch": best_epoch, "best_value": best_value,
                 "monitor": self.monitor, "seed_states": seed_states(self.model), "run_id": self.run_id}
        save_weights(self.model, self.last, state)  # the one file a resume needs, written atomically
        # Only now: if the write failed (e.g. a full disk), these still describe the files on disk.
        self.last_epoch, self.best_value, self.best_epoch = epoch + 1, best_value, best_epoch
        if improved:
            save_weights(self.model, self.best, state, with_optimizer=False)


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


def save_weights(model: keras.Model, path: Path, state: dict | None = None, with_optimizer: bool = True) -> None:
    """`save_weights` (plus `state` as a JSON attribute) through a temporary file, so a crash
    never leaves half a checkpoint; without the optimizer's variables unless `with_optimizer`."""
    import h5py

    optimizer = getattr(model, "optimizer", None)  # an uncompiled model (the initial weights) has none
    skip = [] if with_optimizer or optimizer is None else [optimizer]
    saved = model.weights + (list(optimizer.variables) if optimizer is not None and not skip else [])
    check_free_space(path, weights_nbytes(saved) + HDF5_MARGIN)
    with atomic_write(path) as tmp:
        keras.saving.save_weights(model, tmp, objects_to_skip=skip or None)
        if state is not None:
            with h5py.File(tmp, "a") as f:
                f.attrs["training_state"] = json.dumps(state)


HDF5_MARGIN = 8 * 2**20  # headers, names and attributes beside the tensors' bytes (a ResNet50 file: under 1 MB)


def weights_nbytes(variables) -> int:
    """The bytes of the variables' values, what a weights file mostly holds."""
    return sum(math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize for v in variables)


def load_model_weights(model: keras.Model, path: Path) -> None:
    """Loads a weights file's model variables, leaving the compiled optimizer as it is."""
    objects_to_skip = [model.optimizer] if model.optimizer is not None else None
    model.load_weights(path, objects_to_skip=objects_to_skip)


class SignalStopError(Exception):
    """SIGINT or SIGTERM stopped the run; the last finished epoch's checkpoint is whole."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalStop(keras.callbacks.Callback):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler, `kill`) end a run at a safe point instead of
    wherever the signal lands: inside `fit` the first one is noted and training stops at the end
    of the batch or epoch it arrived in, after that epoch's checkpoint is written, so no file is
    left half-written; outside `fit` (decoding, the final evaluation) it stops at once, since
    every run file is written through `atomic_write` there. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None
        self.deferred = False  # True while fit runs: the callback methods raise at safe points

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalStop]:
        """The handlers, for the block's duration (only the main thread can install them)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (first and self.deferred):
            raise SignalStopError(signum)

    def _stop_if_signalled(self) -> None:
        if self.signum is not None:
            raise SignalStopError(self.signum)

    def on_train_begin(self, logs=None):
        self.deferred = True
        self._stop_if_signalled()

    def on_train_end(self, logs=None):
        self.deferred = False

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_signalled()

    def on_test_batch_end(self, batch, logs=None):
        self._stop_if_signalled()

    def on_epoch_end(self, epoch, logs=None):  # placed after the checkpoints: that epoch is kept
        self._stop_if_signalled()
