"""`ModelSpec`: which model to build, without importing Keras (options are checked first)."""

from __future__ import annotations

import dataclasses

MODELS = ("resnet50", "hybrid")
BACKBONE_NAME = "resnet50"  # the backbone's layer name inside either model
# Where `--cut` ends the backbone: the output layer of the last residual block of a stage.
CUT_LAYERS = {
    "conv3": "conv3_block4_out",
    "conv4": "conv4_block6_out",
    "conv5": "conv5_block3_out",
}
CUTS = tuple(CUT_LAYERS)
# ResNet50's residual blocks per stage (conv1 is the stem, not a block).
STAGE_BLOCKS = {"conv2": 3, "conv3": 4, "conv4": 6, "conv5": 3}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture options; `cut`, `head_blocks`, `head_filters` and `se` are the
    hybrid's (see `model.hybrid.build_hybrid`)."""

    name: str = "resnet50"
    cut: str = "conv4"
    head_blocks: int = 2
    head_filters: int = 256
    se: bool = True
    dropout: float = 0.2
    bn_momentum: float | None = None
    dropout_seed: int | None = None  # a training run passes its --seed

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.name!r}")
        if self.cut not in CUTS:
            raise ValueError(f"cut must be one of {CUTS}, got {self.cut!r}")

    @property
    def backbone_blocks(self) -> int:
        """How many residual blocks the backbone keeps (16 uncut, 13 cut at conv4)."""
        last = self.cut if self.name == "hybrid" else "conv5"
        return sum(n for stage, n in STAGE_BLOCKS.items() if stage <= last)

