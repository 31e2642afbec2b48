"""`run_training`: one training run, from a data folder to a complete run directory.

The steps, each a function a reader finds here: `load_data` (decode the splits once),
`build_run_model` (the starting point), `start_run_dir` (initial weights and config.json;
a resume reconciles the interrupted directory instead, see training.resume), `train_model`
(`fit_phases` with the run's callbacks), `score_and_write` (model.keras, metrics.json) and
`finish_run_dir` (the checkpoints --keep-checkpoints does not keep).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np

from backend import distribute
from backend.determinism import enable_determinism, set_random_seed
from backend.devices import devices, is_out_of_memory, peak_memory_mb
from backend.selection import environment, tensorflow_kept_out
from checksums import file_sha256
from data.discovery import TEST_DIR, TRAIN_DIR, DatasetError, Example, Splits
from data.fingerprint import FINGERPRINT_FILE, Digest, cross_split_copies, fingerprint, write_fingerprint
from data.loader import DecodedCache, EpochSync, MRIBatches, scan_examples
from errors import UserInputError
from model import ModelSpec, build_model, load_initial_weights
from model.structure import set_backbone_trainable
from model.weights import IMAGENET_NOTOP_FILE, keras_models_dir, resolve_arch, resolve_backbone_weights
from training.callbacks import (
    HDF5_MARGIN,
    Checkpoints,
    EpochTimer,
    HistoryCSV,
    NonFiniteGuard,
    SignalStop,
    SignalStopError,
    load_model_weights,
    restore_seed_states,
    save_weights,
    weights_nbytes,
)
from training.config import Preflight, TrainConfig, preflight
from training.metrics import classification_report, format_table, result_rows, results_row
from training.precise_bn import PreciseBatchNormEachEpoch, recompute_after_epoch
from training.resume import reconcile_run_dir
from training.rundir import (
    BEST,
    INITIAL,
    LAST,
    MODEL_FILE,
    PREDICTIONS_FILE,
    atomic_write,
    check_free_space,
    checkpoint_state,
    new_run_id,
    read_history,
    write_csv,
    write_json,
)
from training.schedule import (
    Phase,
    carry_optimizer_state,
    phase_learning_rate,
    phase_optimizer,
    plan_phases,
    training_loss,
)
from training.stability import StabilityMonitor


class DivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good weights were kept."""


class RunStoppedError(RuntimeError):
    """An OS error (a full disk, a lost mount) stopped the run; its last checkpoint is intact."""


