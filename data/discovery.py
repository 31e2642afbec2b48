"""Dataset discovery and seeded, stratified splits for the Kaggle folder layout.

The layout is `<data_dir>/Training/<class>/*` and, optionally,
`<data_dir>/Testing/<class>/*`. Classes are the sorted class-folder names and
must be the same in both splits. Files are listed recursively, in sorted order
of their relative path, so the example list is the same on every machine.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from errors import UserInputError

TRAIN_DIR = "Training"
TEST_DIR = "Testing"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
# Tags keep the split streams apart from every other seeded stream in the project.
_VAL_TAG = 0x5641
_TEST_TAG = 0x5445


class DatasetError(UserInputError, ValueError):
    """The dataset folder is missing or does not have the expected layout."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled image file."""

    path: str
    label: int


@dataclasses.dataclass
class Splits:
    """Train/validation/test examples and what was done to get them."""

    classes: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    test_source: str
    ignored: list[str]
    dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # by --dedup: (path, why)
    leaked_test: list[str] = dataclasses.field(default_factory=list)  # test images with a training twin

    def counts(self) -> dict[str, list[int]]:
        """Examples per class, per split."""
        return {
            name: np.bincount([e.label for e in examples], minlength=len(self.classes)).tolist()
            for name, examples in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def _is_hidden(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(
        p for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p, split_dir)
    )


def _walk_files(folder: Path) -> list[Path]:
    # followlinks=False: a symlinked folder (or a symlink loop) is not descended into.
    return sorted(
        Path(dirpath, name)
        for dirpath, _, names in os.walk(folder, followlinks=False)
        for name in names
        if Path(dirpath, name).is_file()
    )


def files_under(path: str | Path) -> list[Path]:
    """The files a user means by `path`: the file itself, or every file below a folder
    (sorted; hidden files, `__MACOSX` and symlinked folders left out)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [p for p in _walk_files(path) if not _is_hidden(p, path)]


def scan_split(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The image files of every class folder of one split, empty folders included.

    Returns `({class_name: [file, ...]}, ignored_files)`; files are sorted and
    hidden files, `__MACOSX` folders and non-image extensions are ignored.
    """
    files: dict[str, list[str]] = {}
    ignored: list[str] = []
    for class_dir in _class_dirs(split_dir):
        found = files.setdefault(class_dir.name, [])
        for path in files_under(class_dir):
            (found if path.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(str(path))
    return files, ignored


def list_split(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """`scan_split`, refusing a split without class folders or with an empty one."""
    files, ignored = scan_split(split_dir)
    if not files:
        raise DatasetError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    for name, found in files.items():
        if not found:
            raise DatasetError(f"class folder {split_dir / name} holds no image files")
    return files, ignored


def discover(data_dir: str | Path) -> tuple[list[str], list[Example], list[Example] | None, list[str]]:
    """Finds the classes and the Training (and Testing, if present) examples.

    Returns `(classes, train, test_or_None, ignored_files)`.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"--data-dir {root} does not exist or is not a folder")
    train_dir = root / TRAIN_DIR
    if not train_dir.is_dir():
        raise DatasetError(
            f"{root} has no {TRAIN_DIR}/ folder (expected {root}/{TRAIN_DIR}/<class>/*.jpg)"
        )
    train_files, ignored = list_split(train_dir)
    classes = sorted(train_files)
    test_files = None
    test_dir = root / TEST_DIR
    if test_dir.is_dir():
        test_files, test_ignored = list_split(test_dir)
        ignored += test_ignored
        if sorted(test_files) != classes:
            raise DatasetError(
                f"class folders differ between {TRAIN_DIR}/ {classes} and "
                f"{TEST_DIR}/ {sorted(test_files)}"
            )

    def examples(files: dict[str, list[str]]) -> list[Example]:
        return [Example(p, i) for i, c in enumerate(classes) for p in files[c]]

    test = examples(test_files) if test_files is not None else None
    return classes, examples(train_files), test, ignored


def stratified_split(
    examples: list[Example], fraction: float, seed: int, tag: int = _VAL_TAG
) -> tuple[list[Example], list[Example]]:
    """Splits off `fraction` of each class, chosen by a seeded permutation.

    Returns `(kept, held_out)`, both in the original order. Every class keeps at
    least one example; a class of two or more gives at least one to `held_out`.
    """
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"split fraction must be in [0, 1), got {fraction}")
    held = set()
    labels = np.array([e.label for e in examples])
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_held = round(len(idx) * fraction)
        if fraction > 0 and len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        rng = np.random.default_rng([tag, seed, int(label)])
        held.update(idx[rng.permutation(len(idx))[:n_held]].tolist())
    kept = [e for i, e in enumerate(examples) if i not in held]
    out = [e for i, e in enumerate(examples) if i in held]
    return kept, out


def make_splits(
    data_dir: str | Path, val_split: float = 0.1, test_split: float = 0.0, seed: int = 0,
    dedup: bool = False, max_distance: int | None = None, min_correlation: float | None = None,
    find_twins: bool = False,
) -> Splits:
    """Discovers the dataset and builds the train/val/test splits.

    The test set is `Testing/` when present; otherwise `test_split` of Training,
    held out before the validation split is taken from the rest. With `dedup`, the
    rest loses every image with an exact or near twin in the test set and keeps one
    image of each duplicate group (see `data.audit.deduplicate`) before the
    validation split is drawn. `dedup` or `find_twins` list the test images that
    have a twin in the rest (`leaked_test`).
    """
    classes, train, test, ignored = discover(data_dir)
    if test is not None:
        source = f"{TEST_DIR}/"
        if test_split:
            source += f" (--test-split {test_split} ignored: the dataset has {TEST_DIR}/)"
    elif test_split > 0:
        train, test = stratified_split(train, test_split, seed, tag=_TEST_TAG)
        source = f"{test_split:g} of {TRAIN_DIR}/, stratified, split seed {seed}"
    else:
        test, source = [], "none (no Testing/ folder and --test-split 0)"
    dropped, leaked = [], []
    if dedup or find_twins:
        from data import audit

        result = audit.deduplicate(
            train, test,
            audit.DEFAULT_MAX_DISTANCE if max_distance is None else max_distance,
            audit.DEFAULT_MIN_CORRELATION if min_correlation is None else min_correlation,
            drop=dedup,
        )
        train, dropped, leaked = result.kept, result.dropped, result.leaked_test
    train, val = stratified_split(train, val_split, seed, tag=_VAL_TAG)
    return Splits(classes, train, val, test, source, ignored, dropped, leaked)
