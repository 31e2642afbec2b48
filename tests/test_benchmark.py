import pytest

from engine.pipeline_bench import format_report, measure
from tests.conftest import active_backend


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "tensorflow", reason="backend-independent; runs once, in the tensorflow pass")
def test_both_sides_measure_every_image_and_report(demo_dir):
    ours = measure("ours", str(demo_dir), 32, 8, 2, 2)
    baseline = measure("tfdata", str(demo_dir), 32, 8, 2, 2)
    for result in (ours, baseline):
        assert [e["epoch"] for e in result["epochs"]] == [1, 2]
        assert all(e["images"] == 32 and e["images_per_second"] > 0 for e in result["epochs"])
        assert result["peak_memory_mb"] > 50
    report = format_report(ours, baseline)
    assert "| ours (PyDataset, NumPy/Pillow) |" in report and "speed-up over the baseline: cold" in report
