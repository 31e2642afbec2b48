"""Run directories: created and checked for writing before any work starts."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

from checksums import file_sha256
from errors import UserInputError

# The files of a run directory that hold weights.
INITIAL, LAST, BEST, MODEL_FILE = "initial.weights.h5", "last.weights.h5", "best.weights.h5", "model.keras"
PREDICTIONS_FILE = "test_predictions.csv"  # per test image: label, final and best prediction


# Every file and folder a run directory may hold, as this project writes them: --overwrite
# removes these and nothing else. `eval-*.json` and `.tmp-*` are patterns (fnmatch).
RUN_FILES = frozenset({
    "config.json", "metrics.json", "history.csv", "stability.csv", "stability.png", INITIAL, LAST, BEST,
    MODEL_FILE, PREDICTIONS_FILE, "skipped.txt", "decode-report.txt", "leakage.json", "warnings.log",
    "report.html", "data-fingerprint.tsv", ".lock",
})
RUN_FOLDERS = frozenset({"export"})  # `export` writes model.onnx or saved_model/ there
RUN_PATTERNS = ("eval-*.json", ".tmp-*", ".write-test-*")
LOCK_FILE = ".lock"  # held (flock) by the one process writing the run; names it (pid, command)
PROJECT = "brain-mri-keras3"  # the lock file's marker: this project made the folder


class OutputDirError(UserInputError, OSError):
    """The output folder cannot be created or written."""


class RunDirBusyError(OutputDirError):
    """Another live process holds the run directory's lock."""


class RunError(UserInputError, ValueError):
    """A run directory or model file that cannot be used."""


def is_run_file(name: str) -> bool:
    """Whether `name` (an entry of a run directory) is one this project writes there."""
    return name in RUN_FILES or name in RUN_FOLDERS or any(fnmatch.fnmatchcase(name, p) for p in RUN_PATTERNS)


def is_run_dir(path: Path) -> bool:
    """Recognisably a run of this project: its lock file carries the project's marker, or its
    config.json has a run id and the options (runs written before the lock file existed)."""
    for name, keys in ((LOCK_FILE, ("project",)), ("config.json", ("run_id", "options"))):
        try:
            record = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and all(k in record for k in keys) and record.get("project", PROJECT) == PROJECT:
            return True
    return False


def check_apart(out: str | Path, data_dir: str | Path | None, option: str = "--out") -> None:
    """Refuses an output path that is, holds or lies inside the data folder: a run written into a
    dataset becomes part of it (a class folder, a stray file), and --overwrite could delete images."""
    if not data_dir:
        return
    out, data = Path(out).resolve(), Path(data_dir).resolve()
    if out == data or data in out.parents:
        where = "is" if out == data else "lies inside"
        raise OutputDirError(f"{option} {out} {where} the data folder {data}: write it outside the dataset")
    if out in data.parents:
        raise OutputDirError(f"{option} {out} holds the data folder {data}: choose a folder beside it")


def check_output_path(path: str | Path, option: str, run_dir: str | Path | None = None,
                      data_dir: str | Path | None = None, own: str | None = None, folder: bool = False) -> None:
    """An output of a command that reads a run: never inside the run folder, whose files belong to
    the run (save the command's own default place there, `own`: report.html, export), never in
    the run's data folder, and (a file) writable. Checked before any work."""
    path = Path(path)
    if run_dir is not None:
        run = Path(run_dir).resolve()
        target = path.resolve()
        if target == run or run in target.parents:
            inside = target.relative_to(run).as_posix()
            if not (own and (inside == own or inside.startswith(f"{own}/"))):
                raise OutputDirError(f"{option} {path} is inside the run folder {run_dir}, whose files belong to "
                                     f"the run; write it elsewhere")
    check_apart(path, data_dir, option)
    if not folder:
        check_writable_file(path, option)


