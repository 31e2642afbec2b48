"""`download`: the offline error, the layout check, and kagglehub's errors made readable."""

import time

import pytest

from data import download as download_module
from data.download import API_HOST, DownloadError, check_counts, download, find_root
from tests.conftest import make_layout
from tests.test_cli import error_lines, go_offline, run_cli


def test_offline_download_fails_fast_with_one_line(monkeypatch):
    pytest.importorskip("kagglehub")  # an optional extra (pip install .[download]); the lock has it
    tried = go_offline(monkeypatch)
    for proxy in ("HTTPS_PROXY", "https_proxy", "KAGGLE_API_ENDPOINT"):  # with one, kagglehub's own errors speak
        monkeypatch.delenv(proxy, raising=False)
    start = time.perf_counter()
    result = run_cli("download")
    assert time.perf_counter() - start < 30
    assert result.exit_code == 2, result.output
    assert [host for host, _ in tried] == [API_HOST]  # the check, before kagglehub touches the network
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach api.kaggle.com")
    assert "Traceback" not in result.output


def test_the_layout_is_found_nested_and_counts_are_compared(tmp_path):
    counts = {"glioma": 2, "meningioma": 1, "notumor": 1, "pituitary": 1}
    root = make_layout(tmp_path / "archive" / "v1", {"Training": counts, "Testing": counts})
    assert find_root(tmp_path) == root
    notes = check_counts(root)
    assert "Training/glioma: 2 images, expected 1321" in notes and len(notes) == 8


def test_kagglehub_errors_become_one_readable_line(tmp_path, monkeypatch):
    kagglehub = pytest.importorskip("kagglehub")

    def refuse(handle, output_dir=None):
        raise PermissionError("403 Client Error: Forbidden for url\nmore lines")

    monkeypatch.setattr(download_module, "check_reachable", lambda timeout=5.0: None)
    monkeypatch.setattr(kagglehub, "dataset_download", refuse)
    with pytest.raises(DownloadError) as error:
        download("owner/name", tmp_path)
    message = str(error.value)
    assert "\n" not in message and "403 Client Error" in message and "KAGGLE_USERNAME" in message

    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, output_dir=None: str(
        make_layout(tmp_path / "got", {"Training": {"a": 1}, "Testing": {"a": 1}})))
    root, notes = download("owner/name", tmp_path)
    assert root == tmp_path / "got" and any("classes ['a']" in n for n in notes)
