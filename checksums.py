"""The digest of a file's bytes, read in chunks: the one definition that the weights checks, a
run's record of the files it started from and its model hash share. Standard library only, so
anything may import it (with `errors`, the bottom of the import layers)."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 2**20  # bytes read at a time: a 100 MB weights file never sits in memory whole


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (`algorithm` as hashlib names it)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, for recording which file a run started from."""
    return file_digest(path, "sha256")
