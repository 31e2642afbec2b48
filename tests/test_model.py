import hashlib
import time

import keras
import numpy as np
import pytest

from model import WeightsError, build_classifier, load_initial_weights, resolve_backbone_weights
from model import weights as weights_module
from model.classifier import build_backbone

SIZE = 32

def to_numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


BATCH = np.random.default_rng(0).normal(0, 50, (2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    return build_classifier(4, SIZE, weights="none", dropout=0.0)


def test_outputs_one_logit_per_class(classifier):
    logits = to_numpy(classifier(BATCH, training=False))
    assert logits.shape == (2, 4) and np.isfinite(logits).all()
    assert classifier.get_layer("logits").activation is keras.activations.linear


def test_all_weights_train_when_nothing_is_frozen(classifier):
    n_trainable = len(classifier.trainable_weights)
    assert n_trainable == len(classifier.get_layer("resnet50").trainable_weights) + 2
    assert n_trainable > 150


def test_frozen_backbone_trains_only_the_head_and_keeps_batchnorm_in_inference():
    model = build_classifier(4, SIZE, weights="none", freeze="backbone", dropout=0.0)
    assert [w.path for w in model.trainable_weights] == ["logits/kernel", "logits/bias"]
    bn = model.get_layer("resnet50").get_layer("conv1_bn")
    before = to_numpy(bn.moving_mean).copy()
    # training=True must still use the moving statistics, so the output equals inference.
    np.testing.assert_allclose(
        to_numpy(model(BATCH, training=True)), to_numpy(model(BATCH, training=False)), rtol=1e-5, atol=1e-5
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(BATCH, np.array([0, 1]))
    np.testing.assert_array_equal(to_numpy(bn.moving_mean), before)


def test_unknown_freeze_mode_is_rejected():
    with pytest.raises(ValueError, match="freeze must be one of"):
        build_classifier(4, SIZE, freeze="half")


def test_initial_weights_file_reproduces_the_model(classifier, tmp_path):
    path = tmp_path / "initial.weights.h5"
    classifier.save_weights(path)
    keras.utils.set_random_seed(123)
    other = build_classifier(4, SIZE, weights="none", dropout=0.0)
    assert not np.allclose(to_numpy(other(BATCH)), to_numpy(classifier(BATCH)))
    load_initial_weights(other, path)
    np.testing.assert_array_equal(to_numpy(other(BATCH)), to_numpy(classifier(BATCH)))


def test_init_weights_errors_are_clear(classifier, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_initial_weights(classifier, tmp_path / "missing.weights.h5")
    truncated = tmp_path / "cut.weights.h5"
    classifier.save_weights(truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="not a readable HDF5"):
        load_initial_weights(classifier, truncated)
    wrong = tmp_path / "wrong.weights.h5"
    build_classifier(3, SIZE, weights="none").save_weights(wrong)
    with pytest.raises(WeightsError, match="does not fit this model"):
        load_initial_weights(classifier, wrong)


def test_backbone_weights_from_a_file(tmp_path):
    keras.utils.set_random_seed(5)
    source = build_backbone(SIZE, "none")
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    model = build_classifier(4, SIZE, weights=str(path))
    loaded = model.get_layer("resnet50")
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_imagenet_offline_and_uncached_fails_fast_with_the_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(weights_module, "_can_reach", lambda host, timeout=5.0: False)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights("imagenet")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras-home" / "models") in message
    assert "--weights PATH" in message and "--weights none" in message


def test_imagenet_uses_the_cached_file_without_the_network(tmp_path, monkeypatch):
    cached = tmp_path / "models" / weights_module.IMAGENET_NOTOP_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"stand-in")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(weights_module, "_can_reach", lambda *a, **k: pytest.fail("network used"))
    # The stand-in passes the published-hash check only as the published file (tests/test_weights.py).
    stand_in_md5 = hashlib.md5(b"stand-in").hexdigest()
    monkeypatch.setattr(weights_module, "published_hashes", lambda: {"resnet50": ("top", stand_in_md5)})
    assert resolve_backbone_weights("imagenet") == str(cached)


def test_none_and_missing_path():
    assert resolve_backbone_weights("none") is None
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_backbone_weights("/nonexistent/resnet.h5")
