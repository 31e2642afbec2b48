"""The hybrid model: ResNet50 cut at a stage, then a custom CNN head.

The head is Conv-BatchNorm-ReLU blocks (He initialisation, optional
squeeze-and-excitation), then the plain classifier's pooling, dropout and logits.
"""

from __future__ import annotations

import keras

from model.classifier import build_backbone, classification_head
from model.spec import IMAGE_SIZE, NO_WEIGHTS, ModelSpec


def squeeze_excite(x, name: str, output_name: str, ratio: int = 16):
    """Channel attention (Hu et al., 2018): rescale each channel by a gate from its mean."""
    channels = x.shape[-1]
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    gate = keras.layers.Dense(max(channels // ratio, 4), activation="relu", kernel_initializer="he_normal",
                              name=f"{name}_reduce")(gate)
    gate = keras.layers.Dense(channels, activation="sigmoid", name=f"{name}_expand")(gate)
    return keras.layers.Multiply(name=output_name)([x, gate])


def conv_block(x, filters: int, name: str, se: bool):
    """3x3 Conv (He normal, no bias) -> BatchNorm -> ReLU [-> squeeze-and-excitation]."""
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu" if se else f"{name}_out")(x)
    return squeeze_excite(x, f"{name}_se", output_name=f"{name}_out") if se else x


def build_hybrid(
    num_classes: int,
    image_size: int = IMAGE_SIZE,
    weights: str = NO_WEIGHTS,
    cut: str = ModelSpec.cut,
    head_blocks: int = ModelSpec.head_blocks,
    head_filters: int = ModelSpec.head_filters,
    se: bool = ModelSpec.se,
    dropout: float = ModelSpec.dropout,
    bn_momentum: float | None = ModelSpec.bn_momentum,
    dropout_seed: int | None = ModelSpec.dropout_seed,
    arch: str = ModelSpec.arch,
) -> keras.Model:
    """ResNet50 up to `cut` (`conv3`, `conv4` or `conv5`) and a custom CNN head; outputs logits.
    The defaults are `ModelSpec`'s fields (declared once, there).

    Args:
        head_blocks: how many Conv-BatchNorm-ReLU blocks follow the cut (each
            block's output layer is `head_block<i>_out`).
        head_filters: channels of each head block.
        se: add squeeze-and-excitation to each head block.
        The other arguments are those of `build_classifier`.
    """
    backbone = build_backbone(image_size, weights, cut, bn_momentum, arch)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = backbone(inputs)
    for i in range(1, head_blocks + 1):
        x = conv_block(x, head_filters, f"head_block{i}", se)
    logits = classification_head(x, num_classes, dropout, dropout_seed)
    return keras.Model(inputs, logits, name=f"hybrid_{cut}")
