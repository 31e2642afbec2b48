import numpy as np
import pytest

from data.augment import (
    AugmentConfig,
    _output_to_input_map,
    augment_image,
    example_rng,
    normalize,
    random_resized_crop_box,
)

IMAGE = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_caffe_matches_keras_preprocess_input():
    from keras.applications.resnet50 import preprocess_input

    expected = preprocess_input(IMAGE[None].astype(np.float32).copy())
    np.testing.assert_array_equal(normalize(IMAGE[None], "caffe"), expected)


def test_imagenet_matches_keras_torch_mode():
    from keras.applications.imagenet_utils import preprocess_input

    expected = preprocess_input(IMAGE[None].astype(np.float32).copy(), mode="torch")
    np.testing.assert_allclose(normalize(IMAGE[None], "imagenet"), expected, rtol=0, atol=1e-6)


def test_unknown_preprocess_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown preprocess mode"):
        normalize(IMAGE[None], "tf")


def test_same_seed_epoch_index_gives_same_bytes_and_others_differ():
    config = AugmentConfig()
    a = augment_image(IMAGE, example_rng(0, 1, 5), config)
    assert a.shape == IMAGE.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, augment_image(IMAGE, example_rng(0, 1, 5), config))
    for other in (example_rng(0, 2, 5), example_rng(0, 1, 6), example_rng(1, 1, 5)):
        assert not np.array_equal(a, augment_image(IMAGE, other, config))


def test_no_augmentation_returns_the_image_unchanged():
    out = augment_image(IMAGE, example_rng(0, 0, 0), AugmentConfig.none())
    np.testing.assert_array_equal(out, IMAGE)


def test_flip_only_is_an_exact_mirror():
    config = AugmentConfig(crop=False, flip_prob=1.0, rotate_degrees=0.0)
    np.testing.assert_array_equal(augment_image(IMAGE, example_rng(0, 0, 0), config), IMAGE[:, ::-1])


def test_affine_map_of_a_full_frame_flip_resamples_to_an_exact_mirror():
    from PIL import Image

    matrix = _output_to_input_map(32, (0, 0, 32, 32), flip=True, angle=0.0)
    np.testing.assert_allclose(matrix, [[-1, 0, 32], [0, 1, 0], [0, 0, 1]])
    out = Image.fromarray(IMAGE).transform(
        (32, 32), Image.Transform.AFFINE, tuple(matrix[:2].ravel()), Image.Resampling.BILINEAR
    )
    np.testing.assert_array_equal(np.asarray(out), IMAGE[:, ::-1])


def test_affine_map_sends_output_corners_to_the_crop_box_corners():
    matrix = _output_to_input_map(32, (4, 6, 16, 20), flip=False, angle=0.0)
    np.testing.assert_allclose(matrix @ [0, 0, 1], [6, 4, 1])
    np.testing.assert_allclose(matrix @ [32, 32, 1], [26, 20, 1])
    rotated = _output_to_input_map(32, (0, 0, 32, 32), flip=False, angle=37.0)
    np.testing.assert_allclose(rotated @ [16, 16, 1], [16, 16, 1])


def test_rotation_keeps_the_centre_and_fills_corners_black():
    image = np.full((33, 33, 3), 255, np.uint8)
    config = AugmentConfig(crop=False, flip_prob=0.0, rotate_degrees=30.0)
    rotated = next(
        out for i in range(50)
        if abs((out := augment_image(image, example_rng(0, 0, i), config)).astype(int) - 255).sum() > 0
        and (out[0, 0] == 0).all()
    )
    assert (rotated[16, 16] == 255).all()


def test_crop_box_is_inside_the_image_and_within_the_ranges():
    for i in range(200):
        top, left, h, w = random_resized_crop_box(example_rng(0, 0, i), 64, 64, (0.08, 1.0), (3 / 4, 4 / 3))
        assert top >= 0 and top + h <= 64 and left >= 0 and left + w <= 64
        assert 0.08 * 64 * 64 * 0.8 <= h * w <= 64 * 64


def test_crop_of_a_constant_region_is_constant():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :] = (10, 20, 30)
    config = AugmentConfig(crop=True, flip_prob=0.5, rotate_degrees=0.0)
    out = augment_image(image, example_rng(3, 0, 0), config)
    assert (out == (10, 20, 30)).all()
