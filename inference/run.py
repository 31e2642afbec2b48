"""A finished run, loaded for use on whichever backend is active: its model, classes
and input settings, and predictions for image files."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import warnings
from pathlib import Path

import keras
import numpy as np

from data import BATCH_SIZE, WORKERS
from data.augment import normalize
from data.decode import DecodeError, decode_for_model
from data.discovery import DatasetError, Example, files_under, list_split, make_splits
from markdown_tables import markdown_table
from training.metrics import LOW_CONFIDENCE, softmax
from training.resume import check_run_data, recorded_data_dir
from training.rundir import (
    BEST,
    LAST,
    MODEL_FILE,
    RunError,
    check_run_files,
    model_file_problem,
    spreadsheet_safe,
)

PREDICT_CHUNK = 256  # files decoded at a time by `predict_files`
SPLITS = ("test", "val", "train")


@dataclasses.dataclass
class TrainedRun:
    """A run directory's model and what is needed to feed it."""

    run_dir: Path
    model: keras.Model
    checkpoint: str
    classes: list[str]
    image_size: int
    preprocess: str
    options: dict
    config: dict  # the run's whole config.json (counts, data paths), read once by load_run

    @property
    def decode_size(self) -> int:
        """The side the run decoded its images at before taking the centre `image_size` square
        (--decode-size; runs older than that option decoded at the input size)."""
        return int(self.options.get("decode_size") or self.image_size)

    def read(self, path: str, data: bytes | None = None, max_pixels: int | None = None,
             size: int | None = None) -> np.ndarray:
        """An image file as the run's evaluation batches show it to the model (`decode_for_model`);
        with `size`, the same view at another side (for display beside a Grad-CAM map)."""
        size = self.image_size if size is None else size
        decode = round(size * self.decode_size / self.image_size)
        return decode_for_model(path, size, decode, data=data, max_pixels=max_pixels)

    def logits(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Inference-mode logits of uint8 NHWC images of side `image_size`."""
        chunks = [
            self.model.predict_on_batch(normalize(images[i : i + batch_size], self.preprocess))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate([np.asarray(keras.ops.convert_to_numpy(c), np.float32) for c in chunks])

    def probabilities(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        return softmax(self.logits(images, batch_size))


def load_model_file(path: str | Path) -> keras.Model:
    """Loads a `.keras` file with Keras' safe_mode on (no Python code from the file runs)."""
    import training.schedule  # noqa: F401  (registers the learning-rate schedule the file names)

    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} does not exist")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types here; the user needs the reason, not the stack.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "safe_mode" in str(e):
            raise RunError(f"{path} was refused by Keras safe_mode (it would run Python code from the file, "
                           f"e.g. a Lambda layer): {reason}") from None
        raise RunError(f"{path} is not a loadable Keras model ({type(e).__name__}: {reason})") from None


