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

It writes only into an empty or new folder, and marks what it wrote with `.demo-data.json`
(its parameters and every file and folder it made): a real dataset given by mistake is
never written into, and `replace=True` removes only a marked folder's own files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from errors import UserInputError

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
SIZES = (96, 128, 160)
SPLITS = ("Training", "Testing")
MARKER = ".demo-data.json"
# make-demo-data unless told: images per class in Training/ and Testing/, and the seed of their randomness
TRAIN_PER_CLASS, TEST_PER_CLASS, DEMO_SEED = 40, 10, 0
# The patient name and ID in the header of a demo DICOM file: a phantom's, not a person's.
DEMO_PATIENT = ("Phantom^Demo", "DEMO-PHANTOM")
_DEMO_TAG = 0x4445


class DemoDataError(UserInputError, ValueError):
    """An OUT_DIR that make-demo-data will not write into: one line, nothing written."""


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


def _file_name(class_name: str, index: int, dicom: bool = False) -> str:
    """Image `index`'s file name: every 7th, from the 4th, a PNG (the real data mix formats); all
    `.dcm` for a DICOM dataset."""
    suffix = ".dcm" if dicom else ".png" if index % 7 == 3 else ".jpg"
    return f"{class_name}_{index:04d}{suffix}"


def save_dicom(pixels: np.ndarray, path: Path, index: int, patient: tuple[str, str] = DEMO_PATIENT,
               uid_seed: tuple[int, ...] = ()) -> Path:
    """A phantom slice as an MR DICOM file, 12 bits stored in 16, as a scanner writes one.

    Varied by `index`, so that reading exercises the viewer rules of `data.dicom`: odd images are
    MONOCHROME1 (stored inverted), every third carries no window (read min..max), the rest a
    window that spans the stored range. Read by those rules, each gives the phantom back.
    `patient`: (name, ID) written into the header, which nothing the project writes may repeat.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    stored = pixels.astype(np.uint16) * 16 + 8  # 8-bit grey levels onto 12 bits (8..4088)
    monochrome1 = index % 2 == 1
    uid = generate_uid(entropy_srcs=[str(v) for v in (_DEMO_TAG, *uid_seed, index)])  # the same file every time
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, uid, "MR"
    ds.PatientName, ds.PatientID = patient
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if index % 3:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (4095 - stored if monochrome1 else stored).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _save(pixels: np.ndarray, path: Path, index: int) -> Path:
    """Odd `index`: RGB; the format follows `path`'s suffix."""
    if index % 2:  # RGB with a faint tint, as some scans in the real data are
        tint = np.array([1.0, 0.97, 1.02], np.float32)
        pixels = np.clip(pixels[..., None] * tint, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if path.suffix == ".png":
        image.save(path)
    else:
        image.save(path, quality=92)
    return path


def make_demo_data(
    out_dir: str | Path, train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS, seed: int = DEMO_SEED,
    replace: bool = False, dicom: bool = False, patient: tuple[str, str] = DEMO_PATIENT,
) -> dict[str, int]:
    """Writes `Training/` and `Testing/` under `out_dir`; returns file counts per split.

    `out_dir` must be new or empty (raises `DemoDataError` otherwise); with `replace=True` it
    may also be a demo dataset written here before, whose listed files are removed first.
    `dicom`: every image an MR DICOM file (`save_dicom`) with `patient` in its header."""
    out = Path(out_dir)
    per_split = dict(zip(SPLITS, (train_per_class, test_per_class), strict=True))
    if replace and (out / MARKER).exists():
        _remove_demo_data(out)
    else:
        _check_empty(out, replace)
    folders = [f"{split}/{name}" for split in SPLITS for name in CLASSES]
    files = [f"{split}/{name}/{_file_name(name, i, dicom)}" for split in SPLITS for name in CLASSES
             for i in range(per_split[split])]
    # The marker comes first, listing what is about to be written: a run cut short still
    # leaves a folder that `replace=True` recognises and can clean.
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, {"made_by": "make-demo-data", "seed": seed, "train_per_class": train_per_class,
                        "test_per_class": test_per_class, "dicom": dicom, "sizes": list(SIZES), "classes": list(CLASSES),
                        "folders": [*SPLITS, *folders], "files": files})
    for split_index, split in enumerate(SPLITS):
        for class_index, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_split[split]):
                rng = np.random.default_rng([_DEMO_TAG, seed, split_index, class_index, i])
                size = SIZES[int(rng.integers(len(SIZES)))]
                pixels, path = phantom(rng, name, size), folder / _file_name(name, i, dicom)
                if dicom:
                    save_dicom(pixels, path, i, patient, (seed, split_index, class_index))
                else:
                    _save(pixels, path, i)
    return {split: n * len(CLASSES) for split, n in per_split.items()}


