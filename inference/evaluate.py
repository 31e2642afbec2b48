"""`evaluate`: a trained run scored on a labelled split, on whichever backend is active."""

from __future__ import annotations

import json
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


def precise_batchnorm(run: TrainedRun, data_dir: str | Path | None, batches: int, workers: int = WORKERS) -> dict:
    """`evaluate --precise-bn N`: what `train --precise-bn N` does at the end of an epoch, done to a
    finished run's weights in memory (the files are not changed): every trainable BatchNorm layer's
    moving statistics recomputed from the first N batches of the epoch after that one (after the
    last for the final weights, after the best for `--checkpoint best`), from the run's own
    training split and augmentation rebuilt from its config.json. The option never changes the
    weights, so the final weights scored this way score as if trained with it; the best epoch is
    the one the run chose (a run trained with the option chooses by the recomputed statistics)."""
    from inference.run import RunError, split_examples
    from training.config import TrainConfig
    from training.precise_bn import best_epoch_gets_it, recompute_after_epoch
    from training.resume import recorded_data_dir
    from training.train import scanned_training_batches

    phase_epochs = [int(p["epochs"]) for p in run.config["phases"]]
    epoch = sum(phase_epochs)
    if run.checkpoint == "best":
        if not (run.run_dir / "metrics.json").is_file():
            raise RunError(f"{run.run_dir} has no metrics.json (the run did not finish): its best epoch is not known")
        best = int(json.loads((run.run_dir / "metrics.json").read_text())["best"]["epoch"])
        if not best_epoch_gets_it(best, phase_epochs):
            raise RunError(f"the best epoch ({best}) is from an earlier phase than the last: its BatchNorm layers "
                           f"were fitted on their moving statistics, and which of them trained then is not "
                           f"rebuilt here")
        epoch = best
    data_dir = str(data_dir or recorded_data_dir(run.config))
    cfg = TrainConfig.from_record(run.options, data_dir=data_dir, workers=workers, verbose=0)
    examples, _ = split_examples(run, data_dir, "train")
    train_batches = scanned_training_batches(cfg, examples)
    used, layers = recompute_after_epoch(run.model, train_batches, epoch, batches)
    # `requested` names the file (an epoch may hold fewer batches than asked for: all of them are used).
    return {"requested": batches, "batches": used, "layers": layers, "epoch": epoch}


def evaluation_path(run: TrainedRun, split: str, precise_bn: int = 0) -> Path:
    """`eval-<split>-<backend>.json` in the run directory (`-best`/`-last` for those weights,
    `-precise-bn<N>` with recomputed BatchNorm statistics)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", split.strip("/")) or "split"
    suffix = "" if run.checkpoint == "final" else f"-{run.checkpoint}"
    suffix += f"-precise-bn{precise_bn}" if precise_bn else ""
    return run.run_dir / f"eval-{name}-{keras.backend.backend()}{suffix}.json"


def evaluate_run(run: TrainedRun, examples: list[Example], split: str, source: str,
                 batch_size: int = BATCH_SIZE, workers: int = WORKERS, log: Callable[[str], None] = print,
                 recomputed: dict | None = None) -> dict:
    """Evaluates, writes the JSON file and prints the table; returns the report. `recomputed`:
    what `precise_batchnorm` did to the weights first (recorded, and named in the file's name)."""
    log(f"Evaluating {run.run_dir} ({run.checkpoint} weights) on {len(examples)} images of {source} "
        f"under {keras.backend.backend()}")
    report = {"split": split, "source": source, "backend": keras.backend.backend(), "checkpoint": run.checkpoint,
              "run_id": run.config.get("run_id"), "precise_bn": recomputed,
              **evaluate_examples(run, examples, batch_size, workers)}
    path = evaluation_path(run, split, recomputed["requested"] if recomputed else 0)
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
