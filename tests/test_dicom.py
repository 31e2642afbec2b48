"""DICOM read as a viewer shows it, against pydicom's own files and its own VOI code, and a
DICOM dataset through train, predict, evaluate and report without its patient data leaking."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_windowing, pixel_array

from data.decode import DecodeError, decode_and_resize, read_image
from data.demo import make_demo_data, phantom
from data.dicom import window_to_8bit
from data.discovery import list_split
from tests.conftest import active_backend
from tests.test_cli import run_cli

# One 64x64 MR slice (Window Center 600, Width 1600), as pydicom ships it in each encoding.
MR_SMALL = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
            "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_padded.dcm"]
PLANTED = ("Planted^Patient^Name", "PLANTED-ID-4711")


def pixels(name_or_path: str, notes: list[str] | None = None) -> np.ndarray:
    path = name_or_path if "/" in name_or_path else get_testdata_file(name_or_path)
    return np.asarray(read_image(path, notes)[0])


def windowed_by_pydicom(name: str) -> np.ndarray:
    """pydicom's own windowing (apply_windowing) of the file, its output range mapped onto 0..255."""
    ds = pydicom.dcmread(get_testdata_file(name))
    out = apply_windowing(ds.pixel_array.astype(np.float64), ds)
    bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return (out - lo) * (255.0 / (hi - lo))


@pytest.mark.parametrize("name", MR_SMALL)
def test_every_encoding_of_one_slice_reads_as_pydicoms_window(name):
    notes = []
    ours = pixels(name, notes)
    reference = windowed_by_pydicom("MR_small.dcm")
    assert ours.shape == (64, 64) and ours.dtype == np.uint8
    assert np.abs(ours.astype(np.float64) - reference).max() <= 0.5 + 1e-9
    assert notes == ["DICOM MONOCHROME2, 16-bit: window center 600 width 1600 (LINEAR)"]
    assert np.array_equal(ours, pixels("MR_small.dcm"))  # bit for bit whatever the encoding


def test_jpeg_ls_decodes_or_names_the_package_it_needs():
    try:
        decoded = pixels("MR_small_jpeg_ls_lossless.dcm")
    except DecodeError as e:  # no JPEG-LS plugin installed (the locks install none)
        message = str(e)
        assert message.startswith("DICOM JPEG-LS Lossless Image Compression: no installed decoder reads it")
        assert "install pylibjpeg with pylibjpeg-libjpeg, or pyjpegls" in message
    else:
        assert np.array_equal(decoded, pixels("MR_small.dcm"))  # lossless: the same slice


def test_a_12_bit_jpeg_without_its_plugin_is_refused_with_what_to_install():
    with pytest.raises(DecodeError, match=r"JPEG Extended .*install pylibjpeg with pylibjpeg-libjpeg"):
        pixels("JPEG-lossy.dcm")


def test_rescale_then_the_value_range_without_a_window():
    """CT_small: Rescale Intercept -1024, no window: min..max of the rescaled values."""
    notes = []
    ours = pixels("CT_small.dcm", notes).astype(np.float64)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    reference = (hu - hu.min()) * 255.0 / (hu.max() - hu.min())
    assert np.abs(ours - reference).max() <= 0.5 + 1e-9
    assert notes == [f"DICOM MONOCHROME2, 16-bit: rescale slope 1 intercept -1024; no window in the file: value "
                     f"range {hu.min():g}..{hu.max():g} mapped to 0..255"]


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert np.array_equal(pixels(str(tmp_path / "m1.dcm")), 255 - pixels("MR_small.dcm"))


@pytest.mark.parametrize("function, expected", [
    # x = c - w/2, c, c + w/4 for c=100, w=40: the standard's formulas (PS3.3 C.11.2.1.2-3)
    ("LINEAR", [((80 - 99.5) / 39 + 0.5) * 255, ((100 - 99.5) / 39 + 0.5) * 255, ((110 - 99.5) / 39 + 0.5) * 255]),
    ("LINEAR_EXACT", [0.0, 127.5, 191.25]),
    ("SIGMOID", [255 / (1 + np.exp(2)), 127.5, 255 / (1 + np.exp(-1))]),
])
def test_window_functions_follow_the_standard(function, expected):
    assert window_to_8bit(np.array([80.0, 100.0, 110.0]), 100, 40, function) == pytest.approx(expected)
    assert window_to_8bit(np.array([-1e6, 1e6]), 100, 40, function) == pytest.approx([0, 255], abs=1e-6)


def test_a_voi_lut_sequence_is_applied(tmp_path):
    """A VOI LUT Sequence overrides the window: a 12-bit LUT that reverses the values 0..4095."""
    from pydicom.dataset import Dataset
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new(0x00283006, "OW", np.arange(4095, -1, -1, dtype="<u2").tobytes())  # LUT Data
    ds.VOILUTSequence = [lut]
    ds.save_as(tmp_path / "lut.dcm")
    notes = []
    ours = pixels(str(tmp_path / "lut.dcm"), notes)
    reference = (4095 - ds.pixel_array.astype(np.float64)) * 255 / 4095
    assert np.abs(ours - reference).max() <= 0.5 + 1e-9
    assert "VOI LUT sequence (12-bit output)" in notes[0]


