"""Decoding any image Pillow can read into RGB uint8 at a fixed square size.

Pillow only (no backend ops), so the bytes are the same whichever Keras
backend is active.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
# `read_image` refuses such images itself; Pillow's warning about them would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Smaller images hold no anatomy (a 1x1 "image" is a broken export): refused, not upscaled.
MIN_SIDE = 8


class DecodeError(ValueError):
    """An image file could not be read."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """Maps 16- and 32-bit grayscale and float images to 8-bit grayscale."""
    if img.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
    else:  # "F"
        pixels = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def _flatten(img: Image.Image) -> Image.Image:
    """Returns an `L` or `RGB` image; transparency is composited over black."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        return _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def read_image(path: str) -> tuple[Image.Image, str]:
    """Opens and decodes an image file at its own size: `(L or RGB image, original mode)`.

    Raises `DecodeError` with the reason when the file cannot be read.
    """
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            # Refused here, by size, rather than by turning Pillow's warning into an error:
            # `warnings.catch_warnings` is not thread-safe, and the loader decodes in threads.
            pixels = img.size[0] * img.size[1]
            if pixels > Image.MAX_IMAGE_PIXELS:
                raise DecodeError(f"refused as a possible decompression bomb: {img.size[0]}x{img.size[1]} = "
                                  f"{pixels} pixels, over Pillow's limit of {Image.MAX_IMAGE_PIXELS}")
            img.load()
            mode = img.mode
            img = _flatten(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses at open
        raise DecodeError(f"refused as a possible decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(f"cannot decode: {e}") from None
    if min(img.size) < MIN_SIDE:
        raise DecodeError(f"{img.size[0]}x{img.size[1]} px, smaller than {MIN_SIDE} px on a side")
    return img, mode


def decode_and_resize(path: str, size: int) -> np.ndarray:
    """Reads an image file and returns it as a `(size, size, 3)` uint8 RGB array.

    Grayscale images are resized in one channel and repeated, which gives the
    same bytes as resizing their RGB conversion. Raises `DecodeError` with the
    reason when the file cannot be read.
    """
    img, _ = read_image(path)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels)
