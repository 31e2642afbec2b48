"""`run_training`: one training run, from a data folder to a complete run directory."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from data.discovery import DatasetError, Example
from data.loader import DecodedCache, EpochSync, MRIBatches, scan_examples
from engine.backend import enable_determinism, environment, peak_memory_mb
from engine.callbacks import Checkpoints, EpochTimer, NonFiniteGuard, restore_seed_states
from engine.config import Preflight, TrainConfig, preflight
from engine.metrics import classification_report, format_table, result_rows, results_row
from engine.rundir import atomic_write, checkpoint_state, read_history, truncate_csv, write_json
from engine.schedule import Phase, carry_optimizer_state, phase_learning_rate, plan_phases
from engine.stability import StabilityMonitor
from model import build_model, load_initial_weights
from model.structure import set_backbone_trainable


class DivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good weights were kept."""


class RunStoppedError(RuntimeError):
    """An OS error (a full disk, a lost mount) stopped the run; its last checkpoint is intact."""


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
    splits = cfg.splits()
    cache = DecodedCache() if cfg.cache else None
    examples, _ = scan_examples(splits.train, cfg.image_size, cache, cfg.workers)
    return training_batches(cfg, examples, cache)


def probe_batch(cfg: TrainConfig, examples: list[Example], cache) -> tuple[np.ndarray, np.ndarray]:
    """The stability log's fixed batch: up to `batch_size` training images spread over the
    split (so over the classes), not augmented."""
    picks = np.linspace(0, len(examples) - 1, min(cfg.batch_size, len(examples))).astype(int)
    chosen = [examples[i] for i in picks]
    return MRIBatches(chosen, cfg.image_size, len(chosen), cfg.preprocess, cache=cache, workers=0).batch(0, 0)


