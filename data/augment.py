"""Training augmentation and normalization in NumPy and Pillow.

The recipe follows the original study's PyTorch pipeline (torchvision's
RandomResizedCrop, RandomHorizontalFlip, RandomRotation). Every random draw
comes from a generator seeded by (seed, epoch, example index) alone, so an
augmented image does not depend on the backend, the worker count or the order
in which batches are produced. Crop, flip and rotation are folded into one
affine map and resampled once.

That style is named "standard" (`--augment standard`). A second style,
"keras-generator", is the study's "seed-keras" recipe, Keras' ImageDataGenerator
(rotation, shifts, zoom, flip: see `data.keras_generator`), and the preprocess
mode `caffe-rescaled` is what that generator's `standardize` made of its images.

The augmentation ranges are declared once, as `AugmentConfig`'s field defaults:
the training options (`training.config`) and `AugmentConfig.keras_generator`
take theirs from there.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from data import keras_generator

_AUGMENT_TAG = 0x4155

# What keras.applications.resnet50.preprocess_input ("caffe" mode) subtracts, in BGR order.
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PREPROCESS_MODES = ("caffe", "imagenet", "caffe-rescaled", "rescale")
# The augmentation styles, by the names `--augment` takes (which adds "none": no augmentation).
# standard: torchvision's transforms (crop, flip, rotation); keras-generator: ImageDataGenerator's.
STANDARD, KERAS_GENERATOR = "standard", "keras-generator"
AUGMENT_STYLES = (STANDARD, KERAS_GENERATOR)
# What `ImageDataGenerator(horizontal_flip=True)` does: it flips half of the images (Keras' rule,
# not a default of this project's).
KERAS_FLIP_PROB = 0.5
# How the standard style resamples (`--augment-steps`). fused: crop, flip and rotation folded into
# one affine map and resampled once (one interpolation, fast). torchvision: each transform on its
# own, as torchvision.transforms.v2 runs them on a PIL image: the crop, then an antialiased
# bilinear resize to the input size, then the flip, then the rotation.
FUSED, TORCHVISION = "fused", "torchvision"
AUGMENT_STEPS = (FUSED, TORCHVISION)
# The rotation's interpolation (`--rotate-interpolation`): torchvision's RandomRotation samples the
# nearest pixel by default; bilinear blends (what the fused map always did).
BILINEAR, NEAREST = "bilinear", "nearest"
INTERPOLATIONS = (BILINEAR, NEAREST)
_PIL_RESAMPLE = {BILINEAR: Image.Resampling.BILINEAR, NEAREST: Image.Resampling.NEAREST}
# torchvision's reference classification recipe evaluates on `Resize(256)` then `CenterCrop(224)`
# (`--val-resize-size 256 --val-crop-size 224`): the decode side `torchvision_decode_size` gives.
TORCHVISION_RESIZE, TORCHVISION_CROP = 256, 224


def torchvision_decode_size(image_size: int) -> int:
    """The decode side in torchvision's reference proportion (256 for 224; 73 for 64), so that the
    centre crop keeps the same share of the image at any input size."""
    return round(TORCHVISION_RESIZE * image_size / TORCHVISION_CROP)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and their ranges.

    `style="standard"` uses crop, flip and rotation (torchvision's transforms);
    `style="keras-generator"` uses rotation (`rotation_range`), `shift_range`
    (`width_shift_range` and `height_shift_range`, a fraction of the side),
    `zoom_range` (`z`: zoom drawn from `[1 - z, 1 + z]`) and the flip
    (`horizontal_flip=True` is 0.5); `crop` and its ranges do not apply to it.
    """

    crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    rotate_degrees: float = 10.0
    style: str = STANDARD
    # 0.1 and 0.1: common values in Keras brain-MRI notebooks for width/height_shift_range and
    # zoom_range (next to rotation_range=10, the `rotate_degrees` default): moves of at most 10% that
    # keep the head inside the frame. Only the keras-generator style reads them.
    shift_range: float = 0.1
    zoom_range: float = 0.1
    # The standard style only: how it resamples, and the rotation's interpolation (see above).
    steps: str = FUSED
    rotate_interpolation: str = BILINEAR

    def __post_init__(self) -> None:
        if self.style not in AUGMENT_STYLES:
            raise ValueError(f"unknown augmentation style {self.style!r}; expected one of {AUGMENT_STYLES}")
        if self.steps not in AUGMENT_STEPS:
            raise ValueError(f"unknown augmentation steps {self.steps!r}; expected one of {AUGMENT_STEPS}")
        if self.rotate_interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown rotation interpolation {self.rotate_interpolation!r}; "
                             f"expected one of {INTERPOLATIONS}")
        # Keras reads a shift below 1 as a fraction of the side and 1 or more as pixels; only fractions here.
        if not 0 <= self.shift_range < 1:
            raise ValueError(f"shift_range must be a fraction of the side in [0, 1), got {self.shift_range!r}")
        if not 0 <= self.zoom_range < 1:
            raise ValueError(f"zoom_range must be in [0, 1), got {self.zoom_range!r}")

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(crop=False, flip_prob=0.0, rotate_degrees=0.0, shift_range=0.0, zoom_range=0.0)

    @classmethod
    def keras_generator(
        cls,
        rotation_range: float | None = None,
        shift_range: float | None = None,
        zoom_range: float | None = None,
        horizontal_flip: bool = True,
    ) -> AugmentConfig:
        """`ImageDataGenerator(rotation_range, width_shift_range=height_shift_range=shift_range,
        zoom_range, horizontal_flip)`, with its argument names; a range not given (None) is the
        field's default (`rotate_degrees`, `shift_range`, `zoom_range`)."""
        defaults = cls()
        return cls(
            crop=False, flip_prob=KERAS_FLIP_PROB if horizontal_flip else 0.0,
            rotate_degrees=defaults.rotate_degrees if rotation_range is None else rotation_range,
            style=KERAS_GENERATOR, shift_range=defaults.shift_range if shift_range is None else shift_range,
            zoom_range=defaults.zoom_range if zoom_range is None else zoom_range,
        )

    @property
    def enabled(self) -> bool:
        if self.style == KERAS_GENERATOR:
            return self.flip_prob > 0 or self.rotate_degrees > 0 or self.shift_range > 0 or self.zoom_range > 0
        return self.crop or self.flip_prob > 0 or self.rotate_degrees > 0


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator for one example in one epoch."""
    return np.random.default_rng([_AUGMENT_TAG, seed, epoch, index])


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Draws `(top, left, crop_height, crop_width)` as torchvision's RandomResizedCrop does."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: a central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_params(
    rng: np.random.Generator, size: int, config: AugmentConfig
) -> tuple[tuple[int, int, int, int], bool, float]:
    """Draws the crop box (on the `size`-pixel decoded image), the flip and the rotation angle
    (degrees) for one image, in torchvision's order: crop, flip, rotation."""
    box = (0, 0, size, size)
    if config.crop:
        box = random_resized_crop_box(rng, size, size, config.crop_scale, config.crop_ratio)
    flip = bool(config.flip_prob > 0 and rng.random() < config.flip_prob)
    angle = 0.0
    if config.rotate_degrees > 0:
        angle = float(rng.uniform(-config.rotate_degrees, config.rotate_degrees))
    return box, flip, angle


