"""`run_training`: one training run, from a data folder to a complete run directory."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import keras
import numpy as np

from data.discovery import DatasetError, Example, make_splits
from data.loader import DecodedCache, MRIBatches, scan_examples
from engine.backend import enable_determinism, environment, peak_memory_mb
from engine.config import Preflight, TrainConfig, preflight
from engine.metrics import RESULT_ROWS, classification_report, format_table, results_row
from engine.rundir import write_json
from model import build_classifier, load_initial_weights


class EpochTimer(keras.callbacks.Callback):
    """Adds `seconds` (the whole epoch) and `images_per_second` (the training phase,
    validation excluded) to each epoch's logs, and so to history.csv."""

    def __init__(self, num_images: int) -> None:
        super().__init__()
        self.num_images = num_images
        self._start = self._train_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._train_end = 0.0

    def on_test_begin(self, logs=None):
        if self._start and not self._train_end:  # validation inside fit
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        if logs is not None:
            logs["seconds"] = end - self._start
            logs["images_per_second"] = self.num_images / ((self._train_end or end) - self._start)


def _scan(name: str, examples: list[Example], cfg: TrainConfig, cache, log) -> tuple[list[Example], list]:
    if not examples:
        return [], []
    bar = keras.utils.Progbar(len(examples), verbose=1 if cfg.verbose else 0, unit_name="image")
    log(f"Decoding {len(examples)} {name} images at {cfg.image_size} px")
    good, skipped = scan_examples(examples, cfg.image_size, cache, cfg.workers, progress=bar.update)
    for path, reason in skipped:
        log(f"  skipped {path}: {reason}")
    return good, skipped


def training_batches(cfg: TrainConfig, examples: list[Example], cache: DecodedCache | None) -> MRIBatches:
    """The training batches exactly as `fit` gets them (also what `pipeline-hash` hashes)."""
    return MRIBatches(
        examples, cfg.image_size, cfg.batch_size, cfg.preprocess, cfg.augment_config(),
        shuffle=True, seed=cfg.seed, cache=cache, workers=cfg.workers,
    )


def scanned_training_batches(cfg: TrainConfig) -> MRIBatches:
    """`training_batches` of `cfg.data_dir`'s training split, unreadable files left out."""
    splits = make_splits(cfg.data_dir, cfg.val_split, cfg.test_split, cfg.split_seed)
    cache = DecodedCache() if cfg.cache else None
    examples, _ = scan_examples(splits.train, cfg.image_size, cache, cfg.workers)
    return training_batches(cfg, examples, cache)


def _predict(model: keras.Model, examples: list[Example], cfg: TrainConfig, cache) -> tuple[np.ndarray, np.ndarray]:
    batches = MRIBatches(
        examples, cfg.image_size, cfg.batch_size, cfg.preprocess, cache=cache, workers=cfg.workers
    )
    logits = model.predict(batches, verbose=0)
    return np.asarray(logits, dtype=np.float32), batches.labels


def _evaluate(model, val, test, cfg: TrainConfig, cache, classes: list[str]) -> dict:
    return {
        "val": classification_report(*_predict(model, val, cfg, cache), classes) if val else None,
        "test": classification_report(*_predict(model, test, cfg, cache), classes) if test else None,
    }


def run_training(cfg: TrainConfig, checked: Preflight | None = None, log: Callable[[str], None] = print) -> dict:
    """Trains the classifier as `cfg` says and fills the run directory.

    Writes config.json, initial.weights.h5, history.csv, best.weights.h5, model.keras,
    skipped.txt and metrics.json; returns the metrics.
    """
    backend = keras.backend.backend()
    checked = checked or preflight(cfg)
    run_dir, splits = checked.run_dir, checked.splits
    log(f"Run directory: {run_dir}")
    log(f"Backend: {backend}; classes: {', '.join(splits.classes)}; test set: {splits.test_source}")

    cache = DecodedCache() if cfg.cache else None
    train, skipped_train = _scan("training", splits.train, cfg, cache, log)
    val, skipped_val = _scan("validation", splits.val, cfg, cache, log)
    test, skipped_test = _scan("test", splits.test, cfg, cache, log)
    skipped = skipped_train + skipped_val + skipped_test
    (run_dir / "skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
    if skipped:
        log(f"Skipped {len(skipped)} unreadable files (list in {run_dir / 'skipped.txt'})")
    if not train:
        raise DatasetError(f"no readable training images in {cfg.data_dir}")
    counts = dataclasses.replace(splits, train=train, val=val, test=test).counts()

    determinism = enable_determinism() if cfg.deterministic else None
    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(
        len(splits.classes), cfg.image_size, cfg.weights, cfg.freeze, cfg.dropout, cfg.bn_momentum
    )
    if cfg.init_weights:
        load_initial_weights(model, cfg.init_weights)
    model.save_weights(run_dir / "initial.weights.h5")

    write_json(
        run_dir / "config.json",
        {
            "options": dataclasses.asdict(cfg),
            "classes": splits.classes,
            "test_source": splits.test_source,
            "counts": counts,
            "skipped_files": len(skipped),
            "ignored_files": len(splits.ignored),
            "decoded_cache_mb": round(cache.nbytes / 2**20, 1) if cache is not None else 0,
            "deterministic": determinism,
            "environment": environment(),
        },
    )

    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    train_batches = training_batches(cfg, train, cache)
    val_batches = (
        MRIBatches(val, cfg.image_size, cfg.batch_size, cfg.preprocess, cache=cache, workers=cfg.workers)
        if val else None
    )
    monitor = "val_accuracy" if val else "accuracy"
    callbacks = [
        EpochTimer(len(train)),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv")),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "best.weights.h5"), monitor=monitor, mode="max",
            save_best_only=True, save_weights_only=True,
        ),
    ]
    history = model.fit(
        train_batches,
        validation_data=val_batches,
        epochs=cfg.epochs,
        shuffle=False,  # The order is the pipeline's own seeded permutation.
        callbacks=callbacks,
        verbose=cfg.verbose,
    ).history
    model.save(run_dir / "model.keras")

    final = _evaluate(model, val, test, cfg, cache, splits.classes)
    best_epoch = int(np.argmax(history[monitor]))
    model.load_weights(run_dir / "best.weights.h5")
    best = _evaluate(model, val, test, cfg, cache, splits.classes)
    metrics = {
        "backend": backend,
        "epochs": cfg.epochs,
        "train": {"loss": history["loss"][-1], "accuracy": history["accuracy"][-1]},
        **final,
        "best": {
            "epoch": best_epoch + 1,
            "monitor": monitor,
            "train": {"loss": history["loss"][best_epoch], "accuracy": history["accuracy"][best_epoch]},
            **best,
        },
        # What "auto" became: XLA for jax, for tensorflow only with a GPU and without
        # op determinism, never for torch (True there would mean torch.compile).
        "jit_compile": bool(model.jit_compile),
        "seconds_per_epoch": float(np.mean(history["seconds"])),
        "train_images_per_second": float(np.mean(history["images_per_second"])),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "counts": counts,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "failed_during_training": [{"path": p, "reason": r} for p, r in train_batches.failed],
    }
    write_json(run_dir / "metrics.json", metrics)
    log("\n" + results_table({
        f"{backend} (final)": metrics,
        f"{backend} (best, epoch {best_epoch + 1})": metrics["best"],
    }))
    log(f"\nRun directory: {run_dir}")
    return metrics


def results_table(runs: dict[str, dict]) -> str:
    """The results table, one column per run (e.g. per backend)."""
    return format_table({name: results_row(m) for name, m in runs.items()}, RESULT_ROWS)

