"""Data-parallel training (`--devices N`): one model, N replicas, each training on its share of
the same global batch, through each framework's own engine (backend, "Data parallelism":
jax's DataParallel distribution, tensorflow's MirroredStrategy, torch processes under torchrun).

What is the same on every backend lives here:

- `--batch-size` is the global batch: the pipeline builds exactly the batches (bytes and order) of
  a one-device run, and replica r trains on rows [r*B/N, (r+1)*B/N) of each (jax and tensorflow
  split the batch themselves; a torch process takes its rows in `ReplicaShares`).
- An epoch's last, partial batch is cut to a multiple of N rows (at most N-1 images of the epoch
  left out, other ones every epoch since the order is reshuffled): every replica then has the
  same number of rows, which jax's sharding requires and which keeps the mean of the replicas'
  gradients the mean over the batch. A partial batch of fewer than N rows is left out.
- Evaluation batches are padded to a multiple of N rows where the engine needs equal shares
  (jax), with copies of the last image weighted 0; predictions drop the padding.
- Only the process of rank 0 (the only process under jax and tensorflow) writes the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import keras
import numpy as np

from backend.parallel import (
    average_across_processes,
    average_gradients_across_processes,
    average_over_replicas,
    broadcast_from_first_process,
    data_parallel,
)
from data.loader import MRIBatches


@dataclasses.dataclass(frozen=True)
class Replicas:
    """How this process takes part in training: `devices` replicas in all, this process's
    `rank` among `processes` (torch: one process per device; jax, tensorflow: one process)."""

    devices: int = 1
    rank: int = 0
    processes: int = 1
    engine: str = "one device"
    batchnorm: str = "statistics of the whole batch"
    even_batches: bool = False  # every batch must split into N equal shares (jax), evaluation too

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory and prints progress (rank 0 only)."""
        return self.rank == 0

    def record(self, batch_size: int) -> dict:
        """What metrics.json says about the replicas."""
        return {"devices": self.devices, "processes": self.processes, "engine": self.engine,
                "global_batch": batch_size, "batch_per_device": batch_size // self.devices,
                "batchnorm": self.batchnorm}


_active = Replicas()


def active() -> Replicas:
    """The replicas of the run in progress (one device outside `replicas`)."""
    return _active


@contextlib.contextmanager
def replicas(devices: int) -> Iterator[Replicas]:
    """Runs the block with the backend's data parallelism over `devices` devices (nothing changes
    for one): build, compile, fit and predict inside it."""
    global _active
    if devices == 1:
        yield _active
        return
    with data_parallel(devices) as setup:
        previous, _active = _active, Replicas(devices=devices, **setup)
        try:
            yield _active
        finally:
            _active = previous


def shared_rows(rows: int, devices: int) -> int:
    """Rows of a batch of `rows` that the replicas train on: the largest multiple of `devices`."""
    return rows // devices * devices


class ReplicaShares(keras.utils.PyDataset):
    """The training batches as this process feeds them to `fit`: each global batch of `batches`
    cut to a multiple of N rows, and of that, this process's share (the whole cut batch where one
    process drives every device). Epochs and prefetching stay the wrapped pipeline's."""

    def __init__(self, batches: MRIBatches, replicas: Replicas) -> None:
        super().__init__()  # no Keras workers: the wrapped pipeline has its own threads
        self.batches, self.replicas = batches, replicas
        sizes = [min(batches.batch_size, len(batches.examples) - i * batches.batch_size) for i in range(len(batches))]
        self._used = [i for i, rows in enumerate(sizes) if shared_rows(rows, replicas.devices)]

    def __len__(self) -> int:
        return len(self._used)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.batches[self._used[index]]
        share = shared_rows(len(labels), self.replicas.devices) // self.replicas.processes
        rows = slice(self.replicas.rank * share, (self.replicas.rank + 1) * share)
        return images[rows], labels[rows]

    def on_epoch_end(self) -> None:
        self.batches.on_epoch_end()


