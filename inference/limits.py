"""What one `serve` request may hold, declared once; Keras-free, so that the command line shows
these defaults (and checks its options) before a backend loads."""

from __future__ import annotations

import dataclasses

from data import BATCH_SIZE

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Limits:
    """Beyond these, 413 (bytes, files), 422 (pixels) or 503 (queue)."""

    max_file_bytes: int = 20 * MIB  # a 512x512 16-bit DICOM slice is 0.5 MB; a phone photo 5-10 MB
    max_files: int = 16
    max_pixels: int = 25_000_000  # a 5000x5000 image; MRI slices are at most about 1024x1024
    max_queue: int = 64  # images waiting for the model; beyond: 503 with Retry-After
    max_batch: int = BATCH_SIZE  # images per model call, as predict's batches
    batch_wait_ms: float = 10  # once one image waits, how long the model waits for others to join its batch
