"""Where the backbone's starting weights come from, with clear offline errors, and whether
a cached ImageNet file is the one Keras (or torchvision) published.

Nothing here imports Keras or torch: options and files are checked before a backend loads.
A torchvision state dict is converted to Keras' layout once, by `model.torchvision_convert`
in a subprocess (so a tensorflow or jax process never loads torch), into Keras' cache.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

from checksums import file_digest
from errors import UserInputError
from model.spec import ARCHS, KERAS_V1, TORCHVISION_V15

IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
_WEIGHTS_HOST = "storage.googleapis.com"
# Keras' ImageNet weight files for its ResNets, {file name: published md5}, and the folder URL they
# are downloaded from: what `keras.applications.ResNet50` passes to `keras.utils.get_file(name,
# url, file_hash=...)`, and what `model.resnet` passes it too. Copied from keras 3.15.1,
# keras/src/applications/resnet.py: WEIGHTS_HASHES ({name: (top, notop)}, for the files
# `{name}_weights_tf_dim_ordering_tf_kernels.h5` and `{name}_weights_tf_dim_ordering_tf_kernels_notop.h5`)
# and BASE_WEIGHTS_PATH. tests/test_weights.py fails when the installed Keras publishes another
# file, hash or URL: copy them again from its source then.
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
KERAS_WEIGHTS_HASHES = {
    "resnet50_weights_tf_dim_ordering_tf_kernels.h5": "2cb95161c43110f7111970584f804107",
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101_weights_tf_dim_ordering_tf_kernels.h5": "f1aeb4b969a6efcfb50fad2f0c20cfc5",
    "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152_weights_tf_dim_ordering_tf_kernels.h5": "100835be76be38e30d865e96f2aaae62",
    "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5": "ee4c566cf9a93f14d82f913c2dc6dd0c",
    "resnet50v2_weights_tf_dim_ordering_tf_kernels.h5": "3ef43a0b657b3be2300d5770ece849e0",
    "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "fac2f116257151a9d068a22e544a4917",
    "resnet101v2_weights_tf_dim_ordering_tf_kernels.h5": "6343647c601c52e1368623803854d971",
    "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "c0ed64b8031c3730f411d2eb4eea35b5",
    "resnet152v2_weights_tf_dim_ordering_tf_kernels.h5": "a49b44d1979771252814e80f8ec446f9",
    "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "ed17cf2e0169df9d443503ef94b23b33",
    "resnext50_weights_tf_dim_ordering_tf_kernels.h5": "67a5b30d522ed92f75a1f16eef299d1a",
    "resnext50_weights_tf_dim_ordering_tf_kernels_notop.h5": "62527c363bdd9ec598bed41947b379fc",
    "resnext101_weights_tf_dim_ordering_tf_kernels.h5": "34fb605428fcc7aa4d62f44404c11509",
    "resnext101_weights_tf_dim_ordering_tf_kernels_notop.h5": "0f678c91647380debd923963594981b3",
}
_TOP_SUFFIX = "_weights_tf_dim_ordering_tf_kernels.h5"
_NOTOP_SUFFIX = "_weights_tf_dim_ordering_tf_kernels_notop.h5"

# torchvision's ResNet50 weights, `--weights NAME: (ResNet50_Weights member, file name)`, as
# torchvision publishes them: the part after the dash is the start of the file's SHA-256
# (torch.hub's naming rule), which `check_torchvision_file` verifies.
TORCHVISION_WEIGHTS = {
    "torchvision": ("IMAGENET1K_V1", "resnet50-0676ba61.pth"),
    "torchvision-v2": ("IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
}
TORCHVISION_URL = "https://download.pytorch.org/models/"
_TORCHVISION_HOST = "download.pytorch.org"
STATE_DICT_SUFFIXES = (".pth", ".pt")
# The converted file's layout version: a file of another version is converted again.
CONVERTED_FORMAT = 1
_CONVERTER = "model.torchvision_convert"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
TORCH_INSTALL = "pip install -r requirements/runtime.lock (torch 2.14.1 with torchvision 0.29.1)"


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


def keras_weights_file_names(name: str) -> tuple[str, str]:
    """The (top, notop) file names Keras gives the ImageNet weights of ResNet `name`."""
    return name + _TOP_SUFFIX, name + _NOTOP_SUFFIX


def published_hashes() -> dict[str, tuple[str, str]]:
    """Keras' published hashes of the ResNet weight files, `{name: (top, notop)}`, in the shape of
    Keras' WEIGHTS_HASHES, from `KERAS_WEIGHTS_HASHES` (no Keras import: this runs before a backend)."""
    names = [file[: -len(_NOTOP_SUFFIX)] for file in KERAS_WEIGHTS_HASHES if file.endswith(_NOTOP_SUFFIX)]
    return {name: tuple(KERAS_WEIGHTS_HASHES[file] for file in keras_weights_file_names(name)) for name in names}


def imagenet_url() -> str:
    """Where `keras.applications.ResNet50` downloads the ImageNet notop file from."""
    return KERAS_WEIGHTS_URL + IMAGENET_NOTOP_FILE


