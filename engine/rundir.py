"""Run directories: created and checked for writing before any work starts."""

from __future__ import annotations

import json
import time
from pathlib import Path


class OutputDirError(OSError):
    """The output folder cannot be created or written."""


class RunError(ValueError):
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


def write_json(path: str | Path, data: dict) -> None:
    """Writes `data` as indented JSON (atomically: a crash leaves the old file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
