"""Which Keras backend is active, checked before it loads, and its environment: the
framework versions a run records, the variables a framework must find when it starts.

Never imports a framework at module level: the command line uses it before a backend loads.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

from backend.devices import devices
from errors import UserInputError

SUPPORTED_BACKENDS = ("torch", "tensorflow", "jax")
_FRAMEWORK_PACKAGES = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow-cpu", "tensorflow"),
    "jax": ("jax", "jaxlib"),
}


class BackendError(UserInputError, RuntimeError):
    """The requested Keras backend is unknown or not installed."""


def selected_backend() -> str:
    """The backend Keras will use: `KERAS_BACKEND`, else keras.json, else tensorflow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    try:
        return json.loads((home / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def check_backend() -> str:
    """Returns the selected backend after checking it is supported and installed.

    Call before importing keras, which would fail later with a traceback.
    """
    name = selected_backend()
    if name not in SUPPORTED_BACKENDS:
        raise BackendError(
            f"unknown KERAS_BACKEND={name!r}; use one of {', '.join(SUPPORTED_BACKENDS)}"
        )
    if importlib.util.find_spec(name) is None:
        raise BackendError(
            f"KERAS_BACKEND={name} but {name} is not installed; run `make venv` "
            f"(or pip install -r requirements/runtime.lock)"
        )
    for variable, value in framework_environment(name).items():
        os.environ.setdefault(variable, value)  # what the user set wins
    return name


def framework_environment(backend: str) -> dict[str, str]:
    """Environment defaults the backend's framework reads at import, so set before keras loads.

    jax preallocates 75% of each GPU when it starts; beside another framework in the process
    (torchvision in `bench-train`'s baseline, a torch-built data loader) that memory is gone for
    it, and an out-of-memory error blames the wrong side. Allocating on demand costs a little
    speed on the first steps only (XLA's allocator keeps what it took). A user's own setting,
    e.g. XLA_PYTHON_CLIENT_MEM_FRACTION for a dedicated GPU, is left alone."""
    if backend == "jax" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return {}


def backend_subprocess_env(backend: str) -> dict[str, str]:
    """This process's environment with `KERAS_BACKEND=backend`, for a child that runs it."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for variable, value in framework_environment(backend).items():
        env.setdefault(variable, value)
    return env


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, platform and devices of this process (imports keras)."""
    import keras

    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__}
    for package in ("numpy", "pillow", "h5py", "click"):
        versions[package] = _version(package)
    for _name, packages in _FRAMEWORK_PACKAGES.items():
        for package in packages:
            if (v := _version(package)) is not None:
                versions[package] = v
    return {
        "backend": backend,
        "versions": versions,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "devices": devices(),
        "argv": sys.argv,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()




@contextlib.contextmanager
def tensorflow_kept_out() -> Iterator[None]:
    """Inside, Keras takes tensorflow as not installed, unless it is the backend or already
    imported. Keras asks for it in passing (`set_random_seed` seeds it for tf.data pipelines,
    saving a model checks for tf types) and so imports it under torch or jax: seconds of
    start-up, its log lines in front of the project's messages and, on a GPU, device memory
    the active framework needs. Nothing in a training run uses tensorflow under them."""
    import keras
    from keras.src.utils import module_utils  # the lazy `tensorflow` module Keras asks

    lazy_tf = module_utils.tensorflow
    if keras.backend.backend() == "tensorflow" or lazy_tf.module is not None:
        yield
        return
    previous, lazy_tf._available = lazy_tf._available, False
    try:
        yield
    finally:
        lazy_tf._available = previous
