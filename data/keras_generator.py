"""Keras' ImageDataGenerator augmentation, in NumPy, for uint8 images.

The "seed-keras" recipe of the study trained with
`ImageDataGenerator(rotation_range, width_shift_range, height_shift_range,
zoom_range, horizontal_flip=True)`. This module draws the same parameters, in
the same order as `ImageDataGenerator.get_random_transform`, and resamples as
`apply_transform` does (`scipy.ndimage.affine_transform`, order 1,
`fill_mode="nearest"`), without scipy: bilinear interpolation with the sample
coordinates clamped to the image, which is what order 1 with "nearest" computes.

Keras' own quirks are kept on purpose, so a parameter set means the same image
here and there (keras 3.15 `keras/src/legacy/preprocessing/image.py`):

- `tx` is drawn from `height_shift_range` and scaled by the number of rows, but
  Keras' matrix applies it along the columns (and `ty`, from
  `width_shift_range`, along the rows); `zx` scales the columns, `zy` the rows.
- The image is centred at `(rows / 2 - 0.5, cols / 2 - 0.5)` with the row
  count on the column axis, which matters only for non-square images.

Two differences remain: the result is rounded to uint8, so it plugs into the
uint8 pipeline (Keras keeps float32 until `standardize`), and the random
numbers come from the per-example `np.random.Generator`, not the global
`np.random` state, so the draws have Keras' order and ranges but not its values.

This module imports nothing from `data.augment` (which imports it).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TransformParams:
    """One image's transform, with `apply_transform`'s names and meanings (see the module doc)."""

    theta: float = 0.0  # degrees
    tx: float = 0.0  # pixels
    ty: float = 0.0  # pixels
    zx: float = 1.0
    zy: float = 1.0
    flip_horizontal: bool = False

    def as_keras(self) -> dict[str, float | bool]:
        """The `transform_parameters` dict `ImageDataGenerator.apply_transform` takes."""
        return dataclasses.asdict(self)

    @property
    def is_affine_identity(self) -> bool:
        # Keras skips the resampling exactly in this case.
        return self.theta == 0 and self.tx == 0 and self.ty == 0 and self.zx == 1 and self.zy == 1


def draw_params(
    rng: np.random.Generator,
    shape: tuple[int, int],
    rotation_range: float,
    height_shift_range: float,
    width_shift_range: float,
    zoom_range: float,
    flip_prob: float,
) -> TransformParams:
    """Draws one image's transform as `get_random_transform` does, from `rng`.

    `shape` is `(rows, cols)`; the shift ranges are fractions of the side (Keras
    reads values below 1 that way); `zoom_range=z` draws `zx, zy` from
    `[1 - z, 1 + z]`. A range of 0 draws nothing, as in Keras; the flip is
    always drawn (Keras draws it even with `horizontal_flip=False`).
    """
    rows, cols = shape
    theta = float(rng.uniform(-rotation_range, rotation_range)) if rotation_range else 0.0
    tx = float(rng.uniform(-height_shift_range, height_shift_range)) * rows if height_shift_range else 0.0
    ty = float(rng.uniform(-width_shift_range, width_shift_range)) * cols if width_shift_range else 0.0
    zx, zy = (float(z) for z in rng.uniform(1 - zoom_range, 1 + zoom_range, 2)) if zoom_range else (1.0, 1.0)
    flip = bool(rng.random() < flip_prob)
    return TransformParams(theta, tx, ty, zx, zy, flip)


def keras_affine(params: TransformParams, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """`(matrix, offset)` mapping an output `(row, col)` to the input one, as Keras builds them.

    Rotation, then shift, then zoom, composed in Keras' `(x, y)` frame, moved to
    the image centre (`transform_matrix_offset_center(m, rows, cols)`), then
    rows and columns swapped into array order: the arguments Keras passes to
    `scipy.ndimage.affine_transform`.
    """
    a = np.deg2rad(params.theta)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    shift = np.array([[1, 0, params.tx], [0, 1, params.ty], [0, 0, 1]])
    zoom = np.array([[params.zx, 0, 0], [0, params.zy, 0], [0, 0, 1]])
    o_x, o_y = rows / 2 - 0.5, cols / 2 - 0.5
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    m = offset @ (rotation @ shift @ zoom) @ reset
    m = m[[1, 0, 2]][:, [1, 0, 2]]  # Keras' (x, y) frame to (row, col)
    return m[:2, :2], m[:2, 2]


def resample_bilinear(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """`out[o] = image[matrix @ o + offset]`, bilinear, edges extended; float32 `(rows, cols, C)`.

    Clamping the coordinate to `[0, n - 1]` before interpolating gives the same
    value as scipy's order-1 "nearest" mode, which repeats the edge pixels. The
    coordinates are float64, as in scipy; the blend is float32, twice as fast at
    224 px and within 1e-4 of float64, far below the uint8 rounding that follows.
    """
    rows, cols = image.shape[:2]
    flat = image.reshape(rows * cols, -1)
    i = np.arange(rows, dtype=np.float64)[:, None]
    j = np.arange(cols, dtype=np.float64)[None, :]
    r = np.clip(matrix[0, 0] * i + matrix[0, 1] * j + offset[0], 0, rows - 1)
    c = np.clip(matrix[1, 0] * i + matrix[1, 1] * j + offset[1], 0, cols - 1)
    # (r0, c0): the top-left neighbour, kept at most at the last row/column but one so the
    # neighbours below and to the right exist; on the last row fr is 1, so all the weight
    # goes to the row below r0, the last one.
    r0 = np.minimum(r.astype(np.intp), max(rows - 2, 0))
    c0 = np.minimum(c.astype(np.intp), max(cols - 2, 0))
    fr = (r - r0).astype(np.float32)[..., None]
    fc = (c - c0).astype(np.float32)[..., None]
    top = r0 * cols + c0
    down = cols if rows > 1 else 0
    right = 1 if cols > 1 else 0

    def pixels(step: int) -> np.ndarray:
        return np.take(flat, top + step, axis=0).astype(np.float32)

    upper = pixels(0)
    upper += (pixels(right) - upper) * fc
    lower = pixels(down)
    lower += (pixels(down + right) - lower) * fc
    upper += (lower - upper) * fr
    return upper.reshape(image.shape)


def apply_transform(image: np.ndarray, params: TransformParams) -> np.ndarray:
    """`ImageDataGenerator.apply_transform` for a uint8 `(rows, cols, C)` image, rounded to uint8."""
    out = image
    if not params.is_affine_identity:
        matrix, offset = keras_affine(params, *image.shape[:2])
        out = np.clip(np.rint(resample_bilinear(image, matrix, offset)), 0, 255).astype(np.uint8)
    if params.flip_horizontal:  # after the affine map, as in Keras
        out = out[:, ::-1]
    return np.ascontiguousarray(out)

