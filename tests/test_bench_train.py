"""`bench-train`: the three timings, their arithmetic, and the table."""

from __future__ import annotations

import json

import pytest

from bench.train import KERAS_FIT, KERAS_STEP, TORCHVISION, BenchSettings, summarize, window_rates
from tests.conftest import active_backend
from tests.test_cli import run_subprocess


def test_windows_leave_out_the_warmup_and_the_median_is_reported():
    settings = BenchSettings(batch_size=10, warmup_steps=2, window_steps=2, windows=3)
    # Step ends (s): two slow warm-up steps, then windows of 2 steps taking 1, 4 and 2 seconds.
    step_ends = [5.0, 10.0, 10.5, 11.0, 13.0, 15.0, 16.0, 17.0]
    assert window_rates(step_ends, settings) == [20.0, 5.0, 10.0]
    result = summarize(step_ends, settings, 123.45)
    assert result["images_per_second"] == 10.0 and result["ms_per_step"] == 1000.0
    assert result["peak_memory_mb"] == round(123.45, 1)
    assert settings.steps == len(step_ends)


def test_bench_train_times_fit_the_bare_step_and_native_torchvision_and_prints_its_json(tmp_path):
    out = tmp_path / "bench.json"
    native = active_backend() == "torch"  # the native side is backend-independent: timed in one pass
    done = run_subprocess("bench-train", "--image-size", "32", "--batch-size", "4", "--warmup-steps", "1",
                          "--window-steps", "1", "--windows", "3", "--workers", "1", "--out", str(out),
                          "--native" if native else "--no-native")
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["backend"] == active_backend() and report["settings"]["image_size"] == 32
    modes = (KERAS_FIT, KERAS_STEP, TORCHVISION) if native else (KERAS_FIT, KERAS_STEP)
    assert sorted(report["results"]) == sorted(modes)
    results = report["results"]
    for mode in modes:
        result = results[mode]
        assert "error" not in result, (mode, result)
        windows = result["window_images_per_second"]  # the reported rate is the median window's
        assert len(windows) == 3 and result["images_per_second"] == sorted(windows)[1]
        assert result["ms_per_step"] == pytest.approx(1000 * 4 / result["images_per_second"])
        assert result["peak_memory_mb"] > 100  # a ResNet50 and its gradients

    # The printed table is the JSON's figures, rounded, and its ratios are their quotients.
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == len(modes) and f"keras {active_backend()}: fit through the pipeline" == rows[0][0]
    step = results[KERAS_STEP]["images_per_second"]
    for row, mode in zip(rows, modes, strict=True):
        result = results[mode]
        rate, ms, memory, over_step, over_native = (float(c) if c != "-" else None for c in row[1:6])
        assert rate == pytest.approx(result["images_per_second"], abs=0.05)
        assert ms == pytest.approx(result["ms_per_step"], abs=0.5)
        assert memory == pytest.approx(result["peak_memory_mb"], abs=0.5)
        assert over_step == pytest.approx(result["images_per_second"] / step, abs=0.005)
        if native:
            assert over_native == pytest.approx(result["images_per_second"] / results[TORCHVISION]["images_per_second"],
                                                abs=0.005)
        else:
            assert over_native is None
    if native:
        assert results[TORCHVISION]["versions"]["torchvision"]
        assert rows[2][0] == "native torchvision resnet50"


@pytest.mark.skipif(active_backend() != "torch", reason="the torch backend's own refusal")
def test_bench_train_refuses_what_training_refuses():
    done = run_subprocess("bench-train", "--image-size", "32", "--steps-per-execution", "2")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --steps-per-execution 2")
    assert len(done.stderr.strip().splitlines()) == 1
