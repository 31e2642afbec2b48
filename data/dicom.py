"""DICOM files read as a viewer shows them, into the 8-bit image the rest of the pipeline takes.

The rules, in the order the DICOM standard (PS3.3 C.11) applies them to a grayscale image:
1. the Modality LUT: Rescale Slope and Intercept (or a Modality LUT Sequence), to real units;
2. the VOI LUT: a VOI LUT Sequence when present, else the first Window Center/Width (with its
   VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID), else the value range min..max;
3. MONOCHROME1 (0 is white) is inverted, so that bright means bright as in MONOCHROME2.
Colour images come out as RGB (pydicom converts YBR; a palette goes through its colour LUT) and
are scaled to 8 bits by their bit depth. A multi-frame file gives its middle frame (a series'
central slice), and says so. Every step taken is one line in `notes` (decode-report.txt).

Nothing from the header other than what decoding needs is read into a note or a message: no
patient, study or device attribute leaves the file. pydicom and NumPy only (no backend ops), so
the bytes are the same whichever Keras backend is active.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from data.layout import has_dicom_preamble

# Compressed transfer syntaxes that pydicom decodes only with optional packages, and which to install.
OPTIONAL_DECODERS = {
    "JPEG-LS": "pylibjpeg with pylibjpeg-libjpeg, or pyjpegls",
    "JPEG Extended": "pylibjpeg with pylibjpeg-libjpeg (Pillow reads 8-bit JPEG only)",
    "JPEG Lossless": "pylibjpeg with pylibjpeg-libjpeg",
    "JPEG 2000": "pylibjpeg with pylibjpeg-openjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg with pylibjpeg-openjpeg",
}


class DicomError(ValueError):
    """A DICOM file that cannot be shown: the reason, without any header value but decoding's."""


class DicomTooLargeError(DicomError):
    """More pixels than the caller allows."""


def is_dicom(path: str, data: bytes | None = None) -> bool:
    """A `.dcm` file, or a file with the DICOM preamble (`DICM` at byte 128) whatever its name.

    The preamble is looked at before any other reader: a DICOM preamble may itself be a TIFF
    header (a "dual-personality" file), which Pillow would open as a TIFF of the wrong pixels."""
    if Path(path).suffix.lower() == ".dcm":
        return True
    return data[128:132] == b"DICM" if data is not None else has_dicom_preamble(path)


def read_dicom(path: str, data: bytes | None, max_pixels: int) -> tuple[Image.Image, str, list[str]]:
    """Decodes a DICOM file: `(L or RGB 8-bit image, "DICOM <photometric>", notes)`.

    Raises `DicomError` for a file that is not DICOM, has no pixel data, is truncated, is larger
    than `max_pixels`, or uses a compression no installed decoder handles (naming what to install).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise DicomError(f"not a readable DICOM file: {e}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("DICOM file without pixel data (e.g. a report or a structured document)")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * columns > max_pixels:
        raise DicomTooLargeError(f"refused as too large: {columns}x{rows} = {rows * columns} pixels, over the limit of "
                         f"{max_pixels}")
    _assume_transfer_syntax(ds)
    frames = int(ds.get("NumberOfFrames") or 1)
    notes = []
    if frames > 1:
        notes.append(f"DICOM with {frames} frames: frame {frames // 2 + 1} (the middle one) used")
    pixels = _pixels(ds, frames // 2 if frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pixels.ndim == 3 or photometric == "PALETTE COLOR":
        image, note = _colour(ds, pixels, photometric)
    else:
        image, note = _grayscale(ds, pixels, photometric)
    notes.append(note)
    return image, f"DICOM {photometric}", notes


def _assume_transfer_syntax(ds) -> None:
    """A dataset saved without its file meta (no preamble) carries no Transfer Syntax UID:
    pydicom then knows only the encoding it read the elements in, which is that of the pixels."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _pixels(ds, frame: int | None) -> np.ndarray:
    """The stored pixel values of one frame (colour as RGB), or `DicomError` with the reason."""
    from pydicom.pixels import pixel_array

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. excess padding, which pydicom removes itself
            return pixel_array(ds, index=frame) if frame is not None else ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:  # no plugin for the compression, or one that failed
        install = next((v for k, v in OPTIONAL_DECODERS.items() if syntax.name.startswith(k)), None)
        reason = " ".join(str(e).split())
        if install:
            raise DicomError(f"DICOM {syntax.name}: no installed decoder reads it ({reason}); install {install} "
                             "(docs/dicom.md)") from None
        raise DicomError(f"DICOM {syntax.name}: cannot decode the pixel data ({reason})") from None
    except (ValueError, AttributeError, KeyError, TypeError, EOFError) as e:  # truncated, inconsistent
        raise DicomError(f"DICOM pixel data cannot be read: {' '.join(str(e).split())}") from None


