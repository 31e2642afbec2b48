"""--resume: go on with an interrupted run after its last checkpointed epoch.

`resume_config` reads the run's own options (before any backend loads); `reconcile_run_dir`
brings the directory back to the checkpoint before training goes on: the data must be the
same, a best checkpoint cut short is repaired, rows past the checkpoint are dropped. The
checkpoint's phase is rebuilt and loaded by `training.train.fit_phases`. Keras-free.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from backend.selection import environment, selected_backend
from data.discovery import DatasetError
from data.fingerprint import differences, fingerprint, read_fingerprint
from training.config import ConfigError, TrainConfig
from training.rundir import (
    BEST,
    LAST,
    RunError,
    atomic_write,
    check_run_files,
    checkpoint_state,
    truncate_csv,
    write_json,
)

# Files with a row per epoch: rows past the checkpoint are trained again.
PER_EPOCH_FILES = ("history.csv", "stability.csv")


def _training_state(run_dir: Path) -> dict:
    """The training state of the run's last checkpoint; ConfigError when there is none."""
    last = run_dir / LAST
    if not last.is_file():
        raise ConfigError(f"--resume {run_dir}: no epoch finished there (no {LAST}); start it again with "
                          f"--out {run_dir} --overwrite (it removes only this run's files)")
    try:
        state = checkpoint_state(last)
    except OSError as e:
        raise ConfigError(f"--resume {run_dir}: {last} is not readable ({e})") from None
    if state is None:
        raise ConfigError(f"--resume {run_dir}: {last} holds no training state (written before --resume existed)")
    return state


def resume_config(run_dir: str | Path, data_dir: str | None = None) -> TrainConfig | None:
    """The options of the interrupted run in `run_dir`, or None when it already finished.

    Its data is where `data_dir` says (the data moved: `reconcile_run_dir` checks it holds the
    same images per split and class), else where the run found it (see `recorded_data_dir`).
    Raises `ConfigError` when there is nothing to resume or it trained under another backend.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    if (run_dir / "metrics.json").is_file():
        check_run_files(run_dir)  # finished, or a finished run's files mixed with another's
        return None
    _training_state(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        options = config["options"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--resume {run_dir}: config.json is not readable ({e})") from None
    trained_under = config.get("environment", {}).get("backend")
    if trained_under and trained_under != selected_backend():
        raise ConfigError(f"--resume {run_dir}: the run trained under {trained_under}; resume it with "
                          f"KERAS_BACKEND={trained_under} (a run that switches backends measures neither)")
    data_dir = data_dir or recorded_data_dir(config)
    check_run_data(run_dir, config, data_dir)
    return TrainConfig.from_record(options, data_dir=data_dir, out=str(run_dir))


def recorded_data_dir(config: dict) -> str:
    """Where a run's data is: the absolute path it recorded, while that folder exists; else the
    --data-dir as it was given (a relative one names a folder from here, which `check_run_data`
    must then find to hold the same files)."""
    given = config["options"]["data_dir"]
    absolute = config.get("data_dir_absolute")
    if absolute and Path(absolute).is_dir():
        return absolute
    if absolute and not Path(given).is_dir():
        raise DatasetError(f"the run's data is no longer at {absolute} (nor at {given} from here); --data-dir "
                           f"names its new place")
    return given


def check_run_data(run_dir: Path, config: dict, data_dir: str | Path) -> None:
    """Raises `DatasetError` unless `data_dir` holds the image files the run recorded in its
    data fingerprint, byte for byte, and no others: wherever the data now is, it is the same.
    (A run from before fingerprints has only its images per class checked, by the callers.)"""
    record = config.get("data_fingerprint")
    if not record:
        return
    try:
        recorded = read_fingerprint(Path(run_dir) / record["file"])
    except (OSError, ValueError) as e:
        raise RunError(f"{run_dir}: its record of the data it used ({record['file']}) is not readable ({e}); "
                       f"restore that file") from None
    found = differences(recorded, fingerprint(data_dir))
    if found:
        raise DatasetError(f"{data_dir} is not the data the run in {run_dir} used: {found} "
                           f"(--data-dir names the data's place)")


def reconcile_run_dir(run_dir: Path, counts: dict) -> dict:
    """Brings an interrupted run directory back to its last checkpoint; returns that
    checkpoint's training state. Raises `DatasetError` when the data changed since."""
    check_run_files(run_dir)
    state = _training_state(run_dir)
    done = state["epoch"]
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("counts") not in (None, counts):
        raise DatasetError(f"--resume: the data changed since the run started (images per split and class "
                           f"were {config['counts']}, now {counts}); start a new run")
    best, last = run_dir / BEST, run_dir / LAST
    if state["best_epoch"] == done and (not best.exists() or (checkpoint_state(best) or {}).get("epoch") != done):
        with atomic_write(best) as tmp:  # the crash came between the two files
            shutil.copyfile(last, tmp)
    for name in PER_EPOCH_FILES:
        truncate_csv(run_dir / name, done)
    config["resumed"] = [*config.get("resumed", []), {"after_epoch": done, "environment": environment()}]
    write_json(run_dir / "config.json", config)
    return state
