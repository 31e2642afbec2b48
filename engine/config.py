"""Training options, and the checks that run before any backend is imported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data.audit import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_CORRELATION
from data.augment import AugmentConfig
from data.discovery import Splits, make_splits
from engine.backend import selected_backend
from engine.rundir import checkpoint_state, prepare_run_dir
from model.spec import ModelSpec
from model.weights import check_weights_file, resolve_backbone_weights

SCHEDULES = ("constant", "cosine")  # learning rate over the last phase, after any warmup


class ConfigError(ValueError):
    """Options that do not fit together."""


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run; the defaults follow the original study."""

    data_dir: str
    out: str | None = None
    runs_root: str = "runs"
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-4
    weights: str = "imagenet"
    init_weights: str | None = None
    model: str = "resnet50"
    cut: str = "conv4"
    head_blocks: int = 2
    head_filters: int = 256
    se: bool = True
    freeze: str = "none"
    dropout: float = 0.2
    bn_momentum: float | None = None
    bn_train: bool | None = None
    head_epochs: int = 0
    head_lr: float = 1e-3
    unfreeze_blocks: int | None = None
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    preprocess: str = "caffe"
    augment: str = "standard"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    rotate_degrees: float = 10.0
    val_split: float = 0.1
    test_split: float = 0.0
    split_seed: int = 0
    seed: int = 0
    workers: int = 2
    cache: bool = True
    dedup: bool = False
    leakage_report: bool = False
    dedup_max_distance: int = DEFAULT_MAX_DISTANCE
    dedup_min_correlation: float = DEFAULT_MIN_CORRELATION
    deterministic: bool = False
    verbose: int = 1

    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.cut, self.head_blocks, self.head_filters, self.se, self.dropout,
                         self.bn_momentum, dropout_seed=self.seed)

    def check_schedule(self) -> None:
        """Raises ConfigError for schedule options that do not fit together or the model."""
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        blocks = self.model_spec().backbone_blocks
        if self.unfreeze_blocks is not None and self.unfreeze_blocks > blocks:
            raise ConfigError(f"--unfreeze-blocks {self.unfreeze_blocks}: the {self.model} backbone"
                             f"{f' cut at {self.cut}' if self.model == 'hybrid' else ''} has {blocks} residual blocks")
        if self.freeze == "backbone" and self.unfreeze_blocks:
            raise ConfigError("--freeze backbone and --unfreeze-blocks contradict each other; give one")

    @property
    def finds_twins(self) -> bool:
        """Whether the run looks for test images with a twin in Training (--dedup, --leakage-report)."""
        return self.dedup or self.leakage_report

    def splits(self, twins: bool = True) -> Splits:
        """The train/val/test splits these options make (deduplicated with --dedup; with
        `twins` False, without the duplicate search, e.g. to check the layout quickly)."""
        return make_splits(self.data_dir, self.val_split, self.test_split, self.split_seed,
                           self.dedup and twins, self.dedup_max_distance, self.dedup_min_correlation,
                           find_twins=self.leakage_report and twins)

    def augment_config(self) -> AugmentConfig:
        if self.augment == "none":
            return AugmentConfig.none()
        if self.augment != "standard":
            raise ValueError(f"augment must be 'standard' or 'none', got {self.augment!r}")
        return AugmentConfig(
            crop=True,
            crop_scale=tuple(self.crop_scale),
            crop_ratio=tuple(self.crop_ratio),
            flip_prob=self.flip_prob,
            rotate_degrees=self.rotate_degrees,
        )


def resume_config(run_dir: str | Path) -> TrainConfig | None:
    """The options of the interrupted run in `run_dir`, or None when it already finished.

    Raises `ConfigError` when there is nothing to resume.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    if (run_dir / "metrics.json").is_file():
        return None
    last = run_dir / "last.weights.h5"
    if not last.is_file():
        raise ConfigError(f"--resume {run_dir}: no epoch finished there (no last.weights.h5); start it again "
                          f"without --resume")
    try:
        state = checkpoint_state(last)
    except OSError as e:
        raise ConfigError(f"--resume {run_dir}: {last} is not readable ({e})") from None
    if state is None:
        raise ConfigError(f"--resume {run_dir}: {last} holds no training state (written before --resume existed)")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        options = config["options"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--resume {run_dir}: config.json is not readable ({e})") from None
    trained_under = config.get("environment", {}).get("backend")
    if trained_under and trained_under != selected_backend():
        raise ConfigError(f"--resume {run_dir}: the run trained under {trained_under}; resume it with "
                          f"KERAS_BACKEND={trained_under} (a run that switches backends measures neither)")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in names}
    return dataclasses.replace(TrainConfig(**values), out=str(run_dir))


@dataclasses.dataclass
class Preflight:
    """What the checks found: the run directory (created) and the splits."""

    run_dir: Path
    splits: Splits


def preflight(cfg: TrainConfig, resume: bool = False) -> Preflight:
    """Checks the options, data, weights and output folder; creates the run directory.

    Needs no backend, so bad input fails in about a second with one clear error. A resumed
    run needs no starting weights (its checkpoint holds every variable).
    """
    cfg.augment_config()
    cfg.check_schedule()
    splits = cfg.splits(twins=False)  # the layout, in a second
    if not resume:
        resolve_backbone_weights(cfg.weights)
        if cfg.init_weights:
            check_weights_file(Path(cfg.init_weights), "--init-weights file")
    run_dir = prepare_run_dir(cfg.out, selected_backend(), cfg.runs_root)
    if cfg.finds_twins:  # decodes every image: only once everything else is known to be fine
        splits = cfg.splits()
    return Preflight(run_dir, splits)
