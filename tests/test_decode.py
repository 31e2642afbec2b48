import io

import numpy as np
import pytest
from PIL import Image

from data.decode import DecodeError, decode_and_resize
from tests.conftest import write_image

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (48, 40), dtype=np.uint8)
RGB = RNG.integers(0, 256, (48, 40, 3), dtype=np.uint8)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    out = decode_and_resize(str(write_image(tmp_path / "g.png", GRAY)), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # Resizing in one channel gives the same bytes as resizing the RGB conversion.
    expected = np.asarray(Image.fromarray(GRAY).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected)


def test_rgb_png_at_its_own_size_is_lossless(tmp_path):
    out = decode_and_resize(str(write_image(tmp_path / "c.png", RGB[:40, :40])), 40)
    np.testing.assert_array_equal(out, RGB[:40, :40])


def test_rgba_is_composited_over_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    out = decode_and_resize(str(write_image(tmp_path / "a.png", rgba, "RGBA")), 8)
    assert (out[:, :4] == 200).all() and (out[:, 4:] == 0).all()


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    pixels = np.array([[0, 257, 65535, 32896]], dtype=np.uint16).repeat(8, axis=0).repeat(2, axis=1)
    path = tmp_path / "d.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith("I")
    out = decode_and_resize(str(path), 8)
    np.testing.assert_array_equal(out[0, ::2, 0], [0, 1, 255, 128])


def test_cmyk_jpeg_and_palette_gif_become_rgb(tmp_path):
    cmyk = tmp_path / "k.jpg"
    Image.fromarray(RGB).convert("CMYK").save(cmyk, quality=95)
    gif = tmp_path / "p.gif"
    Image.fromarray(RGB).convert("P").save(gif)
    for path in (cmyk, gif):
        out = decode_and_resize(str(path), 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # CMYK round trip stays close to the RGB original.
    assert np.abs(decode_and_resize(str(cmyk), 40).astype(int) - decode_and_resize(
        str(write_image(tmp_path / "ref.png", RGB)), 40).astype(int)).mean() < 12


def test_a_1x1_image_is_refused_and_8_px_is_upscaled(tmp_path):
    with pytest.raises(DecodeError, match="1x1 px, smaller than 8 px"):
        decode_and_resize(str(write_image(tmp_path / "one.png", np.full((1, 1, 3), 77, np.uint8))), 8)
    out = decode_and_resize(str(write_image(tmp_path / "eight.png", np.full((8, 8, 3), 77, np.uint8))), 32)
    assert out.shape == (32, 32, 3) and (out == 77).all()


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DecodeError, match=r"empty file \(0 bytes\)"):
        decode_and_resize(str(tmp_path / "empty.jpg"), 8)


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="JPEG")
    return buffer.getvalue()[:300]


@pytest.mark.parametrize(
    "content",
    [b"", b"this is a text file, not a JPEG\n", _truncated_jpeg(), b"\xff\xd8\xff\xe0" + b"\x00" * 64],
    ids=["zero-byte", "text", "truncated", "corrupt-header"],
)
def test_unreadable_files_raise_decode_error(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(DecodeError):
        decode_and_resize(str(path), 32)