class RunInterruptedError(RuntimeError):
    """SIGINT or SIGTERM stopped the run at a safe point; `exit_code` is the shell's 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _scan(name: str, examples: list[Example], cfg: TrainConfig, cache, log,
          notes: list[tuple[str, str]], digests: dict[str, Digest] | None) -> tuple[list[Example], list]:
    if not examples:
        return [], []
    bar = keras.utils.Progbar(len(examples), verbose=1 if cfg.verbose else 0, unit_name="image")
    log(f"Decoding {len(examples)} {name} images at {cfg.decoded_size} px")
    good, skipped = scan_examples(examples, cfg.decoded_size, cache, cfg.workers, progress=bar.update, notes=notes,
                                  digests=digests)
    for path, reason in skipped:
        log(f"  skipped {path}: {reason}")
    return good, skipped


def training_batches(cfg: TrainConfig, examples: list[Example], cache: DecodedCache | None) -> MRIBatches:
    """The training batches exactly as `fit` gets them (also what `pipeline-hash` hashes)."""
    return MRIBatches(
        examples, cfg.image_size, cfg.batch_size, cfg.preprocess, cfg.augment_config(),
        shuffle=True, seed=cfg.seed, cache=cache, workers=cfg.workers, decode_size=cfg.decoded_size,
    )


def scanned_training_batches(cfg: TrainConfig, examples: list[Example] | None = None) -> MRIBatches:
    """`training_batches` of `examples` (default: `cfg.data_dir`'s training split), decoded once
    into the cache, unreadable files left out."""
    cache = DecodedCache() if cfg.cache else None
    examples, _ = scan_examples(cfg.splits().train if examples is None else examples, cfg.decoded_size, cache,
                                cfg.workers)
    return training_batches(cfg, examples, cache)


def evaluation_batches(cfg: TrainConfig, examples: list[Example], cache: DecodedCache | None,
                       batch_size: int | None = None, workers: int | None = None) -> MRIBatches:
    """Unaugmented batches in file order, as the run's evaluation sees its images (decoded at
    the decode size, then the centre crop): one place, so no evaluation forgets the decode size."""
    return MRIBatches(examples, cfg.image_size, cfg.batch_size if batch_size is None else batch_size, cfg.preprocess,
                      cache=cache, workers=cfg.workers if workers is None else workers, decode_size=cfg.decoded_size)


def probe_batch(cfg: TrainConfig, examples: list[Example], cache) -> tuple[np.ndarray, np.ndarray]:
    """The stability log's fixed batch: up to `batch_size` training images spread over the
    split (so over the classes), not augmented."""
    picks = np.linspace(0, len(examples) - 1, min(cfg.batch_size, len(examples))).astype(int)
    chosen = [examples[i] for i in picks]
    return evaluation_batches(cfg, chosen, cache, batch_size=len(chosen), workers=0).batch(0, 0)


def fit_phases(
    model: keras.Model,
    phases: list[Phase],
    train_batches: MRIBatches,
    val_batches: MRIBatches | None,
    callbacks: list[keras.callbacks.Callback],
    history_csv: Path | None,
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
    history: dict[str, list[float]] = defaultdict(list)
    optimizer, epoch = None, 0
    state = checkpoint_state(resume_from) if resume_from else None
    done = state["epoch"] if state else 0
    for i, phase in enumerate(phases):
        first, end = epoch, epoch + phase.epochs
        epoch = end
        if done > end:  # finished before the checkpoint's phase
            continue
        previous, optimizer, blocks = optimizer, *compile_phase(model, phase, optimizer, len(train_batches), first)
        if state is not None and first < done <= end:  # the checkpoint's phase: its state, not the carried one
            _restore_checkpoint(model, resume_from, state, phase, log)
            previous, first = None, done
            if done == end:  # the checkpoint closed this phase: the next one starts afresh
                continue
        carried = carry_optimizer_state(previous, optimizer) if previous else 0
        for callback in callbacks:
            if isinstance(callback, StabilityMonitor):
                callback.phase = phase.name
        _log_phase(log, phase, first, end, model, blocks, carried if previous else None)
        phase_history = model.fit(
            train_batches,
            validation_data=val_batches,
            initial_epoch=first,
            epochs=end,
            shuffle=False,  # The order is the pipeline's own seeded permutation.
            callbacks=_before_checkpoints(callbacks, HistoryCSV(history_csv, append=i > 0 or done > 0))
            if history_csv else callbacks,
            verbose=verbose,
        ).history
        for key, values in phase_history.items():
            history[key] += values
        if model.stop_training:
            break
    return dict(history)


def compile_phase(model: keras.Model, phase: Phase, previous: keras.optimizers.Optimizer | None,
                   steps_per_epoch: int, epoch: int) -> tuple[keras.optimizers.Optimizer, list[str]]:
    """Sets what trains in `phase` and compiles the model with the phase's new Adam (built, so
    a checkpoint or the previous phase's state can be loaded into it)."""
    blocks = set_backbone_trainable(model, phase.backbone_blocks, phase.train_batchnorm)
    # Step counts at a phase's start: epochs so far times batches per epoch, as the run made them.
    start_step = int(keras.ops.convert_to_numpy(previous.iterations)) if previous else epoch * steps_per_epoch
    optimizer = phase_optimizer(phase, phase_learning_rate(phase, steps_per_epoch, start_step), model.trainable_variables)
    # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer here (float16 gradients
    # would underflow without loss scaling); bfloat16 has float32's range and needs none.
    model.compile(optimizer=optimizer, loss=training_loss(phase.label_smoothing),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=phase.jit_compile, steps_per_execution=phase.steps_per_execution)
    optimizer = model.optimizer  # the Adam, or the LossScaleOptimizer around it
    optimizer.build(model.trainable_variables)
    return optimizer, blocks


def _restore_checkpoint(model: keras.Model, path: Path, state: dict, phase: Phase, log: Callable[[str], None]) -> None:
    """Loads a `last.weights.h5` into the model compiled for its phase: weights, that phase's
    optimizer state and the dropout generators."""
    model.load_weights(path)
    restore_seed_states(model, state["seed_states"])
    log(f"Resumed after epoch {state['epoch']} (phase {phase.name}) from {path}")


