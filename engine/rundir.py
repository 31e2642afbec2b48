"""Run directories: created and checked for writing before any work starts."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from errors import UserInputError
from model.weights import file_sha256

# The files of a run directory that hold weights.
INITIAL, LAST, BEST, MODEL_FILE = "initial.weights.h5", "last.weights.h5", "best.weights.h5", "model.keras"
PREDICTIONS_FILE = "test_predictions.csv"  # per test image: label, final and best prediction


class OutputDirError(UserInputError, OSError):
    """The output folder cannot be created or written."""


class RunError(UserInputError, ValueError):
    """A run directory or model file that cannot be used."""


def prepare_run_dir(out: str | Path | None, backend: str, runs_root: str | Path = "runs") -> Path:
    """Creates the run directory (`runs/<time>-<backend>/` unless `out` is given).

    Raises `OutputDirError` at once if it cannot be written, so no training is lost to it.
    """
    path = Path(out) if out else Path(runs_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{backend}"
    probe = path / ".write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output folder {path} is not writable: {e.strerror or e}") from None
    return path


def check_writable_file(path: str | Path, option: str) -> None:
    """Raises `OutputDirError` unless `path` can be written (its folder exists, or can be made,
    and takes a file there), so an output option fails before the work, not after it."""
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{option} {path} is a folder; name a file")
    probe = path.with_name(f".write-test-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"{option} {path} cannot be written: {e.strerror or e}") from None


def claim_run_dir(out: str | Path | None, backend: str, runs_root: str | Path = "runs",
                  overwrite: bool = False) -> Path:
    """The directory of a new run: created, or refused when it already holds files (a finished
    or interrupted run would be overwritten or, worse, mixed with this one); with `overwrite`
    its old contents are removed first, before anything new is written."""
    path = Path(out) if out else None
    if path is not None and path.is_dir() and any(path.iterdir()):
        if not overwrite:
            held = sorted(p.name for p in path.iterdir())
            raise OutputDirError(f"{path} is not empty ({len(held)} entries, e.g. {', '.join(held[:3])}): continue "
                                 f"that run with --resume {path}, replace it with --overwrite, or choose another --out")
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return prepare_run_dir(out, backend, runs_root)


def new_run_id() -> str:
    """An id for a run; every file that says which run it belongs to carries it."""
    return uuid.uuid4().hex[:16]


def check_run_files(run_dir: Path) -> None:
    """Raises `RunError` when the files of a run directory belong to different runs: the id
    in config.json, metrics.json and the checkpoints' state, and model.keras' SHA-256 as
    metrics.json recorded it. (Runs written before run ids existed are not checked.)"""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    except (OSError, ValueError) as e:
        raise RunError(f"{run_dir}: config.json or metrics.json is not readable ({e})") from None
    run_id = config.get("run_id")
    if run_id is None:
        return
    owners = {"metrics.json": metrics.get("run_id")} if metrics else {}
    for name in (LAST, BEST):
        try:
            owners[name] = (checkpoint_state(run_dir / name) or {}).get("run_id")
        except OSError:  # absent, or cut short by a crash: it claims no run (a resume repairs it)
            continue
    if metrics and (run_dir / MODEL_FILE).is_file() and file_sha256(run_dir / MODEL_FILE) != metrics.get("model_sha256"):
        owners[MODEL_FILE] = "another run (its SHA-256 is not the one metrics.json recorded)"
    foreign = sorted(name for name, owner in owners.items() if owner != run_id)
    if foreign:
        raise RunError(f"{run_dir} mixes files of different runs: {', '.join(foreign)} "
                       f"{'does' if len(foreign) == 1 else 'do'} not belong to the run of its config.json "
                       f"(run {run_id}); start that run again with --overwrite")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a hidden temporary path beside `path` (same name ending, so Keras accepts it)
    to write to; it replaces `path` when the block ends without error. A crash or a full
    disk mid-write leaves the old `path` whole, and no temporary file is left behind."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_history(run_dir: str | Path) -> dict[str, list[float]]:
    """history.csv as {column: [value per epoch]} (NaN for an empty or `NA` cell, which Keras'
    CSVLogger writes for validation columns of a run without validation; {} without the file)."""
    rows = read_csv_rows(Path(run_dir) / "history.csv")
    if not rows:
        return {}
    return {k: [float(r[k]) if r[k] not in ("", "NA", None) else float("nan") for r in rows] for k in rows[0]}


def truncate_csv(path: Path, rows: int) -> None:
    """Keeps the header and the first `rows` rows of a CSV file (atomically)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(lines[: rows + 1]))


def write_csv(path: Path, rows: list[dict], missing: str = "") -> None:
    """Rows as CSV, written whole and atomically; `missing` where a row has no value."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: missing if row.get(k) is None else row[k] for k in columns} for row in rows)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows as text ([] without the file)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def checkpoint_state(path: Path) -> dict | None:
    """The training state stored with a `last.weights.h5` (None for a file without it):
    the epochs done, the best epoch so far and the random generators' state."""
    import h5py

    with h5py.File(path, "r") as f:
        text = f.attrs.get("training_state")
    return json.loads(text) if text is not None else None


def write_json(path: str | Path, data: dict) -> None:
    """Writes `data` as indented JSON (atomically: a crash leaves the old file)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
