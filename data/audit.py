"""Duplicate and leakage audit of an image dataset.

Exact duplicates share a SHA-256 of their decoded pixels (so a PNG copy of a JPEG's pixels
counts as the same image). Near duplicates are found in two steps: candidate pairs whose
perceptual hashes (dHash, 64 bits, of the image cropped to its content) are within a Hamming
distance, confirmed when their 64x64 thumbnails correlate at a threshold or more; MRI
slices all look alike to a 64-bit hash, so the hash alone would pair different scans.
Images linked either way form groups (connected components). A group whose members lie
in Training and Testing is a leak; one whose members carry different labels is a conflict.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from data import WORKERS
from data.decode import DecodeError, read_image
from data.layout import TEST_DIR, TRAIN_DIR, DatasetError, scan_split
from markdown_tables import markdown_table

# Chosen from measurements on the real images (see the README, "Auditing a dataset").
DEFAULT_MAX_DISTANCE = 10
DEFAULT_MIN_CORRELATION = 0.95
_THUMB_SIDE = 64
_ALIGN_REACH = 2


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What the audit knows of one readable image."""

    path: str
    exact: str  # SHA-256 of the decoded pixels and their shape
    dhash: int  # 64-bit perceptual hash of the content box
    thumbnail: np.ndarray = dataclasses.field(repr=False, compare=False)  # unit-norm, zero-mean 64x64
    size: tuple[int, int] = (0, 0)
    mode: str = ""


def content_box(gray: Image.Image) -> Image.Image:
    """The image cropped to its content (what stands out of the dark background), so that
    copies shifted or padded differently line up. Found on a copy of at most 160 px, on robust
    brightness levels, so that noise, JPEG artefacts or a brightness change do not move it."""
    scale = min(1.0, 160 / max(gray.size))
    small = gray.resize((max(1, round(gray.size[0] * scale)), max(1, round(gray.size[1] * scale))),
                        Image.Resampling.BOX)
    pixels = np.asarray(small, np.float32)
    low, high = np.percentile(pixels, [10, 99.5])
    if high - low < 8:
        return gray
    mask = pixels > low + 0.15 * (high - low)
    rows = np.flatnonzero(mask.mean(axis=1) > 0.05)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.05)
    if len(rows) < 4 or len(cols) < 4:
        return gray
    box = (cols[0] / scale, rows[0] / scale, (cols[-1] + 1) / scale, (rows[-1] + 1) / scale)
    return gray.crop(tuple(int(v + 0.5) for v in box))


def perceptual_hash(image: Image.Image) -> int:
    """dHash of the content box: whether each pixel of a 9x8 grayscale copy is brighter than
    its left neighbour, as 64 bits. Brightness, contrast, re-encoding and small shifts
    barely move it."""
    box = content_box(image.convert("L"))
    gray = np.asarray(box.resize((9, 8), Image.Resampling.BOX), np.float64)
    return int(np.packbits((gray[:, 1:] > gray[:, :-1]).ravel()).view(">u8")[0])


def thumbnail(image: Image.Image) -> np.ndarray:
    """The content box, lightly blurred and shrunk to 64x64, minus its mean, of unit norm: the dot
    product of two is their correlation, blind to brightness and contrast."""
    box = content_box(image.convert("L"))
    small = box.filter(ImageFilter.GaussianBlur(max(box.size) / 100)).resize((_THUMB_SIDE, _THUMB_SIDE), Image.Resampling.BOX)
    values = np.asarray(small, np.float32).ravel()
    values = values - values.mean()
    norm = float(np.linalg.norm(values))
    return values / norm if norm > 0 else values


def fingerprint(path: str) -> Fingerprint:
    """Decodes `path` once and hashes it; raises `DecodeError` when it cannot be read."""
    image, mode = read_image(path)
    pixels = np.asarray(image.convert("RGB"), np.uint8)
    digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    return Fingerprint(path, digest, perceptual_hash(image), thumbnail(image), image.size, mode)


def fingerprints(paths: list[str], workers: int = WORKERS, progress: Callable[[int], None] | None = None
                 ) -> tuple[list[Fingerprint], list[tuple[str, str]]]:
    """Fingerprints of the readable files and `(path, reason)` for the others."""
    def one(path: str):
        try:
            return fingerprint(path), None
        except DecodeError as e:
            return None, (path, str(e))

    found, unreadable = [], []
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (fp, error) in enumerate(pool.map(one, paths), 1):
            if fp is not None:
                found.append(fp)
            else:
                unreadable.append(error)
            if progress is not None:
                progress(i)
    return found, unreadable


