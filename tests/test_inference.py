"""Using a trained run on any backend: evaluate, predict and Grad-CAM, their errors, and
agreement between backends for one saved model."""

import csv
import json

import keras
import numpy as np
import pytest

from inference.evaluate import evaluate_run
from inference.gradcam import grad_cam, split_at_cam_layer
from inference.run import RunError, load_model_file, load_run, predict_files, split_examples
from model import ModelSpec, build_model
from tests.conftest import BACKENDS, active_backend, write_image
from tests.test_cli import error_lines, run_cli, run_subprocess
from training.metrics import roc_auc

# Probabilities of one saved model under two backends (measured: <= 1e-6 on CPU).
PROBABILITY_ATOL = 1e-4


def test_roc_auc_is_the_pairwise_win_rate_with_ties_counting_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(scores, positive) == pytest.approx(wins / (len(pos) * len(neg)))
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert roc_auc(scores, np.ones(60, bool)) is None


def test_grad_cam_of_a_pooled_dense_head_is_the_class_activation_map():
    # Behind GlobalAveragePooling and Dense, d score_c / d A[h, w, k] = W[k, c] / (H W):
    # Grad-CAM reduces to Zhou et al.'s CAM, which NumPy computes from the weights.
    keras.utils.set_random_seed(0)
    model = build_model(ModelSpec("resnet50"), 4, 96, "none")
    images = np.random.default_rng(1).normal(0, 40, (3, 96, 96, 3)).astype(np.float32)
    features_model, _ = split_at_cam_layer(model)
    classes = np.array([0, 2, 3])
    maps, probabilities = grad_cam(model, images, classes)
    features = np.asarray(keras.ops.convert_to_numpy(features_model(images, training=False)))
    kernel = np.asarray(keras.ops.convert_to_numpy(model.get_layer("logits").kernel))
    cam = np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]) / 9.0, 0)
    assert maps.shape == (3, 3, 3)
    np.testing.assert_allclose(maps, cam, rtol=1e-4, atol=1e-6 * cam.max())
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(probabilities.argmax(1), logits.argmax(1))


def test_evaluate_writes_the_report_and_matches_the_training_metrics(trained_run):
    run = load_run(trained_run)
    examples, source = split_examples(run, None, "test")
    report = evaluate_run(run, examples, "test", source, log=lambda _: None)
    written = json.loads((trained_run / f"eval-test-{active_backend()}.json").read_text())
    training = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert written["accuracy"] == report["accuracy"] == pytest.approx(training["accuracy"])
    assert written["loss"] == pytest.approx(training["loss"], rel=1e-4)
    assert np.array(written["confusion_matrix"]).sum() == written["count"] == len(examples) == 12
    assert set(written["per_class"]["glioma"]) == {"precision", "recall", "f1", "roc_auc", "support"}
    assert 0 <= written["macro_roc_auc"] <= 1
    assert [p["path"] for p in written["predictions"]] == [e.path for e in examples]


def test_evaluate_a_split_folder_and_refuse_other_classes(trained_run, demo_dir, tmp_path):
    run = load_run(trained_run)
    examples, source = split_examples(run, demo_dir, "Testing")
    assert len(examples) == 12 and source.endswith("Testing/")
    (tmp_path / "Other" / "cats").mkdir(parents=True)
    write_image(tmp_path / "Other" / "cats" / "a.png", np.zeros((8, 8), np.uint8))
    result = run_cli("evaluate", str(trained_run), "--data-dir", str(tmp_path), "--split", "Other")
    assert result.exit_code == 2 and "are not the model's" in result.output
    result = run_cli("evaluate", str(trained_run), "--data-dir", str(tmp_path), "--split", "Nowhere")
    assert result.exit_code == 2 and "is not a folder" in error_lines(result.output)[0]


