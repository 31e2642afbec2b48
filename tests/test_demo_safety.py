"""`make_demo_data` never writes into a folder it did not make: a non-empty OUT_DIR is refused,
and `replace=True` removes only the files a previous demo dataset's marker lists. No backend is
imported; each test writes a few tiny phantoms (well under a second)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from data.demo import MARKER, DemoDataError, make_demo_data
from errors import UserInputError
from tests.conftest import make_layout


def tree(root: Path) -> dict[str, str]:
    """Every file and link under `root` (relative path: SHA-256 or link target), and its folders."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "folder"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def refused(out: Path, **kwargs) -> str:
    """The one-line message of the refusal, checking that nothing under `out` changed."""
    before = tree(out) if out.is_dir() else None
    with pytest.raises(DemoDataError) as caught:
        make_demo_data(out, train_per_class=2, test_per_class=1, **kwargs)
    assert (tree(out) if out.is_dir() else None) == before
    message = str(caught.value)
    assert "\n" not in message and message.startswith("demo-data: ")
    return message


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A real-looking dataset whose file names are those the demo would write."""
    root = make_layout(tmp_path / "mri", {"Training": {"glioma": 6, "notumor": 6}, "Testing": {"glioma": 2, "notumor": 2}})
    (root / "Training" / "glioma" / "005.jpg").rename(root / "Training" / "glioma" / "glioma_0005.jpg")
    return root


@pytest.mark.parametrize("replace", [False, True])
def test_an_existing_dataset_is_refused_and_left_byte_identical(dataset, replace):
    message = refused(dataset, replace=replace)
    assert "(2 entries, e.g. Testing, Training" in message and "choose an empty or new folder" in message
    assert ("is not empty and not a demo dataset made by make-demo-data" if replace else "is not empty (") in message
    assert issubclass(DemoDataError, UserInputError) and issubclass(DemoDataError, ValueError)


@pytest.mark.parametrize("replace", [False, True])
def test_a_folder_with_any_file_is_refused(tmp_path, replace):
    (tmp_path / "thesis.txt").write_text("four years of work")
    assert "(1 entry, e.g. thesis.txt" in refused(tmp_path, replace=replace)


def test_a_file_as_out_dir_is_refused(tmp_path):
    (tmp_path / "notes").write_text("x")
    assert "is a file, not a folder" in refused(tmp_path / "notes", replace=True)


def test_a_new_or_empty_folder_gets_the_images_and_the_marker(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        assert make_demo_data(out, train_per_class=3, test_per_class=1, seed=5) == {"Training": 12, "Testing": 4}
        marker = json.loads((out / MARKER).read_text())
        files = {p for p, kind in tree(out).items() if kind != "folder" and p != MARKER}
        assert set(marker["files"]) == files and len(files) == 16
        assert {p for p, kind in tree(out).items() if kind == "folder"} == set(marker["folders"])
        assert (marker["seed"], marker["train_per_class"], marker["test_per_class"]) == (5, 3, 1)
        assert marker["sizes"] == [96, 128, 160]


def test_a_demo_dataset_is_refused_without_replace(tmp_path):
    make_demo_data(tmp_path, train_per_class=2, test_per_class=1)
    assert "already holds a demo dataset made by make-demo-data; --replace replaces it" in refused(tmp_path)


def test_replace_rewrites_a_demo_dataset_as_new(tmp_path):
    make_demo_data(tmp_path / "out", train_per_class=4, test_per_class=2, seed=0)
    make_demo_data(tmp_path / "out", train_per_class=2, test_per_class=1, seed=1, replace=True)
    make_demo_data(tmp_path / "fresh", train_per_class=2, test_per_class=1, seed=1)
    assert tree(tmp_path / "out") == tree(tmp_path / "fresh")  # no image of the first one is left
    assert not (tmp_path / "out" / "Training" / "glioma" / "glioma_0003.png").exists()


def test_replace_refuses_a_demo_dataset_holding_a_file_it_did_not_write(tmp_path):
    make_demo_data(tmp_path, train_per_class=2, test_per_class=1)
    (tmp_path / "Training" / "glioma" / "patient_017.jpg").write_bytes(b"a real scan")
    message = refused(tmp_path, replace=True)
    assert "holds Training/glioma/patient_017.jpg, which make-demo-data did not write; nothing was replaced" in message


def test_replace_refuses_an_extra_folder_and_a_linked_folder(tmp_path, dataset):
    make_demo_data(tmp_path / "out", train_per_class=2, test_per_class=1)
    (tmp_path / "out" / "Training" / "other").mkdir()
    assert "holds Training/other," in refused(tmp_path / "out", replace=True)
    (tmp_path / "out" / "Training" / "other").rmdir()
    # A class folder swapped for a link to real data: neither followed nor emptied.
    glioma = tmp_path / "out" / "Training" / "glioma"
    for image in glioma.iterdir():
        image.unlink()
    glioma.rmdir()
    glioma.symlink_to(dataset / "Training" / "glioma", target_is_directory=True)
    real = tree(dataset)
    assert "holds Training/glioma," in refused(tmp_path / "out", replace=True)
    assert tree(dataset) == real


def test_replace_refuses_an_unreadable_marker(tmp_path):
    make_demo_data(tmp_path, train_per_class=2, test_per_class=1)
    (tmp_path / MARKER).write_text("{not json")
    assert f"{MARKER} is not readable (" in refused(tmp_path, replace=True)