def hamming_pairs(hashes: np.ndarray, max_distance: int, block: int = 1024) -> list[tuple[int, int, int]]:
    """Every pair `(i, j, distance)`, i < j, of 64-bit hashes at most `max_distance` bits apart."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        distances = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        for r, c in zip(*np.nonzero(distances <= max_distance), strict=True):
            i = start + int(r)
            if i < c:
                pairs.append((i, int(c), int(distances[r, c])))
    return pairs


def _components(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


@dataclasses.dataclass
class Group:
    """Images that are exact or near copies of each other."""

    members: list[int]  # indices into the fingerprint list
    kind: str  # "exact" when all members share their pixels, else "near"
    max_distance: int  # the largest dHash distance of a linking pair


def near_pairs(prints: list[Fingerprint], max_distance: int = DEFAULT_MAX_DISTANCE,
               min_correlation: float = DEFAULT_MIN_CORRELATION) -> list[tuple[int, int, int, float]]:
    """Pairs `(i, j, distance, correlation)` whose dHashes are within `max_distance` bits and
    whose thumbnails correlate at `min_correlation` or more."""
    hashes = np.array([fp.dhash for fp in prints], dtype=np.uint64)
    pairs = []
    for i, j, distance in hamming_pairs(hashes, max_distance):
        correlation = aligned_correlation(prints[i].thumbnail, prints[j].thumbnail)
        if correlation >= min_correlation:
            pairs.append((i, j, distance, correlation))
    return pairs


def aligned_correlation(a: np.ndarray, b: np.ndarray, reach: int = _ALIGN_REACH) -> float:
    """The best correlation of two thumbnails over shifts of up to `reach` pixels each way
    (what is left of a shift after the content boxes lined the copies up)."""
    side = _THUMB_SIDE
    padded = np.pad(b.reshape(side, side), reach)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (side, side))
    return float(np.einsum("ij,xyij->xy", a.reshape(side, side), windows).max())


def duplicate_groups(prints: list[Fingerprint], max_distance: int = DEFAULT_MAX_DISTANCE,
                     min_correlation: float = DEFAULT_MIN_CORRELATION) -> list[Group]:
    """Groups of exact or near duplicates (connected components of the links)."""
    by_digest: dict[str, list[int]] = {}
    for i, fp in enumerate(prints):
        by_digest.setdefault(fp.exact, []).append(i)
    edges = [(g[0], j) for g in by_digest.values() for j in g[1:]]
    near = near_pairs(prints, max_distance, min_correlation)
    edges += [(i, j) for i, j, _, _ in near]
    link_distance: dict[int, int] = {}
    for i, j, d, _ in near:
        link_distance[i] = max(link_distance.get(i, 0), d)
        link_distance[j] = max(link_distance.get(j, 0), d)
    groups = []
    for members in _components(len(prints), edges):
        exact = len({prints[i].exact for i in members}) == 1
        groups.append(Group(sorted(members), "exact" if exact else "near",
                            max((link_distance.get(i, 0) for i in members), default=0)))
    return sorted(groups, key=lambda g: prints[g.members[0]].path)


def summarise_sizes(prints: list[Fingerprint]) -> dict:
    sizes = Counter(f"{w}x{h}" for w, h in (fp.size for fp in prints))
    modes = Counter(fp.mode for fp in prints)
    return {"sizes": dict(sizes.most_common(10)), "distinct_sizes": len(sizes), "modes": dict(modes.most_common())}


@dataclasses.dataclass(frozen=True)
class Item:
    """An image file of the dataset: where it is and what it is labelled."""

    path: str
    split: str
    label: str


def list_dataset(data_dir: str | Path) -> tuple[list[Item], dict[str, dict[str, int]], list[str]]:
    """Every image file under `<data_dir>/<split>/<class>/` for the splits present:
    `(items, files per split and class, ignored non-image files)`. Empty class folders are
    counted (0), not refused: the audit reports, `train` refuses."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"--data-dir {root} does not exist or is not a folder")
    items, counts, ignored = [], {}, []
    for split in (TRAIN_DIR, TEST_DIR):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        files, skipped = scan_split(split_dir)
        ignored += skipped
        counts[split] = {name: len(images) for name, images in files.items()}
        items += [Item(p, split, name) for name, images in files.items() for p in images]
    if not counts:
        raise DatasetError(f"{root} has neither {TRAIN_DIR}/ nor {TEST_DIR}/ (expected {root}/{TRAIN_DIR}/<class>/*.jpg)")
    return items, counts, ignored


