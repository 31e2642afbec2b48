"""Batches for `model.fit`: a `keras.utils.PyDataset` over NumPy and Pillow.

Why PyDataset rather than Grain: it is part of Keras itself and `fit` accepts
it unchanged on torch, tensorflow and jax; it adds no dependency. Grain would
add one, and `image_dataset_from_directory(format="grain")` resizes with the
active backend's ops, so its bytes differ per backend.

Determinism: batch `i` of epoch `e` is a pure function of (examples, seed, e,
i). The epoch order is a permutation seeded by (seed, epoch), each image's
augmentation is seeded by (seed, epoch, example index), so the bytes do not
depend on the backend, the number of workers or the order batches are built in.

Which epoch `fit` is in comes from the `EpochSync` callback, not from counting
`on_epoch_end` calls: `fit` peeks at batch 0 and calls `on_epoch_end` once
before training, on every backend. And the worker threads are this module's
own, not Keras' PyDataset workers: Keras' queue keeps the batches it prefetched
for that peek and serves them first in epoch 1 on torch and jax (not on
tensorflow), which shifted every later epoch by the queue length there
(measured in keras 3.15.1; tests/test_loader.py checks what reaches the model).

Memory: the decoded-image cache holds `n_images * size * size * 3` bytes at the decode size,
e.g. 5,708 images at 224 px = 859 MB, at 64 px = 70 MB (`--no-cache` turns it off).

Decode size: images are decoded (and cached) at `decode_size`, by default the input size. When it
is larger, training crops from it and resizes the crop to the input size (`data.augment`), and
evaluation takes the centre `image_size` square, as torchvision's reference recipe does
(`Resize(256)`, `CenterCrop(224)`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Callable

import keras
import numpy as np

from data import SEED, WORKERS
from data.augment import AugmentConfig, augment_image, example_rng, normalize
from data.decode import DecodeError, center_crop, decode_and_resize
from data.discovery import Example
from data.fingerprint import Digest, read_and_digest

_SHUFFLE_TAG = 0x5348


class DecodedCache:
    """Decoded uint8 images by file path; safe to share between threads."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._images.values())

    def get(self, path: str, size: int, notes: list[str] | None = None, data: bytes | None = None) -> np.ndarray:
        image = self._images.get(path)
        if image is None:
            image = decode_and_resize(path, size, notes, data)
            self._images[path] = image  # A dict store is atomic; a race decodes twice, same bytes.
        return image


def scan_examples(
    examples: list[Example],
    decode_size: int,
    cache: DecodedCache | None = None,
    workers: int = WORKERS,
    progress: Callable[[int], None] | None = None,
    notes: list[tuple[str, str]] | None = None,
    digests: dict[str, Digest] | None = None,
) -> tuple[list[Example], list[tuple[str, str]]]:
    """Decodes every example once, before training, and drops the unreadable ones.

    Returns `(readable_examples, [(path, reason), ...])`. With a cache, this is
    also the cold pass that fills it (at `decode_size`, the side `MRIBatches` decodes at), so no
    decode is wasted. `notes` gets a
    `(path, note)` for each image whose values the decoder rescaled (a float or a
    12-bit image: see `data.decode`). `digests` gets each file's size and SHA-256
    (`data.fingerprint`), read in the same pass: the run's record of its data.
    """
    def load(example: Example) -> tuple[str | None, list[str]]:
        found: list[str] = []
        data = None
        if digests is not None:  # one read of the file: hashed, then decoded from memory
            data, digests[example.path] = read_and_digest(example.path)
        try:
            if cache is not None:
                cache.get(example.path, decode_size, found, data)
            else:
                decode_and_resize(example.path, decode_size, found, data)
        except DecodeError as e:
            return str(e), found
        return None, found

    good, skipped = [], []
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (example, (error, found)) in enumerate(zip(examples, pool.map(load, examples), strict=False)):
            if error is None:
                good.append(example)
            else:
                skipped.append((example.path, error))
            if notes is not None:
                notes += [(example.path, note) for note in found]
            if progress is not None:
                progress(i + 1)
    return good, skipped