def _output_to_input_map(
    size: int, box: tuple[int, int, int, int], flip: bool, angle: float
) -> np.ndarray:
    """The affine map from output pixel coordinates to input ones.

    The image is cropped to `box` and resized to `size` (the output side), then
    flipped, then rotated counter-clockwise by `angle` degrees about its centre;
    the inverse of that chain, composed, is what Pillow's affine transform samples with.
    """
    top, left, h, w = box
    crop = np.array([[w / size, 0, left], [0, h / size, top], [0, 0, 1]])
    mirror = np.array([[-1, 0, size], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
    a = -math.radians(angle)
    c = size / 2
    to_centre = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
    from_centre = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]])
    turn = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]])
    return crop @ mirror @ from_centre @ turn @ to_centre


def augment_image(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig,
                  size: int | None = None) -> np.ndarray:
    """Returns a randomly augmented copy of a square uint8 image, in `config.style`, `size`
    pixels on a side (default: the image's own). A larger image (`--decode-size`) is what the
    standard style's crop is drawn on; the keras-generator style keeps the image's size."""
    if config.style == KERAS_GENERATOR:
        if size not in (None, image.shape[0]):
            raise ValueError("the keras-generator augmentation keeps the image's size; decode at the input size")
        return _keras_generator_image(image, rng, config)
    return _torchvision_image(image, rng, config, image.shape[0] if size is None else size)