def recorded_data_folder(run_dir: str | Path) -> str | None:
    """The absolute data folder a run's config.json records (None when it has none)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text()).get("data_dir_absolute")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_run_dir(out: str | Path | None, backend: str, runs_root: str | Path = "runs") -> Path:
    """Creates the run directory (`runs/<time>-<backend>/` unless `out` is given).

    Raises `OutputDirError` at once if it cannot be written, so no training is lost to it.
    """
    path = Path(out) if out else Path(runs_root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{backend}"
    probe = path / f".write-test-{os.getpid()}"  # per process: two runs racing into one folder must not share it
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
                  overwrite: bool = False, data_dir: str | Path | None = None,
                  notes: list[str] | None = None) -> Path:
    """The directory of a new run, created and locked for this process (`lock_run_dir`).

    Refused when it already holds files: a finished or interrupted run would be mixed with this
    one. With `overwrite`, a folder that is recognisably a run of this project loses the files the
    project writes there (`RUN_FILES`) before anything new is written; a folder holding anything
    else is refused, naming what is there. Never the data folder, inside it, or around it."""
    path = Path(out) if out else None
    if path is not None:
        check_apart(path, data_dir)
        entries = sorted(p.name for p in path.iterdir() if not _lock_being_written(p)) if path.is_dir() else []
        if entries and not is_run_dir(path):  # refused before anything is written into the user's folder
            raise OutputDirError(f"{path} is not empty and is not a run of this project ({_listed(entries)}); "
                                 f"choose another --out (nothing was changed)")
    path = prepare_run_dir(out, backend, runs_root)
    lock_run_dir(path, notes)
    _remove_temporary_files(path, notes)
    held = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
    if held and not overwrite:
        raise OutputDirError(f"{path} is not empty ({_listed(held)}): continue that run with --resume {path}, "
                             f"replace it with --overwrite, or choose another --out")
    if held:
        foreign = _foreign_entries(path)
        if foreign:
            raise OutputDirError(f"--overwrite {path}: it holds files this project did not write ({_listed(foreign)}); "
                                 f"nothing was removed")
        for name in held:
            entry = path / name
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return path


def reopen_run_dir(out: str | Path, data_dir: str | Path | None = None, notes: list[str] | None = None) -> Path:
    """The directory of an interrupted run being resumed: writable, apart from its data, locked
    for this process, and cleared of temporary files a killed write left (said in `notes`)."""
    path = Path(out)
    check_apart(path, data_dir)
    prepare_run_dir(path, "")
    lock_run_dir(path, notes)
    _remove_temporary_files(path, notes)
    return path


def _lock_being_written(entry: Path) -> bool:
    """An empty lock file: a run of ours starting at this moment has made it and not yet written
    its name in it (two runs started together); the lock itself then says who holds the folder."""
    return entry.name == LOCK_FILE and entry.is_file() and entry.stat().st_size == 0


def _foreign_entries(path: Path) -> list[str]:
    """The entries of `path` this project does not write into a run directory ([] when absent)."""
    return sorted(p.name for p in path.iterdir() if not is_run_file(p.name)) if path.is_dir() else []


def _listed(names: list[str]) -> str:
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {', '.join(names[:3])}" + (", ..." if len(names) > 3 else "")


def _remove_temporary_files(path: Path, notes: list[str] | None) -> None:
    """A write killed before its rename (SIGKILL, a power cut) leaves `.tmp-<name>`: never a file
    any command reads, so it goes, and the user is told."""
    stale = sorted(p for p in path.glob(".tmp-*") if p.is_file())
    for p in stale:
        p.unlink()
    if stale and notes is not None:
        notes.append(f"removed {len(stale)} temporary file(s) an interrupted write left in {path}: "
                     f"{', '.join(p.name for p in stale)}")


_LOCKS: dict[Path, int] = {}  # run directory -> the open, flock-ed lock file; held for the process's life


def lock_run_dir(path: Path, notes: list[str] | None = None) -> None:
    """Makes this process the one writer of `path`: an exclusive OS lock (flock) on its lock file,
    held until the process ends (the kernel releases it however the process dies, so a lock left by
    a killed run is simply taken over). Raises `RunDirBusyError` naming the live holder."""
    key = path.resolve()
    if key in _LOCKS:
        return
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(lock)
        os.close(fd)
        raise RunDirBusyError(f"{path} is in use by another run ({holder}); wait for it to end, or choose another "
                              f"--out") from None
    previous = _lock_holder(lock, wait=0)
    record = {"project": PROJECT, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _LOCKS[key] = fd
    if previous != "unknown holder" and notes is not None:
        notes.append(f"took over the lock of {path} from {previous}, which is no longer running")


def _lock_holder(lock: Path, wait: float = 2.0) -> str:
    """Who holds `lock`, as its file says (a holder that just took it may not have written yet)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            record = json.loads(lock.read_text())
            return f"pid {record['pid']}, started {record['started']}: {record['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "unknown holder"
            time.sleep(0.05)


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
    model = run_dir / MODEL_FILE
    # A damaged model.keras is not another run's: `load_run` names the damage and the way around it.
    if metrics and model_file_problem(model) is None and file_sha256(model) != metrics.get("model_sha256"):
        owners[MODEL_FILE] = "another run (its SHA-256 is not the one metrics.json recorded)"
    foreign = sorted(name for name, owner in owners.items() if owner != run_id)
    if foreign:
        raise RunError(f"{run_dir} mixes files of different runs: {', '.join(foreign)} "
                       f"{'does' if len(foreign) == 1 else 'do'} not belong to the run of its config.json "
                       f"(run {run_id}); put the run's own files back, or move the others out")