class EvenBatches(keras.utils.PyDataset):
    """Evaluation batches padded to a multiple of N rows with copies of their last image, weighted
    0 (so accuracy counts only the real images; a padded batch's mean loss is divided by its
    padded size, so the reported loss is low by at most (N-1)/n). Predictions of the padding come
    last and `predict` drops them."""

    def __init__(self, batches: keras.utils.PyDataset, devices: int) -> None:
        super().__init__()
        self.batches, self.devices = batches, devices

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, labels = self.batches[index]
        pad = -len(labels) % self.devices
        weights = np.concatenate([np.ones(len(labels), np.float32), np.zeros(pad, np.float32)])
        last = np.full(pad, len(labels) - 1)
        return (np.concatenate([images, images[last]]), np.concatenate([labels, labels[last]]), weights)

    def on_epoch_end(self) -> None:
        self.batches.on_epoch_end()


def for_training(batches: keras.utils.PyDataset) -> keras.utils.PyDataset:
    """What `fit` trains on: `batches` itself on one device, else this process's `ReplicaShares`."""
    return batches if _active.devices == 1 else ReplicaShares(batches, _active)


def for_evaluation(batches: keras.utils.PyDataset) -> keras.utils.PyDataset:
    """What `fit`'s validation and `predict` take: padded where the engine needs equal shares."""
    return EvenBatches(batches, _active.devices) if _active.even_batches else batches


def predict(model: keras.Model, batches: keras.utils.PyDataset, rows: int) -> np.ndarray:
    """`model.predict` over `batches` (`rows` images in all), on the replicas."""
    return np.asarray(model.predict(for_evaluation(batches), verbose=0))[:rows]


def same_start(model: keras.Model) -> None:
    """Every process starts from rank 0's weights (torch; one process elsewhere)."""
    broadcast_from_first_process(model)


class ProcessSync(keras.callbacks.Callback):
    """Keeps torch processes in step: gradients are averaged over the processes inside fit's train
    steps only (`average_gradients_across_processes`), and each epoch's training loss and accuracy
    become the means over the processes, i.e. over the global batches, as one device reports them.
    Put it first, so every callback after it sees the averaged logs."""

    def __init__(self, switch: dict[str, bool]) -> None:
        super().__init__()
        self.switch = switch

    def on_train_batch_begin(self, batch, logs=None):
        self.switch["on"] = True

    def on_train_batch_end(self, batch, logs=None):
        self.switch["on"] = False

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        # The same keys, in the same order, on every process: rank 0 alone also has val_* ones.
        keys = sorted(k for k in logs if not k.startswith("val_"))
        logs.update(zip(keys, average_across_processes([float(logs[k]) for k in keys]), strict=True))


MOVING_STATISTICS = ("moving_mean", "moving_variance")  # BatchNormalization's


class SharedStatistics(keras.callbacks.Callback):
    """At each epoch's last step, before validation and the checkpoints read them, every
    replica's BatchNormalization moving statistics become their mean over the replicas (tensorflow
    and torch keep one copy per replica, each updated from its own share; jax has one already).

    The moving average is linear, so the moving mean is then the average of the replicas' batch
    means, i.e. of the global batches' means (equal shares); the moving variance is the mean of
    the replicas' variances, which lacks the spread between their means. Without this, tensorflow
    would evaluate each share of a batch with another replica's statistics and save replica 0's."""

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.params.get("steps"):
            average_over_replicas([v for v in self.model.non_trainable_variables if v.name in MOVING_STATISTICS])


# A model's gradient hooks, registered once: a second set would average the average again.
_switches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def replica_callbacks(model: keras.Model) -> list[keras.callbacks.Callback]:
    """The callbacks `fit` needs for the replicas (none on one device)."""
    if _active.devices == 1:
        return []
    if model not in _switches:
        _switches[model] = average_gradients_across_processes(model)
    switch = _switches[model]
    return [*([ProcessSync(switch)] if switch is not None else []), SharedStatistics()]