def load_run(run_dir: str | Path, checkpoint: str = "final") -> TrainedRun:
    """Loads a run directory's `model.keras` (`final`), or that model with the weights of
    `best.weights.h5` or `last.weights.h5`."""
    run_dir = Path(run_dir)
    config_path, model_path = run_dir / "config.json", run_dir / MODEL_FILE
    if not config_path.is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
        classes, options = list(config["classes"]), config["options"]
        image_size, preprocess = int(options["image_size"]), options["preprocess"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{config_path} is not a readable run config ({type(e).__name__}: {e})") from None
    check_run_files(run_dir)
    problem = model_file_problem(model_path)
    if problem is None:
        model = load_model_file(model_path)
    elif checkpoint == "final":
        raise RunError(_model_file_message(run_dir, problem))
    else:  # the weights file holds every variable: the architecture comes from the run's options
        model = _model_from_options(options, len(classes))
    if checkpoint != "final":
        weights = run_dir / f"{checkpoint}.weights.h5"
        if not weights.is_file():
            kept = options.get("keep_checkpoints", "all")
            raise RunError(f"{weights} does not exist" + (
                f" (the run kept {kept!r} checkpoints, --keep-checkpoints; model.keras holds the final "
                f"weights: --checkpoint final)" if kept != "all" else ""))
        try:
            with warnings.catch_warnings():
                # The checkpoint also holds its optimizer; only the model's weights are wanted.
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(weights)
        except (ValueError, OSError, KeyError) as e:
            raise RunError(f"{weights} does not fit {model_path} ({type(e).__name__}: {e})") from None
    return TrainedRun(run_dir, model, checkpoint, classes, image_size, preprocess, options, config)


def _model_file_message(run_dir: Path, problem: str) -> str:
    """Why model.keras cannot be used, and the checkpoint that can (never advice that deletes one)."""
    kept = [p.name for p in (run_dir / BEST, run_dir / LAST) if p.is_file()]
    instead = f"; --checkpoint {kept[0].split('.')[0]} uses {kept[0]}" if kept else ""
    if problem != "missing":
        return f"{run_dir / MODEL_FILE} is {problem}{instead}"
    if (run_dir / "metrics.json").is_file():
        return f"{run_dir / MODEL_FILE} is missing (the run finished: metrics.json is there){instead}"
    return f"{run_dir} has no {MODEL_FILE}: the run did not finish (interrupted or diverged){instead}"


def _model_from_options(options: dict, num_classes: int) -> keras.Model:
    """The run's model, built from its recorded options with no weights loaded."""
    from model import build_model
    from training.config import TrainConfig

    cfg = TrainConfig.from_record(options)
    return build_model(cfg.model_spec(), num_classes, cfg.image_size, "none")


def split_examples(run: TrainedRun, data_dir: str | Path | None, split: str) -> tuple[list[Example], str]:
    """The labelled images to evaluate on: one of the run's own splits (`test`, `val`,
    `train`, rebuilt with the run's split options and seed) or every image of a split
    folder of `data_dir` (e.g. `Testing`). Returns `(examples, description)`."""
    data_dir = Path(data_dir or recorded_data_dir(run.config))
    if split in SPLITS:
        check_run_data(run.run_dir, run.config, data_dir)  # the same files, before any is decoded
        opts = run.options
        # --dedup changes what is left of the training pool, never the test split.
        dedup = bool(opts.get("dedup")) and split != "test"
        splits = make_splits(data_dir, opts["val_split"], opts["test_split"], opts["split_seed"],
                             dedup, opts.get("dedup_max_distance"), opts.get("dedup_min_correlation"))
        _check_classes(run, splits.classes, data_dir)
        examples = getattr(splits, split)
        _check_counts(run, split, examples, data_dir)
        if not examples:
            raise DatasetError(f"the run's {split} split of {data_dir} is empty; name a folder instead "
                               f"(e.g. --split Testing)")
        source = splits.test_source if split == "test" else f"the run's {split} split"
        return examples, f"{data_dir}: {source}"
    folder = data_dir / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder (--split takes {', '.join(SPLITS)} or a split folder "
                           f"of {data_dir}, e.g. Testing)")
    files, _ = list_split(folder)
    _check_classes(run, sorted(files), folder)
    return [Example(p, run.classes.index(c)) for c in run.classes for p in files[c]], f"{folder}/"


def _check_counts(run: TrainedRun, split: str, examples: list[Example], where: Path) -> None:
    """The run's own split rebuilt from `where` must hold the images per class the run recorded
    (plus at most the files it skipped as unreadable): the same data, wherever it now is."""
    recorded = (run.config.get("counts") or {}).get(split)
    if recorded is None:
        return
    found = [sum(e.label == c for e in examples) for c in range(len(run.classes))]
    skipped = int(run.config.get("skipped_files") or 0)
    if any(not 0 <= f - r <= skipped for f, r in zip(found, recorded, strict=True)):
        raise DatasetError(f"the {split} split of {where} holds {found} images per class, the run's held {recorded}: "
                           f"not the data the run used (--data-dir names its place)")


def _check_classes(run: TrainedRun, classes: list[str], where: Path) -> None:
    if classes != run.classes:
        raise DatasetError(f"the classes of {where} {classes} are not the model's {run.classes}")


@dataclasses.dataclass
class Prediction:
    """One file's prediction, or why it could not be read."""

    path: str
    predicted: str | None = None
    probabilities: list[float] | None = None
    low_confidence: bool = False
    error: str | None = None

    @property
    def confidence(self) -> float | None:
        return max(self.probabilities) if self.probabilities else None


def read_images(run: TrainedRun, paths: list[str], workers: int = WORKERS) -> tuple[np.ndarray, list[str | None]]:
    """Decodes files as `run` feeds its model (`TrainedRun.read`); returns the images of the
    readable ones and, per path, None or the reason it could not be read."""
    size = run.image_size

    def read(path: str):
        try:
            return run.read(path), None
        except DecodeError as e:  # also a folder, a missing file, no permission
            return None, str(e)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(read, paths))
    images = [image for image, _ in results if image is not None]
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, [error for _, error in results]


def expand_paths(paths) -> list[str]:
    """Files as given and every non-hidden file below the folders given (`files_under`)."""
    return [str(f) for p in paths for f in files_under(p)]


def predict_files(run: TrainedRun, paths: list[str | Path], threshold: float = LOW_CONFIDENCE,
                  batch_size: int = BATCH_SIZE, workers: int = WORKERS) -> list[Prediction]:
    """Predicts every file under `paths` (files or folders); unreadable files get an error
    and do not stop the others. A top probability below `threshold` is flagged."""
    files = expand_paths(paths)
    rows = []
    for start in range(0, len(files), PREDICT_CHUNK):  # bounded memory for large folders
        chunk = files[start : start + PREDICT_CHUNK]
        images, errors = read_images(run, chunk, workers)
        readable = iter(run.probabilities(images, batch_size) if len(images) else [])
        for path, error in zip(chunk, errors, strict=True):
            if error is not None:
                rows.append(Prediction(path, error=error))
                continue
            p = next(readable)
            rows.append(Prediction(path, run.classes[int(p.argmax())], [float(v) for v in p],
                                   bool(p.max() < threshold)))
    return rows


def format_predictions(rows: list[Prediction], classes: list[str]) -> str:
    """A Markdown table: file, predicted class, each class' probability, the low-confidence flag."""
    def cells(r: Prediction) -> list[str]:
        if r.error:
            return [r.path, "unreadable", *("" for _ in classes), ""]
        return [r.path, r.predicted, *(f"{p:.4f}" for p in r.probabilities), "yes" if r.low_confidence else ""]

    return markdown_table(["File", "Predicted", *classes, "Low confidence"], [cells(r) for r in rows])


def write_predictions_csv(rows: list[Prediction], classes: list[str], path: str | Path) -> None:
    """One row per file: predicted class, confidence, each class' probability, the flag and any error."""
    import csv

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([spreadsheet_safe(c) for c in
                         ("path", "predicted", "confidence", *(f"p_{c}" for c in classes), "low_confidence", "error")])
        for r in rows:
            probs = [f"{p:.6f}" for p in r.probabilities] if r.probabilities else [""] * len(classes)
            confidence = "" if r.confidence is None else f"{r.confidence:.6f}"
            writer.writerow([spreadsheet_safe(cell) for cell in
                             (r.path, r.predicted or "", confidence, *probs, int(r.low_confidence), r.error or "")])
