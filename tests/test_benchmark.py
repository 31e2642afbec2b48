import pytest

from bench.pipeline import format_report, format_scaling, measure
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


def test_the_scaling_table_divides_by_the_fewest_workers():
    def result(cold: float, warm: float) -> dict:
        return {"epochs": [{"images_per_second": cold}, {"images_per_second": warm}], "peak_memory_mb": 1000.0}

    table = format_scaling({4: result(900, 1500), 1: result(300, 600), 2: result(570, 1080)}, cpu_count=4)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 1 | 300 | 600 | 1.00x | 1.00x | 1000 |",
                    "| 2 | 570 | 1080 | 1.90x | 1.80x | 1000 |",
                    "| 4 | 900 | 1500 | 3.00x | 2.50x | 1000 |"]
    assert table.startswith("scaling with --workers (4 CPU cores; speed-up over 1 worker)")