def _log_phase(log: Callable[[str], None], phase: Phase, first: int, end: int, model: keras.Model,
               blocks: list[str], carried: int | None) -> None:
    log(f"Phase {phase.name}: epochs {first + 1}-{end}, "
        f"{len(model.trainable_variables)} trainable tensors, backbone blocks training: "
        f"{_describe_blocks(blocks, phase.backbone_blocks)}, lr {phase.learning_rate:g} "
        f"({phase.schedule}{f', warmup {phase.warmup_epochs:g} epochs' if phase.warmup_epochs else ''})"
        + (f", {carried} optimizer variables carried over" if carried is not None else ""))


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
    batches = evaluation_batches(cfg, examples, cache)
    logits = distribute.predict(model, batches, len(examples))  # on every replica
    return np.asarray(logits, dtype=np.float32), batches.labels


def _evaluate(model: keras.Model, data: RunData, cfg: TrainConfig) -> tuple[dict, np.ndarray | None]:
    """The classification report of the validation and test splits (and of the test images
    with no twin in the training pool, when the run looked for twins), and the predicted class
    of each test image (None without a test split)."""
    classes, cache = data.splits.classes, data.cache
    reports = {
        "val": classification_report(*_predict(model, data.val, cfg, cache), classes) if data.val else None,
        "test": None,
    }
    if not data.test:
        return reports, None
    logits, labels = _predict(model, data.test, cfg, cache)
    reports["test"] = classification_report(logits, labels, classes)
    leaked = set(data.splits.leaked_test)
    clean = np.array([e.path not in leaked for e in data.test])
    if cfg.finds_twins and clean.any():
        reports["test_leakage_free"] = classification_report(logits[clean], labels[clean], classes)
    return reports, np.argmax(logits, axis=-1)


def write_test_predictions(path: Path, data: RunData, final: np.ndarray, best: np.ndarray) -> None:
    """test_predictions.csv: each test image's label and the class predicted with the final and
    with the best epoch's weights, so two runs on the same test images can be compared image by
    image (a paired test between backends: studies.stats.mcnemar)."""
    leaked = set(data.splits.leaked_test)
    write_csv(path, [
        {"path": e.path, "label": e.label, "final": int(f), "best": int(b), "twin_in_training": int(e.path in leaked)}
        for e, f, b in zip(data.test, final, best, strict=True)
    ])


@dataclasses.dataclass
class RunData:
    """A run's splits after decoding: the examples that can be read, and what was skipped."""

    splits: Splits
    train: list[Example]
    val: list[Example]
    test: list[Example]
    skipped: list[tuple[str, str]]
    cache: DecodedCache | None
    decode_notes: list[tuple[str, str]]
    digests: dict[str, Digest] | None  # per file read: size and SHA-256 (data.fingerprint); None when resumed

    @property
    def counts(self) -> dict:
        """Images per split and class, as trained on (a resume checks them)."""
        return dataclasses.replace(self.splits, train=self.train, val=self.val, test=self.test).counts()


def load_data(cfg: TrainConfig, checked: Preflight, log: Callable[[str], None], record: bool = True) -> RunData:
    """Decodes every split once (into the cache), lists the files that could not be read in
    skipped.txt, and writes leakage.json when the run looks for twins."""
    run_dir, splits = checked.run_dir, checked.splits
    cache = DecodedCache() if cfg.cache else None
    notes: list[tuple[str, str]] = []
    digests: dict[str, Digest] | None = {} if record else None  # a resumed run's data was checked, not recorded again
    decoded = {name: _scan(name, examples, cfg, cache, log, notes, digests)
               for name, examples in (("training", splits.train), ("validation", splits.val), ("test", splits.test))}
    skipped = [item for _, skipped in decoded.values() for item in skipped]
    with atomic_write(run_dir / "skipped.txt") as tmp:
        tmp.write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
    if skipped:
        log(f"Skipped {len(skipped)} unreadable files (list in {run_dir / 'skipped.txt'})")
    if notes:  # what the decoder did to images whose values are not plain 8-bit: said, not silent
        with atomic_write(run_dir / "decode-report.txt") as tmp:
            tmp.write_text("".join(f"{p}\t{n}\n" for p, n in notes))
        log(f"Read {len({p for p, _ in notes})} images other than as stored (values not plain 8-bit rescaled, "
            f"EXIF orientation applied; list in {run_dir / 'decode-report.txt'})")
    if not decoded["training"][0]:
        raise DatasetError(f"no readable training images in {cfg.data_dir}")
    if cfg.finds_twins:
        _record_leakage(run_dir, cfg, splits, len(decoded["test"][0]), log)
    return RunData(splits, decoded["training"][0], decoded["validation"][0], decoded["test"][0], skipped, cache, notes,
                   digests)


