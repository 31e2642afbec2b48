"""`ModelSpec`: which model to build, without importing Keras (options are checked first).

The model's defaults are declared here once: `ModelSpec`'s fields, `IMAGE_SIZE`, `NO_FREEZE`
and `NO_WEIGHTS`. The builders' signatures (`model.classifier`, `model.hybrid`, `model.factory`)
and the training options (`training.config.TrainConfig`) take their defaults from them;
`tests/test_defaults.py` fails when a default below the command line differs from its declaration.
"""

from __future__ import annotations

import dataclasses

MODELS = ("resnet50", "hybrid")
# The backbone's architecture. keras-v1: `keras.applications.ResNet50` (the stride of a stage's
# first block on its 1x1 convolution; Keras' ImageNet weights). torchvision-v1.5: torchvision's
# `resnet50` (the stride on the 3x3 convolution, no conv biases; torchvision's weights).
KERAS_V1, TORCHVISION_V15 = "keras-v1", "torchvision-v1.5"
ARCHS = (KERAS_V1, TORCHVISION_V15)
# Keras dtype policies a model can be built in; mixed ones keep the variables (and the logits) in float32.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# The square input side a model is built for unless told otherwise (ResNet50's ImageNet size; --image-size).
IMAGE_SIZE = 224
# What trains in the main phase: everything, or only what follows the backbone (--freeze).
NO_FREEZE, FREEZE_BACKBONE = "none", "backbone"
FREEZE_MODES = (NO_FREEZE, FREEZE_BACKBONE)
# The weights a builder starts from unless told: random, so that building never downloads unasked
# (a training run's --weights defaults to imagenet: that default is the option's, in TrainConfig).
NO_WEIGHTS = "none"
BACKBONE_NAME = "resnet50"  # the backbone's layer name inside either model
# Where `--cut` ends the backbone: the output layer of the last residual block of a stage.
CUT_LAYERS = {
    "conv3": "conv3_block4_out",
    "conv4": "conv4_block6_out",
    "conv5": "conv5_block3_out",
}
CUTS = tuple(CUT_LAYERS)
UNCUT = CUTS[-1]  # conv5: where the plain classifier's backbone ends (the whole ResNet50)
# ResNet50's residual blocks per stage (conv1 is the stem, not a block).
STAGE_BLOCKS = {"conv2": 3, "conv3": 4, "conv4": 6, "conv5": 3}
# The bottleneck width of each stage's blocks; a block outputs 4 times as many channels.
STAGE_FILTERS = {"conv2": 64, "conv3": 128, "conv4": 256, "conv5": 512}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture options; `cut`, `head_blocks`, `head_filters` and `se` are the
    hybrid's (see `model.hybrid.build_hybrid`); `arch` is the backbone's, one of `ARCHS`.

    Each field's default is the one declaration of that default: the builders' keyword
    arguments and the training options of the same name take theirs from here."""

    name: str = "resnet50"
    cut: str = "conv4"
    head_blocks: int = 2
    head_filters: int = 256
    se: bool = True
    dropout: float = 0.2
    bn_momentum: float | None = None
    dropout_seed: int | None = None  # a training run passes its --seed
    arch: str = KERAS_V1  # the resolved one: --arch defaults to what --weights implies (keras-v1 for imagenet)
    precision: str = "float32"  # the Keras dtype policy the layers are built in (one of PRECISIONS)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.name!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.cut not in CUTS:
            raise ValueError(f"cut must be one of {CUTS}, got {self.cut!r}")

    @property
    def backbone_blocks(self) -> int:
        """How many residual blocks the backbone keeps (16 uncut, 13 cut at conv4)."""
        last = self.cut if self.name == "hybrid" else UNCUT
        return sum(n for stage, n in STAGE_BLOCKS.items() if stage <= last)

