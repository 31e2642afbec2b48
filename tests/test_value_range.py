"""Pixel value ranges (issue 15, item 4): float and 16-bit images are scaled from
their real range, or refused with a reason, and every rescaling is reported in `notes`.

The files are written with Pillow and read back through `data.decode`, which is
NumPy/Pillow only: the suite runs under each KERAS_BACKEND and must give the same bytes.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.decode import DecodeError, decode_and_resize, read_image

RNG = np.random.default_rng(15)
SIZE = (40, 48)  # rows, columns: not square, so decode_and_resize really resizes


def _content(low: float, high: float, dtype) -> np.ndarray:
    """Random pixels in low..high that reach both ends (so the range is what the test says)."""
    pixels = RNG.uniform(low, high, SIZE)
    pixels[0, 0], pixels[-1, -1] = low, high
    return pixels.astype(dtype)


def _save(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _own_size(path: str, notes: list[str] | None = None) -> np.ndarray:
    """The decoded image at its own size, one channel (decode_and_resize repeats it in three)."""
    image, _ = read_image(path, notes)
    return np.asarray(image)


def test_float_tiff_in_0_1_is_scaled_by_255(tmp_path):
    pixels = _content(0.0, 1.0, np.float32)
    path = _save(tmp_path / "f.tif", pixels)
    assert Image.open(path).mode == "F"
    notes: list[str] = []
    expected = np.rint(pixels.astype(np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(_own_size(path, notes), expected)
    assert notes == ["float image in 0..1: scaled by 255"]
    # Not dark after resizing either (the bug: clipping 0..1 gave a mean of about 0.5).
    out = decode_and_resize(path, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert abs(out.mean() - expected.mean()) < 4 and out.mean() > 100


def test_twelve_bit_values_in_a_16_bit_png_are_scaled_as_12_bit(tmp_path):
    pixels = _content(0, 4095, np.float64).round().astype(np.uint16)
    path = _save(tmp_path / "d.png", pixels)
    assert Image.open(path).mode == "I;16"
    expected = np.rint(pixels.astype(np.float64) * 255 / 4095).astype(np.uint8)
    notes: list[str] = []
    np.testing.assert_array_equal(_own_size(path, notes), expected)
    assert notes == ["16-bit image with values up to 4095: scaled as 12-bit"]
    # Decodes exactly like the same content saved as an 8-bit PNG, resized or not.
    eight_bit = _save(tmp_path / "e.png", expected)
    for size in (32, 64):
        np.testing.assert_array_equal(decode_and_resize(path, size), decode_and_resize(eight_bit, size))
    assert decode_and_resize(path, 32).mean() > 100


def test_full_range_16_bit_png_is_divided_by_257_without_a_note(tmp_path):
    pixels = _content(0, 65535, np.float64).round().astype(np.uint16)
    path = _save(tmp_path / "full.png", pixels)
    notes: list[str] = []
    expected = np.rint(pixels.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(_own_size(path, notes), expected)
    assert notes == []


@pytest.mark.parametrize(("high", "bits", "note"), [
    (200, 8, "16-bit image with values up to 200: scaled as 8-bit (values kept)"),
    (1023, 10, "16-bit image with values up to 1023: scaled as 10-bit"),
    (1024, 12, "16-bit image with values up to 1024: scaled as 12-bit"),
    (9000, 14, "16-bit image with values up to 9000: scaled as 14-bit"),
    (16384, 16, None),
])
def test_16_bit_depth_is_the_smallest_that_holds_the_maximum(tmp_path, high, bits, note):
    pixels = _content(0, high, np.float64).round().astype(np.uint16)
    path = _save(tmp_path / f"b{bits}.tif", pixels)
    notes: list[str] = []
    expected = np.rint(pixels.astype(np.float64) / ((2**bits - 1) / 255)).astype(np.uint8)
    np.testing.assert_array_equal(_own_size(path, notes), expected)
    assert notes == ([note] if note else [])


def test_float_in_0_255_is_kept_and_any_other_range_is_mapped_min_max(tmp_path):
    in_255 = _content(0.0, 255.0, np.float32)
    notes: list[str] = []
    np.testing.assert_array_equal(_own_size(_save(tmp_path / "k.tif", in_255), notes),
                                  np.rint(in_255.astype(np.float64)).astype(np.uint8))
    wide = _content(-3.2, 840.5, np.float32)
    lo, hi = float(wide.min()), float(wide.max())
    expected = np.rint((wide.astype(np.float64) - lo) * (255 / (hi - lo))).astype(np.uint8)
    np.testing.assert_array_equal(_own_size(_save(tmp_path / "w.tif", wide), notes), expected)
    assert notes == ["float image in 0..255: values kept (rounded)",
                     "float image in -3.2..840.5: mapped min..max to 0..255"]
    assert expected.min() == 0 and expected.max() == 255


@pytest.mark.parametrize(("value", "reason"), [
    (np.nan, r"float image holds NaN in 3 of 1920 pixels"),
    (np.inf, r"float image holds infinity in 3 of 1920 pixels"),
    (-np.inf, r"float image holds infinity in 3 of 1920 pixels"),
])
def test_a_float_image_with_non_finite_values_is_refused(tmp_path, value, reason):
    pixels = _content(0.0, 1.0, np.float32)
    pixels[5, 5:8] = value
    path = _save(tmp_path / "n.tif", pixels)
    notes: list[str] = []
    with pytest.raises(DecodeError, match=reason):
        decode_and_resize(path, 32, notes)
    assert notes == []


def test_a_constant_float_image_is_refused(tmp_path):
    path = _save(tmp_path / "c.tif", np.full(SIZE, 3.5, np.float32))
    with pytest.raises(DecodeError, match=r"^float image is constant \(every pixel 3\.5\): no content$"):
        decode_and_resize(path, 32)


def test_a_signed_32_bit_image_is_mapped_min_max_and_a_constant_one_refused(tmp_path):
    hounsfield = _content(-1024, 3071, np.float64).round().astype(np.int32)
    path = _save(tmp_path / "ct.tif", hounsfield)
    assert Image.open(path).mode == "I"
    notes: list[str] = []
    expected = np.rint((hounsfield.astype(np.float64) + 1024) * (255 / 4095)).astype(np.uint8)
    np.testing.assert_array_equal(_own_size(path, notes), expected)
    assert notes == ["32-bit integer image in -1024..3071: mapped min..max to 0..255"]
    # Within 0..65535 a 32-bit image follows the bit-depth rule.
    twelve = _save(tmp_path / "i12.tif", hounsfield + 1024)
    _own_size(twelve, notes)
    assert notes[-1] == "32-bit integer image with values up to 4095: scaled as 12-bit"
    with pytest.raises(DecodeError, match=r"32-bit integer image is constant \(every pixel -1024\)"):
        decode_and_resize(_save(tmp_path / "air.tif", np.full(SIZE, -1024, np.int32)), 32)


def test_notes_are_optional_and_only_kept_for_images_that_are_kept(tmp_path):
    path = _save(tmp_path / "f.tif", _content(0.0, 1.0, np.float32))
    out = decode_and_resize(path, 16)  # positional call, as the loader and inference make
    assert out.shape == (16, 16, 3)
    image, mode = read_image(path)
    assert mode == "F" and image.mode == "L"
    notes: list[str] = []
    with pytest.raises(DecodeError, match="smaller than 8 px"):
        decode_and_resize(_save(tmp_path / "tiny.tif", np.linspace(0, 1, 4, dtype=np.float32)[None]), 8, notes)
    assert notes == []
    eight_bit = _save(tmp_path / "g.png", RNG.integers(0, 256, SIZE, dtype=np.uint8))
    decode_and_resize(eight_bit, 16, notes)
    assert notes == []


def test_decoding_imports_no_keras_backend():
    """Same bytes on every backend because no backend is involved at all."""
    code = ("import sys, data.decode; "
            "bad = sorted(m for m in ('keras', 'tensorflow', 'torch', 'jax') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
