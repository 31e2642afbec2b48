"""`report`: one self-contained HTML page for a run or a compare directory.

Everything is inlined (plots and Grad-CAM overlays as base64 PNGs, no scripts, no
external files), so the page can be mailed or archived as it is. Plots use matplotlib.

Only config.json is required. A run file the page is built from that is missing or cannot be
read (history.csv, metrics.json, eval-*.json, stability.png) gives a visible note in its
section, with the reason, instead of a traceback: the rest of the page is still worth having.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from markdown_it import MarkdownIt

from training.metrics import result_rows, results_row
from training.rundir import RunError, atomic_write, read_history

STYLE = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 2rem auto; max-width: 1150px;
       color: #1d2329; line-height: 1.45; padding: 0 1rem; }
h1 { border-bottom: 3px solid #2f6db5; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; color: #2f6db5; border-bottom: 1px solid #d5dde6; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #c9d2dc; padding: .25rem .6rem; text-align: right; }
th { background: #eef3f8; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; vertical-align: top; }
figcaption { font-size: .85rem; color: #48525c; max-width: 460px; }
img { max-width: 100%; } code, pre { background: #f3f5f7; font-size: .85rem; }
pre { padding: .6rem; overflow-x: auto; } .note { color: #6b5200; background: #fff6d6; padding: .4rem .7rem; }
"""


# --- HTML pieces ------------------------------------------------------------------------

def _esc(value) -> str:
    return html.escape(str(value))


def _reason(error: Exception) -> str:
    """An exception as a short reason on one line (a KeyError: which field is missing)."""
    if isinstance(error, KeyError):
        return f"no {error.args[0]!r} field" if error.args else "a field is missing"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def file_note(name: str, consequence: str, error: Exception | None = None) -> str:
    """A visible note for a run file the page could not use: missing, or why it was not readable."""
    state = "is missing" if error is None else f"is not readable ({_reason(error)})"
    return f'<p class="note">{_esc(f"{name} {state}: {consequence}.")}</p>'


# What reading and using a run file can raise when it is garbage, cut short, or of another shape.
UNREADABLE = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, csv.Error)


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return _esc(value)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_html(fig, caption: str) -> str:
    """A matplotlib figure, inlined, and closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<figure><img src="{_png_uri(buffer.getvalue())}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'


def image_html(array: np.ndarray, caption: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return f'<figure><img src="{_png_uri(buffer.getvalue())}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'


def _markdown() -> MarkdownIt:
    """CommonMark with GFM tables. Raw HTML is escaped, not passed through, and links keep only
    their text, so that nothing in a Markdown file can make the page load or point elsewhere."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("image", _render_image)
    md.add_render_rule("link_open", lambda *_: "")
    md.add_render_rule("link_close", lambda *_: "")
    return md


def _render_image(renderer, tokens, idx, options, env) -> str:
    """An image file beside the Markdown, inlined as a captioned figure; anything else (a URL,
    a missing file) only as its caption, so the page stays self-contained."""
    token = tokens[idx]
    caption = renderer.renderInlineAsText(token.children or [], options, env)
    base_dir = env.get("base_dir")
    src = urllib.parse.unquote(str(token.attrGet("src") or ""))
    if base_dir is not None and "://" not in src and (base_dir / src).is_file():
        return image_html(_read_png(base_dir / src), caption)
    return _esc(caption)


_MARKDOWN = _markdown()


def markdown_html(text: str, base_dir: Path | None = None) -> str:
    """Markdown (CommonMark and GFM tables, rendered by markdown-it-py) as HTML for a section
    of the page: headings move two levels down, below the page's h1 and the section's h2;
    `![caption](file.png)` images from `base_dir` are inlined."""
    tokens = _MARKDOWN.parse(text)
    for i, token in enumerate(tokens):
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1:]) + 2, 6)}"
        # A paragraph holding only an image renders as the figure alone (no <figure> inside <p>).
        only_image = token.type == "inline" and [c.type for c in token.children or []] == ["image"]
        if only_image and tokens[i - 1].type == "paragraph_open":
            tokens[i - 1].hidden = tokens[i + 1].hidden = True
    return _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {"base_dir": base_dir})