def _keras_generator_image(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    params = keras_generator.draw_params(
        rng, image.shape[:2], config.rotate_degrees, config.shift_range, config.shift_range,
        config.zoom_range, config.flip_prob,
    )
    return keras_generator.apply_transform(image, params)


def _torchvision_image(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig,
                       size: int) -> np.ndarray:
    """A randomly cropped, flipped and rotated copy of a square uint8 image, `size` px on a side."""
    side = image.shape[0]
    box, flip, angle = augment_params(rng, side, config)
    if config.steps == TORCHVISION:
        return torchvision_steps(image, box, flip, angle, size, config.rotate_interpolation)
    if box == (0, 0, side, side) and side == size and angle == 0.0:
        return image[:, ::-1].copy() if flip else image
    matrix = _output_to_input_map(size, box, flip, angle)
    out = Image.fromarray(image).transform(
        (size, size),
        Image.Transform.AFFINE,
        tuple(matrix[:2].ravel()),
        resample=_PIL_RESAMPLE[config.rotate_interpolation],
        fillcolor=(0, 0, 0),
    )
    return np.asarray(out)


def torchvision_steps(image: np.ndarray, box: tuple[int, int, int, int], flip: bool, angle: float,
                      size: int, rotate_interpolation: str = NEAREST) -> np.ndarray:
    """Crop, flip and rotation one after another, each as torchvision.transforms.v2 does it on
    a PIL image: `resized_crop(top, left, h, w, size, antialias=True)` (Pillow's crop, then its
    bilinear resize, which is antialiased when it shrinks), `horizontal_flip`, then
    `rotate(angle, interpolation, fill=0)` about the centre, without expanding. The same Pillow
    calls, so the bytes are torchvision's (tests/test_torchvision_augment.py)."""
    top, left, h, w = box
    img = Image.fromarray(image)
    if (top, left, h, w) != (0, 0, *image.shape[:2]) or image.shape[0] != size:
        img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if angle != 0.0:
        img = img.rotate(angle, resample=_PIL_RESAMPLE[rotate_interpolation], fillcolor=(0, 0, 0))
    return np.asarray(img)


def normalize(images: np.ndarray, mode: str) -> np.ndarray:
    """Maps a uint8 RGB batch to the float32 input the model expects.

    `caffe`: RGB to BGR and subtract the ImageNet mean on the 0-255 scale, which
    is `keras.applications.resnet50.preprocess_input` and what the Keras
    ImageNet weights were trained with. `imagenet`: x/255, then the ImageNet
    mean and standard deviation per RGB channel, as torchvision's recipe does.
    `caffe-rescaled`: `caffe`, then times 1/255, the same bytes as
    `ImageDataGenerator(rescale=1/255, preprocessing_function=resnet50.preprocess_input)
    .standardize`, which runs the function first and rescales after (the study's
    "seed-keras" recipe: inputs of about -0.5 to 0.6, not the range the ImageNet
    weights saw). `rescale`: x/255 only, RGB in 0..1 (`ImageDataGenerator(rescale=1/255)`
    alone; the input most small models written from scratch expect).
    """
    if mode == "caffe":
        # One pass: uint8 -> float32 and the subtraction fused, same bytes as two steps.
        return np.subtract(images[..., ::-1], CAFFE_MEAN_BGR, dtype=np.float32)
    if mode == "caffe-rescaled":
        x = np.subtract(images[..., ::-1], CAFFE_MEAN_BGR, dtype=np.float32)
        # Keras' `x *= 1/255` on float32 rounds the Python float to float32 first (NumPy 2's
        # weak-scalar rule) and multiplies: not a division by 255, which differs in the last bit.
        x *= np.float32(1 / 255)
        return x
    if mode == "rescale":
        return np.multiply(images, np.float32(1 / 255), dtype=np.float32)  # Keras' `x *= 1/255`, as above
    if mode == "imagenet":
        x = np.divide(images, np.float32(255.0), dtype=np.float32)
        x -= IMAGENET_MEAN
        x /= IMAGENET_STD
        return x
    raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {PREPROCESS_MODES}")