def build_run_model(cfg: TrainConfig, num_classes: int, resume: bool, run_dir: Path | None) -> keras.Model:
    """The model at its starting point: the backbone's weights (or the whole --init-weights
    file) loaded, the other layers initialised from --seed. Resuming, every variable comes
    from the checkpoint, so the backbone's start does not matter and nothing is loaded.

    What Keras warns while building and loading (a file that does not fit lists hundreds of
    layers) goes to warnings.log in the run directory, not in front of the one-line error
    (nowhere on a process that writes nothing: `run_dir` None). Data-parallel processes all
    start from the weights of the first (`same_start`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_random_seed(cfg.seed)
        model = build_model(cfg.model_spec(), num_classes, cfg.image_size, "none" if resume else cfg.weights)
        if cfg.init_weights and not resume:
            load_initial_weights(model, cfg.init_weights)
    distribute.same_start(model)
    if caught and run_dir is not None:
        log_file = run_dir / "warnings.log"
        earlier = log_file.read_text() if log_file.exists() else ""  # a resumed run adds to it
        with atomic_write(log_file) as tmp:
            tmp.write_text(earlier + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught))
    return model


def start_run_dir(run_dir: Path, cfg: TrainConfig, model: keras.Model, phases: list[Phase], data: RunData,
                  determinism: dict | None, log: Callable[[str], None] = print) -> str:
    """initial.weights.h5 (a run started from an --init-weights file records that file and
    its SHA-256 instead of copying it) and config.json; returns the new run's id."""
    start = Path(cfg.init_weights) if cfg.init_weights else run_dir / INITIAL
    if not cfg.init_weights:
        save_weights(model, start)
    run_id = new_run_id()
    _write_config(run_dir, cfg, phases, data, determinism, start, run_id, _record_data(run_dir, cfg, data, log))
    return run_id


def _record_data(run_dir: Path, cfg: TrainConfig, data: RunData, log: Callable[[str], None]) -> dict:
    """data-fingerprint.tsv: every image file of the data folder with its size and SHA-256 (those
    the decode pass read are not read again), so a later command can tell this data from other
    data; and the images that are in both Training/ and Testing/ byte for byte, said on the console."""
    prints = fingerprint(cfg.data_dir, data.digests)
    record = {"file": FINGERPRINT_FILE, "files": len(prints), "sha256": write_fingerprint(run_dir / FINGERPRINT_FILE,
                                                                                          prints)}
    if data.splits.test_source.startswith(TEST_DIR):
        copies = cross_split_copies(prints)
        record["copies_in_training_and_testing"] = len(copies)
        log(f"{len(copies)} images of {TEST_DIR}/ are byte-identical copies of images in {TRAIN_DIR}/"
            + (f" (first: {copies[0][0]} = {copies[0][1]}; `audit` lists them, --dedup drops them from training)"
               if copies else ""))
    return record


class Trained(NamedTuple):
    """What `train_model` hands `score_and_write`."""

    checkpoints: Checkpoints
    stability: StabilityMonitor
    train_batches: MRIBatches
    precise_callback: PreciseBatchNormEachEpoch | None  # --precise-bn: it knows the last epoch it recomputed


def train_model(cfg: TrainConfig, model: keras.Model, phases: list[Phase], data: RunData, run_dir: Path,
                state: dict | None, run_id: str | None, log: Callable[[str], None],
                stop: SignalStop | None = None) -> Trained:
    """Fits the phases with the run's callbacks (from the checkpoint's epoch when `state` is a
    resumed run's); raises `DivergedError` when the loss became non-finite."""
    train_batches = training_batches(cfg, data.train, data.cache)
    val_batches = (
        evaluation_batches(cfg, data.val, data.cache) if data.val else None
    )
    guard, checkpoints = NonFiniteGuard(), Checkpoints(run_dir, "val_accuracy" if data.val else "accuracy", state,
                                                  run_id)
    # --precise-bn: the validation runs after the statistics are recomputed, in the callback.
    precise = ([PreciseBatchNormEachEpoch(train_batches, distribute.for_evaluation(val_batches)
                                          if val_batches is not None else None, cfg.precise_bn)]
               if cfg.precise_bn else [])
    fit_validation = None if precise or val_batches is None else distribute.for_evaluation(val_batches)
    stability = StabilityMonitor(*probe_batch(cfg, data.train, data.cache), run_dir,
                                 resume_epochs=state["epoch"] if state else 0)
    with _out_of_memory_stops_the_run(checkpoints, cfg):
        fit_phases(
            model, phases, distribute.for_training(train_batches), fit_validation,
            # Order matters: the replicas' callback averages the training logs over processes
            # first; precise BN's validation adds to them before the checkpoints read them; the
            # timer and the stability log add to the logs history.csv gets.
            [*distribute.replica_callbacks(model), *precise, EpochSync(train_batches), EpochTimer(len(data.train)),
             guard, stability, checkpoints, *([stop] if stop else [])],
            run_dir / "history.csv", cfg.verbose, log, resume_from=run_dir / LAST if state else None,
        )
    if guard.event:
        raise DivergedError(_diverged_message(guard.event, checkpoints, run_dir, cfg))
    return Trained(checkpoints, stability, train_batches, precise[0] if precise else None)


