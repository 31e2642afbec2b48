"""ResNet50 in Keras, as Keras builds it (v1) or as torchvision does (v1.5), from one builder.

Both have the same layers and layer names (`conv1_conv`, `conv2_block1_0_conv` ...
`conv5_block3_out`), so the cut points, the unfreezing of the top blocks and Grad-CAM work
on either. They differ in three settings, `ResNetStyle`:

- where a stage's first block downsamples: on its first 1x1 convolution (v1), or on its
  3x3 convolution (v1.5, so no input pixel is skipped by a strided 1x1);
- the BatchNormalization epsilon: Keras' 1.001e-5, torchvision's 1e-5;
- convolution biases: Keras' have them (its weights come from Caffe), torchvision's do not.

The v1 style builds exactly `keras.applications.ResNet50`'s layers in its order (its
ImageNet .h5 file is loaded by layer order; tests/test_torchvision_weights.py compares the
two), and downloads that file as it does.
"""

from __future__ import annotations

import dataclasses
import os

import h5py
import keras
from keras import layers

from model.spec import BACKBONE_NAME, KERAS_V1, STAGE_BLOCKS, STAGE_FILTERS, TORCHVISION_V15
from model.weights import (
    IMAGENET_NOTOP_FILE,
    WeightsError,
    converted_torchvision_file,
    imagenet_url,
    is_torchvision_weights,
    published_hashes,
)

STEM_FILTERS = 64
EXPANSION = 4  # a bottleneck block outputs 4 times its width


@dataclasses.dataclass(frozen=True)
class ResNetStyle:
    stride_on_3x3: bool  # v1.5: a stage's first block downsamples in its 3x3 convolution
    epsilon: float  # of every BatchNormalization
    conv_bias: bool


STYLES = {
    KERAS_V1: ResNetStyle(stride_on_3x3=False, epsilon=1.001e-5, conv_bias=True),
    TORCHVISION_V15: ResNetStyle(stride_on_3x3=True, epsilon=1e-5, conv_bias=False),
}


def _conv(style: ResNetStyle, filters: int, kernel: int, name: str, strides: int = 1, padding: str = "valid"):
    return layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=style.conv_bias, name=name)


def _batchnorm(style: ResNetStyle, name: str):
    return layers.BatchNormalization(axis=3, epsilon=style.epsilon, name=name)


def _conv3x3(x, style: ResNetStyle, filters: int, stride: int, name: str):
    """The block's 3x3 convolution. Keras' "same" padding with stride 2 pads only the bottom
    and right (one pixel) where torchvision pads one pixel on every side: v1.5 pads
    explicitly, then convolves without padding."""
    if stride == 1:
        return _conv(style, filters, 3, f"{name}_2_conv", padding="same")(x)
    x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name=f"{name}_2_pad")(x)
    return _conv(style, filters, 3, f"{name}_2_conv", strides=stride)(x)


def bottleneck_block(x, filters: int, stride: int, conv_shortcut: bool, style: ResNetStyle, name: str):
    """1x1 -> 3x3 -> 1x1 convolutions (each with BatchNormalization) plus the shortcut.

    The layers are created in `keras.applications.resnet.residual_block_v1`'s order
    (shortcut first): a Functional model's layer order, which the ImageNet file is
    loaded by, follows it.
    """
    shortcut = x
    if conv_shortcut:
        shortcut = _conv(style, EXPANSION * filters, 1, f"{name}_0_conv", strides=stride)(x)
        shortcut = _batchnorm(style, f"{name}_0_bn")(shortcut)
    stride_1x1, stride_3x3 = (1, stride) if style.stride_on_3x3 else (stride, 1)
    x = _conv(style, filters, 1, f"{name}_1_conv", strides=stride_1x1)(x)
    x = _batchnorm(style, f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = _conv3x3(x, style, filters, stride_3x3, name)
    x = _batchnorm(style, f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = _conv(style, EXPANSION * filters, 1, f"{name}_3_conv")(x)
    x = _batchnorm(style, f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def stage(x, stage_name: str, style: ResNetStyle):
    """One stage's residual blocks; conv2 keeps the resolution (the max pool has halved
    it), the later stages halve it in their first block."""
    stride = 1 if stage_name == "conv2" else 2
    for i in range(1, STAGE_BLOCKS[stage_name] + 1):
        first = i == 1
        x = bottleneck_block(x, STAGE_FILTERS[stage_name], stride if first else 1, first, style,
                             f"{stage_name}_block{i}")
    return x


def stem(x, style: ResNetStyle):
    """7x7/2 convolution and 3x3/2 max pool, with torchvision's symmetric padding (which is
    Keras' too). The max pool's zero padding equals torchvision's -inf padding: it follows
    a ReLU, so no value is below 0."""
    x = layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = _conv(style, STEM_FILTERS, 7, "conv1_conv", strides=2)(x)
    x = _batchnorm(style, "conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def resnet50(
    arch: str,
    image_size: int,
    include_top: bool = False,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """ResNet50 of `arch` (`model.spec.ARCHS`) with random weights, for square RGB inputs.
    `include_top` adds `avg_pool` and the `predictions` layer, as Keras' ResNet50 does."""
    style = STYLES[arch]
    inputs = layers.Input(shape=(image_size, image_size, 3))
    x = stem(inputs, style)
    for stage_name in STAGE_FILTERS:
        x = stage(x, stage_name, style)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=BACKBONE_NAME)


def load_backbone_weights(model: keras.Model, resolved: str | None) -> None:
    """Loads what `model.weights.resolve_backbone_weights` resolved into a model built by
    `resnet50`: nothing (None), Keras' ImageNet file (downloaded into Keras' cache as
    `keras.applications.ResNet50` does, with its published hash), a Keras weights file, or
    the Keras-layout file converted from a torchvision state dict (`resolved` is the .pth)."""
    if resolved is None:
        return
    if is_torchvision_weights(resolved):
        load_converted(model, converted_torchvision_file(resolved))
        return
    if resolved == "imagenet":
        resolved = keras.utils.get_file(IMAGENET_NOTOP_FILE, imagenet_url(), cache_subdir="models",
                                        file_hash=published_hashes()["resnet50"][1])
    model.load_weights(resolved)


def load_converted(model: keras.Model, path: str | os.PathLike) -> None:
    """Sets each layer's weights from a file of `model.torchvision_convert`'s layout (one
    group per Keras layer name). The file's layers that `model` lacks (`predictions` in a
    backbone without top) are left out; a layer of `model` missing from the file is refused."""
    with h5py.File(path, "r") as f:
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in f:
                raise WeightsError(f"{path} has no weights for layer {layer.name}: it is not a ResNet50 v1.5 "
                                   f"converted from torchvision; delete it to have it converted again")
            group = f[layer.name]
            layer.set_weights([group[str(i)][()] for i in range(len(group))])
