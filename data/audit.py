"""Duplicate and leakage audit of an image dataset.

Exact duplicates share a SHA-256 of their decoded pixels (so a PNG copy of a JPEG's pixels
counts as the same image); near duplicates have perceptual hashes (pHash, 64 bits) within
a Hamming distance. Images linked either way form groups (connected components). A group
whose members lie in Training and Testing is a leak; one whose members carry different
labels is a conflict.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable

import numpy as np
from PIL import Image

from data.decode import DecodeError, read_image

# Chosen from measurements on the real images (see the README, "Auditing a dataset").
DEFAULT_MAX_DISTANCE = 8
_HASH_SIDE = 32


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What the audit knows of one readable image."""

    path: str
    exact: str  # SHA-256 of the decoded pixels and their shape
    phash: int  # 64-bit perceptual hash
    size: tuple[int, int]
    mode: str


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    matrix = np.sqrt(2 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix(_HASH_SIDE)


def perceptual_hash(image: Image.Image) -> int:
    """pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grayscale copy against
    their median, as 64 bits. Brightness and small shifts barely move it."""
    gray = np.asarray(image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS), np.float64)
    low = (_DCT @ gray @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term only carries the mean brightness
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint(path: str) -> Fingerprint:
    """Decodes `path` once and hashes it; raises `DecodeError` when it cannot be read."""
    image, mode = read_image(path)
    pixels = np.asarray(image.convert("RGB"), np.uint8)
    digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    return Fingerprint(path, digest, perceptual_hash(image), image.size, mode)


def fingerprints(paths: list[str], workers: int = 2, progress: Callable[[int], None] | None = None
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
    max_distance: int  # the largest pHash distance of a linking pair


def duplicate_groups(prints: list[Fingerprint], max_distance: int = DEFAULT_MAX_DISTANCE) -> list[Group]:
    """Groups of exact or near duplicates (connected components of the links)."""
    by_digest: dict[str, list[int]] = {}
    for i, fp in enumerate(prints):
        by_digest.setdefault(fp.exact, []).append(i)
    edges = [(g[0], j) for g in by_digest.values() for j in g[1:]]
    near = hamming_pairs(np.array([fp.phash for fp in prints], dtype=np.uint64), max_distance)
    edges += [(i, j) for i, j, _ in near]
    link_distance: dict[int, int] = {}
    for i, j, d in near:
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