def fit_phases(
    model: keras.Model,
    phases: list[Phase],
    train_batches: MRIBatches,
    val_batches: MRIBatches | None,
    callbacks: list[keras.callbacks.Callback],
    history_csv: Path,
    verbose: int = 1,
    log: Callable[[str], None] = print,
    resume_from: Path | None = None,
) -> dict[str, list[float]]:
    """Runs the phases one `fit` after another, recompiling between them.

    The epoch counter runs on, Adam's state (step and moments) carries over into each
    new phase's optimizer, and history.csv gets every epoch once. A callback that stops
    training (the non-finite loss guard) also ends the schedule. With `resume_from` (a
    `last.weights.h5` of this run), the phases before its epoch are skipped, the phase it
    was saved in is rebuilt and loaded with its weights, optimizer state and generators,
    and training goes on from the next epoch. Returns the history of the epochs it ran
    (history.csv holds all of them).
    """
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    history: dict[str, list[float]] = defaultdict(list)
    optimizer, epoch = None, 0
    state = checkpoint_state(resume_from) if resume_from else None
    done = state["epoch"] if state else 0
    for i, phase in enumerate(phases):
        end = epoch + phase.epochs
        if done > end:  # finished before the checkpoint's phase
            epoch = end
            continue
        restoring = state is not None and epoch < done <= end
        blocks = set_backbone_trainable(model, phase.backbone_blocks, phase.train_batchnorm)
        # Step counts at a phase's start: epochs so far times batches per epoch, as the run made them.
        start_step = int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer else epoch * len(train_batches)
        previous, optimizer = optimizer, keras.optimizers.Adam(
            phase_learning_rate(phase, len(train_batches), start_step)
        )
        model.compile(optimizer=optimizer, loss=loss,
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        optimizer.build(model.trainable_variables)
        if restoring:
            model.load_weights(resume_from)  # weights and this phase's optimizer state
            restore_seed_states(model, state["seed_states"])
            log(f"Resumed after epoch {done} (phase {phase.name}) from {resume_from}")
            if done == end:  # the checkpoint closed this phase: the next one starts afresh
                epoch = end
                continue
            previous = None
        carried = carry_optimizer_state(previous, optimizer) if previous else 0
        for callback in callbacks:
            if isinstance(callback, StabilityMonitor):
                callback.phase = phase.name
        log(f"Phase {phase.name}: epochs {epoch + 1}-{epoch + phase.epochs}, "
            f"{len(model.trainable_variables)} trainable tensors, backbone blocks training: "
            f"{_describe_blocks(blocks, phase.backbone_blocks)}, lr {phase.learning_rate:g} "
            f"({phase.schedule}{f', warmup {phase.warmup_epochs:g} epochs' if phase.warmup_epochs else ''})"
            + (f", {carried} optimizer variables carried over" if previous else ""))
        phase_history = model.fit(
            train_batches,
            validation_data=val_batches,
            initial_epoch=done if restoring else epoch,
            epochs=end,
            shuffle=False,  # The order is the pipeline's own seeded permutation.
            callbacks=_before_checkpoints(
                callbacks, keras.callbacks.CSVLogger(str(history_csv), append=i > 0 or done > 0)),
            verbose=verbose,
        ).history
        for key, values in phase_history.items():
            history[key] += values
        epoch = (done if restoring else epoch) + len(phase_history.get("loss", []))
        if model.stop_training:
            break
    return dict(history)


def _before_checkpoints(callbacks: list, csv_logger) -> list:
    """history.csv gets its row before the checkpoint is written, so a resume finds a row for
    every checkpointed epoch (and drops one written just before a crash)."""
    at = next((k for k, c in enumerate(callbacks) if isinstance(c, Checkpoints)), len(callbacks))
    return [*callbacks[:at], csv_logger, *callbacks[at:]]


def _describe_blocks(blocks: list[str], requested: int | None) -> str:
    if requested is None:
        return "all"
    return ", ".join(blocks) if blocks else "none (frozen)"


def _predict(model: keras.Model, examples: list[Example], cfg: TrainConfig, cache) -> tuple[np.ndarray, np.ndarray]:
    batches = MRIBatches(
        examples, cfg.image_size, cfg.batch_size, cfg.preprocess, cache=cache, workers=cfg.workers
    )
    logits = model.predict(batches, verbose=0)
    return np.asarray(logits, dtype=np.float32), batches.labels


def _evaluate(model, val, test, cfg: TrainConfig, cache, classes: list[str], leaked: set[str]) -> dict:
    reports = {
        "val": classification_report(*_predict(model, val, cfg, cache), classes) if val else None,
        "test": classification_report(*_predict(model, test, cfg, cache), classes) if test else None,
    }
    clean = [e for e in test if e.path not in leaked]
    if cfg.finds_twins and clean:  # the test images with no twin in the training pool
        reports["test_leakage_free"] = classification_report(*_predict(model, clean, cfg, cache), classes)
    return reports


def run_training(cfg: TrainConfig, checked: Preflight | None = None, log: Callable[[str], None] = print,
                 resume: bool = False) -> dict:
    """Trains the classifier as `cfg` says and fills the run directory.

    Writes config.json, initial.weights.h5, history.csv, last.weights.h5, best.weights.h5,
    stability.csv, stability.png, model.keras, skipped.txt and metrics.json; returns the
    metrics. Raises `DivergedError` on a non-finite loss (without writing the model or
    the metrics; the checkpoints hold the last good epoch) and `RunStoppedError` when an OS
    error (e.g. a full disk) stops it (the last checkpoint stays whole). With `resume`, `cfg.out` is an
    interrupted run of these options: it goes on after its last checkpointed epoch.
    """
    backend = keras.backend.backend()
    checked = checked or preflight(cfg, resume=resume)
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
    if cfg.finds_twins:
        _record_leakage(run_dir, cfg, splits, len(test), log)
    counts = dataclasses.replace(splits, train=train, val=val, test=test).counts()

    determinism = enable_determinism() if cfg.deterministic else None
    keras.utils.set_random_seed(cfg.seed)
    last = run_dir / "last.weights.h5"
    state = checkpoint_state(last) if resume else None
    # Resuming, every variable comes from the checkpoint: the backbone's start does not matter.
    model = build_model(cfg.model_spec(), len(splits.classes), cfg.image_size, "none" if resume else cfg.weights)
    if cfg.init_weights and not resume:
        load_initial_weights(model, cfg.init_weights)
    phases = plan_phases(cfg)
    if resume:
        done = state["epoch"]
        config = json.loads((run_dir / "config.json").read_text())
        if config.get("counts") not in (None, counts):
            raise DatasetError(f"--resume: the data changed since the run started (images per split and class "
                               f"were {config['counts']}, now {counts}); start a new run")
        best = run_dir / "best.weights.h5"
        if state["best_epoch"] == done and (not best.exists() or (checkpoint_state(best) or {}).get("epoch") != done):
            with atomic_write(best) as tmp:  # the crash came between the two files
                shutil.copyfile(last, tmp)
        for name in ("history.csv", "stability.csv"):  # rows past the checkpoint are redone
            truncate_csv(run_dir / name, done)
        config["resumed"] = [*config.get("resumed", []), {"after_epoch": done, "environment": environment()}]
        write_json(run_dir / "config.json", config)
    else:
        done = 0
        model.save_weights(run_dir / "initial.weights.h5")
        _write_config(run_dir, cfg, phases, splits, counts, skipped, cache, determinism)

    train_batches = training_batches(cfg, train, cache)
    val_batches = (
        MRIBatches(val, cfg.image_size, cfg.batch_size, cfg.preprocess, cache=cache, workers=cfg.workers)
        if val else None
    )
    monitor = "val_accuracy" if val else "accuracy"
    guard, checkpoints = NonFiniteGuard(), Checkpoints(run_dir, monitor, state)
    stability = StabilityMonitor(*probe_batch(cfg, train, cache), run_dir, resume_epochs=done)
    with _os_errors_stop_the_run(checkpoints, run_dir):
        fit_phases(
            model, phases, train_batches, val_batches,
            # Order matters: the timer and the stability log add to the logs history.csv gets.
            [EpochSync(train_batches), EpochTimer(len(train)), guard, stability, checkpoints],
            run_dir / "history.csv", cfg.verbose, log, resume_from=last if resume else None,
        )
    history = read_history(run_dir)  # every epoch, also those before a resume
    if guard.event:
        raise DivergedError(_diverged_message(guard.event, checkpoints, run_dir))
    with _os_errors_stop_the_run(checkpoints, run_dir), atomic_write(run_dir / "model.keras") as tmp:
        model.save(tmp)

    leaked = set(splits.leaked_test)
    final = _evaluate(model, val, test, cfg, cache, splits.classes, leaked)
    best_epoch = checkpoints.best_epoch - 1
    with warnings.catch_warnings():
        # The file also holds the optimizer of its epoch's phase; only the model's weights matter here.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(run_dir / "best.weights.h5")
    best = _evaluate(model, val, test, cfg, cache, splits.classes, leaked)
    metrics = {
        "backend": backend,
        "model": cfg.model,
        "epochs": len(history["loss"]),
        "phases": [{"name": p.name, "epochs": p.epochs} for p in phases],
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
        "stability": stability.summary(),
        "counts": counts,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "failed_during_training": [{"path": p, "reason": r} for p, r in train_batches.failed],
    }
    with _os_errors_stop_the_run(checkpoints, run_dir):
        write_json(run_dir / "metrics.json", metrics)
    log("\n" + results_table({
        f"{backend} (final)": metrics,
        f"{backend} (best, epoch {best_epoch + 1})": metrics["best"],
    }))
    log(f"\nRun directory: {run_dir}")
    return metrics


def _write_config(run_dir: Path, cfg: TrainConfig, phases: list[Phase], splits, counts: dict, skipped: list,
                  cache, determinism) -> None:
    """config.json: every option, the phases, the data and the environment of the run."""
    write_json(run_dir / "config.json", {
        "options": dataclasses.asdict(cfg),
        "phases": [dataclasses.asdict(p) for p in phases],
        "classes": splits.classes,
        "test_source": splits.test_source,
        "counts": counts,
        "skipped_files": len(skipped),
        "leakage": {"dropped_training_images": len(splits.dropped),
                    "test_images_with_a_training_twin": len(splits.leaked_test)} if cfg.finds_twins else None,
        "ignored_files": len(splits.ignored),
        "decoded_cache_mb": round(cache.nbytes / 2**20, 1) if cache is not None else 0,
        "deterministic": determinism,
        "environment": environment(),
    })


def _record_leakage(run_dir: Path, cfg: TrainConfig, splits, test_count: int, log: Callable[[str], None]) -> None:
    """leakage.json: the test images with a twin in the training pool, and every training
    image --dedup dropped and why."""
    twins = sum("twin of test image" in why for _, why in splits.dropped)
    write_json(run_dir / "leakage.json", {
        "dedup": cfg.dedup,
        "test_images_with_a_training_twin": splits.leaked_test,
        "dropped": [{"path": p, "why": why} for p, why in splits.dropped],
    })
    log(f"{len(splits.leaked_test)} of {test_count} test images have a twin in the training pool"
        + (f"; --dedup dropped {len(splits.dropped)} training images ({twins} twins of test images, "
           f"{len(splits.dropped) - twins} copies inside Training)" if cfg.dedup else "")
        + f" (list in {run_dir / 'leakage.json'})")


def _diverged_message(event: dict, checkpoints: Checkpoints, run_dir: Path) -> str:
    kept = (f"the last good weights (epoch {checkpoints.last_epoch}) are in {checkpoints.last}"
            if checkpoints.last_epoch else f"no epoch finished; the starting weights are in {run_dir / 'initial.weights.h5'}")
    return (f"non-finite loss ({event['loss']}) in epoch {event['epoch']}, batch {event['batch']}: training stopped; "
            f"{kept}; {run_dir / 'stability.csv'} shows the gradient norms and activations that led there "
            f"(try a lower learning rate)")


@contextlib.contextmanager
def _os_errors_stop_the_run(checkpoints: Checkpoints, run_dir: Path):
    """Turns an OS error while training or writing the run (e.g. no space left on the
    device) into `RunStoppedError`, saying which checkpoint is intact and how to go on."""
    try:
        yield
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        kept = (f"the last checkpoint ({checkpoints.last}, epoch {checkpoints.last_epoch}) is intact; "
                f"fix the cause and continue with --resume {run_dir}"
                if checkpoints.last_epoch else "no epoch was checkpointed; fix the cause and start the run again")
        raise RunStoppedError(f"training stopped by an OS error ({reason}); {kept}") from e


def results_table(runs: dict[str, dict]) -> str:
    """The results table, one column per run (e.g. per backend)."""
    return format_table({name: results_row(m) for name, m in runs.items()}, result_rows(list(runs.values())))

