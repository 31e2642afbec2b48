"""`evaluate`: a trained run scored on a labelled split, on whichever backend is active."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from data import BATCH_SIZE, WORKERS
from data.discovery import DatasetError, Example
from data.loader import MRIBatches, scan_examples
from inference.run import TrainedRun
from markdown_tables import markdown_table
from training.metrics import classification_report, softmax
from training.rundir import write_json


def evaluate_examples(run: TrainedRun, examples: list[Example], batch_size: int = BATCH_SIZE, workers: int = WORKERS) -> dict:
    """Scores the run's model on `examples` (unreadable files skipped and listed).

    Returns the classification report plus every file's label, prediction and
    probabilities, so two backends' evaluations can be compared file by file.
    """
    readable, skipped = scan_examples(examples, run.decode_size, None, workers)
    if not readable:
        raise DatasetError(f"none of the {len(examples)} images could be read")
    batches = MRIBatches(readable, run.image_size, batch_size, run.preprocess, workers=workers,
                         decode_size=run.decode_size)
    logits = np.asarray(run.model.predict(batches, verbose=0), np.float32)
    probabilities = softmax(logits)
    report = classification_report(logits, batches.labels, run.classes)
    report["predictions"] = [
        {"path": e.path, "label": run.classes[e.label], "predicted": run.classes[int(p.argmax())],
         "probabilities": [round(float(v), 7) for v in p]}
        for e, p in zip(readable, probabilities, strict=True)
    ]
    report["skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    return report


def evaluation_path(run: TrainedRun, split: str) -> Path:
    """`eval-<split>-<backend>.json` in the run directory (`-best`/`-last` for those weights)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", split.strip("/")) or "split"
    suffix = "" if run.checkpoint == "final" else f"-{run.checkpoint}"
    return run.run_dir / f"eval-{name}-{keras.backend.backend()}{suffix}.json"


def evaluate_run(run: TrainedRun, examples: list[Example], split: str, source: str,
                 batch_size: int = BATCH_SIZE, workers: int = WORKERS, log: Callable[[str], None] = print) -> dict:
    """Evaluates, writes the JSON file and prints the table; returns the report."""
    log(f"Evaluating {run.run_dir} ({run.checkpoint} weights) on {len(examples)} images of {source} "
        f"under {keras.backend.backend()}")
    report = {"split": split, "source": source, "backend": keras.backend.backend(), "checkpoint": run.checkpoint,
              **evaluate_examples(run, examples, batch_size, workers)}
    path = evaluation_path(run, split)
    write_json(path, report)
    for item in report["skipped"]:
        log(f"  skipped {item['path']}: {item['reason']}")
    log("\n" + format_evaluation(report, run.classes))
    log(f"\nWrote {path}")
    return report


def format_evaluation(report: dict, classes: list[str]) -> str:
    """The per-class table, the summary line and the confusion matrix, as Markdown."""
    def cell(v):
        return "n/a" if v is None else f"{v:.4f}"

    scores = ("precision", "recall", "f1", "roc_auc")
    per_class = [[name, *(cell(report["per_class"][name][k]) for k in scores), report["per_class"][name]["support"]]
                 for name in classes]
    lines = [markdown_table(["Class", "Precision", "Recall", "F1", "ROC-AUC", "Support"], per_class)]
    lines.append(f"\nAccuracy {report['accuracy']:.4f}, loss {report['loss']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
                 f"macro ROC-AUC {cell(report['macro_roc_auc'])} on {report['count']} images")
    matrix = [[name, *row] for name, row in zip(classes, report["confusion_matrix"], strict=True)]
    lines += ["", "Confusion matrix (rows: true class, columns: predicted)", "",
              markdown_table(["", *classes], matrix)]
    return "\n".join(lines)
