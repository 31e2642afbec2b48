"""The child process of a study: `python -m studies.worker TASK ARGS`, started by
`studies.processes.in_process` under one backend. Each task calls the training core or the
parity worker as functions; the command line is not re-entered.

Tasks:
- `train --config FILE --out RUN [--resume RUN]`: one training run, its options from FILE (a
  `{"options": {...}}` JSON, as `compare` writes them); exit 0, 1 (the run stopped: diverged,
  an OS error), 2 (bad input, one line) or 128 + a signal.
- `init-weights PATH SPEC`: the starting weights file of a grid cell (SPEC: JSON of the options
  `training.train.save_initial_weights` takes).
- `parity SPEC WEIGHTS OUT`: the parity quantities of one backend (`studies.parity.run_worker`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def train(config_file: str, out: str, resume: bool) -> int:
    """One run of a grid, as `train --config FILE --out RUN [--resume RUN]` would make it."""
    from backend.startup import start_environment
    from training.config import TrainConfig, preflight
    from training.options import read_config_file
    from training.resume import resume_config

    if resume:
        cfg = resume_config(out)
        if cfg is None:
            return 0  # it finished already
    else:
        cfg = TrainConfig.from_record(read_config_file(config_file), out=out)
    checked = preflight(cfg, resume=resume)  # before the backend loads
    os.environ.update(start_environment(cfg.deterministic, cfg.devices))
    from training.train import DivergedError, RunInterruptedError, RunStoppedError, run_training

    try:
        run_training(cfg, checked, resume=resume)
    except (DivergedError, RunStoppedError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except RunInterruptedError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    return 0


def init_weights(path: str, spec: str) -> int:
    from training.train import save_initial_weights

    save_initial_weights(Path(path), **json.loads(spec))
    return 0


def parity(spec: str, weights: str, out: str) -> int:
    from studies.parity import ParityConfig, run_worker

    fields = json.loads(Path(spec).read_text())
    fields["backends"] = tuple(fields["backends"])
    run_worker(ParityConfig(**fields), Path(weights), Path(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    from errors import UserInputError

    parser = argparse.ArgumentParser(prog="python -m studies.worker", description=__doc__.splitlines()[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    run = tasks.add_parser("train")
    run.add_argument("--config", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--resume", default=None)
    start = tasks.add_parser("init-weights")
    start.add_argument("path")
    start.add_argument("spec")
    check = tasks.add_parser("parity")
    for name in ("spec", "weights", "out"):
        check.add_argument(name)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.task == "train":
            return train(args.config, args.out, args.resume is not None)
        if args.task == "init-weights":
            return init_weights(args.path, args.spec)
        return parity(args.spec, args.weights, args.out)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
