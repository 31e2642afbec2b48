"""Named presets of training options (`--recipe NAME`): the original study's two recipes and
a from-scratch CPU recipe. A recipe only supplies defaults: options given on the command line,
or by a `--config` file, still win, and the resolved options land in config.json.

Keras-free, like `training.options`: recipes are checked before a backend loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from training.config import TORCHVISION_DECODE, TrainConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A preset: what it reproduces, and the options it sets (TrainConfig field -> value)."""

    summary: str
    options: dict[str, Any]


# What the study's two recipes share: the optimizer's schedule and the input size. They differ only
# in the factors `reproduce` changes one at a time. The values are the training options' defaults
# (which follow the study), declared once in TrainConfig; a recipe sets them all the same, so that
# they hold under a command whose own defaults differ (`hybrid`).
STUDY_SCHEDULE: dict[str, Any] = {"learning_rate": TrainConfig.learning_rate, "epochs": TrainConfig.epochs,
                                  "image_size": TrainConfig.image_size}
TORCH_ADAM_EPSILON = 1e-8  # torch.optim.Adam's default

RECIPES: dict[str, Recipe] = {
    # The study's PyTorch recipe, as this project reconstructs it: torchvision's transforms, run as
    # torchvision runs them (the crop from a decode at 256 px, resized with antialiasing to 224;
    # evaluation on the centre 224 of the 256, as torchvision's reference recipe, in that
    # proportion at another --image-size; rotation with nearest-neighbour sampling),
    # torch.optim.Adam's epsilon, and torchvision's pretrained ResNet50.
    "seed-pytorch": Recipe(
        "the study's PyTorch recipe: RandomResizedCrop from a 256 px decode (evaluation: its centre 224) + flip + "
        "rotation (nearest), each step as torchvision runs it, x/255 then ImageNet mean/std, torchvision's ResNet50 "
        "v1.5 and ImageNet weights, BatchNorm momentum 0.9, Adam 1e-4 with epsilon 1e-8, 10 epochs, 224 px",
        {
            "augment": "standard", "augment_steps": "torchvision", "rotate_interpolation": "nearest",
            "decode_size": TORCHVISION_DECODE, "preprocess": "imagenet", "arch": "torchvision-v1.5",
            "weights": "torchvision", "bn_momentum": 0.9, "adam_epsilon": TORCH_ADAM_EPSILON, **STUDY_SCHEDULE,
        },
    ),
    # The study's Keras recipe, as this project reconstructs it: ImageDataGenerator(rescale=1/255, preprocessing_function=preprocess_input,
    # rotation/shift/zoom, horizontal_flip) and keras.applications.ResNet50 with Keras' defaults.
    "seed-keras": Recipe(
        "the study's Keras recipe: ImageDataGenerator's rotation/shift/zoom/flip with edge fill, caffe "
        "preprocessing then x/255 (its order), Keras' ResNet50 v1 and ImageNet weights, BatchNorm momentum "
        "0.99, Adam 1e-4, 10 epochs, 224 px",
        {
            "augment": "keras-generator", "preprocess": "caffe-rescaled", "arch": "keras-v1", "weights": "imagenet",
            "bn_momentum": 0.99, **STUDY_SCHEDULE,
        },
    ),
    # From random weights at 64 px on a 2-core CPU, in 8 epochs: the best of a measured ablation
    # (backends.md, "A recipe that trains from scratch on a CPU"). Cropping a 64 px image throws
    # away detail the model needs, so the standard augmentation keeps the whole image (flip and
    # rotation only); a warmup epoch and cosine decay to zero end on a settled point rather than a
    # noisy one; BatchNorm momentum 0.9 lets the moving statistics keep up with fast-changing weights.
    "cpu-scratch": Recipe(
        "from random weights at 64 px, 8 epochs: flip + 10 degree rotation (no crop), Adam 1e-3 with a warmup "
        "epoch and cosine decay, BatchNorm momentum 0.9, batch 32",
        {
            "image_size": 64, "epochs": 8, "weights": "none", "batch_size": 32, "learning_rate": 1e-3,
            "lr_schedule": "cosine", "warmup_epochs": 1.0, "bn_momentum": 0.9, "augment": "standard",
            "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "rotate_degrees": 10.0, "flip_prob": 0.5,
        },
    ),
}


def recipe_options(name: str) -> dict[str, Any]:
    """The options recipe `name` sets (a copy)."""
    return dict(RECIPES[name].options)
