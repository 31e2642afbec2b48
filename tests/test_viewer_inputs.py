"""Inputs read as a viewer shows them (issue 21, item 7): EXIF orientation applied, class folder
names compared in Unicode NFC, --image-size bounded by the range and by memory, and ignored
symlinked folders named on the console."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data.decode import decode_and_resize, read_image
from data.discovery import DatasetError, Example, Splits, discover, make_splits
from tests.conftest import ROOT, cli_env, make_layout, write_image
from training import config
from training.config import ConfigError, TrainConfig, check_splits, memory_estimate

# A smooth, non-symmetric 32x48 image (a bright block top-left): every one of the 8
# orientations gives a different array, and JPEG keeps a smooth image within a few levels.
_Y, _X = np.mgrid[0:32, 0:48]
STORED = (_X * 4 + _Y * 2).astype(np.uint8)
STORED[:8, :8] = 255
# How a viewer shows the stored pixels for each EXIF Orientation value (the EXIF/TIFF spec).
VIEWED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),  # stored turned 90° counter-clockwise: shown turned 90° clockwise
    7: lambda a: a[::-1, ::-1].T,
    8: lambda a: np.rot90(a, 1),
}
# A JPEG at quality 95 of STORED decodes within this many levels of it (measured: 1).
JPEG_TOLERANCE = 3


def _with_orientation(path, orientation: int | None, **save) -> str:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(STORED).save(path, exif=exif, **save)
    return str(path)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path, orientation):
    notes: list[str] = []
    img, _ = read_image(_with_orientation(tmp_path / "o.png", orientation), notes)  # PNG: lossless
    np.testing.assert_array_equal(np.asarray(img), VIEWED[orientation](STORED))
    assert len(notes) == (orientation != 1)


def test_a_jpeg_with_orientation_6_is_turned_upright_and_noted(tmp_path):
    notes: list[str] = []
    turned = decode_and_resize(_with_orientation(tmp_path / "six.jpg", 6, quality=95), 48, notes)
    assert notes == ["EXIF orientation 6: rotated 90° clockwise to upright (as a viewer shows it)"]
    # Exactly the plain JPEG's pixels (same encoder, same data) turned 90° clockwise, then resized.
    plain = np.asarray(Image.open(_with_orientation(tmp_path / "plain.jpg", None, quality=95)))
    expected = Image.fromarray(np.ascontiguousarray(np.rot90(plain, -1))).resize((48, 48), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(turned[..., 0], np.asarray(expected))
    # And within JPEG's error of the upright original, far from the image as stored.
    upright = np.asarray(Image.fromarray(np.ascontiguousarray(VIEWED[6](STORED))).resize(
        (48, 48), Image.Resampling.BILINEAR), dtype=int)
    as_stored = np.asarray(Image.fromarray(STORED).resize((48, 48), Image.Resampling.BILINEAR), dtype=int)
    assert np.abs(turned[..., 0] - upright).max() <= JPEG_TOLERANCE
    assert np.abs(turned[..., 0] - as_stored).mean() > 20


def test_orientation_1_or_no_exif_changes_nothing_and_says_nothing(tmp_path):
    notes: list[str] = []
    bare = decode_and_resize(str(write_image(tmp_path / "bare.jpg", STORED, quality=95)), 40, notes)
    one = decode_and_resize(_with_orientation(tmp_path / "one.jpg", 1, quality=95), 40, notes)
    none = decode_and_resize(_with_orientation(tmp_path / "none.jpg", None, quality=95), 40, notes)
    assert notes == []
    assert bare.tobytes() == one.tobytes() == none.tobytes()


def test_orientation_and_a_bit_depth_rescaling_are_both_noted(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "twelve.png"
    Image.fromarray(STORED.astype(np.uint16) * 16).save(path, exif=exif)  # 12-bit values, up to 4080
    notes: list[str] = []
    img, _ = read_image(str(path), notes)
    assert notes == ["EXIF orientation 8: rotated 90° counter-clockwise to upright (as a viewer shows it)",
                     "16-bit image with values up to 4080: scaled as 12-bit"]
    assert img.size == (32, 48)  # turned: 32 wide, 48 tall


NFC, NFD = "tum\u00f6r", "tumo\u0308r"  # the same name to a user: composed, and with a combining umlaut


def test_an_nfd_testing_folder_is_the_same_class_as_its_nfc_training_folder(tmp_path):
    root = make_layout(tmp_path / "data", {"Training": {NFC: 3, "glioma": 3}, "Testing": {NFD: 2, "glioma": 2}},
                       size=16)
    splits = make_splits(root, val_split=0.0)
    assert splits.classes == ["glioma", NFC]
    tumour = [e.path for e in splits.test if e.label == 1]
    assert len(tumour) == 2 and all(os.path.isfile(p) and f"{os.sep}{NFD}{os.sep}" in p for p in tumour)


def test_class_names_that_really_differ_are_shown_by_their_code_points(tmp_path):
    root = make_layout(tmp_path / "data", {"Training": {NFC: 1, "glioma": 1},
                                           "Testing": {"tum\u0151r": 1, "glioma\u200b": 1}}, size=16)
    with pytest.raises(DatasetError) as error:
        discover(root)
    assert str(error.value) == (
        "class folders differ between Training/ ['glioma', 'tumör'] and Testing/ ['glioma\\u200b', 'tumőr']: "
        "only in Training/: 'glioma', 'tumör' (as code points: 'tum\\u00f6r'); "
        "only in Testing/: 'glioma\\u200b' (as code points: 'glioma\\u200b'), 'tumőr' (as code points: 'tum\\u0151r')")


def test_two_training_folders_differing_only_in_unicode_form_are_refused(tmp_path):
    root = make_layout(tmp_path / "data", {"Training": {NFC: 1, NFD: 1}}, size=16)
    with pytest.raises(DatasetError) as error:
        discover(root)
    assert str(error.value) == (
        "Training/ has two class folders with the same name in different Unicode forms ('tumo\u0308r' (as code "
        "points: 'tumo\\u0308r'), 'tum\u00f6r' (as code points: 'tum\\u00f6r')): rename one")


def _splits(n_train: int, ignored: list[str] | None = None) -> Splits:
    train = [Example(f"{c}{i}.jpg", label) for label, c in enumerate("ab") for i in range(n_train // 2)]
    return Splits(["a", "b"], train, [], [], "none", ignored or [])


def test_memory_estimate_is_the_cache_and_the_float32_batches_in_flight():
    cfg = TrainConfig(data_dir="x", image_size=64, batch_size=8, workers=2)
    assert memory_estimate(cfg, 100) == (100 * 64 * 64 * 3, (2 + 2) * 8 * 64 * 64 * 3 * 4) == (1_228_800, 1_572_864)
    assert memory_estimate(TrainConfig(data_dir="x", image_size=64, batch_size=8, workers=2, cache=False), 100) == (
        0, 1_572_864)


def test_a_run_larger_than_physical_memory_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(config, "physical_memory", lambda: 16 * 2**20)
    monkeypatch.setattr(config, "available_memory", lambda: None)
    cfg = TrainConfig(data_dir="x", image_size=256, batch_size=8, workers=0)
    # 40 * 256^2 * 3 = 7.5 MiB of cache; 2 batches * 8 * 256^2 * 3 * 4 bytes = 12.0 MiB.
    with pytest.raises(ConfigError) as error:
        check_splits(cfg, _splits(40))
    assert str(error.value) == ("40 images at --image-size 256 need about 19.5 MiB (7.5 MiB decoded cache + 12.0 MiB "
                                "of float32 batches in flight), more than this machine's 16.0 MiB of memory: lower "
                                "--image-size, or give --no-cache")
    no_cache = TrainConfig(data_dir="x", image_size=256, batch_size=8, workers=0, cache=False)
    assert check_splits(no_cache, _splits(40)) == []  # 12.0 MiB of batches fit in 16
    monkeypatch.setattr(config, "physical_memory", lambda: 8 * 2**20)
    with pytest.raises(ConfigError, match=r"need about 12\.0 MiB \(12\.0 MiB of float32 batches in flight\), "
                                          r"more than this machine's 8\.0 MiB of memory: lower --image-size or "
                                          r"--batch-size$"):
        check_splits(no_cache, _splits(40))


def test_memory_short_only_now_is_a_note_not_a_refusal(monkeypatch):
    monkeypatch.setattr(config, "physical_memory", lambda: 2**40)
    monkeypatch.setattr(config, "available_memory", lambda: 16 * 2**20)
    cfg = TrainConfig(data_dir="x", image_size=256, batch_size=8, workers=0)
    assert check_splits(cfg, _splits(40)) == [
        "40 images at --image-size 256 need about 19.5 MiB (7.5 MiB decoded cache + 12.0 MiB of float32 batches "
        "in flight), more than the 16.0 MiB of memory available now; lower --image-size, or give --no-cache if the "
        "run swaps"]
    monkeypatch.setattr(config, "available_memory", lambda: 2**40)
    assert check_splits(cfg, _splits(40)) == []


def test_an_image_size_over_1024_is_refused_by_the_option(tmp_path):
    result = subprocess.run([sys.executable, "cli.py", "train", "--data-dir", str(tmp_path), "--image-size", "20000"],
                            cwd=ROOT, env=cli_env("torch"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--image-size" in result.stderr and "20000 is not in the range 32<=x<=1024" in result.stderr


def test_a_symlinked_folder_and_non_image_files_are_named_in_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "available_memory", lambda: None)
    root = make_layout(tmp_path / "data", {"Training": {"a": 2, "b": 2}}, size=16)
    make_layout(tmp_path / "elsewhere", {"x": {"y": 1}}, size=16)
    os.symlink(tmp_path / "elsewhere" / "x" / "y", root / "Training" / "a" / "linked")
    (root / "Training" / "a" / "notes.txt").write_text("n")
    (root / "Training" / "b" / "scan.nii").write_bytes(b"d")
    notes = check_splits(TrainConfig(data_dir=str(root), image_size=32), make_splits(root, val_split=0.0))
    assert notes == ["ignored 1 symlinked folder (not followed): Training/a/linked/; "
                     "2 non-image files: Training/a/notes.txt, Training/b/scan.nii"]


def test_a_long_list_of_ignored_files_names_the_first_three(monkeypatch):
    monkeypatch.setattr(config, "available_memory", lambda: None)
    ignored = [f"d/Training/a/{i}.txt" for i in range(5)] + ["d/Training/a/l1/", "d/Training/b/l2/"]
    (note,) = check_splits(TrainConfig(data_dir="d", image_size=32), _splits(4, ignored))
    assert note == ("ignored 2 symlinked folders (not followed): Training/a/l1/, Training/b/l2/; 5 non-image files: "
                    "Training/a/0.txt, Training/a/1.txt, Training/a/2.txt, ... (2 more, all in config.json)")
