"""`bench-pipeline`: both sides time every image, and the report says what was measured."""

import re

import pytest

from bench.pipeline import format_report, format_scaling, measure
from tests.conftest import active_backend


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of the Markdown table in `text`, each by its first cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="backend-independent; runs once, in the torch pass")
def test_both_sides_measure_every_image_and_the_report_gives_their_figures(demo_dir):
    ours = measure("ours", str(demo_dir), 32, 8, 2, 2)
    baseline = measure("tfdata", str(demo_dir), 32, 8, 2, 2)
    for result in (ours, baseline):
        assert [e["epoch"] for e in result["epochs"]] == [1, 2]
        for epoch in result["epochs"]:  # every Training image, and the rate is the images over the time
            assert epoch["images"] == 32
            assert epoch["images_per_second"] == pytest.approx(epoch["images"] / epoch["seconds"])
        assert result["peak_memory_mb"] > 50

    report = format_report(ours, baseline)
    rows = table_rows(report)
    assert list(rows) == ["ours (PyDataset, NumPy/Pillow)", "tf.data + keras layers"]
    for cells, result in zip(rows.values(), (ours, baseline), strict=True):  # whole numbers: within 0.5
        figures = [result["epochs"][0]["images_per_second"], result["epochs"][-1]["images_per_second"],
                   result["peak_memory_mb"]]
        assert [float(c) for c in cells] == pytest.approx(figures, abs=0.5)
    speed_up = re.search(r"speed-up over the baseline: cold ([\d.]+)x .*, warm ([\d.]+)x", report)
    assert speed_up, report
    for epoch, printed in ((0, speed_up[1]), (-1, speed_up[2])):  # our rate over the baseline's, to 0.01
        quotient = ours["epochs"][epoch]["images_per_second"] / baseline["epochs"][epoch]["images_per_second"]
        assert float(printed) == pytest.approx(quotient, abs=0.005)


def test_the_scaling_table_divides_by_the_fewest_workers():
    def result(cold: float, warm: float) -> dict:
        return {"epochs": [{"images_per_second": cold}, {"images_per_second": warm}], "peak_memory_mb": 1000.0}

    table = format_scaling({4: result(900, 1500), 1: result(300, 600), 2: result(570, 1080)}, cpu_count=4)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 1 | 300 | 600 | 1.00x | 1.00x | 1000 |",
                    "| 2 | 570 | 1080 | 1.90x | 1.80x | 1000 |",
                    "| 4 | 900 | 1500 | 3.00x | 2.50x | 1000 |"]
    assert table.startswith("scaling with --workers (4 CPU cores; speed-up over 1 worker)")
