"""Everything that depends on which Keras backend is active, in one place.

The rest of the project is backend-agnostic Keras; any `if backend == ...`
belongs here.
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


def devices() -> list[str]:
    """The accelerators the active backend sees, or `["cpu"]`."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return [g.name for g in gpus]
    elif backend == "jax":
        import jax

        accelerators = [str(d) for d in jax.devices() if d.platform != "cpu"]
        if accelerators:
            return accelerators
    return ["cpu"]


def peak_memory_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux and macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def device_peak_memory_mb() -> float | None:
    """Peak memory the active framework allocated on its first accelerator, in MiB; None on a
    CPU (there `peak_memory_mb`, the process's resident peak, is the figure)."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2**20 if gpus else None
    if backend == "jax":
        import jax

        accelerators = [d for d in jax.devices() if d.platform != "cpu"]
        stats = accelerators[0].memory_stats() if accelerators else None
        return stats["peak_bytes_in_use"] / 2**20 if stats else None
    return None


# How each framework says a device ran out of memory: torch.OutOfMemoryError (CUDA's caching
# allocator), tensorflow's ResourceExhaustedError, and XLA's RESOURCE_EXHAUSTED status in a jax
# XlaRuntimeError (also what tensorflow's XLA path raises). Matched by name and message, so that
# classifying an error never imports a framework the run does not use.
_OUT_OF_MEMORY_TYPES = ("OutOfMemoryError", "ResourceExhaustedError")
_OUT_OF_MEMORY_TEXT = ("RESOURCE_EXHAUSTED", "CUDA out of memory", "out of memory while trying to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is a device out-of-memory error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # a chain can loop back on itself
        if type(error).__name__ in _OUT_OF_MEMORY_TYPES or any(t in str(error) for t in _OUT_OF_MEMORY_TEXT):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def loss_and_gradients(model, images, labels, loss_fn) -> tuple:
    """One training-mode forward and backward pass, eagerly, on the active backend.

    Returns `(logits, loss, gradients)`, the gradients in the order of
    `model.trainable_variables`. BatchNormalization uses the batch statistics and
    updates its moving averages, as in a `fit` step.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
        return logits, loss, tape.gradient(loss, model.trainable_variables)
    if backend == "torch":
        import torch

        for v in model.trainable_variables:
            v.value.grad = None
        with torch.enable_grad():
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
            loss.backward()
        return logits.detach(), loss.detach(), [v.value.grad for v in model.trainable_variables]
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def compute_loss(trainable_values):
            logits, updated = model.stateless_call(trainable_values, non_trainable, images, training=True)
            return loss_fn(labels, logits), (logits, updated)

        (loss, (logits, updated)), grads = jax.value_and_grad(compute_loss, has_aux=True)(trainable)
        for variable, value in zip(model.non_trainable_variables, updated, strict=True):
            variable.assign(value)
        return logits, loss, grads
    raise BackendError(f"no gradient code for backend {backend!r}")


def outputs_and_input_gradients(model, inputs, weights) -> tuple:
    """An inference-mode forward pass and the gradient of `sum(outputs * weights)` with
    respect to the inputs, with the active backend's own autodiff.

    `weights` has the outputs' shape (e.g. a one-hot row per image selects the score whose
    gradient is wanted); the images of a batch are independent in inference mode, so each
    row of the gradient belongs to its own image. Returns NumPy `(outputs, gradients)`.
    """
    import keras
    import numpy as np

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(inputs)
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = model(x, training=False)
            score = tf.reduce_sum(outputs * tf.convert_to_tensor(weights, outputs.dtype))
        return np.asarray(outputs), np.asarray(tape.gradient(score, x))
    if backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(inputs).detach().requires_grad_(True)  # on keras' device
        with torch.enable_grad():
            outputs = model(x, training=False)
            score = (outputs * keras.ops.convert_to_tensor(weights, outputs.dtype)).sum()
            (gradients,) = torch.autograd.grad(score, x)
        return outputs.detach().cpu().numpy(), gradients.cpu().numpy()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def score(x):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return (outputs * weights).sum(), outputs

        (_, outputs), gradients = jax.value_and_grad(score, has_aux=True)(jax.numpy.asarray(inputs))
        return np.asarray(outputs), np.asarray(gradients)
    raise BackendError(f"no gradient code for backend {backend!r}")


# What Keras' `model.export` needs beyond the CPU lock, per (format, backend); None: nothing.
_EXPORT_NEEDS = {
    ("onnx", "tensorflow"): "tf2onnx",
    ("onnx", "torch"): "onnxscript",
    ("onnx", "jax"): "jax2onnx",
    ("savedmodel", "tensorflow"): None,
    ("savedmodel", "jax"): "tensorflow",
    ("savedmodel", "torch"): "torch_xla",
}


def missing_export_module(format: str) -> str | None:
    """The module Keras would need to export `format` under the active backend and that
    is not installed, or None when the export can run."""
    import keras

    module = _EXPORT_NEEDS[(format, keras.backend.backend())]
    return module if module and importlib.util.find_spec(module) is None else None


def backends_that_export(format: str) -> list[str]:
    """The backends that can export `format` with what is installed here."""
    return [backend for (f, backend), module in _EXPORT_NEEDS.items()
            if f == format and (module is None or importlib.util.find_spec(module) is not None)]


def deterministic_environment() -> dict[str, str]:
    """Environment variables deterministic mode needs, set before the backend is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags:
        flags = f"{flags} --xla_gpu_deterministic_ops=true".strip()
    # cuBLAS needs a fixed workspace for deterministic GEMMs (torch on GPU).
    return {"XLA_FLAGS": flags, "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),
            "TF_DETERMINISTIC_OPS": "1"}


def enable_determinism() -> dict[str, str]:
    """Turns on the active framework's deterministic mode; returns what was set.

    tensorflow: op determinism; torch: deterministic algorithms (cuDNN benchmark
    off); jax: XLA deterministic ops, which `deterministic_environment` must have
    put in XLA_FLAGS before jax was imported.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        return {"tensorflow": "tf.config.experimental.enable_op_determinism()"}
    if backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        return {"torch": "torch.use_deterministic_algorithms(True); cudnn.benchmark=False",
                "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")}
    if backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_gpu_deterministic_ops=true" not in flags:
            raise BackendError("jax deterministic mode needs XLA_FLAGS=--xla_gpu_deterministic_ops=true "
                               "set before jax is imported")
        return {"XLA_FLAGS": flags}
    raise BackendError(f"no deterministic mode for backend {backend!r}")


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


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed` (Python, NumPy, Keras' global seed, the torch generator
    under torch), without importing tensorflow under torch or jax."""
    import keras

    with tensorflow_kept_out():
        keras.utils.set_random_seed(seed)