def score_and_write(model: keras.Model, cfg: TrainConfig, data: RunData, run_dir: Path, phases: list[Phase],
                    trained: Trained, log: Callable[[str], None]) -> dict:
    """model.keras (the final weights), the metrics of the final and the best epoch's weights
    in metrics.json, and the results table in the log."""
    checkpoints = trained.checkpoints
    with _out_of_memory_stops_the_run(checkpoints, cfg):
        precise_record = _precise_batchnorm(model, cfg, trained, sum(p.epochs for p in phases), log)
    save_model_file(model, run_dir / MODEL_FILE)
    with _out_of_memory_stops_the_run(checkpoints, cfg):
        final, final_predicted = _evaluate(model, data, cfg)
        # best.weights.h5 already holds precise statistics: they were recomputed (from the first
        # batches of the epoch after it) before the validation that chose it.
        load_model_weights(model, run_dir / BEST)
        best, best_predicted = _evaluate(model, data, cfg)
    if final_predicted is not None:
        write_test_predictions(run_dir / PREDICTIONS_FILE, data, final_predicted, best_predicted)
    history = read_history(run_dir)  # every epoch, also those before a resume
    metrics = _metrics(cfg, model, phases, history, final, best, trained, data)
    metrics["precise_bn"] = precise_record
    # Which run the files belong to: evaluate, report and --resume check them (check_run_files).
    metrics.update(run_id=checkpoints.run_id, model_sha256=file_sha256(run_dir / MODEL_FILE))
    write_json(run_dir / "metrics.json", metrics)
    broken = [f"{split} loss {report['loss']}" for split, report in final.items()
              if report is not None and not math.isfinite(report["loss"])]
    if broken:  # written for inspection, but not a result: the command fails
        raise DivergedError(f"the final evaluation is non-finite ({', '.join(broken)}); metrics.json in {run_dir} "
                            f"shows it; the weights in {run_dir / MODEL_FILE} are finite, the inputs may not be")
    backend = metrics["backend"]
    log("\n" + results_table({
        f"{backend} (final)": metrics,
        f"{backend} (best, epoch {checkpoints.best_epoch})": metrics["best"],
    }))
    return metrics


def _precise_batchnorm(model: keras.Model, cfg: TrainConfig, trained: Trained, epoch: int,
                       log: Callable[[str], None]) -> dict | None:
    """`--precise-bn N`: the moving statistics from the first N batches of epoch `epoch`, the one after the
    last (the pipeline's own, augmented as in training, the same bytes on every backend). The
    callback did exactly that at the last epoch's end, unless this process trained no epoch (a
    resume after the last one): then it is done here."""
    if not cfg.precise_bn:
        return None
    done = trained.precise_callback.recomputed if trained.precise_callback else None
    if done is None or done["epoch"] != epoch:
        used, layers = recompute_after_epoch(model, trained.train_batches, epoch, cfg.precise_bn)
        done = {"batches": used, "layers": layers, "epoch": epoch}
    log(f"Precise BatchNorm: {done['layers']} layers' moving statistics recomputed from {done['batches']} "
        f"training batches (the first of epoch {epoch + 1}, after the last)")
    return done


