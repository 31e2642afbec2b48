"""Device memory: an out-of-memory error stops a run with one line and its checkpoint intact,
and jax does not take most of a GPU it may share with another framework."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.devices import is_out_of_memory
from backend.selection import framework_environment
from data.demo import make_demo_data
from tests.conftest import ROOT, SMALL_MODEL_FLAGS, active_backend
from tests.test_cli import run_cli
from training.callbacks import EpochTimer
from training.rundir import checkpoint_state


def _framework_out_of_memory() -> Exception:
    """The error the active backend's framework raises when a device is out of memory, with its
    own wording (torch's caching allocator, tensorflow's BFC allocator, XLA's status)."""
    backend = active_backend()
    if backend == "torch":
        import torch

        return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,256,56,56]")
    import jax

    return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.06GiB.")


def test_out_of_memory_errors_are_told_from_other_errors():
    oom = _framework_out_of_memory()
    assert is_out_of_memory(oom)
    assert not is_out_of_memory(RuntimeError("shapes (4, 3) and (4, 5) do not match"))
    assert not is_out_of_memory(ValueError("expected 4 classes"))
    # Keras and the trainers re-raise with context: the cause still counts, however deep.
    try:
        try:
            raise oom
        except Exception as inner:
            raise RuntimeError("error in the train step") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)
    looped = RuntimeError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped  # a cycle must not hang the check
    assert not is_out_of_memory(looped)


def test_out_of_memory_stops_the_run_in_one_line_with_the_checkpoint_intact(tmp_path, monkeypatch):
    make_demo_data(tmp_path / "data", train_per_class=3, test_per_class=1)
    run_dir = tmp_path / "run"
    epoch_begin = EpochTimer.on_epoch_begin

    def out_of_memory_in_the_second_epoch(self, epoch, logs=None):
        if epoch == 1:
            raise _framework_out_of_memory()
        return epoch_begin(self, epoch, logs)

    monkeypatch.setattr(EpochTimer, "on_epoch_begin", out_of_memory_in_the_second_epoch)
    result = run_cli("train", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--batch-size", "4",
                     "--weights", "none", "--val-split", "0", "--epochs", "2", "--verbose", "0",
                     "--out", str(run_dir), *SMALL_MODEL_FLAGS)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    message = lines[0]
    for said in ("ran out of memory", "--batch-size 4", "--image-size 32", "--precision float32",
                 "lower --batch-size", "mixed_bfloat16", "epoch 1", "is intact"):
        assert said in message, (said, message)
    assert checkpoint_state(run_dir / "last.weights.h5")["epoch"] == 1
    assert not (run_dir / "metrics.json").exists()


def test_other_errors_in_training_are_not_called_out_of_memory(tmp_path, monkeypatch):
    make_demo_data(tmp_path / "data", train_per_class=2, test_per_class=1)

    def broken(self, epoch, logs=None):
        raise ZeroDivisionError("a bug, not the device")

    monkeypatch.setattr(EpochTimer, "on_epoch_begin", broken)
    with pytest.raises(ZeroDivisionError):
        run_cli("train", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--batch-size", "4",
                "--weights", "none", "--val-split", "0", "--epochs", "1", "--verbose", "0",
                "--out", str(tmp_path / "run"))


def _environment_after_check(env: dict[str, str]) -> dict:
    code = ("import json, os, sys; from backend.selection import check_backend; check_backend(); "
            "print(json.dumps({k: os.environ.get(k) for k in ('XLA_PYTHON_CLIENT_PREALLOCATE', "
            "'XLA_PYTHON_CLIENT_MEM_FRACTION')} | {'jax imported': 'jax' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_jax_allocates_device_memory_on_demand_unless_the_user_says_otherwise(monkeypatch):
    for variable in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(variable, raising=False)
    import os

    base = dict(os.environ)
    seen = _environment_after_check(base | {"KERAS_BACKEND": "jax"})
    assert seen == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": None,
                    "jax imported": False}  # set before jax loads, which is when XLA reads it
    assert _environment_after_check(base | {"KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"})[
        "XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert _environment_after_check(base | {"KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"})[
        "XLA_PYTHON_CLIENT_PREALLOCATE"] is None  # a dedicated GPU's fraction: preallocation stays on
    assert framework_environment("torch") == {} and framework_environment("tensorflow") == {}
