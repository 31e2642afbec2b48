"""The duplicate audit and --dedup, on generated phantoms with planted duplicates: every
planted pair is found, no two distinct phantoms are paired."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.audit import audit_dataset, deduplicate, fingerprint, hamming_pairs, perceptual_hash
from data.demo import _ellipse, _smooth_noise
from data.discovery import make_splits
from tests.conftest import SMALL_MODEL_FLAGS, active_backend
from tests.test_cli import error_lines, run_cli


def shifted(image: Image.Image, dx: int, dy: int) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=0)


def distinct_scan(rng: np.random.Generator, size: int = 160) -> Image.Image:
    """A head-shaped image with its own random texture: distinct from every other one
    (their thumbnails correlate below 0.9), as different patients' scans are. The demo
    phantoms are not: they are one drawing with a few pixels of jitter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    head = _ellipse(xx, yy, size / 2, size / 2, 0.36 * size, 0.43 * size, rng.uniform(-0.2, 0.2)) <= 1
    texture = 0.5 * _smooth_noise(rng, size, 8) + 0.5 * _smooth_noise(rng, size, 16)
    pixels = np.zeros((size, size), np.float32)
    pixels[head] = (40 + 180 * texture)[head]
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    """10 training and 4 test scans per class, all distinct, plus planted copies; returns the
    folder and, per planted copy, the set of files it must be grouped with."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    for split, n in (("Training", 10), ("Testing", 4)):
        for name in ("glioma", "meningioma", "notumor", "pituitary"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                suffix = ".png" if i % 5 == 4 else ".jpg"
                distinct_scan(rng).save(root / split / name / f"{name}_{i:02d}{suffix}")
    train = root / "Training"
    original = {name: sorted((train / name).iterdir()) for name in ("glioma", "meningioma", "notumor", "pituitary")}
    twins: dict[str, set[str]] = {}

    def plant(source: Path, target: Path, image: Image.Image | None = None, **save) -> None:
        if image is None:
            shutil.copyfile(source, target)
        else:
            image.save(target, **save)
        twins[str(target)] = {str(source)}

    g, m, n, p = original["glioma"], original["meningioma"], original["notumor"], original["pituitary"]
    plant(g[0], train / "glioma" / "copy_exact.jpg")
    decoded = Image.open(g[1]).convert("RGB")
    plant(g[1], train / "glioma" / "copy_reencoded.png", decoded)  # same pixels, other format
    plant(m[0], train / "meningioma" / "copy_jpeg70.jpg", Image.open(m[0]).convert("RGB"), quality=70)
    plant(m[1], train / "meningioma" / "copy_shifted.jpg", shifted(Image.open(m[1]), 2, 1), quality=92)
    plant(n[0], train / "notumor" / "copy_brighter.jpg", Image.eval(Image.open(n[0]), lambda v: min(255, v + 20)),
          quality=92)
    plant(p[0], root / "Testing" / "pituitary" / "leak.jpg")  # a training image in the test split
    plant(n[1], train / "glioma" / "conflict.jpg")  # the same image under another label
    return root, twins


def test_every_planted_pair_is_found_and_no_distinct_images_are_paired(planted):
    root, twins = planted
    report = audit_dataset(root)
    groups = [{f["path"] for f in g["files"]} for g in report["groups"]]
    for copy, sources in twins.items():
        assert any({copy, *sources} <= g for g in groups), f"{copy} not grouped with {sources}"
    # Every group is one planted pair: no original phantom is linked to another.
    assert sorted(len(g) for g in groups) == [2] * len(twins)
    by_copy = {Path(f["path"]).name: g for g in report["groups"] for f in g["files"] if f["path"] in twins}
    assert by_copy["copy_exact.jpg"]["kind"] == by_copy["copy_reencoded.png"]["kind"] == "exact"
    assert {by_copy[n]["kind"] for n in ("copy_jpeg70.jpg", "copy_shifted.jpg", "copy_brighter.jpg")} == {"near"}
    assert by_copy["leak.jpg"]["cross_split"] and report["summary"]["across_splits"]["groups"] == 1
    assert by_copy["conflict.jpg"]["cross_class"] and report["summary"]["cross_class_conflicts"]["groups"] == 1
    assert report["leaked_test_images"] == [str(root / "Testing" / "pituitary" / "leak.jpg")]
    assert report["counts"]["Training"]["glioma"] == 13 and report["counts"]["Testing"]["pituitary"] == 5


def test_hash_is_stable_under_brightness_and_a_small_shift(planted):
    root, _ = planted
    image = Image.open(sorted((root / "Training" / "glioma").iterdir())[3])
    base = perceptual_hash(image)
    for variant in (Image.eval(image, lambda v: min(255, v + 20)), shifted(image, 2, 1)):
        assert int(np.bitwise_count(np.uint64(base ^ perceptual_hash(variant)))) <= 10


def test_hamming_pairs_match_a_brute_force_count():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64) ^ (rng.integers(0, 2, 300, dtype=np.uint64) << 63)
    hashes[10] = hashes[3] ^ np.uint64(0b1011)  # 3 bits apart
    expected = {(i, j) for i in range(300) for j in range(i + 1, 300)
                if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 12}
    assert {(i, j) for i, j, _ in hamming_pairs(hashes, 12, block=64)} == expected
    assert (3, 10, 3) in hamming_pairs(hashes, 3)


def test_exact_fingerprint_ignores_the_file_format(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.bmp")
    Image.fromarray(pixels[:, :, ::-1]).save(tmp_path / "c.png")
    a, b, c = (fingerprint(str(tmp_path / n)) for n in ("a.png", "b.bmp", "c.png"))
    assert a.exact == b.exact != c.exact and a.size == (50, 40)


def test_dedup_drops_training_twins_of_test_images_and_collapses_groups(planted):
    root, twins = planted
    splits = make_splits(root, val_split=0.0, dedup=True)
    plain = make_splits(root, val_split=0.0)
    dropped = dict(splits.dropped)
    leak = str(root / "Testing" / "pituitary" / "leak.jpg")
    assert "twin of test image" in dropped[next(iter(twins[leak]))]
    assert splits.leaked_test == [leak]
    # The test split is untouched; each training group keeps one member, except the image
    # held under two labels, of which none is kept.
    assert [e.path for e in splits.test] == [e.path for e in plain.test]
    conflict = str(root / "Training" / "glioma" / "conflict.jpg")
    assert "different labels" in dropped[conflict] and "different labels" in dropped[next(iter(twins[conflict]))]
    kept = {e.path for e in splits.train}
    for copy, sources in twins.items():
        if copy not in (leak, conflict):
            assert len(({copy} | sources) & kept) == 1
    assert len(dropped) == len(twins) + 1
    result = deduplicate(plain.train, [])  # no test set: collapse only
    assert not result.leaked_test and len(result.dropped) == len(twins)
    # --leakage-report: the same twins found, nothing dropped.
    report = make_splits(root, val_split=0.0, find_twins=True)
    assert report.leaked_test == [leak] and not report.dropped and report.train == plain.train


def test_audit_command_writes_the_report_and_refuses_a_missing_folder(planted, tmp_path):
    root, twins = planted
    out = tmp_path / "audit.json"
    result = run_cli("audit", "--data-dir", str(root), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "| across splits | 1 | 1 | 0 | 2 | 1 |" in result.output
    assert len(json.loads(out.read_text())["groups"]) == len(twins)
    result = run_cli("audit", "--data-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "does not exist" in error_lines(result.output)[0]


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="one short training run; runs in the torch pass")
def test_train_with_dedup_reports_the_test_images_without_a_twin(planted, tmp_path):
    root, twins = planted
    out = tmp_path / "run"
    result = run_cli("train", "--data-dir", str(root), "--dedup", "--image-size", "32", "--batch-size", "16",
                     "--epochs", "1", "--weights", "none", "--out", str(out), "--verbose", "0", *SMALL_MODEL_FLAGS)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["count"] == 17 and metrics["test_leakage_free"]["count"] == 16
    assert metrics["best"]["test_leakage_free"]["count"] == 16
    assert "| Test Accuracy (no twin in Training) |" in result.output
    record = json.loads((out / "leakage.json").read_text())
    assert len(record["dropped"]) == len(twins) + 1 and len(record["test_images_with_a_training_twin"]) == 1
    assert json.loads((out / "config.json").read_text())["counts"]["train"] != make_splits(root).counts()["train"]
