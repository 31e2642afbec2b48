"""The "seed-keras" recipe against Keras' own ImageDataGenerator.

Reference: keras 3.15 `keras/src/legacy/preprocessing/image.py` (exported for
tf.keras as `keras.preprocessing.image.ImageDataGenerator`), whose
`apply_transform` resamples with scipy; scipy is needed by these tests only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data.augment import AugmentConfig, augment_image, example_rng, normalize
from data.decode import decode_and_resize
from data.keras_generator import (
    TransformParams,
    apply_transform,
    draw_params,
    keras_affine,
    resample_bilinear,
)

pytest.importorskip("scipy")  # Keras' apply_transform, the reference, needs it; our code does not

# Ours is rounded to uint8, Keras' stays float32, so they are up to 0.5 apart (exactly 0.5 where
# Keras lands on a half and rint rounds to even), plus the float32 blend: the unrounded values
# differ by at most 3.1e-5 (measured on these images), so 1e-3 is the slack.
FLOAT_TOL = 1e-3
UINT8_TOL = 0.5 + FLOAT_TOL
# The rounding error is about uniform on [0, 0.5]: measured mean 0.22 to 0.25.
MEAN_TOL = 0.3

PARAMS = {
    "small": TransformParams(theta=7.0, tx=3.2, ty=-2.7, zx=0.93, zy=1.08),
    "half-pixel shift": TransformParams(tx=5.5),
    "shift along rows only": TransformParams(ty=9.0),
    "zoom and flip": TransformParams(theta=-4.0, zx=1.1, zy=0.9, flip_horizontal=True),
    # Far beyond the recipe's ranges: 42% of the output samples fall outside the image, so
    # "nearest" (edge-replicating) fill decides much of it.
    "large rotation and shift": TransformParams(theta=70.0, tx=18.0, ty=-14.0, zx=1.3, zy=0.8, flip_horizontal=True),
}


def _generator(**kwargs):
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    return ImageDataGenerator(**kwargs)


@pytest.fixture(scope="module")
def images(demo_dir) -> list[np.ndarray]:
    """Phantom slices as the pipeline decodes them: grayscale and tinted RGB, JPEG and PNG, 64 px."""
    paths = sorted(demo_dir.rglob("*.jpg"))[:4] + sorted(demo_dir.rglob("*.png"))[:2]
    return [decode_and_resize(str(p), 64) for p in paths]


def _keras_transform(image: np.ndarray, params: TransformParams) -> np.ndarray:
    return _generator().apply_transform(image.astype("float32"), params.as_keras())


def test_caffe_rescaled_is_byte_equal_to_image_data_generator_standardize(images):
    from keras.applications.resnet50 import preprocess_input

    generator = _generator(rescale=1 / 255, preprocessing_function=preprocess_input)
    batch = np.stack(images)
    ours = normalize(batch, "caffe-rescaled")
    # Tolerance: none. The iterator standardizes one image at a time; a copy each time, since
    # preprocess_input works in place.
    expected = np.stack([generator.standardize(image.astype("float32")) for image in images])
    assert ours.dtype == expected.dtype == np.float32
    assert ours.tobytes() == expected.tobytes()
    assert ours.tobytes() == generator.standardize(batch.astype("float32")).tobytes()
    # The test can tell the order of operations apart: dividing by 255 is not Keras' bytes.
    assert (normalize(batch, "caffe") / np.float32(255)).tobytes() != expected.tobytes()


@pytest.mark.parametrize("name", PARAMS)
def test_fixed_params_match_keras_apply_transform(images, name):
    params = PARAMS[name]
    for image in images:
        expected = _keras_transform(image, params)
        ours = apply_transform(image, params)
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        diff = np.abs(ours.astype(np.float64) - expected)
        assert diff.max() <= UINT8_TOL, name
        assert diff.mean() <= MEAN_TOL, name
        unrounded = resample_bilinear(image, *keras_affine(params, *image.shape[:2]))
        if params.flip_horizontal:
            unrounded = unrounded[:, ::-1]
        np.testing.assert_allclose(unrounded, expected, rtol=0, atol=FLOAT_TOL)


def test_large_transform_samples_outside_the_image():
    # What makes "large rotation and shift" a test of the edge fill.
    matrix, offset = keras_affine(PARAMS["large rotation and shift"], 64, 64)
    ij = np.stack(np.mgrid[0:64, 0:64], -1).reshape(-1, 2)
    source = ij @ matrix.T + offset
    outside = ((source < 0) | (source > 63)).any(axis=1).mean()
    assert outside > 0.3


def test_non_square_images_keep_keras_centre_convention():
    image = np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    params = TransformParams(theta=25.0, tx=4.0, ty=-3.0, zx=1.1, zy=0.95)
    diff = np.abs(apply_transform(image, params).astype(np.float64) - _keras_transform(image, params))
    assert diff.max() <= UINT8_TOL


def test_a_wrong_axis_or_direction_is_caught(images):
    """The comparison is strict enough to fail: tx along the rows, or the rotation reversed."""
    params = PARAMS["small"]
    expected = _keras_transform(images[0], params)
    for wrong in (
        dataclasses.replace(params, tx=params.ty, ty=params.tx),
        dataclasses.replace(params, theta=-params.theta),
        dataclasses.replace(params, zx=params.zy, zy=params.zx),
    ):
        assert np.abs(apply_transform(images[0], wrong) - expected).max() > 10


def test_identity_returns_the_image_and_flip_is_an_exact_mirror(images):
    image = images[0]
    assert apply_transform(image, TransformParams()) is image
    np.testing.assert_array_equal(apply_transform(image, TransformParams(flip_horizontal=True)), image[:, ::-1])


def test_draws_follow_keras_get_random_transform_order(monkeypatch):
    """Keras' own get_random_transform, fed from our generator, draws the same parameters."""
    generator = _generator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
                           zoom_range=0.1, horizontal_flip=True)
    for i in range(20):
        theirs_rng = example_rng(3, 1, i)
        monkeypatch.setattr(np.random, "uniform", theirs_rng.uniform)
        monkeypatch.setattr(np.random, "random", theirs_rng.random)
        theirs = generator.get_random_transform((64, 48, 3))
        monkeypatch.undo()
        ours = draw_params(example_rng(3, 1, i), (64, 48), 10.0, 0.1, 0.1, 0.1, 0.5)
        assert (ours.theta, ours.tx, ours.ty, ours.zx, ours.zy) == (
            theirs["theta"], theirs["tx"], theirs["ty"], theirs["zx"], theirs["zy"])
        assert ours.flip_horizontal == bool(theirs["flip_horizontal"])


