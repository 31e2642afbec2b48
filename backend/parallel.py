"""Data parallelism through each framework's own engine (`--devices N`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from backend.selection import BackendError, selected_backend

# Data parallelism
#
# `--devices N`: one model trained on N devices by each framework's own engine. jax: Keras'
# DataParallel distribution (one process; XLA shards every batch over the devices); tensorflow:
# tf.distribute.MirroredStrategy (one process, one replica per device); torch: one process per
# device, started by torchrun, gradients averaged with torch.distributed. What does not depend on
# the backend (the rows each replica gets, which process writes) is in backend.distribute.

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
    steps (backend.distribute.ProcessSync), so a gradient that rank 0 alone takes (the stability
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
