"""What the training schedule and the stability log need to know about a model's parts:
the backbone's residual blocks, which of them train, and the layer groups."""

from __future__ import annotations

import re

import keras

from model.spec import BACKBONE_NAME

_BLOCK = re.compile(r"^(conv\d_block\d+)_")
_STAGE = re.compile(r"^(conv\d)_")
_HEAD_BLOCK = re.compile(r"^(head_block\d+)_")
CLASSIFIER_LAYER = "logits"


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_NAME)


def residual_blocks(backbone: keras.Model) -> list[str]:
    """The backbone's residual blocks, bottom to top (`conv2_block1` ... `conv5_block3`)."""
    names = [m.group(1) for layer in backbone.layers if (m := _BLOCK.match(layer.name))]
    return list(dict.fromkeys(names))


def set_backbone_trainable(model: keras.Model, top_blocks: int | None, train_batchnorm: bool = True) -> list[str]:
    """Freezes the backbone except its top `top_blocks` residual blocks (None: all of it
    trains, stem included; 0: none of it). The rest of the model trains.

    Without `train_batchnorm` the backbone's BatchNormalization layers stay frozen even
    in the blocks that train: they normalise with the moving statistics and keep their
    scale and offset (torchvision's FrozenBatchNorm2d). Returns the residual blocks that
    train. Recompile the model after calling this.
    """
    if top_blocks is not None and top_blocks < 0:
        raise ValueError(f"top_blocks must be >= 0, got {top_blocks}")
    model.trainable = True
    backbone = backbone_of(model)
    blocks = residual_blocks(backbone)
    training = set(blocks if top_blocks is None else blocks[len(blocks) - top_blocks:] if top_blocks else [])
    for layer in backbone.layers:
        match = _BLOCK.match(layer.name)
        in_training_block = top_blocks is None or bool(match and match.group(1) in training)
        # Keras 3 runs a BatchNormalization layer in inference mode exactly when it is not
        # trainable: `fit` overrides a `training=False` given when the backbone was called
        # (keras-team/keras#20285), so this flag is the one switch that holds.
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = in_training_block and (train_batchnorm or not is_batchnorm)
    return [b for b in blocks if b in training]


def layer_group(variable_path: str) -> str | None:
    """The group a variable belongs to in the stability log: a backbone stage (`conv1` to
    `conv5`), a head block (`head_block<i>`), `classifier`, or None (e.g. a seed state)."""
    layer = variable_path.split("/")[-2] if "/" in variable_path else variable_path
    for pattern in (_HEAD_BLOCK, _STAGE):
        if match := pattern.match(layer):
            return match.group(1)
    return "classifier" if layer == CLASSIFIER_LAYER else None


def activation_points(model: keras.Model) -> dict[str, keras.KerasTensor]:
    """Tensors whose statistics the stability log records: the backbone's output (`cut`)
    and the output of each head block."""
    names = [layer.name for layer in model.layers]
    after_backbone = model.layers[names.index(BACKBONE_NAME) + 1]
    points = {"cut": after_backbone.input}
    for name in names:
        if (match := _HEAD_BLOCK.match(name)) and name.endswith("_out"):
            points[match.group(1)] = model.get_layer(name).output
    return points
