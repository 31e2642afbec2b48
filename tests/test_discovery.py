from collections import Counter

import pytest

from data.discovery import DatasetError, discover, make_splits, stratified_split
from tests.conftest import make_layout


def test_discovers_sorted_classes_and_both_splits(tmp_path):
    make_layout(tmp_path, {"Training": {"b": 3, "a": 2}, "Testing": {"a": 1, "b": 1}})
    classes, train, test, ignored = discover(tmp_path)
    assert classes == ["a", "b"]
    assert [e.label for e in train] == [0, 0, 1, 1, 1]
    assert [e.label for e in test] == [0, 1]
    assert ignored == []


def test_hidden_files_and_non_images_are_ignored(tmp_path):
    make_layout(tmp_path, {"Training": {"a": 2}})
    (tmp_path / "Training" / "a" / ".DS_Store").write_text("x")
    (tmp_path / "Training" / "a" / "notes.txt").write_text("x")
    (tmp_path / "Training" / "__MACOSX").mkdir()
    (tmp_path / "Training" / ".hidden_class").mkdir()
    classes, train, _, ignored = discover(tmp_path)
    assert classes == ["a"]
    assert len(train) == 2
    assert [p.rsplit("/", 1)[-1] for p in ignored] == ["notes.txt"]


def test_nested_files_are_found(tmp_path):
    make_layout(tmp_path, {"Training": {"a": 1}})
    make_layout(tmp_path / "Training" / "a", {"sub": {"deeper": 2}})
    _, train, _, _ = discover(tmp_path)
    assert len(train) == 3


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no Training/ folder"),
        (lambda p: (p / "Training").mkdir(parents=True), "no class folders"),
        (lambda p: (p / "Training" / "a").mkdir(parents=True), "holds no image files"),
        (
            lambda p: make_layout(p, {"Training": {"a": 1, "b": 1}, "Testing": {"a": 1, "c": 1}}),
            "class folders differ",
        ),
    ],
)
def test_layout_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DatasetError, match=message):
        discover(root)


def test_stratified_split_keeps_class_proportions_and_is_seeded(tmp_path):
    make_layout(tmp_path, {"Training": {"a": 50, "b": 30, "c": 20}})
    _, train, _, _ = discover(tmp_path)
    kept, held = stratified_split(train, 0.2, seed=3)
    assert Counter(e.label for e in held) == {0: 10, 1: 6, 2: 4}
    assert sorted(kept + held, key=lambda e: e.path) == sorted(train, key=lambda e: e.path)
    assert stratified_split(train, 0.2, seed=3) == (kept, held)
    assert stratified_split(train, 0.2, seed=4)[1] != held


def test_make_splits_holds_out_test_before_validation(tmp_path):
    make_layout(tmp_path, {"Training": {"a": 20, "b": 20}})
    splits = make_splits(tmp_path, val_split=0.1, test_split=0.25, seed=0)
    # val_split is a fraction of what is left after the test hold-out: round(15 * 0.1) = 2.
    assert splits.counts() == {"train": [13, 13], "val": [2, 2], "test": [5, 5]}
    paths = [set(e.path for e in s) for s in (splits.train, splits.val, splits.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert "0.25 of Training/" in splits.test_source


def test_testing_folder_wins_over_test_split(tmp_path):
    make_layout(tmp_path, {"Training": {"a": 4}, "Testing": {"a": 2}})
    splits = make_splits(tmp_path, val_split=0.25, test_split=0.5)
    assert len(splits.test) == 2 and len(splits.train) == 3
    assert "ignored" in splits.test_source
