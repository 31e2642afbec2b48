"""Weights you can trust: a cached ImageNet file is used only when it has Keras' published
hash, checked before a backend loads; and the SHA-256 other code records of its files."""

import hashlib
import subprocess
import sys

import pytest

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


def test_the_published_hash_is_keras_own_and_read_without_importing_keras():
    from keras.src.applications.resnet import WEIGHTS_HASHES

    code = ("import sys; from model.weights import published_hashes; h = published_hashes()['resnet50'][1]; "
            "print(h, 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == [WEIGHTS_HASHES["resnet50"][1], "False"]


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
    assert weights_module.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


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