def _metrics(cfg: TrainConfig, model: keras.Model, phases: list[Phase], history: dict, final: dict, best: dict,
             trained: Trained, data: RunData) -> dict:
    checkpoints, stability, train_batches = trained.checkpoints, trained.stability, trained.train_batches
    best_epoch = checkpoints.best_epoch - 1
    return {
        "backend": keras.backend.backend(),
        "model": cfg.model,
        "epochs": len(history["loss"]),
        "phases": [{"name": p.name, "epochs": p.epochs} for p in phases],
        "train": {"loss": history["loss"][-1], "accuracy": history["accuracy"][-1]},
        **final,
        "best": {
            "epoch": best_epoch + 1,
            "monitor": checkpoints.monitor,
            "train": {"loss": history["loss"][best_epoch], "accuracy": history["accuracy"][best_epoch]},
            **best,
        },
        # What "auto" became: XLA for jax, for tensorflow only with a GPU and without
        # op determinism, never for torch (True there would mean torch.compile).
        "jit_compile": bool(model.jit_compile),
        "seconds_per_epoch": float(np.mean(history["seconds"])),
        "train_images_per_second": float(np.mean(history["images_per_second"])),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "data_parallel": distribute.active().record(cfg.batch_size),
        "stability": stability.summary(),
        "counts": data.counts,
        "skipped": [{"path": p, "reason": r} for p, r in data.skipped],
        "failed_during_training": [{"path": p, "reason": r} for p, r in train_batches.failed],
    }


def finish_run_dir(run_dir: Path, keep: str) -> None:
    """Removes the checkpoints that `--keep-checkpoints` does not keep, once metrics.json is
    written (until then they are what a resume needs): `best` drops last.weights.h5 (model.keras
    holds the same weights without Adam's moments), `none` drops best.weights.h5 too."""
    drop = {"all": (), "best": (LAST,), "none": (LAST, BEST)}[keep]
    for name in drop:
        (run_dir / name).unlink(missing_ok=True)


def run_training(cfg: TrainConfig, checked: Preflight | None = None, log: Callable[[str], None] = print,
                 resume: bool = False) -> dict:
    """Trains the classifier as `cfg` says and fills the run directory; returns the metrics.

    The steps: `load_data`, `build_run_model`, `start_run_dir` (or, with `resume`,
    `reconcile_run_dir` of the interrupted run in `cfg.out`), `train_model`, `score_and_write`,
    `finish_run_dir`. Writes config.json, initial.weights.h5, history.csv, the checkpoints,
    stability.csv/png, model.keras, skipped.txt and metrics.json. Raises `DivergedError` on a
    non-finite loss (without writing the model or the metrics; the checkpoints hold the last
    good epoch) and `RunStoppedError` when an OS error (e.g. a full disk) stops it (the last
    checkpoint stays whole).
    """
    checked = checked or preflight(cfg, resume=resume)
    with tensorflow_kept_out(), distribute.replicas(cfg.devices) as replica:  # the model is built and compiled inside
        if not replica.writes:
            return _run_in_step(cfg, checked, resume)
        return _run(cfg, checked, log, resume)


def _run(cfg: TrainConfig, checked: Preflight, log: Callable[[str], None], resume: bool) -> dict:
    stop = SignalStop()
    with stop.installed(), _signals_stop_the_run(checked.run_dir), _os_errors_stop_the_run(checked.run_dir):
        return _run_steps(cfg, checked, log, resume, stop)


def _run_steps(cfg: TrainConfig, checked: Preflight, log: Callable[[str], None], resume: bool,
               stop: SignalStop) -> dict:
    run_dir = checked.run_dir
    determinism = enable_determinism() if cfg.deterministic else None
    with checked.undone_on_input_errors():  # bad weights or no readable image: no run folder left
        model = build_run_model(cfg, len(checked.splits.classes), resume, checked.run_dir)
        log(f"Run directory: {run_dir}")
        log(f"Backend: {keras.backend.backend()} on {', '.join(devices())}; classes: {', '.join(checked.splits.classes)}; "
            f"test set: {checked.splits.test_source}")
        if distribute.active().devices > 1:
            log(_describe_replicas(cfg))
        for note in checked.notes:
            log(f"note: {note}")
        data = load_data(cfg, checked, log, record=not resume)
    phases = plan_phases(cfg)
    if resume:
        state = reconcile_run_dir(run_dir, data.counts)
        run_id = state.get("run_id")
    else:
        state, run_id = None, start_run_dir(run_dir, cfg, model, phases, data, determinism, log)
    trained = train_model(cfg, model, phases, data, run_dir, state, run_id, log, stop)
    metrics = score_and_write(model, cfg, data, run_dir, phases, trained, log)
    finish_run_dir(run_dir, cfg.keep_checkpoints)
    log(f"\nRun directory: {run_dir}")
    return metrics