def test_colour_and_multi_frame_files():
    notes = []
    ours = pixels("SC_rgb_rle_2frame.dcm", notes)
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert np.array_equal(ours, pixel_array(ds, index=1))
    assert notes == ["DICOM with 2 frames: frame 2 (the middle one) used", "DICOM RGB, 8-bit"]
    ybr = pixels("SC_rgb_jpeg_dcmtk.dcm")  # YBR_FULL in the file: RGB as pydicom converts it
    assert np.array_equal(ybr, pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).pixel_array)
    wide = pixels("SC_rgb_rle_16bit.dcm").astype(np.float64)
    reference = pydicom.dcmread(get_testdata_file("SC_rgb_rle_16bit.dcm")).pixel_array / 65535 * 255
    assert np.abs(wide - reference).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("name, reason", [
    ("MR_truncated.dcm", "DICOM pixel data cannot be read: The number of bytes of pixel data is less than expected"),
    ("ExplVR_LitEndNoMeta.dcm", "DICOM file without pixel data"),
])
def test_files_that_cannot_be_shown_say_why(name, reason):
    with pytest.raises(DecodeError) as e:
        pixels(name)
    assert str(e.value).startswith(reason)


def test_a_dicom_file_is_known_by_its_preamble_whatever_its_name(tmp_path):
    folder = tmp_path / "Training" / "glioma"
    folder.mkdir(parents=True)
    for name in ("IM000001", "scan.jpg", "slice.DCM"):
        shutil.copy(get_testdata_file("MR_small.dcm"), folder / name)
    (folder / "notes.txt").write_text("not an image")
    files, ignored = list_split(tmp_path / "Training")
    assert sorted(Path(f).name for f in files["glioma"]) == ["IM000001", "scan.jpg", "slice.DCM"]
    assert [Path(f).name for f in ignored] == ["notes.txt"]
    for f in files["glioma"]:
        assert np.array_equal(pixels(f), pixels("MR_small.dcm"))
        with open(f, "rb") as handle:  # from bytes too (the training pass hashes and decodes one read)
            assert np.array_equal(decode_and_resize(f, 32, data=handle.read()), decode_and_resize(f, 32))


def test_the_pixel_limit_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(DecodeError, match=r"refused as too large: 64x64 = 4096 pixels, over the limit of 4095"):
        pixels("MR_small.dcm")


def test_demo_phantoms_as_dicom_read_back_as_the_phantoms(tmp_path):
    make_demo_data(tmp_path, train_per_class=4, test_per_class=1, dicom=True)
    for index in range(4):  # MONOCHROME1 and 2, with and without a window
        notes = []
        ours = pixels(str(tmp_path / "Training" / "glioma" / f"glioma_{index:04d}.dcm"), notes).astype(int)
        rng = np.random.default_rng([0x4445, 0, 0, 0, index])
        size = (96, 128, 160)[int(rng.integers(3))]
        expected = phantom(rng, "glioma", size).astype(int)
        if "value range" in notes[0]:  # min..max stretches the phantom's own range
            expected = np.rint((expected - expected.min()) * 255 / (expected.max() - expected.min()))
        assert np.abs(ours - expected).max() <= 1, notes


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "jax", reason="the shared pipeline reads DICOM before any backend sees it, and "
                    "what a run writes is backend-free code: once, in the jax pass")
def test_a_dicom_dataset_trains_and_its_patient_data_stays_in_the_files(tmp_path):
    data = tmp_path / "dicom-data"
    make_demo_data(data, train_per_class=6, test_per_class=2, dicom=True, patient=PLANTED)
    run = tmp_path / "run"
    result = run_cli("train", "--data-dir", str(data), "--out", str(run), "--weights", "none", "--image-size", "32",
                     "--batch-size", "8", "--epochs", "1", "--model", "hybrid", "--cut", "conv3", "--head-blocks", "1",
                     "--head-filters", "16", "--augment", "none", "--verbose", "0")
    assert result.exit_code == 0, result.output
    report = (run / "decode-report.txt").read_text()
    assert "MONOCHROME1 inverted" in report and "window center 2048 width 4096" in report
    outputs = [result.output]
    for args in (["predict", str(run), str(data / "Testing" / "glioma"), "--csv", str(tmp_path / "p.csv")],
                 ["evaluate", str(run)], ["report", str(run)]):
        step = run_cli(*args)
        assert step.exit_code == 0, step.output
        outputs.append(step.output)
    assert "glioma_0000.dcm" in outputs[1] and (tmp_path / "p.csv").is_file()
    written = [p for p in [*run.rglob("*"), tmp_path / "p.csv"] if p.is_file()]
    assert len(written) > 10
    for planted in (*PLANTED, "Planted^Patient"):  # whole values: a short digit run can occur in base64 plots
        assert not any(planted in text for text in outputs)
        leaked = [p for p in written if planted.encode() in p.read_bytes()]
        assert leaked == [], planted