def audit_dataset(data_dir: str | Path, max_distance: int = DEFAULT_MAX_DISTANCE,
                  min_correlation: float = DEFAULT_MIN_CORRELATION, workers: int = WORKERS,
                  progress: Callable[[int], None] | None = None) -> dict:
    """The whole audit as a JSON-ready dict: counts, sizes, modes, unreadable files and
    every duplicate group with its files, splits and labels."""
    items, counts, ignored = list_dataset(data_dir)
    prints, unreadable = fingerprints([it.path for it in items], workers, progress)
    by_path = {it.path: it for it in items}
    groups = []
    for group in duplicate_groups(prints, max_distance, min_correlation):
        members = [by_path[prints[i].path] for i in group.members]
        splits = sorted({m.split for m in members})
        labels = sorted({m.label for m in members})
        groups.append({
            "kind": group.kind, "max_distance": group.max_distance, "size": len(members),
            "splits": splits, "labels": labels, "cross_split": len(splits) > 1, "cross_class": len(labels) > 1,
            "files": [{"path": m.path, "split": m.split, "label": m.label} for m in members],
        })
    leaked = sorted({f["path"] for g in groups if g["cross_split"] for f in g["files"] if f["split"] == TEST_DIR})

    def tally(selected: list[dict]) -> dict:
        return {"groups": len(selected), "exact": sum(g["kind"] == "exact" for g in selected),
                "near": sum(g["kind"] == "near" for g in selected),
                "images": sum(g["size"] for g in selected), "redundant_images": sum(g["size"] - 1 for g in selected)}

    summary = {split: tally([g for g in groups if g["splits"] == [split]]) for split in counts}
    summary["across_splits"] = tally([g for g in groups if g["cross_split"]])
    summary["cross_class_conflicts"] = tally([g for g in groups if g["cross_class"]])
    summary["test_images_with_a_training_twin"] = len(leaked)
    return {
        "data_dir": str(data_dir), "max_distance": max_distance, "min_correlation": min_correlation,
        "images": len(items), "readable": len(prints),
        "counts": counts, **summarise_sizes(prints),
        "summary": summary, "unreadable": [{"path": p, "reason": r} for p, r in unreadable],
        "ignored_files": ignored, "leaked_test_images": leaked, "groups": groups,
    }


def format_audit(report: dict) -> str:
    """The audit's summary as Markdown tables."""
    classes = sorted({c for per_class in report["counts"].values() for c in per_class})
    counts = [[split, *(per_class.get(c, 0) for c in classes), sum(per_class.values())]
              for split, per_class in report["counts"].items()]
    lines = [markdown_table(["Split", *classes, "total"], counts)]
    lines += ["", f"Readable: {report['readable']} of {report['images']}; sizes: "
              + ", ".join(f"{k} ({v})" for k, v in report["sizes"].items())
              + (f" and {report['distinct_sizes'] - len(report['sizes'])} more" if report["distinct_sizes"] > len(report["sizes"]) else "")
              + "; modes: " + ", ".join(f"{k} ({v})" for k, v in report["modes"].items()), "",
              f"Duplicate groups (exact pixels, or dHash within {report['max_distance']} bits and thumbnail "
              f"correlation >= {report['min_correlation']}):", ""]
    names = {"across_splits": "across splits", "cross_class_conflicts": "same image, different labels"}
    groups = [[names.get(key, "within " + key), *(t[k] for k in ("groups", "exact", "near", "images", "redundant_images"))]
              for key, t in report["summary"].items() if isinstance(t, dict)]
    lines.append(markdown_table(["Where", "Groups", "Exact", "Near", "Images in them", "Redundant copies"], groups))
    lines.append(f"\nTest images with a twin in Training: {report['summary']['test_images_with_a_training_twin']}")
    if report["unreadable"]:
        lines.append(f"Unreadable files: {len(report['unreadable'])} (listed in audit.json)")
    return "\n".join(lines)


@dataclasses.dataclass
class Deduplication:
    """What `--dedup` did to the training pool."""

    kept: list  # the training examples left
    dropped: list[tuple[str, str]]  # (path, why)
    leaked_test: list[str]  # test images that had a twin in the training pool


def deduplicate(train: list, test: list, max_distance: int = DEFAULT_MAX_DISTANCE,
                min_correlation: float = DEFAULT_MIN_CORRELATION, workers: int = WORKERS, drop: bool = True) -> Deduplication:
    """Finds the test images with an exact or near twin in `train` (examples with `.path` and
    `.label`). With `drop`, also drops from `train` every such twin, keeps one image of each
    duplicate group inside `train` (the first in order), and drops all copies of an image that
    `train` holds under different labels. Unreadable files are left for the loader to skip
    and report."""
    prints, _ = fingerprints([e.path for e in train] + [e.path for e in test], workers)
    in_test = {e.path for e in test}
    label = {e.path: e.label for e in train}
    dropped: dict[str, str] = {}
    leaked: set[str] = set()
    for group in duplicate_groups(prints, max_distance, min_correlation):
        paths = [prints[i].path for i in group.members]
        tests = [p for p in paths if p in in_test]
        trains = [p for p in paths if p not in in_test]
        if tests and trains:
            leaked.update(tests)
            dropped.update({p: f"{group.kind} twin of test image {tests[0]}" for p in trains})
        elif len({label[p] for p in trains}) > 1:  # which label is right is unknown: keep none
            dropped.update({p: f"{group.kind} copies under different labels: {', '.join(trains)}" for p in trains})
        elif len(trains) > 1:
            dropped.update({p: f"{group.kind} duplicate of {trains[0]}" for p in trains[1:]})
    if not drop:
        return Deduplication(list(train), [], sorted(leaked))
    kept = [e for e in train if e.path not in dropped]
    return Deduplication(kept, sorted(dropped.items()), sorted(leaked))