@functools.lru_cache(maxsize=8)
def _digest_of(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
    return file_digest(path, algorithm)  # size and mtime key the cache: a replaced file is hashed again


def check_imagenet_file(path: Path) -> None:
    """Raises `WeightsError` unless `path` has Keras' published hash of the ResNet50 notop
    file (md5 for a 32-character hash, SHA-256 for 64, as Keras' `get_file` does)."""
    expected = published_hashes()["resnet50"][1]
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
    """Maps `--weights imagenet|torchvision|torchvision-v2|none|PATH` to the file the
    backbone's weights are read from (`model.resnet.load_backbone_weights` takes it).

    `imagenet` is the cached file when present, refused unless it has Keras' published
    hash; otherwise Keras downloads it (and checks that hash itself), which needs the
    network: offline, this raises at once with the file name, the folder to put it in
    and the alternatives. `torchvision`, `torchvision-v2` and `PATH.pth` are a torchvision
    state dict (see `resolve_torchvision_weights`), returned as the .pth file's path.
    """
    if spec == "none":
        return None
    if is_torchvision_weights(spec):
        return resolve_torchvision_weights(spec)
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


def is_torchvision_weights(spec: str) -> bool:
    """Whether `--weights` names a torchvision state dict: one of `TORCHVISION_WEIGHTS`, or a
    .pth / .pt file."""
    return spec in TORCHVISION_WEIGHTS or Path(spec).suffix in STATE_DICT_SUFFIXES


def weights_arch(spec: str) -> str | None:
    """The architecture `--weights` were trained for (None: `none`, or a Keras weights file,
    which must fit the architecture it is loaded into)."""
    if is_torchvision_weights(spec):
        return TORCHVISION_V15
    return KERAS_V1 if spec == "imagenet" else None


def resolve_arch(arch: str | None, weights: str) -> str:
    """`arch`, or when None the one the weights imply (torchvision's weights:
    torchvision-v1.5; otherwise keras-v1). Raises `WeightsError` when they contradict."""
    if arch is not None and arch not in ARCHS:
        raise WeightsError(f"arch must be one of {ARCHS}, got {arch!r}")
    implied = weights_arch(weights)
    if arch is None:
        return implied or KERAS_V1
    if implied and implied != arch:
        raise WeightsError(f"--weights {weights} are ResNet50 {implied} weights and do not fit --arch {arch}: "
                           f"use --arch {implied}, or other weights")
    return arch


def torch_hub_dir() -> Path:
    """`torch.hub.get_dir()` without importing torch: $TORCH_HOME/hub, where TORCH_HOME defaults
    to $XDG_CACHE_HOME/torch and XDG_CACHE_HOME to ~/.cache."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def torchvision_checkpoint(name: str) -> Path:
    """Where torch.hub keeps (and downloads) torchvision's file of `--weights name`."""
    return torch_hub_dir() / "checkpoints" / TORCHVISION_WEIGHTS[name][1]


def cached_sha256(path: Path) -> str:
    """`file_sha256`, computed once per process while the file keeps its size and mtime."""
    stat = path.stat()
    return _digest_of(str(path), "sha256", stat.st_size, stat.st_mtime_ns)


def check_torchvision_file(path: Path) -> None:
    """Raises `WeightsError` unless `path`'s SHA-256 starts with the hash in its file name, as
    torch.hub's `check_hash` does on download."""
    prefix = path.stem.rsplit("-", 1)[-1]
    if not cached_sha256(path).startswith(prefix):
        raise WeightsError(f"{path} does not match torchvision's published hash (SHA-256 {prefix}...): it is corrupt "
                           f"or truncated; delete it and put the real file there (torch.hub downloads it when online)")


def converted_torchvision_file(pth: str | os.PathLike) -> Path:
    """The Keras-layout copy of a torchvision state dict, in Keras' cache, named by the
    .pth file's SHA-256: one conversion serves every run and backend."""
    return keras_models_dir() / f"resnet50_v1.5_torchvision_{cached_sha256(Path(pth))[:16]}.h5"


def _is_converted(pth: Path) -> bool:
    import h5py

    converted = converted_torchvision_file(pth)
    try:
        with h5py.File(converted, "r") as f:
            return f.attrs.get("format") == CONVERTED_FORMAT and f.attrs.get("source_sha256") == cached_sha256(pth)
    except OSError:  # absent, or cut short: convert again
        return False


def resolve_torchvision_weights(spec: str) -> str:
    """The .pth file of `--weights torchvision|torchvision-v2|PATH.pth`, converted to Keras'
    layout if it is not yet (a subprocess with torch; it downloads torchvision's file into
    torch.hub's cache when that is absent and the network is there).

    A named file is looked for in torch.hub's cache first and used only with its published
    hash; absent and offline, this raises at once, without importing torch, with the file
    name, the folder to put it in and its URL.
    """
    if spec in TORCHVISION_WEIGHTS:
        path = torchvision_checkpoint(spec)
        if path.is_file():
            check_torchvision_file(path)
        elif not _can_reach(_TORCHVISION_HOST):
            member, name = TORCHVISION_WEIGHTS[spec]
            raise WeightsError(
                f"torchvision's ResNet50 {member} weights are not cached and cannot be downloaded (offline): put "
                f"{name} (from {TORCHVISION_URL}{name}) in {path.parent}/ (or set TORCH_HOME), or use "
                f"--weights PATH.pth, or --weights none"
            )
    else:
        path = Path(spec)
        if not path.is_file():
            raise WeightsError(f"--weights file {path} does not exist")
    if not (path.is_file() and _is_converted(path)):
        _convert(spec)
    return str(path)


def _convert(spec: str) -> None:
    """Runs `model.torchvision_convert` on `spec` in a subprocess: torch stays out of this
    process. Its `WeightsError` comes back as one line."""
    if importlib.util.find_spec("torch") is None:
        raise WeightsError(f"--weights {spec} is a PyTorch state dict, and reading it needs torch: {TORCH_INSTALL}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_PROJECT_ROOT), os.getenv("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", _CONVERTER, spec], capture_output=True, text=True, env=env)
    if result.returncode == 0:
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{WeightsError.__name__}: ")]
    if errors:
        raise WeightsError(errors[-1].split(": ", 1)[1])
    raise RuntimeError(f"converting --weights {spec} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
