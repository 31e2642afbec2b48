"""Training phases: which part of the model trains, for how long, at what learning rate, with
which optimizer and loss.

A run is one phase (`train`) or two (`head`, then `finetune`): the head first with
the backbone frozen, then the top residual blocks too, at a low rate with warmup
and cosine decay. One Adam optimizer state runs through both phases.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from training.config import JIT_COMPILE, SCHEDULES, TrainConfig


@dataclasses.dataclass(frozen=True)
class Phase:
    """One `fit` call: its epochs, learning rate and trainable backbone blocks."""

    name: str
    epochs: int
    learning_rate: float
    # The options' defaults (TrainConfig's), for a phase built without them.
    schedule: str = TrainConfig.lr_schedule
    warmup_epochs: float = TrainConfig.warmup_epochs
    backbone_blocks: int | None = None  # top residual blocks that train; None: all, 0: frozen
    train_batchnorm: bool = True  # the backbone's BatchNormalization in those blocks trains too
    weight_decay: float = TrainConfig.weight_decay  # Adam's decoupled weight decay, on kernels
    adam_epsilon: float = TrainConfig.adam_epsilon
    label_smoothing: float = TrainConfig.label_smoothing
    jit_compile: str | bool = JIT_COMPILE[TrainConfig.jit_compile]  # model.compile's
    steps_per_execution: int = TrainConfig.steps_per_execution


def plan_phases(cfg) -> list[Phase]:
    """The phases a `TrainConfig` asks for."""
    phases = []
    # How every phase trains and compiles (not what trains): the same in each.
    common = {"weight_decay": cfg.weight_decay, "adam_epsilon": cfg.adam_epsilon, "label_smoothing": cfg.label_smoothing,
              "jit_compile": JIT_COMPILE[cfg.jit_compile], "steps_per_execution": cfg.steps_per_execution}
    if cfg.head_epochs:
        # The schedule options are the main phase's: the head phase runs at a constant rate.
        phases.append(Phase("head", cfg.head_epochs, cfg.head_lr, "constant", 0.0, backbone_blocks=0, **common))
    blocks = 0 if cfg.freeze == "backbone" else cfg.unfreeze_blocks
    # The hybrid keeps the backbone's BatchNormalization on the statistics its weights
    # came with; the plain classifier trains it, as the original study did.
    train_batchnorm = cfg.bn_train if cfg.bn_train is not None else cfg.model == "resnet50"
    phases.append(Phase(
        "finetune" if phases else "train", cfg.epochs, cfg.learning_rate, cfg.lr_schedule,
        cfg.warmup_epochs, blocks, train_batchnorm, **common,
    ))
    return phases


@keras.saving.register_keras_serializable(package="brain_mri")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak` over `warmup_steps`, then constant or cosine decay to zero at
    `total_steps`; steps count from `start_step`, the optimizer step at which the phase starts."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, start_step: int = 0,
                 decay: str = "cosine") -> None:
        if decay not in SCHEDULES:
            raise ValueError(f"decay must be one of {SCHEDULES}, got {decay!r}")
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps
        self.start_step, self.decay = start_step, decay

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32") - self.start_step
        warmup = ops.minimum((step + 1) / max(self.warmup_steps, 1), 1.0)
        if self.decay == "constant":
            return self.peak * warmup
        progress = ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
        cosine = 0.5 * (1 + ops.cos(math.pi * progress))
        return self.peak * ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "start_step": self.start_step, "decay": self.decay}


def phase_learning_rate(phase: Phase, steps_per_epoch: int, start_step: int):
    """A float for a constant rate without warmup, else a `WarmupSchedule`."""
    warmup_steps = round(phase.warmup_epochs * steps_per_epoch)
    if phase.schedule == "constant" and not warmup_steps:
        return phase.learning_rate
    return WarmupSchedule(phase.learning_rate, warmup_steps, phase.epochs * steps_per_epoch, start_step,
                          phase.schedule)


def phase_optimizer(phase: Phase, learning_rate, variables: list) -> keras.optimizers.Adam:
    """The phase's Adam; with `phase.weight_decay`, decoupled weight decay (AdamW) on the kernels
    of `variables` only: decaying BatchNorm scales, shifts and biases pulls them toward 0 for no gain."""
    optimizer = keras.optimizers.Adam(learning_rate, epsilon=phase.adam_epsilon, weight_decay=phase.weight_decay or None)
    if phase.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
    return optimizer


def carry_optimizer_state(source: keras.optimizers.Optimizer, target: keras.optimizers.Optimizer) -> int:
    """Copies the step count and the slots (e.g. Adam's moments) of every variable both
    optimizers track from `source` into the built `target`; returns how many were copied.

    Keras names a slot after its variable's path (`head_block1_conv_kernel_momentum`),
    so a variable that trained in the previous phase keeps its moments.
    """
    previous = {v.name: v for v in source.variables}
    copied = 0
    for variable in target.variables:
        old = previous.get(variable.name)
        if variable.name == "learning_rate" or old is None or tuple(old.shape) != tuple(variable.shape):
            continue
        variable.assign(old.value)
        copied += 1
    return copied


# The training loss: sparse cross-entropy from logits, with optional label smoothing. Keras'
# `SparseCategoricalCrossentropy` has no `label_smoothing` (only the one-hot
# `CategoricalCrossentropy` does), and the pipeline's labels are class indices; so the smoothed
# loss is written here once, in `keras.ops`, the same code on every backend.
@keras.saving.register_keras_serializable(package="brain_mri")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy against `(1 - smoothing) * one_hot(label) + smoothing / num_classes`,
    from logits and integer labels: `CategoricalCrossentropy(label_smoothing=...)` without
    building the one-hot targets."""

    def __init__(self, smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def call(self, y_true, y_pred):
        ops = keras.ops
        log_probs = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        labels = ops.cast(ops.reshape(y_true, (-1, 1)), "int32")
        true_class = -ops.squeeze(ops.take_along_axis(log_probs, labels, axis=-1), axis=-1)
        uniform = -ops.mean(log_probs, axis=-1)  # the cross-entropy against 1/num_classes everywhere
        return (1.0 - self.smoothing) * true_class + self.smoothing * uniform

    def get_config(self) -> dict:
        return {**super().get_config(), "smoothing": self.smoothing}


def training_loss(label_smoothing: float = 0.0) -> keras.losses.Loss:
    """Keras' own sparse cross-entropy from logits, or the smoothed one when asked for."""
    if label_smoothing:
        return SmoothedSparseCrossentropy(label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
