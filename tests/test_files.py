"""Atomic writes leave a whole file or none, under names no two writers share; digests are canonical."""

import pytest

from qra.files import atomic_folder, digest, write_text


class Failed(Exception):
    pass


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "results.json"
    write_text(target, "first")
    write_text(target, "second")
    assert target.read_text() == "second"
    assert [path.name for path in target.parent.iterdir()] == ["results.json"]


def test_a_folder_that_fails_halfway_leaves_the_previous_one(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_folder(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(Failed):
        with atomic_folder(target) as staging:
            (staging / "a").write_text("2")
            raise Failed
    assert (target / "a").read_text() == "1"
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint"]


def test_digests_do_not_depend_on_key_order():
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1}) != digest({"a": 1, "b": [3, 2]})
    assert len(digest("x", 16)) == 16