def _describe_replicas(cfg: TrainConfig) -> str:
    replica = distribute.active()
    return (f"Data parallel: {replica.devices} replicas ({replica.engine}), {cfg.batch_size // replica.devices} "
            f"images each of every global batch of {cfg.batch_size}; BatchNorm {replica.batchnorm}")


def _run_in_step(cfg: TrainConfig, checked: Preflight, resume: bool) -> dict:
    """A data-parallel process besides rank 0 (torch): the same model, phases and batch order as
    rank 0, its own share of each batch, stepping with rank 0 (gradients averaged in every step),
    and nothing written or printed; rank 0 evaluates and writes the run. Resuming, it reads the
    run's last checkpoint as rank 0 does. Returns {} (the metrics are rank 0's)."""
    if cfg.deterministic:
        enable_determinism()
    model = build_run_model(cfg, len(checked.splits.classes), resume, None)
    batches = scanned_training_batches(cfg, checked.splits.train)
    last = Path(cfg.out) / LAST if resume else None
    fit_phases(model, plan_phases(cfg), distribute.for_training(batches), None,
               [*distribute.replica_callbacks(model), EpochSync(batches)], None, verbose=0, log=lambda _: None,
               resume_from=last)
    return {}


def _write_config(run_dir: Path, cfg: TrainConfig, phases: list[Phase], data: RunData, determinism: dict | None,
                  start: Path, run_id: str, data_record: dict) -> None:
    """config.json: every option, the phases, the data, the starting weights' SHA-256 and the
    environment of the run."""
    splits = data.splits
    write_json(run_dir / "config.json", {
        "run_id": run_id,
        "options": dataclasses.asdict(cfg),
        # Where the data was, wherever the run is resumed or evaluated from (the option as given may be relative).
        "data_dir_absolute": str(Path(cfg.data_dir).resolve()),
        "data_fingerprint": data_record,  # which files, byte for byte: checked by --resume, evaluate, report
        "phases": [dataclasses.asdict(p) for p in phases],
        "classes": splits.classes,
        "test_source": splits.test_source,
        "counts": data.counts,
        "skipped_files": len(data.skipped),
        "rescaled_images": len(data.decode_notes),
        "leakage": {"dropped_training_images": len(splits.dropped),
                    "test_images_with_a_training_twin": len(splits.leaked_test)} if cfg.finds_twins else None,
        "ignored_files": len(splits.ignored),
        "ignored": splits.ignored,  # non-image files, and symlinked folders (ending in /), not followed
        "decoded_cache_mb": round(data.cache.nbytes / 2**20, 1) if data.cache is not None else 0,
        "deterministic": determinism,
        "starting_weights": starting_weights_record(cfg.weights, start),
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


def _diverged_message(event: dict, checkpoints: Checkpoints, run_dir: Path, cfg: TrainConfig) -> str:
    start = cfg.init_weights or run_dir / INITIAL
    kept = (f"the last finite weights (epoch {checkpoints.last_epoch}) are in {checkpoints.last}"
            if checkpoints.last_epoch else f"no epoch was checkpointed; the starting weights are in {start}")
    where = (f"non-finite {event['where']} loss ({event['loss']}) in epoch {event['epoch']}, batch {event['batch']}"
             if event["batch"] else f"non-finite {event['where']} after epoch {event['epoch']}"
             + (f" ({event['loss']})" if event["loss"] is not None else ""))
    return (f"{where}: training stopped; {kept}; {run_dir / 'stability.csv'} shows the gradient norms and "
            f"activations that led there (try a lower learning rate)")


def save_model_file(model: keras.Model, path: Path) -> None:
    """model.keras for inference and export, written atomically: the architecture and the
    weights, not the optimizer's state (Adam's moments would double the file; a resume
    reads last.weights.h5)."""
    check_free_space(path, weights_nbytes(model.weights) + HDF5_MARGIN)
    optimizer = model.optimizer
    model.optimizer = None  # Keras' .keras format saves whatever optimizer the model holds
    try:
        with atomic_write(path) as tmp:
            model.save(tmp)
    finally:
        model.optimizer = optimizer


def save_initial_weights(path: Path, num_classes: int, image_size: int, weights: str, seed: int,
                         **architecture) -> keras.Model:
    """Builds the model once (the backbone's `weights`, the rest from `seed`) and saves its
    weights to `path`: the one file every backend of a comparison starts from. Returns the model."""
    architecture["arch"] = resolve_arch(architecture["arch"], weights)  # the default: what --weights implies
    set_random_seed(seed)
    model = build_model(ModelSpec(architecture.pop("model"), **architecture), num_classes, image_size, weights)
    model.save_weights(path)
    return model


def starting_weights_record(weights: str, start: Path) -> dict:
    """Which files a run started from, by SHA-256: the backbone's file (None for random
    weights) and the whole model's starting weights. Runs that should share a start (a
    compare cell's backends) can be checked from their config.json alone."""
    backbone = resolve_backbone_weights(weights)
    if backbone == "imagenet":  # Keras downloaded it during the build: it is in the cache now
        backbone = str(keras_models_dir() / IMAGENET_NOTOP_FILE)
    return {
        "backbone": {"file": backbone, "sha256": file_sha256(backbone)} if backbone else None,
        "initial": {"file": str(start), "sha256": file_sha256(start)},
    }


@contextlib.contextmanager
def _os_errors_stop_the_run(run_dir: Path):
    """Turns an OS error while training or writing the run (no space left on the device, a lost
    mount) into `RunStoppedError`, saying which checkpoint is intact (as the disk holds it) and how
    to go on. A user's input error that is also an OSError (an unwritable --out) passes unchanged."""
    try:
        yield
    except OSError as e:
        if isinstance(e, UserInputError):
            raise
        reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        done = _checkpointed_epoch(run_dir)
        kept = (f"the last checkpoint ({run_dir / LAST}, epoch {done}) is intact; fix the cause and continue with "
                f"--resume {run_dir}" if done else "no epoch was checkpointed; fix the cause and start the run "
                f"again with --out {run_dir} --overwrite")
        raise RunStoppedError(f"training stopped by an OS error ({reason}); {kept}") from e


def _checkpointed_epoch(run_dir: Path) -> int | None:
    """The epoch of the run's last.weights.h5 on disk (None without a readable one)."""
    try:
        return (checkpoint_state(run_dir / LAST) or {}).get("epoch")
    except OSError:
        return None


@contextlib.contextmanager
def _signals_stop_the_run(run_dir: Path):
    """Turns `SignalStopError` into one line: what the run directory keeps (the checkpoint on
    disk, not what memory says) and the command that goes on from there."""
    try:
        yield
    except SignalStopError as e:
        raise RunInterruptedError(_interrupted_message(run_dir, e), 128 + e.signum) from None


def _interrupted_message(run_dir: Path, e: SignalStopError) -> str:
    said = f"stopped by {e}"
    if (run_dir / "metrics.json").is_file():
        return f"{said} after the run had finished; its files in {run_dir} are complete"
    done = _checkpointed_epoch(run_dir)
    if done:
        return (f"{said}: the checkpoint of epoch {done} ({run_dir / LAST}) is kept; continue with: "
                f"KERAS_BACKEND={keras.backend.backend()} python cli.py train --resume {run_dir}")
    return (f"{said} before the first epoch finished (no checkpoint to resume from); start again with "
            f"--out {run_dir} --overwrite")


@contextlib.contextmanager
def _out_of_memory_stops_the_run(checkpoints: Checkpoints, cfg: TrainConfig):
    """Turns a device out-of-memory error into `RunStoppedError`: one line with the settings that
    decide the memory a step needs and what to lower, instead of a framework's page of allocator
    state. Checkpoints are written whole or not at all, so the last one is intact."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        kept = (f"the last checkpoint ({checkpoints.last}, epoch {checkpoints.last_epoch}) is intact"
                if checkpoints.last_epoch else "no epoch was checkpointed")
        lower = "" if cfg.precision != "float32" else ", or use --precision mixed_bfloat16 (about half the activations)"
        said = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__  # not the allocator dump
        raise RunStoppedError(
            f"the device ran out of memory ({said}) at --batch-size {cfg.batch_size}, --image-size {cfg.image_size}, "
            f"--precision {cfg.precision}: lower --batch-size (memory grows with it) or --image-size{lower}; "
            f"{kept}") from None


def results_table(runs: dict[str, dict]) -> str:
    """The results table, one column per run (e.g. per backend)."""
    return format_table({name: results_row(m) for name, m in runs.items()}, result_rows(list(runs.values())))

