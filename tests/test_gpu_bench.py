"""scripts/gpu-bench.sh: the GPU check, run here as its --dry-run (the same steps, tiny, on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, active_backend


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="runs torch and jax itself; once, in the torch pass")
def test_the_gpu_check_runs_every_step_and_writes_its_summary(tmp_path):
    out = tmp_path / "gpu-bench"
    env = dict(os.environ, PY=sys.executable)
    env.pop("KERAS_BACKEND", None)  # the script must name the backend of every step itself
    done = subprocess.run([str(ROOT / "scripts" / "gpu-bench.sh"), "--dry-run", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "failed" not in log, log[-3000:]
    assert sorted(p.name for p in out.glob("bench-*.json")) == ["bench-jax-mixed_bfloat16.json",
                                                               "bench-torch-float32.json"]
    for backend, precision, native in (("torch", "float32", True), ("jax", "mixed_bfloat16", False)):
        report = json.loads((out / f"bench-{backend}-{precision}.json").read_text())
        assert report["backend"] == backend and report["settings"]["precision"] == precision
        assert sorted(report["results"]) == sorted(["keras-fit", "keras-step"] + ["torchvision"] * native)
        assert all(r["images_per_second"] > 0 for r in report["results"].values())
    assert "| 2 |" in (out / "pipeline.md").read_text()  # the scaling table's 2-worker row
    assert json.loads((out / "parity" / "parity.json").read_text())["passed"] is True
    assert json.loads((out / "train-torch" / "metrics.json").read_text())["epochs"] == 2
    summary = (out / "gpu-bench.md").read_text()
    assert summary.count("| torch |") == 3 and summary.count("| jax |") == 2 and "2-epoch demo train" in summary
    environment = (out / "environment.txt").read_text()
    assert "keras 3." in environment and "torch " in environment and "cpu cores:" in environment
