"""The plain classifier: ResNet50 (Keras' v1 or torchvision's v1.5) without its top, global
average pooling, dropout, logits.

`build_backbone` and `classification_head` are shared with the hybrid model.
"""

from __future__ import annotations

import keras

from model.resnet import load_backbone_weights, resnet50
from model.spec import (
    BACKBONE_NAME,
    CUT_LAYERS,
    FREEZE_BACKBONE,
    FREEZE_MODES,
    IMAGE_SIZE,
    NO_FREEZE,
    NO_WEIGHTS,
    UNCUT,
    ModelSpec,
)
from model.structure import set_backbone_trainable
from model.weights import WeightsError, first_line, resolve_arch, resolve_backbone_weights


def build_backbone(
    image_size: int,
    weights: str = NO_WEIGHTS,
    cut: str = UNCUT,
    bn_momentum: float | None = ModelSpec.bn_momentum,
    arch: str = ModelSpec.arch,
) -> keras.Model:
    """ResNet50 of `arch` without its top (`model.resnet`) for square RGB inputs, ending at `cut`.

    `weights` that were trained for another architecture (Keras' ImageNet weights and v1.5,
    torchvision's and v1) are refused before anything is built.
    """
    if cut not in CUT_LAYERS:
        raise ValueError(f"cut must be one of {tuple(CUT_LAYERS)}, got {cut!r}")
    resolve_arch(arch, weights)
    resolved = resolve_backbone_weights(weights)
    resnet = resnet50(arch, image_size)
    try:
        load_backbone_weights(resnet, resolved)
    except (ValueError, OSError) as e:
        raise WeightsError(f"cannot load backbone weights {weights!r}: {first_line(e)}") from None
    if bn_momentum is not None:
        for layer in resnet.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    if cut == UNCUT:
        return resnet
    return keras.Model(resnet.input, resnet.get_layer(CUT_LAYERS[cut]).output, name=BACKBONE_NAME)


def classification_head(x, num_classes: int, dropout: float, dropout_seed: int | None = ModelSpec.dropout_seed):
    """Global average pooling, dropout and the logits layer.

    With `dropout_seed`, the masks come from a seeded Keras generator on every backend
    (unseeded, torch draws them from its global RNG, which no checkpoint holds).
    """
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, seed=dropout_seed, name="dropout")(x)
    # float32 logits under a mixed policy: the softmax and the loss are then computed in float32,
    # where bfloat16's 8-bit mantissa (or float16's range) would round the loss.
    return keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)


def build_classifier(
    num_classes: int,
    image_size: int = IMAGE_SIZE,
    weights: str = NO_WEIGHTS,
    freeze: str = NO_FREEZE,
    dropout: float = ModelSpec.dropout,
    bn_momentum: float | None = ModelSpec.bn_momentum,
    dropout_seed: int | None = ModelSpec.dropout_seed,
    arch: str = ModelSpec.arch,
) -> keras.Model:
    """The ResNet50 classifier; it outputs logits (use a `from_logits=True` loss). The defaults
    are `ModelSpec`'s fields and `model.spec`'s constants (declared once, there).

    Args:
        num_classes: size of the logits layer.
        image_size: square input side, in pixels (32 or more).
        weights: `imagenet` (Keras', for keras-v1), `torchvision` or `torchvision-v2`
            (torchvision's IMAGENET1K_V1 or V2, for torchvision-v1.5), `none` (random
            init), a path to backbone weights (.h5) or to a torchvision state dict (.pth).
        freeze: `none` trains everything; `backbone` trains only the head.
        dropout: rate of the dropout before the logits.
        bn_momentum: if set, the moving-average momentum of every backbone
            BatchNormalization (Keras' ResNet50 uses 0.99; torchvision's
            equivalent is 0.9). A lower value lets the inference statistics
            catch up in short runs from random weights.
        dropout_seed: seed of the dropout masks (see `classification_head`).
        arch: the backbone, one of `model.spec.ARCHS`.
    """
    if freeze not in FREEZE_MODES:
        raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {freeze!r}")
    backbone = build_backbone(image_size, weights, bn_momentum=bn_momentum, arch=arch)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    logits = classification_head(backbone(inputs), num_classes, dropout, dropout_seed)
    model = keras.Model(inputs, logits, name="resnet50_classifier")
    if freeze == FREEZE_BACKBONE:
        set_backbone_trainable(model, 0)  # the schedule's own switch (BatchNorm to inference mode)
    return model
