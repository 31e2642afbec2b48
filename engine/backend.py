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

        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():  # see "Data parallelism"
            return on_first_replica(loss_and_gradients, model, images, labels, loss_fn)
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


# Data parallelism
#
# `--devices N`: one model trained on N devices by each framework's own engine. jax: Keras'
# DataParallel distribution (one process; XLA shards every batch over the devices); tensorflow:
# tf.distribute.MirroredStrategy (one process, one replica per device); torch: one process per
# device, started by torchrun, gradients averaged with torch.distributed. What does not depend on
# the backend (the rows each replica gets, which process writes) is in engine.distribute.

# torch: how long a process waits in a collective for the others before it fails (torch's own
# default for gloo). Rank 0 alone evaluates and writes checkpoints while the others wait at the next
# step, so it must be long; torchrun stops every process as soon as one exits with an error, so
# this only bounds a process that hangs without failing.
COLLECTIVE_TIMEOUT_S = 1800
BATCHNORM_SYNCHRONISED = "synchronised: statistics of the whole global batch, as on one device"
BATCHNORM_PER_REPLICA = "per replica: each replica normalises with the statistics of its own share"


def data_parallel_environment(devices: int) -> dict[str, str]:
    """What the framework must find in the environment when it starts, to see `devices` devices:
    jax on a CPU has one device unless XLA splits the host. The flag concerns only the host
    platform (harmless on a GPU machine) and is added to the user's XLA_FLAGS, never replacing one
    they set."""
    flags = os.environ.get("XLA_FLAGS", "")
    if selected_backend() != "jax" or devices < 2 or "xla_force_host_platform_device_count" in flags:
        return {}
    return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def process_rank() -> tuple[int, int]:
    """(rank, processes) of this process: torchrun's RANK and WORLD_SIZE under torch, else (0, 1)
    (jax and tensorflow drive every device from one process). Needs no framework."""
    if selected_backend() == "torch" and "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    return 0, 1


def data_parallel_launch_error(devices: int) -> str | None:
    """Why this process cannot be one of `devices` replicas as it was launched, or None; checked
    before the backend loads. torch needs one process per device, and those are torchrun's to
    start (it also sets the rendezvous: MASTER_ADDR, RANK, LOCAL_RANK): relaunching ourselves
    would hide that launcher and its multi-node options, so the command is named instead."""
    if selected_backend() != "torch":
        return None
    world = os.environ.get("WORLD_SIZE")
    if world is None and devices > 1:
        import shlex

        return (f"--devices {devices} on torch runs one process per device, started by torchrun: "
                f"KERAS_BACKEND=torch torchrun --nproc-per-node {devices} {shlex.join(sys.argv)}")
    if world is not None and int(world) != devices:
        return f"torchrun started {world} processes (WORLD_SIZE) but --devices is {devices}: give the same number"
    return None


@contextlib.contextmanager
def data_parallel(devices: int) -> Iterator[dict]:
    """Inside, models built and compiled train on `devices` devices of the active backend.
    Yields how: rank, processes, engine, BatchNorm behaviour, and whether every batch must split
    into equal parts (`even_batches`, jax's sharding). BackendError when the devices are missing."""
    import keras

    starts = {"jax": _jax_data_parallel, "tensorflow": _tensorflow_data_parallel, "torch": _torch_data_parallel}
    with starts[keras.backend.backend()](devices) as setup:
        yield setup


@contextlib.contextmanager
def _jax_data_parallel(devices: int) -> Iterator[dict]:
    import jax
    import keras

    found = jax.devices()
    if len(found) < devices:
        raise BackendError(f"--devices {devices}: jax sees {len(found)} {found[0].platform} device(s); on a CPU "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} must be set before jax "
                           f"starts (`cli.py train` sets it)")
    # Variables are replicated and each batch is sharded along its first axis. One program runs
    # over the global batch (GSPMD), so a mean over the batch, BatchNorm's included, is the
    # whole batch's: the same computation as on one device.
    distribution = keras.distribution.DataParallel(devices=[f"{d.platform}:{d.id}" for d in found[:devices]])
    with distribution.scope():
        yield {"rank": 0, "processes": 1, "engine": "jax: keras.distribution.DataParallel",
               "batchnorm": BATCHNORM_SYNCHRONISED, "even_batches": True}


@contextlib.contextmanager
def _tensorflow_data_parallel(devices: int) -> Iterator[dict]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if 0 < len(gpus) < devices:
        raise BackendError(f"--devices {devices}: tensorflow sees {len(gpus)} GPU(s)")
    if not gpus:
        _split_host(tf, devices)
    names = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")][:devices]
    # Keras' tensorflow trainer takes the strategy in scope when the model is made
    # (TensorFlowTrainer.__init__), runs each step with strategy.run on every replica's share and
    # lets MirroredStrategy sum the gradients; Keras scales each replica's loss by 1/N
    # (scale_loss_for_distribution), so the sum is the mean over the global batch. keras'
    # tensorflow/distribution_lib.py is marked "DO NOT USE" in 3.15, so tf.distribute it is.
    strategy = tf.distribute.MirroredStrategy(names)
    with strategy.scope():
        yield {"rank": 0, "processes": 1, "engine": "tensorflow: tf.distribute.MirroredStrategy",
               "batchnorm": BATCHNORM_PER_REPLICA, "even_batches": False}


