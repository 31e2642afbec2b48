"""Training options, and the checks that run before any backend is imported."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import click

from backend.parallel import data_parallel_launch_error, process_rank
from backend.selection import selected_backend
from data import BATCH_SIZE, SEED, TEST_SPLIT, VAL_SPLIT, WORKERS
from data.audit import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_CORRELATION
from data.augment import (
    AUGMENT_STEPS,
    AUGMENT_STYLES,
    INTERPOLATIONS,
    KERAS_GENERATOR,
    PREPROCESS_MODES,
    AugmentConfig,
    torchvision_decode_size,
)
from data.discovery import DatasetError, Splits, make_splits
from errors import UserInputError
from model.spec import ARCHS, CUTS, FREEZE_MODES, IMAGE_SIZE, MODELS, NO_FREEZE, PRECISIONS, ModelSpec
from model.weights import check_weights_file, resolve_arch, resolve_backbone_weights
from training.options import FloatPair, PositiveFloat, SizeOrName, option
from training.rundir import claim_run_dir, reopen_run_dir

SCHEDULES = ("constant", "cosine")  # learning rate over the last phase, after any warmup
KEEP_CHECKPOINTS = ("all", "best", "none")
NO_AUGMENT = "none"
AUGMENTS = (*AUGMENT_STYLES, NO_AUGMENT)  # --augment: data.augment's styles by their own names, or none
JIT_COMPILE = {"auto": "auto", "on": True, "off": False}  # --jit-compile -> model.compile(jit_compile=...)
DATA, MODEL, OPTIMIZATION, AUGMENTATION, RUN = "Data", "Model", "Optimization", "Augmentation", "Run"
# Defaults declared below the command line, at the lowest layer that needs them, are taken from
# there: the input pipeline's from data, the augmentation's from data.augment (`_AUGMENT`), the
# model's from model.spec (`ModelSpec`'s fields, `IMAGE_SIZE`, `NO_FREEZE`). tests/test_defaults.py
# fails when a copy drifts.
_AUGMENT = AugmentConfig()
TORCHVISION_DECODE = "torchvision"  # --decode-size in torchvision's reference proportion (data.augment)
# --decode-size at most this times --image-size: a centre crop of less than half the side drops
# most of the image (a recipe's 256 px decode left at --image-size 64 would keep its centre 25%).
MAX_DECODE_RATIO = 2
# keras.optimizers.Adam's epsilon (Keras' default; torch.optim.Adam's is 1e-8), declared here, Keras-free,
# for --adam-epsilon; tests/test_defaults.py checks it against Keras.
KERAS_ADAM_EPSILON = 1e-7


class ConfigError(UserInputError, ValueError):
    """Options that do not fit together."""


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run, each declared once (its flag, type, default and help);
    the defaults follow the original study. The click options of `train`, `hybrid` and
    `compare` are made from these fields (`training.options.click_options`)."""

    data_dir: str = option(help="Folder with Training/<class>/* (and optionally Testing/<class>/*); required unless "
                           "--config or --resume supplies it.",
                           type=click.Path(), group=DATA)
    image_size: int = option(IMAGE_SIZE, "Square input side in pixels.", type=click.IntRange(32, 1024), group=DATA)
    decode_size: int | str | None = option(None, "Decode (and cache) images at this side, at least --image-size: "
                                           "training crops from it and resizes each crop to --image-size; "
                                           "evaluation takes the centre --image-size square, as torchvision's "
                                           "reference recipe (Resize 256, CenterCrop 224). torchvision: that "
                                           "proportion at any --image-size (256 at 224, 73 at 64). Default: "
                                           "--image-size.", type=SizeOrName(32, 2048, (TORCHVISION_DECODE,)),
                                           group=DATA)
    batch_size: int = option(BATCH_SIZE, "Images per training step (and per evaluation batch).", type=click.IntRange(1), group=DATA)
    preprocess: str = option("caffe", "caffe: BGR minus ImageNet mean, 0-255 (Keras ImageNet weights); "
                             "imagenet: x/255 then mean/std (torchvision); caffe-rescaled: caffe then x/255 "
                             "(seed-keras); rescale: x/255 only.", type=click.Choice(PREPROCESS_MODES),
                             group=DATA)
    val_split: float = option(VAL_SPLIT, "Stratified fraction of Training used for validation.",
                              type=click.FloatRange(0, 1, max_open=True), group=DATA)
    test_split: float = option(TEST_SPLIT, "Without Testing/: stratified fraction of Training held out as the test set.",
                               type=click.FloatRange(0, 1, max_open=True), group=DATA)
    split_seed: int = option(SEED, "Seed of the validation and test splits.", type=int, group=DATA)
    seed: int = option(SEED, "Seed of the batch order, augmentation and model randomness.", type=int, group=DATA)
    workers: int = option(WORKERS, "Loader threads (0: load in the training thread).", type=click.IntRange(0), group=DATA)
    cache: bool = option(True, "Keep decoded images in memory (n * size^2 * 3 bytes).", group=DATA)
    dedup: bool = option(False, "Drop from training every image with an exact or near twin in the test set, keep "
                         "one of each duplicate group (none of an image under two labels); write leakage.json.",
                         group=DATA)
    leakage_report: bool = option(False, "Find the test images with a twin in the training pool without dropping "
                                  "anything; metrics add the accuracy on the test images with no twin.", group=DATA)
    dedup_max_distance: int = option(DEFAULT_MAX_DISTANCE, "--dedup: dHash distance (bits) of a candidate near pair "
                                     "(see `audit`).", type=click.IntRange(0, 64), group=DATA)
    dedup_min_correlation: float = option(DEFAULT_MIN_CORRELATION, "--dedup: thumbnail correlation that confirms a "
                                          "near pair.", type=click.FloatRange(-1, 1), group=DATA)
    weights: str = option("imagenet", "Backbone start: imagenet, none (random) or PATH to a ResNet50 notop .h5 file.",
                          group=MODEL)
    init_weights: str | None = option(None, "Start the whole model from a .weights.h5 file (e.g. another run's "
                                      "initial.weights.h5).", type=click.Path(), group=MODEL)
    arch: str | None = option(None, "Backbone architecture: keras-v1 (keras.applications.ResNet50: the stride on a "
                              "stage's first 1x1 convolution) or torchvision-v1.5 (torchvision's resnet50: the stride "
                              "on the 3x3, no conv biases). Default: the one --weights implies (torchvision weights: "
                              "torchvision-v1.5; otherwise keras-v1).", type=click.Choice(ARCHS), group=MODEL)
    model: str = option(ModelSpec.name, "resnet50: the plain classifier; hybrid: ResNet50 cut at --cut and a custom CNN "
                        "head.", type=click.Choice(MODELS), group=MODEL)
    cut: str = option(ModelSpec.cut, "Hybrid: the last backbone stage kept (conv4 ends at layer conv4_block6_out).",
                      type=click.Choice(CUTS), group=MODEL)
    head_blocks: int = option(ModelSpec.head_blocks, "Hybrid: Conv-BatchNorm-ReLU blocks after the cut.", type=click.IntRange(0),
                              group=MODEL)
    head_filters: int = option(ModelSpec.head_filters, "Hybrid: channels of each head block.", type=click.IntRange(1), group=MODEL)
    se: bool = option(ModelSpec.se, "Hybrid: squeeze-and-excitation in each head block.", group=MODEL)
    freeze: str = option(NO_FREEZE, "backbone: the main phase trains only what follows the backbone.",
                         type=click.Choice(FREEZE_MODES), group=MODEL)
    dropout: float = option(ModelSpec.dropout, "Dropout rate before the logits layer.", type=click.FloatRange(0, 1, max_open=True), group=MODEL)
    bn_momentum: float | None = option(ModelSpec.bn_momentum, "Backbone BatchNorm moving-average momentum (default: Keras' 0.99; "
                                       "torchvision's is 0.9).", type=click.FloatRange(0, 1, max_open=True),
                                       group=MODEL)
    bn_train: bool | None = option(None, "Backbone BatchNorm uses batch statistics while it trains (default: yes "
                                   "for resnet50, no for hybrid; a frozen layer never does).", group=MODEL)
    epochs: int = option(10, "Epochs of the main phase (after any --head-epochs).", type=click.IntRange(1),
                         group=OPTIMIZATION)
    learning_rate: float = option(1e-4, "Adam learning rate of the main phase (its peak with warmup or cosine).",
                                  type=PositiveFloat(), flag="--lr", group=OPTIMIZATION)
    adam_epsilon: float = option(KERAS_ADAM_EPSILON, "Adam's epsilon (Keras' default; torch.optim.Adam's is 1e-8).",
                                 type=PositiveFloat(), group=OPTIMIZATION)
    precise_bn: int = option(0, "After each epoch, before the validation that picks the best checkpoint: recompute "
                             "every trainable BatchNorm layer's moving mean and variance from N training batches "
                             "through the epoch's weights, the same on every backend (\"precise BN\"; costs N "
                             "forward passes an epoch); 0: off.", type=click.IntRange(0),
                             group=OPTIMIZATION)
    head_epochs: int = option(0, "First phase: epochs with the backbone frozen (0: no such phase).",
                              type=click.IntRange(0), group=OPTIMIZATION)
    head_lr: float = option(1e-3, "Adam learning rate of the --head-epochs phase.", type=PositiveFloat(), group=OPTIMIZATION)
    unfreeze_blocks: int | None = option(None, "Main phase: only the top K residual blocks of the backbone train "
                                         "(default: all of it).", type=click.IntRange(0), group=OPTIMIZATION)
    lr_schedule: str = option("constant", "Main phase learning rate after warmup: constant, or cosine decay to 0.",
                              type=click.Choice(SCHEDULES), group=OPTIMIZATION)
    warmup_epochs: float = option(0.0, "Main phase: linear warmup from 0 over this many epochs.",
                                  type=click.FloatRange(0), group=OPTIMIZATION)
    label_smoothing: float = option(0.0, "Cross-entropy label smoothing (0: off).",
                                    type=click.FloatRange(0, 1, max_open=True), group=OPTIMIZATION)
    weight_decay: float = option(0.0, "Decoupled weight decay of Adam (AdamW), on kernels only (not on BatchNorm "
                                 "or biases; 0: off).", type=click.FloatRange(0), group=OPTIMIZATION)
    augment: str = option(_AUGMENT.style, "Training augmentation. standard: torchvision's random resized crop, "
                          "horizontal flip, rotation (black fill); keras-generator: ImageDataGenerator's rotation, "
                          "shift, zoom and flip (edge fill); none.", type=click.Choice(AUGMENTS), group=AUGMENTATION)
    crop_scale: tuple[float, float] = option(_AUGMENT.crop_scale, "Random resized crop: area fraction range.",
                                             type=FloatPair(), group=AUGMENTATION)
    crop_ratio: tuple[float, float] = option(_AUGMENT.crop_ratio, "Random resized crop: aspect ratio range.",
                                             type=FloatPair(), group=AUGMENTATION)
    flip_prob: float = option(_AUGMENT.flip_prob, "Horizontal flip probability (0: off).",
                              type=click.FloatRange(0, 1), group=AUGMENTATION)
    rotate_degrees: float = option(_AUGMENT.rotate_degrees, "Rotation range +-degrees (0: off).",
                                   type=click.FloatRange(0, 180), group=AUGMENTATION)
    shift_range: float = option(_AUGMENT.shift_range, "keras-generator: width and height shift range, a fraction "
                                "of the side (0: off).", type=click.FloatRange(0, 1, max_open=True), group=AUGMENTATION)
    zoom_range: float = option(_AUGMENT.zoom_range, "keras-generator: zoom drawn from [1-z, 1+z] per axis (0: off).",
                               type=click.FloatRange(0, 1, max_open=True), group=AUGMENTATION)
    augment_steps: str = option(_AUGMENT.steps, "standard: fused (crop, flip and rotation in one bilinear "
                                "resampling; fast) or torchvision (each step as torchvision.transforms.v2 runs it "
                                "on a PIL image: crop, antialiased resize, flip, rotation).",
                                type=click.Choice(AUGMENT_STEPS), group=AUGMENTATION)
    rotate_interpolation: str = option(_AUGMENT.rotate_interpolation, "standard: the rotation's interpolation "
                                       "(nearest: torchvision's RandomRotation default; with --augment-steps fused, "
                                       "the whole resampling's).", type=click.Choice(INTERPOLATIONS),
                                       group=AUGMENTATION)
    precision: str = option(ModelSpec.precision, "Keras dtype policy: float32, or mixed_bfloat16 / mixed_float16 (float32 "
                            "variables and logits; float16 with loss scaling).", type=click.Choice(PRECISIONS),
                            group=RUN)
    jit_compile: str = option("auto", "Compile the train step: auto (Keras' choice: XLA on jax, on tensorflow only "
                              "with a GPU, never on torch), on (XLA; torch.compile on torch) or off; metrics.json "
                              "records what it resolved to.", type=click.Choice(JIT_COMPILE), group=RUN)
    steps_per_execution: int = option(1, "Batches per compiled call (fewer Python round trips on a GPU; the torch "
                                      "backend takes only 1).", type=click.IntRange(1), group=RUN)
    devices: int = option(1, "Data-parallel replicas: each trains on --batch-size/N images of every (global) "
                          "batch. jax: keras.distribution.DataParallel; tensorflow: MirroredStrategy; torch: one "
                          "process per device, under `torchrun --nproc-per-node N` (docs/distributed.md).",
                          type=click.IntRange(1), group=RUN)
    deterministic: bool = option(False, "Each framework's deterministic mode (tf op determinism, torch "
                                 "deterministic algorithms, XLA deterministic ops); recorded in config.json.",
                                 group=RUN)
    keep_checkpoints: str = option("best", "What stays once the run has finished: all (last.weights.h5 with the "
                                   "optimizer state too), best (best.weights.h5; model.keras holds the final "
                                   "weights) or none (model.keras only).", type=click.Choice(KEEP_CHECKPOINTS),
                                   group=RUN)
    out: str | None = option(None, "Run directory (default runs/<time>-<backend>/).", type=click.Path(), group=RUN)
    verbose: int = option(1, "Keras progress: 0 silent, 1 bar, 2 a line per epoch.", type=click.IntRange(0, 2),
                          group=RUN)
    runs_root: str = "runs"
    recipe: str | None = None  # the --recipe whose options this run started from (training.recipes)

    def __post_init__(self) -> None:
        # `--decode-size torchvision` (seed-pytorch's) becomes its size for this run's input, so
        # config.json records pixels and a recipe keeps its proportion at any --image-size.
        if self.decode_size == TORCHVISION_DECODE:
            self.decode_size = torchvision_decode_size(self.image_size)

    @classmethod
    def from_record(cls, options: dict, **changes) -> TrainConfig:
        """A config from options as a JSON file holds them (a run's config.json, a grid's options
        file): lists back to tuples, names this version has no option for left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in names}
        return cls(**{**values, **changes})

    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.cut, self.head_blocks, self.head_filters, self.se, self.dropout,
                         self.bn_momentum, dropout_seed=self.seed, arch=self.resolved_arch,
                         precision=self.precision)

    @property
    def decoded_size(self) -> int:
        """The side images are decoded and cached at: --decode-size, or the input size."""
        return self.image_size if self.decode_size is None else self.decode_size

    @property
    def resolved_arch(self) -> str:
        """--arch, or the architecture --weights implies (WeightsError when they contradict)."""
        return resolve_arch(self.arch, self.weights)

    def check_schedule(self) -> None:
        """Raises ConfigError for schedule options that do not fit together or the model."""
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        blocks = self.model_spec().backbone_blocks
        if self.unfreeze_blocks is not None and self.unfreeze_blocks > blocks:
            raise ConfigError(f"--unfreeze-blocks {self.unfreeze_blocks}: the {self.model} backbone"
                             f"{f' cut at {self.cut}' if self.model == 'hybrid' else ''} has {blocks} residual blocks")
        if self.steps_per_execution > 1 and selected_backend() == "torch":
            raise ConfigError(f"--steps-per-execution {self.steps_per_execution}: Keras' torch backend runs one "
                              f"batch per call (its trainer refuses more); use 1, or the jax or tensorflow backend")
        if self.freeze == "backbone" and self.unfreeze_blocks:
            raise ConfigError("--freeze backbone and --unfreeze-blocks contradict each other; give one")

    def check_devices(self) -> None:
        """Raises ConfigError when the global batch does not split evenly over --devices, or when
        this process was not launched as one of them (torch: torchrun)."""
        if self.batch_size % self.devices:
            even = max(self.devices, self.batch_size // self.devices * self.devices)
            raise ConfigError(f"--batch-size {self.batch_size} is the global batch and must split evenly over "
                              f"--devices {self.devices} (e.g. --batch-size {even})")
        error = data_parallel_launch_error(self.devices)
        if error:
            raise ConfigError(error)

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
        """The training augmentation; raises ConfigError where it and --decode-size do not fit."""
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.decoded_size < self.image_size:
            raise ConfigError(f"--decode-size {self.decode_size} is smaller than --image-size {self.image_size}: "
                              f"images are decoded at the larger side and cropped to the input")
        if self.decoded_size > MAX_DECODE_RATIO * self.image_size:
            raise ConfigError(f"--decode-size {self.decode_size} is more than {MAX_DECODE_RATIO}x --image-size "
                              f"{self.image_size}: evaluation would see only the centre "
                              f"{self.image_size / self.decoded_size:.0%} of each side; give --decode-size at most "
                              f"{MAX_DECODE_RATIO * self.image_size} (torchvision's 256/224 at this size: "
                              f"--decode-size {torchvision_decode_size(self.image_size)})")
        if self.augment == KERAS_GENERATOR and self.decoded_size != self.image_size:
            raise ConfigError(f"--decode-size {self.decode_size} with --augment keras-generator: "
                              f"ImageDataGenerator transforms the image at the input size and crops nothing; "
                              f"leave --decode-size out (or use --augment standard)")
        if self.augment == NO_AUGMENT:
            return AugmentConfig.none()
        if self.augment == KERAS_GENERATOR:
            return AugmentConfig(crop=False, flip_prob=self.flip_prob, rotate_degrees=self.rotate_degrees,
                                 style=KERAS_GENERATOR, shift_range=self.shift_range, zoom_range=self.zoom_range)
        return AugmentConfig(
            crop=True,
            crop_scale=tuple(self.crop_scale),
            crop_ratio=tuple(self.crop_ratio),
            flip_prob=self.flip_prob,
            rotate_degrees=self.rotate_degrees,
            steps=self.augment_steps,
            rotate_interpolation=self.rotate_interpolation,
        )


# `hybrid` is `train --model hybrid` with the two-phase recipe as its defaults (its flags renamed
# where the phase they set has a name of its own).
HYBRID_RECIPE: dict[str, dict] = {
    "epochs": {"flag": "--finetune-epochs", "default": 4,
               "help": "Second phase: epochs fine-tuning the top --unfreeze-blocks blocks with the head."},
    "learning_rate": {"flag": "--finetune-lr", "default": 1e-5,
                      "help": "Second phase: peak Adam learning rate (warmup, then cosine decay)."},
    "model": {"default": "hybrid", "hidden": True},
    "freeze": {"hidden": True},
    "head_epochs": {"default": 2, "type": click.IntRange(1),
                    "help": "First phase: epochs training the head with the backbone frozen."},
    "unfreeze_blocks": {"default": 3, "help": "Second phase: the top K residual blocks of the backbone train with the head."},
    "lr_schedule": {"default": "cosine"},
    "warmup_epochs": {"default": 0.5},
}

# Fewer training images per class than this is not a class a model can learn (nor a split one can score).
MIN_TRAIN_IMAGES_PER_CLASS = 2
# A training split whose largest class outnumbers its smallest by more than this is reported.
IMBALANCE_REPORTED = 10.0


def check_splits(cfg: TrainConfig, splits: Splits) -> list[str]:
    """Refuses data that cannot make a meaningful run, saying what was found: fewer than two
    classes (often --data-dir one level off), a class too small to train on, or more decoded
    images than memory holds (`check_memory`). (A split cannot be left without a class:
    `stratified_split` gives each class of two or more images at least one on both sides.)
    Returns notes to report (what was ignored, memory that is short now, class imbalance)."""
    if len(splits.classes) < 2:
        found = f"{len(splits.classes)} class folder{'s' if len(splits.classes) != 1 else ''} " \
                f"({', '.join(splits.classes)}) under {Path(cfg.data_dir) / 'Training'}"
        raise DatasetError(f"{found}: a classifier needs at least 2; is --data-dir one level too high "
                           f"(the class folders inside a folder of their own)?")
    counts = splits.counts()
    small = [c for c, n in zip(splits.classes, counts["train"], strict=True) if n < MIN_TRAIN_IMAGES_PER_CLASS]
    if small:
        raise DatasetError(f"class {', '.join(small)} has fewer than {MIN_TRAIN_IMAGES_PER_CLASS} training images "
                           f"(per class: {dict(zip(splits.classes, counts['train'], strict=True))})")
    notes = [note for note in (ignored_note(cfg, splits), check_memory(cfg, splits)) if note]
    ratio = max(counts["train"]) / min(counts["train"])
    if ratio > IMBALANCE_REPORTED:
        notes.append(f"class imbalance: the largest training class has {ratio:.1f}x the images of the smallest "
                     f"({dict(zip(splits.classes, counts['train'], strict=True))})")
    return notes


# How many ignored non-image files a note names (config.json lists them all).
IGNORED_NAMED = 3


def ignored_note(cfg: TrainConfig, splits: Splits) -> str | None:
    """What discovery passed over, said on the console and not only in config.json: a symlinked
    folder left out silently loses a class's images, and a stray file may be a misnamed image."""
    def shown(path: str) -> str:
        with contextlib.suppress(ValueError):  # relative to --data-dir, as a user looks for it
            return str(Path(path).relative_to(cfg.data_dir)) + ("/" if path.endswith("/") else "")
        return path

    links = [shown(p) for p in splits.ignored if p.endswith("/")]
    files = [shown(p) for p in splits.ignored if not p.endswith("/")]
    parts = []
    if links:
        parts.append(f"{_count(len(links), 'symlinked folder')} (not followed): {', '.join(links)}")
    if files:
        more = f", ... ({len(files) - IGNORED_NAMED} more, all in config.json)" if len(files) > IGNORED_NAMED else ""
        parts.append(f"{_count(len(files), 'non-image file')}: {', '.join(files[:IGNORED_NAMED])}{more}")
    return f"ignored {'; '.join(parts)}" if parts else None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _size(n_bytes: int) -> str:
    """Bytes as a person reads them: `12.3 GiB`, or `45.6 MiB` under a GiB."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def memory_estimate(cfg: TrainConfig, n_images: int) -> tuple[int, int]:
    """Bytes the run's images take at the least: `(decoded cache, float32 batches in flight)`.

    The cache holds every image as uint8 at the decode size, `n * size^2 * 3` (0 with --no-cache); the batches are
    the one training, the one being built and the --workers prefetched, `size^2 * 3` float32
    values per image. The model, its activations and the backend come on top: this is a lower
    bound, so a refusal on it never turns away a run that would fit.
    """
    pixels = cfg.image_size * cfg.image_size * 3
    decoded = cfg.decoded_size * cfg.decoded_size * 3
    return n_images * decoded if cfg.cache else 0, (cfg.workers + 2) * cfg.batch_size * pixels * 4


def physical_memory() -> int | None:
    """The machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes: what can be had now without swapping (None off Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_memory(cfg: TrainConfig, splits: Splits) -> str | None:
    """Refuses a run whose images cannot fit in this machine's RAM, before hours of decoding end in
    a swap storm or the OOM killer. The refusal compares with physical memory, which does not
    change: a run over it can never fit. Memory available now (MemAvailable) moves as other jobs
    start and end, so falling short of it only gives a note: a refusal on it would be a guess."""
    n_images = len(splits.train) + len(splits.val) + len(splits.test)
    cache, batches = memory_estimate(cfg, n_images)
    need = cache + batches
    parts = f"{_size(cache)} decoded cache + " if cfg.cache else ""
    what = (f"{n_images} images at --image-size {cfg.image_size} need about {_size(need)} "
            f"({parts}{_size(batches)} of float32 batches in flight)")
    lower = "lower --image-size, or give --no-cache" if cfg.cache else "lower --image-size or --batch-size"
    total = physical_memory()
    if total is not None and need > total:
        raise ConfigError(f"{what}, more than this machine's {_size(total)} of memory: {lower}")
    available = available_memory()
    if available is not None and need > available:
        return f"{what}, more than the {_size(available)} of memory available now; {lower} if the run swaps"
    return None


@dataclasses.dataclass
class Preflight:
    """What the checks found: the run directory (created), the splits, and notes to report."""

    run_dir: Path | None  # None only on a torch process of rank > 0 without --out: it writes nothing
    splits: Splits
    notes: list[str] = dataclasses.field(default_factory=list)
    created: bool = False  # the run directory did not exist before this run

    @contextlib.contextmanager
    def undone_on_input_errors(self) -> Iterator[None]:
        """A new run that stops on bad input before its first epoch leaves nothing behind: the
        files it wrote go, and the directory too if it made it (one line, no stray folder)."""
        try:
            yield
        except UserInputError:
            if self.created:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise


def preflight(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Preflight:
    """Checks the options, data, weights and output folder; creates the run directory.

    Needs no backend, so bad input fails in about a second with one clear error. A resumed
    run needs no starting weights (its checkpoint holds every variable).
    """
    cfg.augment_config()
    cfg.check_schedule()
    cfg.check_devices()
    splits = cfg.splits(twins=False)  # the layout, in a second
    notes = check_splits(cfg, splits)
    if process_rank()[0] > 0:  # a torch process besides rank 0 trains in step with it and writes nothing
        return Preflight(Path(cfg.out) if cfg.out else None, cfg.splits() if cfg.finds_twins else splits, notes)
    if not resume:
        cfg.resolved_arch  # noqa: B018 -- a contradiction (keras-v1 with torchvision weights) fails here
        resolve_backbone_weights(cfg.weights)
        if cfg.init_weights:
            check_weights_file(Path(cfg.init_weights), "--init-weights file")
    created = not resume and not (cfg.out and Path(cfg.out).exists())
    if resume:
        run_dir = reopen_run_dir(cfg.out, cfg.data_dir, notes)
    else:  # never into another run's files: refused, or emptied first with --overwrite
        run_dir = claim_run_dir(cfg.out, selected_backend(), cfg.runs_root, overwrite, cfg.data_dir, notes)
    checked = Preflight(run_dir, splits, notes, created)
    if cfg.finds_twins:  # decodes every image: only once everything else is known to be fine
        with checked.undone_on_input_errors():
            checked.splits = cfg.splits()
            check_splits(cfg, checked.splits)
    return checked
