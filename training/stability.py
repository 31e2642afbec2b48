"""The stability log: per epoch, on one fixed probe batch, the gradient norm of each layer
group, activation statistics at the cut and after each head block, and the learning rate.

Written to stability.csv and stability.png in the run directory after every epoch, so a
run that stops early still leaves its evidence.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import defaultdict
from pathlib import Path

import keras
import numpy as np

from backend.gradients import loss_and_gradients
from model.structure import activation_points, layer_group
from training.rundir import atomic_write, write_csv


def group_gradient_norms(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The L2 norm of the loss gradient over each group's trainable variables, for one
    training-mode pass over the batch. The model's state (BatchNormalization moving
    statistics, dropout seeds) is left as it was, so probing does not change training."""
    state = [(v, keras.ops.convert_to_numpy(v.value)) for v in model.non_trainable_variables]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _, _, grads = loss_and_gradients(model, images, labels, loss_fn)
    for variable, value in state:
        variable.assign(value)
    squares: dict[str, float] = defaultdict(float)
    for variable, grad in zip(model.trainable_variables, grads, strict=True):
        if grad is not None:
            g = keras.ops.convert_to_numpy(grad).astype(np.float64)
            squares[layer_group(variable.path) or "other"] += float(np.sum(g * g))
    return {group: math.sqrt(total) for group, total in squares.items()}


def gradient_ratio(norms: dict[str, float]) -> float | None:
    """Smallest over largest group gradient norm: near 0 means some group barely learns."""
    values = list(norms.values())
    if not values or not all(map(math.isfinite, values)) or max(values) == 0:
        return None
    return min(values) / max(values)


class StabilityMonitor(keras.callbacks.Callback):
    """Appends one row per epoch to stability.csv and redraws stability.png.

    Set `phase` before each `fit`; a row's `learning_rate` is the rate at the epoch's end
    (also added to the epoch's logs, so history.csv has it).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, run_dir: Path, resume_epochs: int = 0) -> None:
        super().__init__()
        self.images, self.labels = images, labels
        self.csv_path, self.png_path = run_dir / "stability.csv", run_dir / "stability.png"
        self.phase = ""
        # A resumed run keeps the rows of the epochs it does not repeat.
        self.rows: list[dict] = read_rows(self.csv_path, resume_epochs) if resume_epochs else []
        self._probe: keras.Model | None = None
        self._points: list[str] = []
        self._groups: list[str] = []

    def _setup(self) -> None:
        points = activation_points(self.model)
        self._probe = keras.Model(self.model.input, list(points.values()))
        self._points = list(points)
        self._groups = list(dict.fromkeys(
            g for v in self.model.weights if (g := layer_group(v.path)) is not None
        ))

    def on_epoch_end(self, epoch, logs=None):
        if self._probe is None:
            self._setup()
        logs = logs if logs is not None else {}
        loss = logs.get("loss")
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["learning_rate"] = lr
        norms = group_gradient_norms(self.model, self.images, self.labels)
        ratio = gradient_ratio(norms)
        row = {
            "epoch": epoch + 1, "phase": self.phase, "learning_rate": lr,
            "loss": float(loss) if loss is not None else None,
            "nonfinite_loss": int(loss is not None and not math.isfinite(float(loss))),
            "grad_ratio": ratio,
        }
        row.update({f"grad_norm/{g}": norms.get(g) for g in self._groups})
        outputs = self._probe.predict_on_batch(self.images)
        for name, value in zip(self._points, outputs if isinstance(outputs, list) else [outputs], strict=True):
            value = np.asarray(value, dtype=np.float64)
            row[f"act_mean/{name}"], row[f"act_std/{name}"] = float(value.mean()), float(value.std())
        self.rows.append(row)
        write_rows(self.csv_path, self.rows)
        plot_stability(self.rows, self.png_path)

    def summary(self) -> dict:
        """The figures a results table shows: the last epoch's and the worst gradient ratio,
        the last activation std at the cut, whether any loss was non-finite."""
        if not self.rows:
            return {}
        ratios = [r["grad_ratio"] for r in self.rows if r["grad_ratio"] is not None]
        last = self.rows[-1]
        return {
            "grad_ratio_last": last["grad_ratio"],
            "grad_ratio_min": min(ratios) if ratios else None,
            "cut_act_std_last": last.get("act_std/cut"),
            "nonfinite_loss": any(r["nonfinite_loss"] for r in self.rows),
        }


def read_rows(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of a stability.csv, with the types `write_rows` was given."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))[:limit]

    def value(key: str, text: str):
        if text == "":
            return None
        if key == "phase":
            return text
        if key in ("epoch", "nonfinite_loss"):
            return int(text)
        return float(text)

    return [{k: value(k, v) for k, v in row.items()} for row in rows]


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rows as CSV; empty cells where a row has no value (e.g. a frozen group's gradient)."""
    write_csv(path, rows)


def plot_stability(rows: list[dict], path: Path) -> None:
    """Three panels over epochs: group gradient norms, activation std (and |mean|), learning
    rate; dotted lines mark phase changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("grad_norm/", "gradient norm per layer group (probe batch)"),
              ("act_std/", "activation std (solid) and |mean| (dashed)")]
    for ax, (prefix, title) in zip(axes, panels, strict=False):
        # Groups that never trained (frozen all run) have no line to draw.
        keys = [k for k in rows[0] if k.startswith(prefix) and any(r.get(k) is not None for r in rows)]
        for i, key in enumerate(keys):
            name = key[len(prefix):]
            values = [_plottable(r.get(key)) for r in rows]
            ax.plot(epochs, values, marker="o", markersize=3, color=f"C{i % 10}", label=name)
            if prefix == "act_std/":
                means = [_plottable(r.get(f"act_mean/{name}"), absolute=True) for r in rows]
                ax.plot(epochs, means, "--", color=f"C{i % 10}")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    axes[2].plot(epochs, [r["learning_rate"] for r in rows], marker="o", markersize=3)
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate at epoch end (0 not drawn)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for prev, row in itertools.pairwise(rows):
            if row["phase"] != prev["phase"]:
                ax.axvline(prev["epoch"] + 0.5, color="grey", linestyle=":")
    bad = [r["epoch"] for r in rows if r["nonfinite_loss"]]
    if bad:
        fig.suptitle(f"non-finite loss in epoch {bad[0]}: training stopped", color="red")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _plottable(value, absolute: bool = False) -> float:
    """A value a log axis can show, else NaN (a gap in the line)."""
    if value is None or not math.isfinite(float(value)):
        return np.nan
    value = abs(float(value)) if absolute else float(value)
    return value if value > 0 else np.nan
