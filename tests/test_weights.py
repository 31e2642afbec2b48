"""Weights you can trust: a cached ImageNet file is used only when it has Keras' published
hash, checked before a backend loads; and the SHA-256 other code records of its files."""

import hashlib
import subprocess
import sys

import pytest

from checksums import file_sha256
from model import WeightsError, resolve_backbone_weights
from model import weights as weights_module
from tests.conftest import ROOT, active_backend, cli_env
from tests.test_cli import error_lines, run_subprocess

NOTOP = weights_module.IMAGENET_NOTOP_FILE


def cache_file(keras_home, data: bytes):
    path = keras_home / "models" / NOTOP
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_the_hash_table_is_the_installed_keras_own():
    """The project's copy of Keras' table agrees with the installed Keras' (its source, read as
    the runtime no longer does): a Keras upgrade that changes a file, hash or URL fails here."""
    from keras.src.applications import resnet

    from_keras = {}
    for name, hashes in resnet.WEIGHTS_HASHES.items():
        from_keras.update(zip(weights_module.keras_weights_file_names(name), hashes, strict=True))
    assert from_keras == weights_module.KERAS_WEIGHTS_HASHES
    assert weights_module.published_hashes() == resnet.WEIGHTS_HASHES
    assert weights_module.KERAS_WEIGHTS_URL == resnet.BASE_WEIGHTS_PATH


class _AskedError(Exception):
    pass


def test_keras_resnet50_asks_get_file_for_the_same_file_url_and_hash(monkeypatch):
    """What `keras.applications.ResNet50(weights="imagenet")` hands `get_file` is what
    `model.resnet` hands it: the notop file, its URL and its published hash (and the top file's)."""
    import keras
    from keras.src.utils import file_utils

    def get_file(fname, origin, cache_subdir, file_hash):
        raise _AskedError(fname, origin, cache_subdir, file_hash)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    asked = []
    for include_top in (False, True):
        with pytest.raises(_AskedError) as call:
            keras.applications.ResNet50(include_top=include_top, weights="imagenet",
                                        input_shape=None if include_top else (32, 32, 3))
        asked.append(call.value.args)
    top, notop = weights_module.keras_weights_file_names("resnet50")
    assert asked[0] == (NOTOP, weights_module.imagenet_url(), "models", weights_module.published_hashes()["resnet50"][1])
    assert notop == NOTOP and asked[0][3] == weights_module.KERAS_WEIGHTS_HASHES[NOTOP]
    assert asked[1] == (top, weights_module.KERAS_WEIGHTS_URL + top, "models", weights_module.KERAS_WEIGHTS_HASHES[top])


def test_the_published_hash_is_read_without_importing_keras():
    code = ("import sys; from model.weights import published_hashes, imagenet_url; "
            "h = published_hashes()['resnet50'][1]; imagenet_url(); print(h, 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == [weights_module.KERAS_WEIGHTS_HASHES[NOTOP], "False"]


def test_a_cached_file_is_used_only_while_it_has_the_published_hash(tmp_path, monkeypatch):
    data = bytes(range(256)) * 9000  # 2.2 MiB: more than one read chunk
    cached = cache_file(tmp_path, data)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(weights_module, "_can_reach", lambda *a, **k: pytest.fail("network used"))
    monkeypatch.setattr(weights_module, "published_hashes", lambda: {"resnet50": ("top", hashlib.md5(data).hexdigest())})
    assert resolve_backbone_weights("imagenet") == str(cached)
    cached.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(WeightsError) as error:
        resolve_backbone_weights("imagenet")
    message = str(error.value)
    assert "\n" not in message and str(cached) in message
    assert "does not match Keras' published hash" in message and "delete it and put the real file there" in message


def test_file_sha256_streams_the_whole_file(tmp_path):
    data = b"0123456789abcdef" * 200_000  # 3.2 MB: several 1 MiB chunks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_train_refuses_a_truncated_imagenet_file_before_anything_runs(demo_dir, tmp_path):
    fake = b"\x89HDF\r\n\x1a\n" + bytes(4096)  # looks like HDF5, is not Keras' file
    cached = cache_file(tmp_path / "keras-home", fake[:1000])
    env = dict(cli_env(active_backend()), KERAS_HOME=str(tmp_path / "keras-home"))
    out = tmp_path / "run"
    result = run_subprocess("train", "--data-dir", str(demo_dir), "--weights", "imagenet", "--out", str(out),
                            env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and str(cached) in lines[0] and "published hash" in lines[0], result.stderr[-2000:]
    assert not out.exists()
