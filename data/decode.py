"""Decoding any image Pillow or pydicom can read into RGB uint8 at a fixed square size.

Pillow and NumPy only (no backend ops), so the bytes are the same whichever
Keras backend is active. Float images are scaled from their actual range and
16-bit ones by their real bit depth, and an EXIF orientation is applied (the
image is read as a viewer shows it); each is reported in `notes`.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from data.dicom import DicomError, DicomTooLargeError, is_dicom, read_dicom

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
# Bit depths a 16-bit container is read as: the smallest whose range holds the image's maximum.
_BIT_DEPTHS = (8, 10, 12, 14, 16)
# `read_image` refuses such images itself; Pillow's warning about them would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Smaller images hold no anatomy (a 1x1 "image" is a broken export): refused, not upscaled.
MIN_SIDE = 8
_ORIENTATION_TAG = 0x0112
# What `ImageOps.exif_transpose` does for each EXIF Orientation value (1: already upright).
_ORIENTATIONS = {
    2: "mirrored left-right",
    3: "rotated 180°",
    4: "mirrored top-bottom",
    5: "mirrored across the top-left to bottom-right diagonal",
    6: "rotated 90° clockwise",
    7: "mirrored across the top-right to bottom-left diagonal",
    8: "rotated 90° counter-clockwise",
}


class DecodeError(ValueError):
    """An image file could not be read."""


class ImageTooLargeError(DecodeError):
    """An image with more pixels than allowed (Pillow's decompression-bomb limit, or the caller's)."""


def _fmt(value: float) -> str:
    """A pixel value for a note or an error: short, no trailing zeros (`3.5`, `-1024`, `1e+06`)."""
    return f"{value:.6g}"


def _refuse_constant(pixels: np.ndarray, kind: str) -> tuple[float, float]:
    """Returns `(min, max)`; a constant image is refused, since a min..max map is undefined for it."""
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo == hi:
        raise DecodeError(f"{kind} is constant (every pixel {_fmt(lo)}): no content")
    return lo, hi


def _min_max(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Maps lo..hi linearly onto 0..255 (float64, not yet rounded)."""
    return (pixels - lo) * (255.0 / (hi - lo))


def _float_to_8bit(pixels: np.ndarray) -> tuple[np.ndarray, str]:
    """Scales a float ("F") image from its actual range: `(0..255 float64, note)`.

    Float exports use 0..1 (most tools), 0..255 (8-bit data saved as float) or a
    physical range (e.g. CT units); clipping to 0..255, as before, turned 0..1 black.
    Only an exact fit to 0..1 or 0..255 is trusted; anything else is min..max.
    """
    finite = np.isfinite(pixels)
    if not finite.all():
        nan = int(np.isnan(pixels).sum())
        what = "NaN" if nan else "infinity"
        bad = nan or int((~finite).sum())
        raise DecodeError(f"float image holds {what} in {bad} of {pixels.size} pixels")
    lo, hi = _refuse_constant(pixels, "float image")
    if lo >= 0.0 and hi <= 1.0:
        return pixels * 255.0, "float image in 0..1: scaled by 255"
    if lo >= 0.0 and hi <= 255.0:
        return pixels, "float image in 0..255: values kept (rounded)"
    return _min_max(pixels, lo, hi), f"float image in {_fmt(lo)}..{_fmt(hi)}: mapped min..max to 0..255"


def _integer_to_8bit(pixels: np.ndarray, label: str) -> tuple[np.ndarray, str | None]:
    """Scales a 16-bit (or 32-bit "I") grayscale image by its real bit depth: `(0..255 float64, note)`.

    A 16-bit container often holds fewer bits (DICOM exports: 12-bit, 0..4095);
    dividing by 257 made those nearly black. The depth is the smallest of 8, 10,
    12, 14, 16 bits whose range holds the maximum, and that range maps onto 0..255.
    A full-range 16-bit image is divided by 257, as before, without a note.
    """
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < 0 or hi >= 2**16:
        # Signed or wider than 16 bits (e.g. CT Hounsfield units, -1024..3071, saved as a
        # 32-bit TIFF): there is no bit depth to trust, but the values are still an image,
        # so they are mapped min..max, like a float image, rather than refused; a constant
        # one has no range to map and is refused.
        lo, hi = _refuse_constant(pixels, label)
        return _min_max(pixels, lo, hi), f"{label} in {_fmt(lo)}..{_fmt(hi)}: mapped min..max to 0..255"
    bits = next(b for b in _BIT_DEPTHS if hi < 2**b)
    scaled = pixels / ((2**bits - 1) / 255.0)  # 16 bits: 65535 / 255 = 257 exactly
    if bits == 16:
        return scaled, None
    kept = " (values kept)" if bits == 8 else ""
    return scaled, f"{label} with values up to {_fmt(hi)}: scaled as {bits}-bit{kept}"


