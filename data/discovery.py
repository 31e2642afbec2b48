"""Dataset discovery and seeded, stratified splits for the Kaggle folder layout.

The layout is `<data_dir>/Training/<class>/*` and, optionally,
`<data_dir>/Testing/<class>/*` (listed by `data.layout`). Classes are the sorted
class-folder names and must be the same in both splits, compared in Unicode NFC
(`tumör` written with a combining umlaut, as macOS stores it, is the class `tumör`).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from pathlib import Path

import numpy as np

from data import SEED, TEST_SPLIT, VAL_SPLIT
from data.layout import (
    IMAGE_EXTENSIONS,
    TEST_DIR,
    TRAIN_DIR,
    DatasetError,
    files_under,
    list_split,
    scan_split,
)

# The layout's names stay importable from here, where most callers look for them.
__all__ = [
    "IMAGE_EXTENSIONS",
    "TEST_DIR",
    "TRAIN_DIR",
    "DatasetError",
    "Example",
    "Splits",
    "discover",
    "files_under",
    "list_split",
    "make_splits",
    "scan_split",
    "stratified_split",
]

# Tags keep the split streams apart from every other seeded stream in the project.
_VAL_TAG = 0x5641
_TEST_TAG = 0x5445


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


def _nfc_classes(files: dict[str, list[str]], split: str) -> dict[str, list[str]]:
    """The class folders of one split by the NFC form of their names (the files keep the real
    paths on disk). Unzipping on macOS or copying through it can leave one split's names
    decomposed (NFD) and the other's composed: the same name to a user, different strings."""
    by_name: dict[str, list[str]] = {}
    for name, paths in files.items():
        nfc = unicodedata.normalize("NFC", name)
        if nfc in by_name:
            same = [_spelled(n) for n in files if unicodedata.normalize("NFC", n) == nfc]
            raise DatasetError(f"{split}/ has two class folders with the same name in different Unicode forms "
                               f"({', '.join(same)}): rename one")
        by_name[nfc] = paths
    return by_name


def _spelled(name: str) -> str:
    """A name as a user can tell it apart: quoted (a trailing space shows), and when it holds
    anything but printable ASCII, also with each such character as its code point (a look-alike
    Cyrillic letter, an accent, a zero-width space: invisible in the name itself)."""
    if name.isascii() and name.isprintable():
        return repr(name)
    escaped = "".join(c if c.isascii() and c.isprintable() else f"\\u{ord(c):04x}" for c in name)
    return f"{name!r} (as code points: '{escaped}')"


def _class_mismatch(classes: list[str], test_classes: list[str]) -> DatasetError:
    """The error for Training/ and Testing/ class folders that differ, naming the names in one only."""
    only = [
        f"only in {split}/: {', '.join(_spelled(n) for n in sorted(set(mine) - set(other)))}"
        for split, mine, other in ((TRAIN_DIR, classes, test_classes), (TEST_DIR, test_classes, classes))
        if set(mine) - set(other)
    ]
    return DatasetError(f"class folders differ between {TRAIN_DIR}/ {classes} and {TEST_DIR}/ {test_classes}: "
                        f"{'; '.join(only)}")


def discover(data_dir: str | Path) -> tuple[list[str], list[Example], list[Example] | None, list[str]]:
    """Finds the classes and the Training (and Testing, if present) examples.

    Returns `(classes, train, test_or_None, ignored_files)`; class names are in NFC.
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
    train_files = _nfc_classes(train_files, TRAIN_DIR)
    classes = sorted(train_files)
    test_files = None
    test_dir = root / TEST_DIR
    if test_dir.is_dir():
        test_files, test_ignored = list_split(test_dir)
        ignored += test_ignored
        test_files = _nfc_classes(test_files, TEST_DIR)
        if sorted(test_files) != classes:
            raise _class_mismatch(classes, sorted(test_files))

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
    data_dir: str | Path, val_split: float = VAL_SPLIT, test_split: float = TEST_SPLIT, seed: int = SEED,
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