def _check_empty(out: Path, replace: bool) -> None:
    """Refuses an `out` that exists and is not an empty folder."""
    if out.exists() and not out.is_dir():
        raise DemoDataError(f"demo-data: {out} is a file, not a folder; choose an empty or new folder")
    entries = sorted(e.name for e in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if MARKER in entries:
        raise DemoDataError(f"demo-data: {out} already holds a demo dataset made by make-demo-data; "
                            "--replace replaces it, or choose an empty or new folder")
    found = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, e.g. {', '.join(entries[:3])}"
    if replace:
        raise DemoDataError(f"demo-data: {out} is not empty and not a demo dataset made by make-demo-data "
                            f"({found}; no {MARKER}); choose an empty or new folder")
    raise DemoDataError(f"demo-data: {out} is not empty ({found}); choose an empty or new folder "
                        "(--replace replaces only a demo dataset made by make-demo-data)")


def _read_marker(out: Path) -> tuple[set[str], set[str]]:
    """The files and folders a previous run listed in `out`'s marker."""
    try:
        marker = json.loads((out / MARKER).read_text())
        files, folders = set(marker["files"]), set(marker["folders"])
        if not all(isinstance(p, str) for p in files | folders):
            raise TypeError("a listed path is not a string")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DemoDataError(f"demo-data: {out / MARKER} is not readable ({e}); nothing was replaced, "
                            "choose an empty or new folder") from None
    return files, folders


def _entries(root: Path, relative: str = "") -> list[tuple[str, os.DirEntry]]:
    """Every entry under `root` as (path relative to it, entry), folders before their contents;
    symbolic links are listed, not followed."""
    found = []
    with os.scandir(root / relative if relative else root) as scan:
        for entry in sorted(scan, key=lambda e: e.name):
            path = f"{relative}/{entry.name}" if relative else entry.name
            found.append((path, entry))
            if entry.is_dir(follow_symlinks=False):
                found += _entries(root, path)
    return found


def _remove_demo_data(out: Path) -> None:
    """Removes a previous demo dataset: the files and folders its marker lists, after checking
    that the folder holds nothing else (a file the user added, a link): that refuses instead."""
    files, folders = _read_marker(out)
    entries = [(path, entry) for path, entry in _entries(out) if path != MARKER]
    for path, entry in entries:
        is_ours = (path in folders if entry.is_dir(follow_symlinks=False)
                   else path in files and entry.is_file(follow_symlinks=False))
        if not is_ours:
            raise DemoDataError(f"demo-data: {out} holds {path}, which make-demo-data did not write; "
                                "nothing was replaced (move it out, or choose an empty or new folder)")
    # Only what was found inside `out`: a listed path that points elsewhere is never touched.
    for entry in [e for _, e in entries if not e.is_dir(follow_symlinks=False)]:
        os.unlink(entry.path)
    for entry in [e for _, e in reversed(entries) if e.is_dir(follow_symlinks=False)]:  # deepest first
        os.rmdir(entry.path)
    (out / MARKER).unlink()


def _write_marker(out: Path, marker: dict) -> None:
    """The marker, written whole (a temporary file renamed over it)."""
    tmp = out / f".tmp-{MARKER}"
    try:
        tmp.write_text(json.dumps(marker, indent=1) + "\n")
        os.replace(tmp, out / MARKER)
    finally:
        tmp.unlink(missing_ok=True)
