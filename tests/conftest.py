"""Shared fixtures: small generated datasets, so the suite needs no real data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.demo import make_demo_data

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "tensorflow", "jax")
# The smallest model the command line builds: ResNet50 cut after conv3 (its first 7 residual
# blocks) and one 16-filter head block, a 37 MB run folder against ResNet50's 540 MB. Tests of
# a run's machinery (resume, signals, locks, options, bad inputs) train it; the tests of the
# models themselves, and one run per backend (test_cli), train the full ResNet50.
SMALL_MODEL = {"model": "hybrid", "cut": "conv3", "head_blocks": 1, "head_filters": 16}
SMALL_MODEL_FLAGS = [item for k, v in SMALL_MODEL.items() for item in (f"--{k.replace('_', '-')}", str(v))]

# JAX compiles every new model's steps with XLA, which is most of a jax pass's time; its
# persistent cache lets a test (and the subprocesses it starts, which inherit the environment)
# reuse what another compiled for the same computation. It returns the same executable, so the
# results are the same bits (checked: a cached and an uncached run end with identical weights).
# One folder per session, removed at its end: nothing is carried between `make test` runs. It is
# made when pytest starts, not when this module is imported: the suite's helper processes import
# it too (`python -m tests.test_distribute`), and they share the session's folder through the
# environment instead of leaving one of their own behind.
_JAX_CACHE: str | None = None


def pytest_configure(config):
    global _JAX_CACHE
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _JAX_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-compilation-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if _JAX_CACHE:
        shutil.rmtree(_JAX_CACHE, ignore_errors=True)


def active_backend() -> str:
    import keras

    return keras.backend.backend()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo phantom dataset, small: 8 training and 3 test images per class."""
    path = tmp_path_factory.mktemp("demo")
    make_demo_data(path, train_per_class=8, test_per_class=3)
    return path


def write_image(path: Path, array: np.ndarray, mode: str | None = None, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **save_kwargs) if mode else Image.fromarray(array).save(path, **save_kwargs)
    return path


def make_layout(root: Path, splits: dict[str, dict[str, int]], size: int = 40) -> Path:
    """Writes `{split: {class: n_images}}` of random gray JPEGs under `root`."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(folder / f"{i:03d}.jpg", rng.integers(0, 256, (size, size), dtype=np.uint8))
    return root


def cli_env(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return env


@pytest.fixture(scope="session")
def trained_run(demo_dir, tmp_path_factory) -> Path:
    """A small finished run on the demo data under the active backend: the hybrid cut at
    conv3 with one head block, 64 px (8x8 Grad-CAM maps), two epochs."""
    from training.config import TrainConfig
    from training.train import run_training

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = TrainConfig(
        data_dir=str(demo_dir), out=str(run_dir), image_size=64, batch_size=8, epochs=2, learning_rate=1e-3,
        weights="none", model="hybrid", cut="conv3", head_blocks=1, head_filters=32, augment="none",
        verbose=0, keep_checkpoints="all",  # every file, for the tests of --checkpoint and --resume
    )
    run_training(cfg, log=lambda _: None)
    return run_dir
