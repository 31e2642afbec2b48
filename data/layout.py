"""The Kaggle folder layout, `<data_dir>/Training/<class>/*` and optionally
`<data_dir>/Testing/<class>/*`: its names, and the image files of a split.

Both `data.discovery` (which builds the splits) and `data.audit` (which finds duplicates)
read the folders through this module, so neither has to import the other's listing code.
Files are listed recursively, in sorted order of their path, so the lists are the same on
every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from errors import UserInputError

TRAIN_DIR = "Training"
TEST_DIR = "Testing"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm"}
)
_DICOM_MAGIC_AT, _DICOM_MAGIC = 128, b"DICM"  # a DICOM file: a 128-byte preamble, then "DICM" (PS3.10 7.1)


class DatasetError(UserInputError, ValueError):
    """The dataset folder is missing or does not have the expected layout."""


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

    Returns `({class_name: [file, ...]}, ignored)`; files are sorted; hidden files and
    `__MACOSX` folders are passed over; files of other extensions and symlinked folders
    (with a trailing `/`) are listed as ignored.
    """
    files: dict[str, list[str]] = {}
    ignored: list[str] = []
    for class_dir in _class_dirs(split_dir):
        found = files.setdefault(class_dir.name, [])
        for path in files_under(class_dir):
            (found if is_image_file(path) else ignored).append(str(path))
        ignored += [f"{link}/" for link in symlinked_folders(class_dir)]
    return files, ignored


def has_dicom_preamble(path: str | Path) -> bool:
    """Whether the file's bytes 128..131 are `DICM`: a DICOM file whatever its name (scanners and
    PACS exports often write them without an extension)."""
    try:
        with open(path, "rb") as f:
            return f.read(_DICOM_MAGIC_AT + 4)[_DICOM_MAGIC_AT:] == _DICOM_MAGIC
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    """An image by its extension, or a DICOM file by its preamble."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or has_dicom_preamble(path)


def symlinked_folders(folder: Path) -> list[Path]:
    """The symlinked folders below `folder` (hidden ones aside): never followed, since a link
    can loop or lead outside the dataset, so they are named among the ignored entries instead."""
    return sorted(
        Path(dirpath, name)
        for dirpath, dirnames, _ in os.walk(folder, followlinks=False)
        for name in dirnames
        if Path(dirpath, name).is_symlink() and not _is_hidden(Path(dirpath, name), folder)
    )


def list_split(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """`scan_split`, refusing a split without class folders or with an empty one."""
    files, ignored = scan_split(split_dir)
    if not files:
        raise DatasetError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    for name, found in files.items():
        if not found:
            raise DatasetError(f"class folder {split_dir / name} holds no image files")
    return files, ignored
