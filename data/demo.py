"""A deterministic synthetic MRI-like phantom dataset in the Kaggle layout.

It is a smoke test of the whole path (files, decoding, training, metrics), not
medical data: a head-like ellipse with a skull ring, textured brain and
ventricles, and one class-dependent structure:

- glioma: an irregular mass with a dark core inside the brain;
- meningioma: a bright, round mass against the inside of the skull;
- pituitary: a small bright blob low in the centre (the sella);
- notumor: none.

Files are a mix of grayscale and RGB JPEGs and a few PNGs, at several sizes,
as in the real dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
SIZES = (96, 128, 160)
_DEMO_TAG = 0x4445


def _ellipse(xx, yy, cx, cy, ax, ay, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / ax
    v = (-(xx - cx) * s + (yy - cy) * c) / ay
    return u * u + v * v


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, "F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img)


def phantom(rng: np.random.Generator, class_name: str, size: int) -> np.ndarray:
    """One `(size, size)` uint8 phantom slice of the given class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx = size / 2 + rng.uniform(-0.04, 0.04) * size
    cy = size / 2 + rng.uniform(-0.04, 0.04) * size
    ax, ay = rng.uniform(0.33, 0.38) * size, rng.uniform(0.40, 0.45) * size
    tilt = rng.uniform(-0.2, 0.2)
    head = _ellipse(xx, yy, cx, cy, ax, ay, tilt)
    img = np.zeros((size, size), np.float32)
    img[head <= 1.0] = rng.uniform(190, 230)  # skull
    brain = _ellipse(xx, yy, cx, cy, ax * 0.9, ay * 0.9, tilt) <= 1.0
    texture = _smooth_noise(rng, size, 6)
    img[brain] = (rng.uniform(85, 115) + 30 * (texture - 0.5))[brain]
    for side in (-1, 1):  # ventricles
        v = _ellipse(xx, yy, cx + side * 0.08 * size, cy - 0.02 * size, 0.04 * size, 0.1 * size, side * 0.3)
        img[v <= 1.0] = rng.uniform(30, 50)

    if class_name == "glioma":
        r = rng.uniform(0.10, 0.15) * size
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(0.1, 0.35) * min(ax, ay)
        mx, my = cx + dist * np.cos(angle), cy - abs(dist * np.sin(angle))
        blob = _ellipse(xx, yy, mx, my, r, r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
        rough = _smooth_noise(rng, size, 10)
        mass = blob + 0.6 * (rough - 0.5) <= 1.0
        img[mass & brain] = rng.uniform(150, 180)
        img[(blob <= 0.3) & brain] = rng.uniform(40, 60)  # necrotic core
    elif class_name == "meningioma":
        r = rng.uniform(0.08, 0.12) * size
        angle = rng.uniform(0, 2 * np.pi)
        mx = cx + (ax * 0.9 - r * 0.8) * np.cos(angle)
        my = cy + (ay * 0.9 - r * 0.8) * np.sin(angle)
        img[(_ellipse(xx, yy, mx, my, r, r) <= 1.0) & (head <= 1.0)] = rng.uniform(220, 250)
    elif class_name == "pituitary":
        r = rng.uniform(0.045, 0.065) * size
        mask = _ellipse(xx, yy, cx + rng.uniform(-0.02, 0.02) * size, cy + 0.22 * ay, r * 1.2, r) <= 1.0
        img[mask] = rng.uniform(210, 245)
    elif class_name != "notumor":
        raise ValueError(f"unknown class {class_name!r}")

    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _save(pixels: np.ndarray, path: Path, index: int) -> Path:
    if index % 2:  # RGB with a faint tint, as some scans in the real data are
        tint = np.array([1.0, 0.97, 1.02], np.float32)
        pixels = np.clip(pixels[..., None] * tint, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if index % 7 == 3:
        path = path.with_suffix(".png")
        image.save(path)
    else:
        image.save(path, quality=92)
    return path


def make_demo_data(
    out_dir: str | Path, train_per_class: int = 40, test_per_class: int = 10, seed: int = 0
) -> dict[str, int]:
    """Writes `Training/` and `Testing/` under `out_dir`; returns file counts per split."""
    out = Path(out_dir)
    counts = {}
    for split_index, (split, n) in enumerate((("Training", train_per_class), ("Testing", test_per_class))):
        for class_index, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([_DEMO_TAG, seed, split_index, class_index, i])
                size = SIZES[int(rng.integers(len(SIZES)))]
                _save(phantom(rng, name, size), folder / f"{name}_{i:04d}.jpg", i)
        counts[split] = n * len(CLASSES)
    return counts