def test_predict_names_bad_files_and_still_predicts_the_rest(trained_run, demo_dir, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted((demo_dir / "Testing" / "glioma").iterdir())[:2]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    (folder / "notes.jpg").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    out = tmp_path / "predictions.csv"
    result = run_cli("predict", str(trained_run), str(folder), "--csv", str(out))
    assert result.exit_code == 1
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {good[0].name, good[1].name, "truncated.jpg", "notes.jpg"}  # hidden file left out
    for name in (good[0].name, good[1].name):
        probs = [float(rows[name][f"p_{c}"]) for c in ("glioma", "meningioma", "notumor", "pituitary")]
        assert sum(probs) == pytest.approx(1, abs=1e-5) and not rows[name]["error"]
        assert rows[name]["predicted"] == ("glioma", "meningioma", "notumor", "pituitary")[int(np.argmax(probs))]
    assert rows["truncated.jpg"]["error"] and rows["notes.jpg"]["error"] and not rows["notes.jpg"]["predicted"]
    assert "notes.jpg" in result.output and "2 of 4 files could not be read" in result.output


def test_low_confidence_flag_follows_the_threshold(trained_run, demo_dir):
    run = load_run(trained_run)
    files = [str(demo_dir / "Testing" / "notumor")]
    assert all(r.low_confidence for r in predict_files(run, files, threshold=1.0))
    assert not any(r.low_confidence for r in predict_files(run, files, threshold=0.0))
    result = run_cli("predict", str(trained_run), *files)
    assert result.exit_code == 0, result.output


def test_unusable_run_directories_and_model_files_are_refused(tmp_path, trained_run):
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((trained_run / "config.json").read_text())
    (unfinished / "best.weights.h5").write_bytes(b"")
    with pytest.raises(RunError, match=r"no model.keras.*best.weights.h5"):
        load_run(unfinished)
    (unfinished / "model.keras").write_bytes(b"PK\3\4 truncated")
    result = run_cli("evaluate", str(unfinished))
    line = error_lines(result.output)[0]  # named as damaged, with the checkpoint that still works
    assert result.exit_code == 2 and "model.keras is damaged (" in line and "--checkpoint best uses best.weights.h5" in line


def test_a_lambda_layer_is_refused_by_safe_mode(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(RunError, match="safe_mode"):
        load_model_file(tmp_path / "lambda.keras")


@pytest.mark.slow
@pytest.mark.skipif(active_backend() != "torch", reason="spawns every backend; runs once, in the torch pass")
def test_one_saved_model_gives_the_same_predictions_and_heatmaps_on_every_backend(trained_run, demo_dir, tmp_path):
    predictions, heatmaps = {}, {}
    for backend in BACKENDS:
        result = run_subprocess("evaluate", str(trained_run), backend=backend)
        assert result.returncode == 0, result.stderr
        report = json.loads((trained_run / f"eval-test-{backend}.json").read_text())
        predictions[backend] = report["predictions"]
        out = tmp_path / f"cam-{backend}"
        result = run_subprocess("gradcam", str(trained_run), str(demo_dir / "Testing"), "--out", str(out), backend=backend)
        assert result.returncode == 0, result.stderr
        assert len(list(out.glob("*.png"))) == 12
        heatmaps[backend] = np.load(out / "heatmaps.npz")["maps"]
    reference = predictions["torch"]
    probs = np.array([p["probabilities"] for p in reference])
    assert heatmaps["torch"].shape == (12, 8, 8) and (heatmaps["torch"].reshape(12, -1).max(1) > 0).all()
    for backend in ("tensorflow", "jax"):
        assert [p["predicted"] for p in predictions[backend]] == [p["predicted"] for p in reference]
        other = np.array([p["probabilities"] for p in predictions[backend]])
        np.testing.assert_allclose(other, probs, atol=PROBABILITY_ATOL)
        for a, b in zip(heatmaps["torch"], heatmaps[backend], strict=True):
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99


def test_gradcam_writes_an_overlay_per_readable_image_and_names_the_rest(trained_run, demo_dir, tmp_path):
    good = sorted((demo_dir / "Testing" / "meningioma").iterdir())[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "cam"
    result = run_cli("gradcam", str(trained_run), *map(str, good), str(broken), "--out", str(out), "--class", "pituitary")
    assert result.exit_code == 1 and "broken.png: error" in result.output
    overlays = sorted(out.glob("*.png"))
    assert [p.name.split("-", 1)[1].split("__")[0] for p in overlays] == [p.stem for p in good]
    assert all("__pituitary_" in p.name for p in overlays)
    from PIL import Image

    assert Image.open(overlays[0]).size == (2 * 224, 224)  # image and overlay, at display size
    rows = list(csv.DictReader((out / "gradcam.csv").open()))
    assert [r["error"] != "" for r in rows] == [False, False, False, True]
    saved = np.load(out / "heatmaps.npz")
    assert saved["maps"].shape == (3, 8, 8) and list(saved["paths"]) == [str(p) for p in good]
    result = run_cli("gradcam", str(trained_run), str(good[0]), "--out", str(out), "--class", "cat")
    assert result.exit_code == 2 and "the model's classes are" in result.output
