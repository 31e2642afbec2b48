"""Classification metrics from logits, in NumPy (so every backend is scored alike)."""

from __future__ import annotations

import numpy as np

from markdown_tables import markdown_table

# `predict` flags a prediction whose top probability is below this (--threshold): a classifier
# answers even for an image that is not a brain MRI.
LOW_CONFIDENCE = 0.6


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean categorical cross-entropy of integer labels under softmax(logits)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve: the probability that a positive scores above a negative
    (ties count half). None when either group is empty."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # tied scores share their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Loss, accuracy, per-class precision/recall/F1 and one-vs-rest ROC-AUC, their macro
    averages and the confusion matrix."""
    labels = np.asarray(labels)
    probabilities = softmax(logits)
    auc = [roc_auc(probabilities[:, i], labels == i) for i in range(len(classes))]
    defined_auc = [a for a in auc if a is not None]
    predictions = logits.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, len(classes))
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {
        "count": len(labels),
        "loss": cross_entropy(logits, labels),
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": float(f1.mean()),
        "macro_roc_auc": float(np.mean(defined_auc)) if defined_auc else None,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "roc_auc": auc[i],
                "support": int(actual[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
    }


def format_table(columns: dict[str, dict[str, float | None]], rows: list[str]) -> str:
    """A Markdown table: one row per metric name, one column per run."""
    def cell(v) -> str:
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    return markdown_table(["Metric", *columns],
                          [[row, *(cell(values.get(row)) for values in columns.values())] for row in rows])


RESULT_ROWS = ["Train Loss", "Train Accuracy", "Val Accuracy", "Test Loss", "Test Accuracy", "Test macro-F1"]


LEAKAGE_ROWS = ["Test Accuracy (no twin in Training)", "Test images with no twin"]


def result_rows(runs: list[dict]) -> list[str]:
    """The table's rows: the study's, plus the leakage-free test subset when a run has one."""
    return RESULT_ROWS + (LEAKAGE_ROWS if any(m.get("test_leakage_free") for m in runs) else [])


def results_row(metrics: dict) -> dict[str, float | None]:
    """The original study's results-table values of one run (and, with --dedup or
    --leakage-report, the accuracy on the test images with no twin in the training pool)."""
    test = metrics.get("test") or {}
    clean = metrics.get("test_leakage_free") or {}
    return {
        LEAKAGE_ROWS[0]: clean.get("accuracy"),
        LEAKAGE_ROWS[1]: clean.get("count"),
        "Train Loss": metrics["train"]["loss"],
        "Train Accuracy": metrics["train"]["accuracy"],
        "Val Accuracy": (metrics.get("val") or {}).get("accuracy"),
        "Test Loss": test.get("loss"),
        "Test Accuracy": test.get("accuracy"),
        "Test macro-F1": test.get("macro_f1"),
    }