def model_file_problem(path: Path) -> str | None:
    """None for a whole `.keras` archive; else why not: `missing`, or `damaged (...)` for a file
    cut short or corrupted (its zip directory or a member's CRC does not check out)."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"damaged ({e})"
    return f"damaged (member {bad} fails its CRC check)" if bad else None


def check_free_space(path: Path, needed: int) -> None:
    """Raises ENOSPC's OSError before a write of about `needed` bytes that the disk cannot take:
    HDF5 (h5py) can crash the whole process when the disk fills in the middle of a write, so
    the weights files are measured against the free space first."""
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device ({needed / 2**20:.0f} MB needed, "
                                    f"{free / 2**20:.0f} MB free)", str(path))


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


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A text cell that a spreadsheet would run as a formula (a file named `=cmd|...!A0.jpg`)
    gets a leading single quote, OWASP's rule; so does one already starting with quotes before
    such a character, so `spreadsheet_text` undoes it exactly. Numbers pass unchanged."""
    if isinstance(value, str) and value.lstrip("'").startswith(FORMULA_STARTS) and not _is_number(value):
        return "'" + value
    return value


def _is_number(text: str) -> bool:
    """`-0.25` or `+1e-3` as text (a value read back from a CSV): a spreadsheet reads a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def spreadsheet_text(value: str) -> str:
    """The text `spreadsheet_safe` was given."""
    quoted = value.startswith("'") and value.lstrip("'").startswith(FORMULA_STARTS) and not _is_number(value[1:])
    return value[1:] if quoted else value


def write_csv(path: Path, rows: list[dict], missing: str = "") -> None:
    """Rows as CSV (RFC 4180 quoting by the csv module, formula-like text neutralised), written
    whole and atomically; `missing` where a row has no value."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, [spreadsheet_safe(c) for c in columns])
        writer.writeheader()
        writer.writerows({spreadsheet_safe(k): missing if row.get(k) is None else spreadsheet_safe(row[k])
                          for k in columns} for row in rows)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows as text, as they were before `write_csv` neutralised them ([] without the file)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{_text(k): _text(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _text(cell):
    """A cell as written; DictReader's None key (surplus cells) and list values pass unchanged."""
    return spreadsheet_text(cell) if isinstance(cell, str) else cell


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
