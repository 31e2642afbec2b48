"""The HTML report of a run and of a compare directory: sections, self-containment, and
what a browser renders of it."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.report import build_report, markdown_html, resolve_run_dir
from inference.run import RunError
from studies.compare import plot_curves, summarise, summary_row
from tests.conftest import active_backend
from tests.test_cli import run_cli
from training.rundir import read_history

RUN_SECTIONS = ["Summary", "Results", "Training curves", "Per-class metrics", "Confusion matrices", "Evaluations",
                "Training stability", "Grad-CAM", "Configuration and environment"]
COMPARE_SECTIONS = ["Summary", "Comparison", "Results", "Training curves", "Per-class metrics", "Confusion matrices",
                    "Grad-CAM", "Configuration and environment"]


class Outline(HTMLParser):
    """The page's headings, tables and every external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.h1, self.h2, self.tables, self.images, self.external, self._in = [], [], 0, 0, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in = tag if tag in ("h1", "h2") else None
        self.tables += tag == "table"
        if tag == "img":
            self.images += 1
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])
        if tag == "script":
            self.external.append("<script>")

    def handle_data(self, data):
        if self._in:
            getattr(self, self._in).append(data.strip())
            self._in = None


def outline(html_text: str) -> Outline:
    parser = Outline()
    parser.feed(html_text)
    return parser


def make_compare_dir(trained_run: Path, root: Path) -> Path:
    """A compare directory of two copies of one run, recorded under another prefix (as
    after the folder was moved), with compare.md and curves.png written by `compare`'s code."""
    compare_dir = root / "compare"
    results = []
    for backend in ("torch", "jax"):
        run_dir = compare_dir / "runs" / "seed0" / backend
        shutil.copytree(trained_run, run_dir)
        results.append({"backend": backend, "cell": "", "levels": [], "seed": 0,
                        "run_dir": f"/elsewhere/compare/runs/seed0/{backend}",
                        "row": summary_row(json.loads((run_dir / "metrics.json").read_text())),
                        "history": read_history(run_dir)})
    text, summary = summarise(results, ("torch", "jax"), {}, "cli.py compare --data-dir demo")
    (compare_dir / "compare.md").write_text(text)
    plot_curves(results, compare_dir / "curves.png")
    (compare_dir / "compare.json").write_text(json.dumps({
        "command": "cli.py compare --data-dir demo", "options": {"epochs": 2}, "backends": ["torch", "jax"],
        "factors": {}, "seeds": [0], "runs": results, "failures": [], "summary": summary}))
    return compare_dir


def test_markdown_tables_headings_lists_and_images(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c.png")
    text = "# Title\n\nSome `code` here.\n\n| a | b |\n|---|---:|\n| 1 | <2> |\n\n- one\n- two\n\n![curves](c.png)\n"
    html_text = markdown_html(text, tmp_path)
    flat = html_text.replace("\n", "")  # markdown-it puts block tags on lines of their own
    assert "<h3>Title</h3>" in flat and "<code>code</code>" in flat  # below the page's h1 and section h2
    right = ' style="text-align:right"'  # the table's `---:` column
    assert (f"<thead><tr><th>a</th><th{right}>b</th></tr></thead>"
            f"<tbody><tr><td>1</td><td{right}>&lt;2&gt;</td></tr></tbody>") in flat
    assert "<ul><li>one</li><li>two</li></ul>" in flat
    assert '<figure><img src="data:image/png;base64,' in flat and "<figcaption>curves</figcaption>" in flat
    assert "c.png" not in flat and "<p><figure>" not in flat


def test_markdown_cannot_make_the_page_load_or_link_anything(tmp_path):
    text = ("<script>alert(1)</script>\n\n[site](https://example.com) <https://example.org> "
            "![web](https://example.com/x.png) ![missing](gone.png)\n")
    html_text = markdown_html(text, tmp_path)
    assert not outline(html_text).external and outline(html_text).images == 0
    assert "&lt;script&gt;" in html_text and "site" in html_text and "missing" in html_text


def test_run_report_has_every_section_and_is_self_contained(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    result = run_cli("evaluate", str(run_dir))
    assert result.exit_code == 0, result.output
    result = run_cli("report", str(run_dir), "--gradcam-samples", "3")
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    parsed = outline(page)
    assert parsed.h1 == [f"Run report: {run_dir.name}"] and parsed.h2 == RUN_SECTIONS
    assert not parsed.external  # images inlined, no scripts, no links out
    # results, per-class, evaluations, options (+ agreement when several backends evaluated)
    assert parsed.tables >= 4
    assert parsed.images == 1 + 2 + 1 + 3  # curves, two confusion matrices, stability, Grad-CAM samples
    assert f"eval-test-{active_backend()}.json" in page and ("MISCLASSIFIED" in page or "(correct)" in page)


def test_compare_report_reads_every_run_even_after_a_move(trained_run, tmp_path):
    compare_dir = make_compare_dir(trained_run, tmp_path)
    assert resolve_run_dir(compare_dir, "/elsewhere/compare/runs/seed0/jax") == compare_dir / "runs" / "seed0" / "jax"
    target = build_report(compare_dir, samples=2, log=lambda _: None)
    parsed = outline(target.read_text())
    assert parsed.h1 == ["Compare report: compare"] and parsed.h2 == COMPARE_SECTIONS
    assert "<h3>Backend comparison</h3>" in target.read_text()  # compare.md's own title, inside its section
    assert not parsed.external
    # curves.png from compare.md, a curves figure and a confusion matrix per run, 2 Grad-CAM samples per backend
    assert parsed.images == 1 + 2 + 2 + 4


def test_report_refuses_a_folder_that_is_neither(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.exit_code == 2 and "neither a run directory" in result.output
    with pytest.raises(RunError):
        build_report(tmp_path)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(html_file: Path, screenshot: Path) -> str:
    """The DOM headless Chromium built from the file, and a screenshot of the page."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    url = html_file.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = subprocess.run([*flags, "--window-size=1280,2400", f"--screenshot={screenshot}", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    return dom.stdout


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
@pytest.mark.skipif(active_backend() != "torch", reason="the browser sees the same HTML from every backend; runs in the torch pass")
def test_a_browser_renders_the_run_and_compare_reports(trained_run, tmp_path):
    pages = {"run": build_report(trained_run, samples=2, out=tmp_path / "run.html", log=lambda _: None),
             "compare": build_report(make_compare_dir(trained_run, tmp_path), samples=2, log=lambda _: None)}
    for kind, html_file in pages.items():
        screenshot = tmp_path / f"{kind}.png"
        dom = outline(render(html_file, screenshot))
        assert dom.h1 == [f"{kind.capitalize()} report: {html_file.parent.name if kind == 'compare' else 'run'}"]
        assert {"Results", "Confusion matrices", "Grad-CAM"} <= set(dom.h2) and dom.tables >= 3
        pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
        assert pixels.shape == (2400, 1280)
        # Not blank: text, tables and plots darken a real share of the page.
        assert (pixels < 200).mean() > 0.02 and pixels.std() > 20
