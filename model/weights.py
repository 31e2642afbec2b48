"""Where the backbone's starting weights come from, with clear offline errors, and whether
a cached ImageNet file is the one Keras published.

Nothing here imports Keras: options and files are checked before a backend loads.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import socket
from pathlib import Path

from errors import UserInputError

IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
_WEIGHTS_HOST = "storage.googleapis.com"
# Where keras.applications.ResNet50 keeps the published hashes of its weight files, and where
# in the table the notop file's is (`WEIGHTS_HASHES["resnet50"] = (top, notop)`).
_KERAS_RESNET_SOURCE = ("src", "applications", "resnet.py")
_HASH_TABLE, _HASH_KEY, _NOTOP = "WEIGHTS_HASHES", "resnet50", 1
_CHUNK = 2**20  # bytes read at a time when hashing a file


class WeightsError(UserInputError, ValueError):
    """Weights were asked for that cannot be had."""


def keras_models_dir() -> Path:
    """The folder Keras caches application weights in (`$KERAS_HOME/models`)."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]) / "models"
    home = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
    return home / ".keras" / "models"


def _can_reach(host: str, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks (`algorithm` as hashlib names it)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, for recording which file a run started from."""
    return file_digest(path, "sha256")


def published_hashes() -> dict[str, tuple[str, str]]:
    """Keras' table of the ResNet weight files' published hashes, `{name: (top, notop)}`, as
    `keras.applications.ResNet50` hands them to `get_file`. Read from Keras' source with `ast`,
    not imported: importing any `keras.src` module loads a backend, and this runs before one."""
    spec = importlib.util.find_spec("keras")  # a top-level package is found, not imported
    source = Path(spec.submodule_search_locations[0], *_KERAS_RESNET_SOURCE) if spec else None
    try:
        tree = ast.parse(source.read_text())
        return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == _HASH_TABLE for t in node.targets))
    except (AttributeError, OSError, SyntaxError, StopIteration, ValueError) as e:
        raise WeightsError(f"cannot read Keras' published weight hashes ({_HASH_TABLE}) from {source}: "
                           f"{type(e).__name__} {e}") from None


@functools.lru_cache(maxsize=8)
def _digest_of(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
    return file_digest(path, algorithm)  # size and mtime key the cache: a replaced file is hashed again


def check_imagenet_file(path: Path) -> None:
    """Raises `WeightsError` unless `path` has Keras' published hash of the ResNet50 notop
    file (md5 for a 32-character hash, SHA-256 for 64, as Keras' `get_file` does)."""
    expected = published_hashes()[_HASH_KEY][_NOTOP]
    algorithm = "sha256" if len(expected) == 64 else "md5"
    stat = path.stat()
    if _digest_of(str(path), algorithm, stat.st_size, stat.st_mtime_ns) != expected:
        raise WeightsError(
            f"{path} does not match Keras' published hash of {IMAGENET_NOTOP_FILE} ({algorithm} {expected}): "
            f"it is corrupt or truncated; delete it and put the real file there (Keras downloads it when online)"
        )


def check_weights_file(path: Path, what: str) -> None:
    """Raises `WeightsError` unless `path` is a readable HDF5 file."""
    import h5py

    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist")
    try:
        with h5py.File(path, "r"):
            pass
    except OSError as e:
        raise WeightsError(f"{what} {path} is not a readable HDF5 weights file ({e})") from None


def resolve_backbone_weights(spec: str) -> str | None:
    """Maps `--weights imagenet|none|PATH` to what `keras.applications.ResNet50` takes.

    `imagenet` is the cached file when present, refused unless it has Keras' published
    hash; otherwise Keras downloads it (and checks that hash itself), which needs the
    network: offline, this raises at once with the file name, the folder to put it in
    and the alternatives.
    """
    if spec == "none":
        return None
    if spec == "imagenet":
        cached = keras_models_dir() / IMAGENET_NOTOP_FILE
        if cached.is_file():
            check_imagenet_file(cached)
            return str(cached)
        if not _can_reach(_WEIGHTS_HOST):
            raise WeightsError(
                f"ImageNet weights are not cached and cannot be downloaded (offline): "
                f"put {IMAGENET_NOTOP_FILE} in {cached.parent}/ (or set KERAS_HOME), "
                f"or use --weights PATH to a copy of it, or --weights none"
            )
        return "imagenet"
    path = Path(spec)
    check_weights_file(path, "--weights file")
    if is_whole_model_file(path):
        raise WeightsError(f"--weights file {path} holds a whole model's weights (saved by save_weights, e.g. a "
                           f"run's initial.weights.h5), not a ResNet50 backbone's: give it as --init-weights")
    return str(path)


def is_whole_model_file(path: Path) -> bool:
    """Whether an HDF5 file holds a whole model's weights as Keras 3's `save_weights` writes
    them: the backbone nested as a model of its own (`functional`) beside the head's layers.
    A backbone's own file (ImageNet's, or a backbone saved alone) has its layers at the top."""
    import h5py

    with h5py.File(path, "r") as f:
        layers = f.get("layers")
        return layers is not None and any(name.startswith("functional") for name in layers)


def first_line(error: Exception) -> str:
    """An exception's first line: Keras' loading errors go on to list every layer."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_initial_weights(model, path: str | os.PathLike) -> None:
    """Loads a `.weights.h5` file saved by `model.save_weights` into `model`."""
    path = Path(path)
    check_weights_file(path, "--init-weights file")
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as e:
        raise WeightsError(
            f"--init-weights file {path} does not fit this model, so it was saved from another one (check "
            f"--model, --cut, --head-blocks, --head-filters, --se): {type(e).__name__}: {first_line(e)}"
        ) from None