def _grayscale(ds, pixels: np.ndarray, photometric: str) -> tuple[Image.Image, str]:
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = np.asarray(apply_modality_lut(pixels, ds), np.float64)
    steps = []
    if "ModalityLUTSequence" in ds:
        steps.append("modality LUT sequence")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        steps.append(f"rescale slope {_fmt(ds.get('RescaleSlope') or 1)} intercept {_fmt(ds.get('RescaleIntercept') or 0)}")
    window = _first_window(ds)
    if "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        # A LUT is indexed by whole values (the modality LUT's output, rounded).
        looked_up = apply_voi(np.rint(values).astype(np.int64), ds, index=0)
        scaled = np.asarray(looked_up, np.float64) * (255.0 / (2**bits - 1))
        steps.append(f"VOI LUT sequence ({bits}-bit output)")
    elif window is not None:
        center, width, function = window
        scaled = window_to_8bit(values, center, width, function)
        steps.append(f"window center {_fmt(center)} width {_fmt(width)} ({function})")
    else:
        lo, hi = float(values.min()), float(values.max())
        if lo == hi:
            raise DicomError(f"DICOM image is constant (every pixel {_fmt(lo)}): no content")
        scaled = (values - lo) * (255.0 / (hi - lo))
        steps.append(f"no window in the file: value range {_fmt(lo)}..{_fmt(hi)} mapped to 0..255")
    if photometric == "MONOCHROME1":
        scaled = 255.0 - scaled
        steps.append("MONOCHROME1 inverted (bright is bright)")
    image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    return image, f"DICOM {photometric}, {ds.get('BitsStored', '?')}-bit: " + "; ".join(steps)


def _first_window(ds) -> tuple[float, float, str] | None:
    """The first Window Center/Width pair and the VOI LUT Function, or None when absent or unusable."""
    from pydicom.multival import MultiValue

    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center, width = (float(v[0]) if isinstance(v, MultiValue) else float(v) for v in (center, width))
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _WINDOW_FUNCTIONS or width <= 0 or (function == "LINEAR" and width < 1):
        return None  # a function the standard does not define, or a width it forbids: no window to trust
    return center, width, function


def window_to_8bit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 onto 0..255 (float64, not yet rounded)."""
    return _WINDOW_FUNCTIONS[function](np.asarray(values, np.float64), center, width) * 255.0


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    # C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; else linear between.
    if w == 1:
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def _linear_exact(x: np.ndarray, c: float, w: float) -> np.ndarray:
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)  # C.11.2.1.3.2


def _sigmoid(x: np.ndarray, c: float, w: float) -> np.ndarray:
    # C.11.2.1.3.1: 1 / (1 + exp(-4 (x - c) / w)), written with tanh, which cannot overflow.
    return 0.5 * (1.0 + np.tanh(2.0 * (x - c) / w))


_WINDOW_FUNCTIONS = {"LINEAR": _linear, "LINEAR_EXACT": _linear_exact, "SIGMOID": _sigmoid}


def _colour(ds, pixels: np.ndarray, photometric: str) -> tuple[Image.Image, str]:
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        bits = 16 if pixels.dtype.itemsize > 1 else 8
        how = f"palette colour LUT ({bits}-bit)"
    else:
        bits = int(ds.get("BitsStored") or 8)
        how = f"{photometric} as RGB" if photometric.startswith("YBR") else "RGB"
    scaled = pixels.astype(np.float64) * (255.0 / (2**bits - 1)) if bits != 8 else pixels.astype(np.float64)
    image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "RGB")
    return image, f"DICOM {how}, {bits}-bit" + (" scaled to 8 bits" if bits != 8 else "")


def _fmt(value) -> str:
    return f"{float(value):.6g}"