def _to_8bit(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Maps 16- and 32-bit grayscale and float images to 8-bit grayscale: `(L image, note or None)`."""
    pixels = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scaled, note = _float_to_8bit(pixels)
    else:
        label = "32-bit integer image" if img.mode == "I" else "16-bit image"
        scaled, note = _integer_to_8bit(pixels, label)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L"), note


def _flatten(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Returns `(L or RGB image, note on a value rescaling or None)`; transparency is composited over black."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        return _to_8bit(img)
    return _flatten_8bit(img), None


def _flatten_8bit(img: Image.Image) -> Image.Image:
    """Returns an `L` or `RGB` image from any 8-bit-per-channel mode."""
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


def _upright(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Applies an EXIF Orientation tag: `(image as a viewer shows it, note or None)`.

    Cameras and phones store the sensor's pixels and a tag saying how to turn them;
    every viewer applies it, so a model fed the raw pixels sees a sideways or mirrored
    scan that no person ever looked at. Values 2..8 turn the image; any other (1, or a
    malformed tag) leaves it as stored, as viewers do.
    """
    orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    if not isinstance(orientation, int) or orientation not in _ORIENTATIONS:
        return img, None
    upright = ImageOps.exif_transpose(img)
    return upright, f"EXIF orientation {orientation}: {_ORIENTATIONS[orientation]} to upright (as a viewer shows it)"


def read_image(path: str, notes: list[str] | None = None, data: bytes | None = None,
               max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """Opens and decodes an image file at its own size: `(L or RGB image, original mode)`.

    An EXIF orientation is applied first. When the image was turned that way, or its pixel
    values had to be rescaled (a float image, or a 16-bit one not using its full range),
    one line saying what was found and done is appended to `notes` for each. `data`: the
    file's bytes, when the caller read them already (to hash them: the file is read once).
    Raises `DecodeError` with the reason when the file cannot be read, `ImageTooLargeError` when
    it has more than `max_pixels` pixels (default: Pillow's decompression-bomb limit), before
    its pixels are decoded.
    """
    if (len(data) == 0) if data is not None else (os.path.isfile(path) and os.path.getsize(path) == 0):
        raise DecodeError("empty file (0 bytes)")
    if is_dicom(path, data):
        return _read_dicom(path, notes, data, max_pixels or Image.MAX_IMAGE_PIXELS)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            # Refused here, by size, rather than by turning Pillow's warning into an error:
            # `warnings.catch_warnings` is not thread-safe, and the loader decodes in threads.
            pixels = img.size[0] * img.size[1]
            if max_pixels is not None and pixels > max_pixels:
                raise ImageTooLargeError(f"refused as too large: {img.size[0]}x{img.size[1]} = {pixels} pixels, "
                                         f"over the limit of {max_pixels}")
            if pixels > Image.MAX_IMAGE_PIXELS:
                raise ImageTooLargeError(f"refused as a possible decompression bomb: {img.size[0]}x{img.size[1]} = "
                                         f"{pixels} pixels, over Pillow's limit of {Image.MAX_IMAGE_PIXELS}")
            img.load()
            mode = img.mode
            img, turned = _upright(img)
            img, note = _flatten(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses at open
        raise ImageTooLargeError(f"refused as a possible decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(f"cannot decode: {e}") from None
    return _kept(img, mode, notes, [turned, note])


def _kept(img: Image.Image, mode: str, notes: list[str] | None, found: list[str | None]) -> tuple[Image.Image, str]:
    """The image, unless too small to hold anatomy; what was done to it goes to `notes`."""
    if min(img.size) < MIN_SIDE:
        raise DecodeError(f"{img.size[0]}x{img.size[1]} px, smaller than {MIN_SIDE} px on a side")
    if notes is not None:  # only for an image that is kept
        notes += [n for n in found if n is not None]
    return img, mode


def _read_dicom(path: str, notes: list[str] | None, data: bytes | None, max_pixels: int) -> tuple[Image.Image, str]:
    try:
        img, mode, found = read_dicom(path, data, max_pixels)
    except DicomTooLargeError as e:
        raise ImageTooLargeError(str(e)) from None
    except DicomError as e:
        raise DecodeError(str(e)) from None
    return _kept(img, mode, notes, found)


def decode_and_resize(path: str, size: int, notes: list[str] | None = None, data: bytes | None = None,
                      max_pixels: int | None = None) -> np.ndarray:
    """Reads an image file and returns it as a `(size, size, 3)` uint8 RGB array.

    Grayscale images are resized in one channel and repeated, which gives the
    same bytes as resizing their RGB conversion. An EXIF orientation applied or a
    rescaling of pixel values is reported in `notes`, as in `read_image`. Raises
    `DecodeError` with the reason when the file cannot be read (`max_pixels`: as in `read_image`).
    """
    img, _ = read_image(path, notes, data, max_pixels)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels)


def decode_for_model(path: str, image_size: int, decode_size: int | None = None, notes: list[str] | None = None,
                     data: bytes | None = None, max_pixels: int | None = None) -> np.ndarray:
    """What evaluation and inference feed a model: the image decoded at `decode_size` (default:
    `image_size`), then its centre `image_size` square (`center_crop`): the same
    bytes as the evaluation batches of the run that trained it (`data.loader.MRIBatches`)."""
    pixels = decode_and_resize(path, image_size if decode_size is None else decode_size, notes, data, max_pixels)
    return center_crop(pixels, image_size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central `size` x `size` square of a larger square image, where torchvision's
    `CenterCrop` puts it (its top-left corner at `round((side - size) / 2)`); the image itself
    when it is already `size`. With the decode at `--decode-size`, this is the evaluation
    transform of torchvision's reference recipe: `Resize(decode size)`, then `CenterCrop(size)`."""
    side = image.shape[0]
    if side == size:
        return image
    if side < size:
        raise ValueError(f"cannot centre-crop {size} px from a {side} px image")
    top = round((side - size) / 2.0)
    return np.ascontiguousarray(image[top : top + size, top : top + size])