def _split_host(tf, devices: int) -> None:
    """On a machine without GPUs, N logical CPU devices (possible only before tensorflow
    initialises its runtime: afterwards the count it has is checked)."""
    host = tf.config.list_physical_devices("CPU")[0]
    with contextlib.suppress(RuntimeError):  # initialised already, e.g. by an earlier run in this process
        tf.config.set_logical_device_configuration(host, [tf.config.LogicalDeviceConfiguration()] * devices)
    found = len(tf.config.list_logical_devices("CPU"))
    if found < devices:
        raise BackendError(f"--devices {devices}: tensorflow started with {found} CPU device(s) and cannot add "
                           f"more in this process; run the training in a fresh process")


@contextlib.contextmanager
def _torch_data_parallel(devices: int) -> Iterator[dict]:
    import datetime

    import torch
    import torch.distributed as dist

    error = data_parallel_launch_error(devices)
    if error:
        raise BackendError(error)
    rank, processes = process_rank()
    cuda = torch.cuda.is_available()
    if cuda:  # before Keras makes a tensor: its device "cuda" is then this process's GPU
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise BackendError(f"torchrun process {local} on a machine with {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        yield {"rank": rank, "processes": processes,
               "engine": f"torch: torchrun, one process per device, gradients all-reduced ({dist.get_backend()})",
               "batchnorm": BATCHNORM_PER_REPLICA, "even_batches": False}
    finally:
        dist.destroy_process_group()


def _torch_processes() -> int:
    """How many torch processes train together (1 without an initialised process group)."""
    import keras

    if keras.backend.backend() != "torch":
        return 1
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_first_process(model) -> None:
    """torch with several processes: every process takes rank 0's floating-point variables, so all
    start from the same weights whatever their own initialisers drew. A no-op with one process."""
    if _torch_processes() == 1:
        return
    import torch.distributed as dist

    for variable in model.variables:
        if variable.value.is_floating_point():
            dist.broadcast(variable.value.data, src=0)


def average_gradients_across_processes(model) -> dict[str, bool] | None:
    """torch with several processes: each variable's gradient is replaced by its mean over the
    processes as soon as backward has accumulated it, which is what DistributedDataParallel does.

    Why hooks and not DistributedDataParallel: Keras' torch `train_step` (3.15.1) calls
    `self(x)`, `loss.backward()` and `optimizer.apply` on the Keras model itself, so a DDP wrapper
    would never be called inside `fit` (its reducer is armed in DDP.forward) unless train_step were
    rewritten. A `register_post_accumulate_grad_hook` on each variable's torch Parameter works
    inside Keras' own step; the Parameters persist (Keras assigns weights in place), and the hooks
    are registered on every float variable, frozen ones too, so a phase that unfreezes blocks needs
    nothing new. Every process runs the same graph, so the hooks fire, and the all-reduces happen, in
    the same order. They run one at a time, without DDP's bucketing or overlap.

    Returns a switch ({"on": bool}): averaging happens only while it is on, i.e. inside fit's train
    steps (engine.distribute.ProcessSync), so a gradient that rank 0 alone takes (the stability
    probe) does not wait for the others. None with one process."""
    processes = _torch_processes()
    if processes == 1:
        return None
    import torch.distributed as dist

    switch = {"on": False}

    def average(parameter) -> None:
        if switch["on"]:
            dist.all_reduce(parameter.grad)  # a sum: gloo has no ReduceOp.AVG
            parameter.grad.div_(processes)

    for variable in model.variables:
        parameter = variable.value
        if parameter.is_floating_point() and parameter.is_leaf:
            trains = parameter.requires_grad
            parameter.requires_grad_(True)  # torch refuses a hook on a tensor that needs no gradient
            parameter.register_post_accumulate_grad_hook(average)
            parameter.requires_grad_(trains)
    return switch


def average_across_processes(values: list[float]) -> list[float]:
    """The mean of `values` over the torch processes (each process gives its own list, in the
    same order); `values` unchanged with one process."""
    processes = _torch_processes()
    if processes == 1 or not values:
        return values
    import keras
    import torch.distributed as dist

    total = keras.ops.convert_to_tensor(values, dtype="float64")  # on Keras' device (a GPU under nccl)
    dist.all_reduce(total)
    return [v / processes for v in total.tolist()]


def on_first_replica(fn, *args):
    """`fn(*args)` on every replica of the tensorflow strategy in scope, the first replica's result
    returned. A gradient tape over mirrored variables works only in a replica's context (outside,
    tensorflow refuses to read them), so an eager gradient taken between steps (the stability
    probe) runs there; each replica computes the same thing on the same inputs."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    results = strategy.run(fn, args=args)
    return tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], results)


def average_over_replicas(variables: list) -> None:
    """Sets each variable, on every replica, to its mean over the replicas. For what each replica
    updates from its own share: BatchNormalization's moving statistics on tensorflow (a mirrored
    variable without aggregation keeps one value per device, and `predict` runs on every device) and
    on torch (one copy per process, rank 0's saved). jax holds one value already: nothing to do.
    Computed as first + mean(others - first), so values that agree stay bit for bit the same."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import numpy as np

        for variable in variables:
            copies = [np.asarray(c) for c in getattr(variable.value, "values", (variable.value,))]
            if len(copies) > 1:  # assigned outside a replica's context, the value goes to every copy
                variable.assign(copies[0] + sum(c - copies[0] for c in copies[1:]) / len(copies))
    elif backend == "torch" and _torch_processes() > 1 and variables:
        import torch
        import torch.distributed as dist

        flat = torch.cat([v.value.data.reshape(-1) for v in variables])  # two collectives, not two per variable
        first = flat.clone()
        dist.broadcast(first, src=0)
        difference = flat - first
        dist.all_reduce(difference)
        flat = first + difference / _torch_processes()
        for v, part in zip(variables, flat.split([v.value.numel() for v in variables]), strict=True):
            v.value.data.copy_(part.view_as(v.value))