def page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "\n".join(f'<section id="{_esc(re.sub(r"[^a-z0-9]+", "-", name.lower()))}"><h2>{_esc(name)}</h2>\n{content}</section>'
                     for name, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{_esc(title)}</h1>\n{body}\n</body></html>\n")


# --- Plots ------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(histories: dict[str, dict[str, list[float]]], caption: str) -> str:
    """Loss and accuracy per epoch, training (solid) and validation (dashed), a colour per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for colour, (name, history) in enumerate(histories.items()):
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            for prefix, style in (("", "-"), ("val_", "--")):
                values = history.get(prefix + key)
                if values:
                    ax.plot(range(1, len(values) + 1), values, style, marker="o", markersize=3, color=f"C{colour}",
                            label=f"{name} {'validation' if prefix else 'training'}")
    from matplotlib.ticker import MaxNLocator

    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    return figure_html(fig, caption)


def confusion_figure(matrix: list[list[int]], classes: list[str], caption: str) -> str:
    plt = _pyplot()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.3, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return figure_html(fig, caption)


# --- Sections ---------------------------------------------------------------------------

def results_section(runs: dict[str, dict]) -> str:
    """The original study's results table: a row per metric, a column per run."""
    values = {name: results_row(metrics) for name, metrics in runs.items()}
    rows = result_rows(list(runs.values()))
    return table(["Metric", *runs], [[row, *(values[n][row] for n in runs)] for row in rows])


def per_class_section(report: dict, classes: list[str]) -> str:
    rows = [[c, report["per_class"][c]["precision"], report["per_class"][c]["recall"], report["per_class"][c]["f1"],
             report["per_class"][c].get("roc_auc"), report["per_class"][c]["support"]] for c in classes]
    rows.append(["macro", None, None, report["macro_f1"], report.get("macro_roc_auc"), report["count"]])
    return table(["Class", "Precision", "Recall", "F1", "ROC-AUC", "Support"], rows)


def _read_evaluation(path: Path) -> dict:
    """One eval-*.json with its table row and probabilities taken out (raises on any part missing)."""
    r = _read_json(path)
    r["row"] = [path.name, r["backend"], r["split"], r["checkpoint"], r["count"], r["accuracy"], r["loss"],
                r["macro_f1"], r.get("macro_roc_auc")]
    r["probs"] = np.array([p["probabilities"] for p in r["predictions"]], dtype=float)
    return r


def evaluations_section(run_dir: Path) -> str:
    """The `evaluate` results found in the run directory, and how far backends agree; a file
    that cannot be read is named in a note and left out."""
    reports, notes = {}, ""
    for path in sorted(run_dir.glob("eval-*.json")):
        try:
            reports[path.name] = _read_evaluation(path)
        except UNREADABLE as e:
            notes += file_note(path.name, "left out of this section", e)
    if not reports:
        return notes + '<p class="note">No evaluate results yet (python cli.py evaluate RUN_DIR under any backend).</p>'
    rows = [r["row"] for r in reports.values()]
    html_out = notes + table(["File", "Backend", "Split", "Weights", "Images", "Accuracy", "Loss", "Macro-F1", "Macro ROC-AUC"], rows)
    groups: dict[tuple, list[dict]] = {}
    for r in reports.values():
        groups.setdefault((str(r["split"]), str(r["checkpoint"])), []).append(r)
    agreement = []
    for (split, checkpoint), same in groups.items():
        if len(same) < 2:
            continue
        reference = same[0]["probs"]
        for other in same[1:]:
            probs = other["probs"]
            if probs.ndim != 2 or probs.shape != reference.shape:
                continue
            agreement.append([f"{split} ({checkpoint})", f"{same[0]['backend']} vs {other['backend']}",
                              float((probs.argmax(1) == reference.argmax(1)).mean()),
                              f"{np.abs(probs - reference).max():.2e}"])
    if agreement:
        html_out += "<h3>Agreement between backends (one saved model)</h3>" + table(
            ["Split", "Backends", "Same prediction", "Max probability difference"], agreement)
    return html_out


def config_section(config: dict) -> str:
    options = config.get("options", {})
    html_out = table(["Option", "Value"], [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in options.items()])
    extra = {k: config[k] for k in ("classes", "test_source", "counts", "phases", "deterministic") if k in config}
    html_out += "<h3>Data and schedule</h3><pre>" + _esc(json.dumps(extra, indent=2)) + "</pre>"
    html_out += "<h3>Environment</h3><pre>" + _esc(json.dumps(config.get("environment", {}), indent=2)) + "</pre>"
    return html_out


def gradcam_section(run_dir: Path, samples: int, data_dir: str | None, log: Callable[[str], None]) -> str:
    """Grad-CAM overlays of test images, the misclassified ones first (most confident first)."""
    if samples <= 0:
        return '<p class="note">Skipped (--gradcam-samples 0).</p>'
    from data.discovery import DatasetError
    from inference.gradcam import DISPLAY_SIZE, cam_layer, grad_cam, side_by_side, split_at_cam_layer
    from inference.run import RunError, load_run, read_images, split_examples

    try:
        run = load_run(run_dir)
        examples, source = split_examples(run, data_dir, "test")
    except (RunError, DatasetError, OSError) as e:
        return f'<p class="note">No Grad-CAM samples: {_esc(e)}</p>'
    log(f"  Grad-CAM: predicting {len(examples)} test images of {run_dir}")
    images, errors = read_images(run, [e.path for e in examples])
    readable = [e for e, err in zip(examples, errors, strict=True) if err is None]
    if not readable:
        return '<p class="note">No Grad-CAM samples: no test image could be read.</p>'
    probabilities = run.probabilities(images)
    predicted = probabilities.argmax(1)
    labels = np.array([e.label for e in readable])
    wrong = [int(i) for i in np.argsort(-probabilities.max(1)) if predicted[i] != labels[i]]
    right = [int(i) for i in np.flatnonzero(predicted == labels)]
    chosen = wrong[: samples // 2]
    chosen += right[:: max(1, len(right) // max(1, samples - len(chosen)))][: samples - len(chosen)]
    chosen += [i for i in wrong if i not in chosen][: samples - len(chosen)]
    from data.augment import normalize

    maps, _ = grad_cam(run.model, normalize(images[chosen], run.preprocess), None, split_at_cam_layer(run.model))
    layer, tensor = cam_layer(run.model)
    figures = []
    for i, cam in zip(chosen, maps, strict=True):
        p = probabilities[i]
        verdict = "MISCLASSIFIED" if predicted[i] != labels[i] else "correct"
        caption = (f"{Path(readable[i].path).name}: true {run.classes[labels[i]]}, predicted "
                   f"{run.classes[predicted[i]]} {p[predicted[i]]:.2f} ({verdict})")
        figures.append(image_html(side_by_side(run, readable[i].path, cam, DISPLAY_SIZE), caption))
    intro = (f"<p>{len(wrong)} of {len(readable)} test images ({_esc(source)}) misclassified. Grad-CAM of the "
             f"predicted class on <code>{_esc(layer)}</code> ({tensor.shape[1]}x{tensor.shape[2]} maps), "
             f"computed under the active backend; misclassified images first.</p>")
    if min(tensor.shape[1], tensor.shape[2]) < 7:
        intro += (f'<p class="note">The maps are coarse: at {run.image_size} px the last stage is '
                  f"{tensor.shape[1]}x{tensor.shape[2]}; ResNet50 at 224 px gives 7x7.</p>")
    return intro + "".join(figures)


# --- Pages ------------------------------------------------------------------------------

def curves_section(run_dir: Path) -> str:
    """The run's loss and accuracy per epoch from history.csv, or a note saying why there are none."""
    path = run_dir / "history.csv"
    if not path.exists():
        return file_note("history.csv", "no training curves")
    try:
        history = read_history(run_dir)
    except UNREADABLE as e:  # random bytes (csv.Error, UnicodeDecodeError), a non-numeric cell (ValueError)
        return file_note("history.csv", "no training curves", e)
    if not any(history.get(prefix + key) for prefix in ("", "val_") for key in ("loss", "accuracy")):
        return '<p class="note">history.csv holds no loss or accuracy per epoch: no training curves.</p>'
    return curves_figure({run_dir.name: history}, "Training (solid) and validation (dashed) per epoch")


def metrics_sections(run_dir: Path, classes: list[str]) -> list[tuple[str, str]]:
    """Results, and with a test split per-class metrics and confusion matrices, from metrics.json;
    a note in Results when it is missing or cannot be read."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return [("Results", file_note("metrics.json", "the run did not finish, so there are no results"))]
    try:
        return _metrics_sections(_read_json(path), classes)
    except UNREADABLE as e:
        return [("Results", file_note("metrics.json", "no results, per-class metrics or confusion matrices", e))]


def _metrics_sections(metrics: dict, classes: list[str]) -> list[tuple[str, str]]:
    backend = metrics["backend"]
    best = metrics["best"]
    sections = [("Results", results_section({f"{backend} (final)": metrics, f"{backend} (best, epoch {best['epoch']})": best}))]
    if metrics.get("test"):
        sections.append(("Per-class metrics", "<p>Test split, final weights.</p>" + per_class_section(metrics["test"], classes)))
        figures = [confusion_figure(metrics["test"]["confusion_matrix"], classes, "Test, final weights")]
        if best.get("test"):
            figures.append(confusion_figure(best["test"]["confusion_matrix"], classes,
                                            f"Test, best weights (epoch {best['epoch']})"))
        sections.append(("Confusion matrices", "".join(figures)))
    return sections


def stability_section(run_dir: Path) -> str:
    """stability.png, the gradient norms the run logged, or a note saying why it is not shown."""
    from PIL import Image

    path = run_dir / "stability.png"
    if not path.exists():
        return file_note("stability.png", "no gradient-norm plot")
    try:
        return image_html(_read_png(path), "Gradient norms per layer group (stability.csv)")
    except (*UNREADABLE, Image.DecompressionBombError) as e:
        return file_note("stability.png", "no gradient-norm plot", e)


def read_run_config(run_dir: Path) -> dict:
    """config.json, the record every run page starts from: `RunError` (one line) when unreadable."""
    try:
        config = _read_json(run_dir / "config.json")
        if not isinstance(config["classes"], list):
            raise ValueError("'classes' is not a list")
    except UNREADABLE as e:
        raise RunError(f"{run_dir / 'config.json'} is not readable ({_reason(e)}); "
                       "a report needs the run's config.json") from None
    return config


def run_page(run_dir: Path, samples: int, data_dir: str | None, log: Callable[[str], None]) -> str:
    config = read_run_config(run_dir)
    options = config.get("options", {})
    summary = (f"<p>Backend <b>{_esc(config.get('environment', {}).get('backend', '?'))}</b>, model "
               f"<b>{_esc(options.get('model', 'resnet50'))}</b>, {_esc(options.get('image_size'))} px, "
               f"test set: {_esc(config.get('test_source', ''))}.</p>")
    results, *per_class = metrics_sections(run_dir, config["classes"])
    sections = [("Summary", summary), results, ("Training curves", curves_section(run_dir)), *per_class]
    sections.append(("Evaluations", evaluations_section(run_dir)))
    sections.append(("Training stability", stability_section(run_dir)))
    sections.append(("Grad-CAM", gradcam_section(run_dir, samples, data_dir, log)))
    sections.append(("Configuration and environment", config_section(config)))
    return page(f"Run report: {run_dir.name}", sections)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def resolve_run_dir(compare_dir: Path, recorded: str) -> Path:
    """A run directory named in compare.json, also when the compare folder was moved."""
    path = Path(recorded)
    if path.exists() or "runs" not in path.parts:
        return path
    last = len(path.parts) - 1 - path.parts[::-1].index("runs")
    return compare_dir.joinpath(*path.parts[last:])


def compare_page(compare_dir: Path, samples: int, data_dir: str | None, log: Callable[[str], None]) -> str:
    report = json.loads((compare_dir / "compare.json").read_text())
    runs, notes = [], ""
    for r in report["runs"]:
        run_dir = resolve_run_dir(compare_dir, r["run_dir"])
        label = " ".join(x for x in (r["backend"], r["cell"], f"seed {r['seed']}") if x)
        if not (run_dir / "metrics.json").exists():
            continue  # a failed run: compare.md lists it
        try:
            runs.append((label, r, run_dir, _read_json(run_dir / "metrics.json")))
        except UNREADABLE as e:
            notes += file_note(f"{run_dir.name}/metrics.json", f"{label} is left out of this page", e)
    sections = [("Summary", f"<p>Command: <code>{_esc(report.get('command', ''))}</code></p>"
                 f"<p>{len(runs)} runs over backends {_esc(', '.join(report['backends']))}.</p>" + notes)]
    if (compare_dir / "compare.md").exists():
        text = (compare_dir / "compare.md").read_text()
        text = "\n".join(line for line in text.splitlines() if not line.startswith("Command:"))
        sections.append(("Comparison", markdown_html(text, compare_dir)))
    if not runs:
        return page(f"Compare report: {compare_dir.name}", [*sections, ("Results", '<p class="note">No finished runs.</p>')])
    sections.append(("Results", results_section({label: m for label, _, _, m in runs})))
    histories = {label: r["history"] for label, r, _, _ in runs}
    by_backend: dict[str, dict] = {}
    for label, r, _, _ in runs:
        by_backend.setdefault(r["backend"], {})[label] = histories[label]
    sections.append(("Training curves", "".join(curves_figure(h, f"{b}: training (solid) and validation (dashed)")
                                                for b, h in by_backend.items())))
    first_config = read_run_config(runs[0][2])
    classes = first_config["classes"]
    tested = [(label, m) for label, _, _, m in runs if m.get("test")]
    if tested:
        f1 = [[c, *(m["test"]["per_class"][c]["f1"] for _, m in tested)] for c in classes]
        f1.append(["macro-F1", *(m["test"]["macro_f1"] for _, m in tested)])
        sections.append(("Per-class metrics", "<p>Test F1 per class, final weights.</p>"
                         + table(["Class", *(label for label, _ in tested)], f1)))
        sections.append(("Confusion matrices", "".join(
            confusion_figure(m["test"]["confusion_matrix"], classes, f"{label}: test, final weights")
            for label, m in tested)))
    firsts = {}
    for label, r, run_dir, _ in runs:
        firsts.setdefault(r["backend"], (label, run_dir))
    gradcams = "".join(f"<h3>{_esc(label)}</h3>" + gradcam_section(run_dir, samples, data_dir, log)
                       for label, run_dir in firsts.values())
    sections.append(("Grad-CAM", gradcams))
    sections.append(("Configuration and environment",
                     "<p>Options of the compare command:</p><pre>" + _esc(json.dumps(report["options"], indent=2)) + "</pre>"
                     + f"<p>Environment of {_esc(runs[0][0])}:</p><pre>"
                     + _esc(json.dumps(first_config.get("environment", {}), indent=2)) + "</pre>"))
    return page(f"Compare report: {compare_dir.name}", sections)


def build_report(path: str | Path, samples: int = 6, data_dir: str | None = None, out: str | Path | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Writes `report.html` (or `out`) for a run directory or a compare directory."""
    path = Path(path)
    if (path / "compare.json").exists():
        text = compare_page(path, samples, data_dir, log)
    elif (path / "config.json").exists():
        text = run_page(path, samples, data_dir, log)
    else:
        raise RunError(f"{path} is neither a run directory (config.json) nor a compare directory (compare.json)")
    target = Path(out) if out else path / "report.html"
    with atomic_write(target) as tmp:  # into a run directory: never half a page
        tmp.write_text(text)
    return target
