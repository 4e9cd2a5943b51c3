"""Atomic writes leave a whole file or none, under names no two writers share; digests are canonical and
keep the values journals, caches, markers and manifests were keyed by."""

import hashlib

import pytest

from qra.files import atomic_folder, content_digest, digest, text_digest, write_text
from qra.models import ModelSource, content_hash


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def test_digests_keep_their_formats(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"xyz")
    assert text_digest("abc") == sha256(b"abc") == content_digest(tmp_path / "model.safetensors")
    assert digest({"b": 1, "a": [2]}) == sha256(b'{"a": [2], "b": 1}')
    assert content_digest(tmp_path) == sha256(b"model.safetensors\0abcsub/b.bin\0xyz")
    # a model's weights: each weight file's name and bytes, in sorted order, nothing between them
    assert content_hash(ModelSource("m", "folder", tmp_path)) == sha256(b"model.safetensorsabc")