def test_draws_stay_in_their_ranges():
    draws = [draw_params(example_rng(0, 0, i), (64, 64), 10.0, 0.1, 0.1, 0.1, 0.5) for i in range(1000)]
    theta, tx, ty, zx, zy = (np.array([getattr(d, k) for d in draws]) for k in ("theta", "tx", "ty", "zx", "zy"))
    flips = np.mean([d.flip_horizontal for d in draws])
    assert np.abs(theta).max() <= 10 and np.abs(theta).max() > 9.9
    for shift in (tx, ty):
        assert np.abs(shift).max() <= 6.4 and np.abs(shift).max() > 6.3
    for zoom in (zx, zy):
        assert zoom.min() >= 0.9 and zoom.max() <= 1.1 and zoom.min() < 0.91 and zoom.max() > 1.09
    assert not np.array_equal(zx, zy) and not np.array_equal(tx, ty)
    assert 0.45 < flips < 0.55
    off = draw_params(example_rng(0, 0, 0), (64, 64), 0.0, 0.0, 0.0, 0.0, 0.0)
    assert off == TransformParams()


def test_augment_image_keras_style_is_seeded_by_seed_epoch_index(images):
    config = AugmentConfig.keras_generator()
    image = images[1]
    a = augment_image(image, example_rng(0, 1, 5), config)
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, augment_image(image, example_rng(0, 1, 5), config))
    for other in (example_rng(0, 2, 5), example_rng(0, 1, 6), example_rng(1, 1, 5)):
        assert not np.array_equal(a, augment_image(image, other, config))
    # And it is Keras' transform of the parameters it drew.
    params = draw_params(example_rng(0, 1, 5), (64, 64), 10.0, 0.1, 0.1, 0.1, 0.5)
    assert np.abs(a - _keras_transform(image, params)).max() <= UINT8_TOL


def test_config_enabled_and_validation():
    assert AugmentConfig().style == "standard"
    config = AugmentConfig.keras_generator()
    assert (config.rotate_degrees, config.shift_range, config.zoom_range, config.flip_prob) == (10.0, 0.1, 0.1, 0.5)
    assert config.enabled
    assert not AugmentConfig.keras_generator(0.0, 0.0, 0.0, horizontal_flip=False).enabled
    assert AugmentConfig.keras_generator(0.0, 0.0, 0.05, horizontal_flip=False).enabled
    assert not dataclasses.replace(AugmentConfig.none(), style="keras-generator").enabled
    with pytest.raises(ValueError, match="unknown augmentation style"):
        AugmentConfig(style="albumentations")
    with pytest.raises(ValueError, match="shift_range"):
        AugmentConfig.keras_generator(shift_range=5.0)
