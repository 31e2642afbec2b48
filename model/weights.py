"""Where the backbone's starting weights come from, with clear offline errors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from errors import UserInputError

IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
_WEIGHTS_HOST = "storage.googleapis.com"


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

    `imagenet` is the cached file when present; otherwise Keras downloads it,
    which needs the network: offline, this raises at once with the file name,
    the folder to put it in and the alternatives.
    """
    if spec == "none":
        return None
    if spec == "imagenet":
        cached = keras_models_dir() / IMAGENET_NOTOP_FILE
        if cached.is_file():
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
    return str(path)


def load_initial_weights(model, path: str | os.PathLike) -> None:
    """Loads a `.weights.h5` file saved by `model.save_weights` into `model`."""
    path = Path(path)
    check_weights_file(path, "--init-weights file")
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as e:
        raise WeightsError(
            f"--init-weights file {path} does not fit this model ({type(e).__name__}: {e})"
        ) from None
