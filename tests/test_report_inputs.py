"""`report` on a run whose files are missing or garbage: the page is still written, with a
visible note naming the file and the reason, no traceback, and no file of the run changed.
Uses the session's `trained_run` (no training of its own); Grad-CAM is off but in one test."""

from __future__ import annotations

import hashlib
import html
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import active_backend
from tests.test_cli import error_lines, run_cli, run_subprocess
from tests.test_report import RUN_SECTIONS, make_compare_dir, outline

RANDOM_BYTES = bytes(range(256))[::-7] * 40  # not UTF-8, with a NUL: neither text nor CSV


def files(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(trained_run, tmp_path) -> Path:
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def report_page(run_dir: Path, *args: str) -> str:
    """`report RUN_DIR` (in-process: an exception would fail the test), which must exit 0 and
    write report.html and nothing else in the run."""
    before = files(run_dir)
    before.pop("report.html", None)
    result = run_cli("report", str(run_dir), "--gradcam-samples", "0", *args)
    assert result.exit_code == 0, result.output
    after = files(run_dir)
    assert after.pop("report.html") and after == before
    page = (run_dir / "report.html").read_text()
    sections = outline(page).h2  # every section, in order; those metrics.json makes only with it
    assert sections == [s for s in RUN_SECTIONS if s in sections]
    assert set(RUN_SECTIONS) - set(sections) <= {"Per-class metrics", "Confusion matrices"}
    return page


def test_missing_history_is_said_in_the_page(run_dir):
    (run_dir / "history.csv").unlink()
    page = report_page(run_dir, "--gradcam-samples", "1")
    assert '<p class="note">history.csv is missing: no training curves.</p>' in page
    assert "MISCLASSIFIED" in page or "(correct)" in page  # the rest of the page is all there


@pytest.mark.parametrize("content, reason", [
    (RANDOM_BYTES, "'utf-8' codec can't decode byte 0xff in position 0"),
    (b"epoch,loss,accuracy\n0,<b>high</b>,0.5\n", "could not convert string to float: '<b>high</b>'"),
    (b"epoch,loss\n0,0.5,0.7,0.9\n", ""),  # more cells than the header: the reason depends on rundir
])
def test_garbage_history_is_said_in_the_page(run_dir, content, reason):
    (run_dir / "history.csv").write_bytes(content)
    page = report_page(run_dir)
    note = re.search(r'<p class="note">history.csv is not readable \((.*)\): no training curves.</p>', page)
    assert note and reason in html.unescape(note[1]), note
    assert "<b>high</b>" not in page  # the reason is escaped


@pytest.mark.skipif(active_backend() != "torch", reason="same page from every backend; runs in the torch pass")
def test_garbage_history_gives_no_traceback(run_dir):
    """The real command in its own process: exit 0, no traceback, the note in the page."""
    (run_dir / "history.csv").write_bytes(RANDOM_BYTES)
    result = run_subprocess("report", str(run_dir), "--gradcam-samples", "0")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "history.csv is not readable (" in (run_dir / "report.html").read_text()


def test_a_header_only_history_says_there_is_no_epoch(run_dir):
    (run_dir / "history.csv").write_text("epoch,loss,accuracy\n")
    assert "history.csv holds no loss or accuracy per epoch: no training curves." in report_page(run_dir)


def test_missing_or_garbage_metrics_is_said_in_the_page(run_dir):
    (run_dir / "metrics.json").write_bytes(RANDOM_BYTES)
    page = report_page(run_dir)
    assert '<p class="note">metrics.json is not readable (' in page
    assert "): no results, per-class metrics or confusion matrices.</p>" in page
    (run_dir / "metrics.json").write_text('{"backend": "torch"}')
    assert "metrics.json is not readable (no &#x27;best&#x27; field)" in report_page(run_dir)
    (run_dir / "metrics.json").unlink()
    assert "metrics.json is missing: the run did not finish, so there are no results." in report_page(run_dir)


def test_garbage_evaluation_and_stability_plot_are_said_in_the_page(run_dir):
    for earlier in run_dir.glob("eval-*.json"):  # what other tests' `evaluate` left in the shared run
        earlier.unlink()
    (run_dir / "eval-test-torch.json").write_text("[1, 2]")
    (run_dir / "stability.png").write_bytes(RANDOM_BYTES)
    page = report_page(run_dir)
    assert ("eval-test-torch.json is not readable (a JSON list, not an object): left out of this section." in page
            and "No evaluate results yet" in page)
    assert "stability.png is not readable (cannot identify image file" in page
    (run_dir / "stability.png").unlink()
    assert "stability.png is missing: no gradient-norm plot." in report_page(run_dir)


def test_garbage_config_is_refused_with_one_line(run_dir):
    (run_dir / "config.json").write_text("{")
    result = run_cli("report", str(run_dir))
    assert result.exit_code == 2 and len(error_lines(result.output)) == 1, result.output
    assert "config.json is not readable (Expecting property name" in result.output
    assert not (run_dir / "report.html").exists()


def test_a_complete_run_has_no_note_about_its_files(run_dir):
    page = report_page(run_dir)
    assert "is missing" not in page and "is not readable" not in page


def test_a_compare_run_with_garbage_metrics_is_named_and_left_out(trained_run, tmp_path):
    compare_dir = make_compare_dir(trained_run, tmp_path)
    (compare_dir / "runs" / "seed0" / "jax" / "metrics.json").write_bytes(RANDOM_BYTES)
    result = run_cli("report", str(compare_dir), "--gradcam-samples", "0")
    assert result.exit_code == 0, result.output
    page = (compare_dir / "report.html").read_text()
    assert "jax/metrics.json is not readable (" in page and "): jax seed 0 is left out of this page.</p>" in page
    assert "<p>1 runs over backends torch, jax.</p>" in page
