"""`build_classifier`: ResNet50 without its top, global average pooling, dropout, logits."""

from __future__ import annotations

import keras

from model.weights import WeightsError, resolve_backbone_weights

FREEZE_MODES = ("none", "backbone")


def build_backbone(image_size: int, weights: str = "none") -> keras.Model:
    """`keras.applications.ResNet50(include_top=False)` for square RGB inputs."""
    resolved = resolve_backbone_weights(weights)
    try:
        return keras.applications.ResNet50(
            include_top=False, weights=resolved, input_shape=(image_size, image_size, 3)
        )
    except (ValueError, OSError) as e:
        raise WeightsError(f"cannot load backbone weights {weights!r}: {e}") from None


def build_classifier(
    num_classes: int,
    image_size: int = 224,
    weights: str = "none",
    freeze: str = "none",
    dropout: float = 0.2,
    bn_momentum: float | None = None,
) -> keras.Model:
    """The ResNet50 classifier; it outputs logits (use a `from_logits=True` loss).

    Args:
        num_classes: size of the logits layer.
        image_size: square input side, in pixels (32 or more).
        weights: `imagenet`, `none` (random init) or a path to backbone weights.
        freeze: `none` trains everything; `backbone` trains only the head and
            runs the backbone's BatchNormalization in inference mode.
        dropout: rate of the dropout before the logits.
        bn_momentum: if set, the moving-average momentum of every backbone
            BatchNormalization (Keras' ResNet50 uses 0.99; torchvision's
            equivalent is 0.9). A lower value lets the inference statistics
            catch up in short runs from random weights.
    """
    if freeze not in FREEZE_MODES:
        raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {freeze!r}")
    backbone = build_backbone(image_size, weights)
    if bn_momentum is not None:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    frozen = freeze == "backbone"
    backbone.trainable = not frozen
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # training=False keeps a frozen backbone's BatchNormalization on its moving
    # statistics even while the head trains (the keras-io fine-tuning recipe).
    x = backbone(inputs, training=False) if frozen else backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="resnet50_classifier")
