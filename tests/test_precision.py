"""--precision, --jit-compile and --steps-per-execution: built, compiled, recorded, refused."""

import json
import math
import os
import subprocess
import sys

import keras
import pytest

from model import ModelSpec, build_model
from tests.conftest import ROOT, active_backend, cli_env
from training.config import ConfigError, TrainConfig
from training.schedule import plan_phases

# The hybrid cut at conv3 with one small head block: the layers that matter here (the backbone's
# conv1_conv, the logits) at a fraction of ResNet50's build and compile time.
SMALL = {"model": "hybrid", "cut": "conv3", "head_blocks": 1, "head_filters": 16}
SMALL_FLAGS = [item for k, v in SMALL.items() for item in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture
def float32_afterwards():
    """build_model sets the global dtype policy; later tests in this process build in float32."""
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("precision, compute", [("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")])
def test_a_mixed_model_computes_in_half_precision_with_float32_variables_and_logits(precision, compute,
                                                                                     float32_afterwards):
    model = build_model(ModelSpec(**{"name" if k == "model" else k: v for k, v in SMALL.items()}, precision=precision), num_classes=4, image_size=32)
    conv = model.get_layer("resnet50").get_layer("conv1_conv")
    assert conv.compute_dtype == compute and conv.kernel.dtype == "float32"
    assert model.get_layer("logits").compute_dtype == "float32"
    logits = model(keras.ops.zeros((2, 32, 32, 3)), training=False)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_float16_training_gets_loss_scaling(float32_afterwards, tmp_path):
    from training.train import compile_phase

    cfg = TrainConfig(data_dir=str(tmp_path), precision="mixed_float16", epochs=1, weights="none", **SMALL)
    model = build_model(cfg.model_spec(), num_classes=4, image_size=32)
    optimizer, _ = compile_phase(model, plan_phases(cfg)[0], None, steps_per_epoch=2, epoch=0)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(optimizer.inner_optimizer, keras.optimizers.Adam)


def test_steps_per_execution_above_one_is_refused_before_torch_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    with pytest.raises(ConfigError, match=r"steps-per-execution 4.*torch"):
        TrainConfig(data_dir=str(tmp_path), steps_per_execution=4).check_schedule()
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    TrainConfig(data_dir=str(tmp_path), steps_per_execution=4).check_schedule()


@pytest.mark.slow
def test_a_compiled_mixed_bfloat16_run_trains_and_records_both(demo_dir, tmp_path):
    """Issue 14's first acceptance command, smaller (32 px, the small hybrid). On torch, `on` means
    torch.compile, which took 414 s for this test on the 2-core CPU (passed, by hand: JIT_ON_TORCH=1);
    the torch pass checks the same wiring with `off` to keep the suite's time."""
    backend = active_backend()
    jit = "on" if backend != "torch" or os.environ.get("JIT_ON_TORCH") else "off"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "train", "--data-dir", str(demo_dir), "--image-size", "32",
         "--epochs", "1", "--batch-size", "8", "--weights", "none", "--precision", "mixed_bfloat16",
         "--jit-compile", jit, "--verbose", "0", "--out", str(out), *SMALL_FLAGS],
        env=cli_env(backend), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"Backend: {backend} on " in result.stdout  # the device(s) in use, named at start-up
    options = json.loads((out / "config.json").read_text())["options"]
    assert (options["precision"], options["jit_compile"]) == ("mixed_bfloat16", jit)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["jit_compile"] is (jit == "on") and math.isfinite(metrics["train"]["loss"])
    saved = keras.saving.load_model(out / "model.keras", compile=False)
    try:
        assert saved.get_layer("logits").compute_dtype == "float32"
        assert saved.get_layer("resnet50").get_layer("conv1_conv").compute_dtype == "bfloat16"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
