"""The identity of a run's data: per image file, its path relative to the data folder, its
size and the SHA-256 of its bytes.

A run records this (`data-fingerprint.tsv`); `--resume`, `evaluate` and `report` compare the
data they are given with it, so a relative `--data-dir` that names another folder from
somewhere else, or a dataset changed in place, is refused instead of silently used. The same
digests find exact copies of an image in both Training/ and Testing/ at no extra cost.
NumPy-free and Keras-free: hashing only.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from data.discovery import TEST_DIR, TRAIN_DIR, discover

FINGERPRINT_FILE = "data-fingerprint.tsv"
Digest = tuple[int, str]  # (bytes, sha256 hex); (-1, "") for a file that cannot be read


def file_digest(path: str | Path) -> Digest:
    """The size and SHA-256 of a file's bytes."""
    return read_and_digest(path)[1]


def read_and_digest(path: str | Path) -> tuple[bytes | None, Digest]:
    """A file's bytes (None when it cannot be read: the decoder then says why) and their digest."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, (-1, "")
    return data, (len(data), hashlib.sha256(data).hexdigest())


def relative(path: str | Path, data_dir: str | Path) -> str:
    """`path` below `data_dir`, with forward slashes (the same on every machine)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(data_dir))).as_posix()


def dataset_files(data_dir: str | Path) -> list[str]:
    """Every image file discovery lists under `data_dir` (Training/ and Testing/)."""
    _, train, test, _ = discover(data_dir)
    return [e.path for e in train + (test or [])]


def fingerprint(data_dir: str | Path, known: dict[str, Digest] | None = None) -> dict[str, Digest]:
    """{relative path: digest} of every image file of `data_dir`; digests already computed
    (by the decode pass, keyed by the path as listed) are reused, the rest are read here."""
    known = known or {}
    return {relative(p, data_dir): known.get(p) or file_digest(p) for p in dataset_files(data_dir)}


def write_fingerprint(path: Path, prints: dict[str, Digest]) -> str:
    """Writes the listing (sorted, tab-separated) and returns its own SHA-256 for config.json."""
    text = "path\tbytes\tsha256\n" + "".join(f"{p}\t{n}\t{h}\n" for p, (n, h) in sorted(prints.items()))
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return hashlib.sha256(text.encode()).hexdigest()


def read_fingerprint(path: Path) -> dict[str, Digest]:
    """The listing `write_fingerprint` wrote; `ValueError` when it is not one."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != "path\tbytes\tsha256":
        raise ValueError(f"{path} is not a data fingerprint")
    rows = (line.rsplit("\t", 2) for line in lines[1:])
    return {p: (int(n), h) for p, n, h in rows}


def differences(recorded: dict[str, Digest], current: dict[str, Digest]) -> str | None:
    """None when the two listings agree, else what differs in a few words, e.g.
    "12 files differ, 3 missing, first: Testing/glioma/x.jpg"."""
    changed = sorted(p for p in recorded.keys() & current.keys() if recorded[p] != current[p])
    missing = sorted(recorded.keys() - current.keys())
    new = sorted(current.keys() - recorded.keys())
    if not (changed or missing or new):
        return None
    parts = [f"{len(names)} {what}" for names, what in (
        (changed, "file differs" if len(changed) == 1 else "files differ"), (missing, "missing"),
        (new, "not in the run's data")) if names]
    return f"{', '.join(parts)}, first: {(changed or missing or new)[0]}"


def cross_split_copies(prints: dict[str, Digest]) -> list[tuple[str, str]]:
    """(Testing file, Training file) pairs with the same bytes: one image in both splits."""
    training = defaultdict(list)
    for path, (_, sha) in prints.items():
        if sha and path.startswith(f"{TRAIN_DIR}/"):
            training[sha].append(path)
    return [(path, training[sha][0]) for path, (_, sha) in sorted(prints.items())
            if sha and path.startswith(f"{TEST_DIR}/") and sha in training]