class MRIBatches(keras.utils.PyDataset):
    """Normalized float32 image batches and int32 labels, one epoch at a time.

    Args:
        examples: the labelled files, already scanned (see `scan_examples`).
        image_size: square side in pixels.
        batch_size: examples per batch; the last batch may be smaller.
        preprocess: `caffe` or `imagenet` (see `data.augment.normalize`).
        augment: the training augmentation, or None for evaluation.
        shuffle: a new seeded order each epoch (training) or the file order.
        seed: the seed of the order and of the augmentation.
        epoch: the epoch `__getitem__` serves; set by `EpochSync` inside `fit`.
        cache: a shared decoded-image cache, or None to decode every time.
        workers: threads that build the next batches ahead (0: build each batch
            when asked, in the caller's thread).
        prefetch: how many batches ahead the threads build (default: `workers`).
        decode_size: the side images are decoded and cached at (default: `image_size`); when
            larger, training crops from it and evaluation takes the centre (see above).
    """

    def __init__(
        self,
        examples: list[Example],
        image_size: int,
        batch_size: int,
        preprocess: str = "caffe",
        augment: AugmentConfig | None = None,
        shuffle: bool = False,
        seed: int = SEED,
        epoch: int = 0,
        cache: DecodedCache | None = None,
        workers: int = WORKERS,
        prefetch: int | None = None,
        decode_size: int | None = None,
    ) -> None:
        super().__init__()  # Keras' own workers off: see the module docstring.
        if not examples:
            raise ValueError("no examples to batch")
        self.examples = list(examples)
        self.labels = np.array([e.label for e in self.examples], dtype=np.int32)
        self.image_size = image_size
        self.decode_size = image_size if decode_size is None else decode_size
        if self.decode_size < image_size:
            raise ValueError(f"decode size {self.decode_size} is smaller than the input size {image_size}")
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.augment = augment if augment is not None and augment.enabled else None
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.cache = cache
        self.failed: list[tuple[str, str]] = []
        self.prefetch = workers if prefetch is None else prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None
        self._ahead: dict[tuple[int, int], concurrent.futures.Future] = {}

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The example indices in the order epoch `epoch` visits them."""
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([_SHUFFLE_TAG, self.seed, epoch]).permutation(n)

    def _image(self, index: int) -> np.ndarray:
        path = self.examples[index].path
        try:
            if self.cache is not None:
                return self.cache.get(path, self.decode_size)
            return decode_and_resize(path, self.decode_size)
        except DecodeError as e:
            # Readable at scan time, unreadable now (changed on disk): keep the run
            # going with a black image and record it, rather than lose the epoch.
            self.failed.append((path, str(e)))
            return np.zeros((self.decode_size, self.decode_size, 3), np.uint8)

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of epoch `epoch`: `(float32 NHWC images, int32 labels)`."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        ids = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        images = np.empty((len(ids), self.image_size, self.image_size, 3), np.uint8)
        for row, i in enumerate(ids):
            image = self._image(int(i))
            if self.augment is not None:
                image = augment_image(image, example_rng(self.seed, epoch, int(i)), self.augment, self.image_size)
            else:
                image = center_crop(image, self.image_size)
            images[row] = image
        return normalize(images, self.preprocess), self.labels[ids]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of `self.epoch`; the threads start on the next ones meanwhile."""
        if self._pool is None:
            return self.batch(self.epoch, index)
        epoch = self.epoch
        future = self._ahead.pop((epoch, index), None) or self._pool.submit(self.batch, epoch, index)
        for ahead in range(index + 1, min(index + 1 + self.prefetch, len(self))):
            if (epoch, ahead) not in self._ahead:
                self._ahead[(epoch, ahead)] = self._pool.submit(self.batch, epoch, ahead)
        for key in [k for k in self._ahead if k[0] != epoch]:  # built for another epoch
            self._ahead.pop(key).cancel()
        return future.result()

    def on_epoch_end(self) -> None:
        # Without `EpochSync` (a plain `fit` of this dataset) the order still changes
        # every epoch; with it, this count is overwritten at each epoch's start.
        self.epoch += 1


class EpochSync(keras.callbacks.Callback):
    """Tells the training batches which epoch `fit` is starting (before any batch of it is
    fetched), so epoch `e` of a run, resumed or in a later phase, is the pipeline's epoch `e`."""

    def __init__(self, batches: MRIBatches) -> None:
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


def iterate_epoch(batches: MRIBatches, epoch: int, limit: int | None = None):
    """Yields the batches of one epoch as `fit` asks for them: the epoch set (as `EpochSync`
    does), then `__getitem__` in order, through the prefetch threads. That this is exactly
    what reaches the model inside `fit` on every backend is tested
    (test_fit_trains_on_exactly_the_pipeline_batches_of_each_epoch), so no private Keras
    data adapter is needed here."""
    batches.epoch = epoch
    for index in range(len(batches) if limit is None else min(limit, len(batches))):
        yield batches[index]


def pipeline_hash(batches: MRIBatches, epoch: int, num_batches: int) -> str:
    """SHA-256 over the bytes of the first `num_batches` batches of `epoch`."""
    digest = hashlib.sha256()
    for images, labels in iterate_epoch(batches, epoch, limit=num_batches):
        digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return digest.hexdigest()
