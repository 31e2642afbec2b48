"""`download`: the Kaggle "Brain Tumor MRI Dataset", fetched with kagglehub and checked."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from data.discovery import TEST_DIR, TRAIN_DIR, DatasetError, list_split
from errors import UserInputError

DATASET = "masoudnickparvar/brain-tumor-mri-dataset"
API_HOST = "api.kaggle.com"
# Files per class of the dataset's version 1 (Kaggle page, 7,023 images).
EXPECTED_COUNTS = {
    TRAIN_DIR: {"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457},
    TEST_DIR: {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300},
}


class DownloadError(UserInputError, RuntimeError):
    """The dataset could not be fetched; the message says what is missing."""


def check_reachable(host: str = API_HOST, timeout: float = 5.0) -> None:
    """Raises `DownloadError` within `timeout` seconds when `host` cannot be reached."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise DownloadError(f"cannot reach {host} (offline, or blocked by a firewall or proxy: {e.strerror or e}); "
                            f"download the dataset elsewhere and pass its folder as --data-dir") from None


def find_root(path: Path) -> Path:
    """The folder under `path` that holds `Training/` (the archive may nest it)."""
    for candidate in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        if (candidate / TRAIN_DIR).is_dir():
            return candidate
    raise DatasetError(f"the download in {path} has no {TRAIN_DIR}/ folder; the dataset's layout changed")


def check_counts(root: Path) -> list[str]:
    """Differences between the files per class found and the published counts (empty: none)."""
    notes = []
    for split, expected in EXPECTED_COUNTS.items():
        if not (root / split).is_dir():
            notes.append(f"{split}/ is missing")
            continue
        files, _ = list_split(root / split)
        found = {name: len(paths) for name, paths in files.items()}
        if sorted(found) != sorted(expected):
            notes.append(f"{split}/ has classes {sorted(found)}, expected {sorted(expected)}")
        notes += [f"{split}/{name}: {found.get(name, 0)} images, expected {n}"
                  for name, n in expected.items() if found.get(name, 0) != n]
    return notes


def download(handle: str = DATASET, dest: str | Path | None = None, timeout: float = 5.0) -> tuple[Path, list[str]]:
    """Fetches `handle` (into `dest`, or kagglehub's cache) and checks its layout; returns
    `(dataset root, differences from the published class counts)`."""
    try:
        import kagglehub
    except ImportError:
        raise DownloadError("kagglehub is not installed (pip install kagglehub)") from None
    if not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "KAGGLE_API_ENDPOINT")):
        check_reachable(timeout=timeout)  # a direct connection is what a proxy-less machine would use
    try:
        path = kagglehub.dataset_download(handle, output_dir=str(dest) if dest else None)
    except Exception as e:  # kagglehub raises HTTP, auth and I/O errors of many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = ("; if the dataset needs a signed-in user, set KAGGLE_USERNAME and KAGGLE_KEY or put kaggle.json "
                "in ~/.kaggle/" if any(w in reason.lower() for w in ("401", "403", "auth", "credential", "permission"))
                else "")
        raise DownloadError(f"kagglehub could not download {handle}: {type(e).__name__}: {reason}{hint}") from None
    root = find_root(Path(path))
    return root, check_counts(root)
