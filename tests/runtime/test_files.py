"""Crash-safe writes: a file or a folder is replaced whole or not at all, and no temporary sibling is left behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mcit.runtime import files
from mcit.runtime.files import (
    atomic_folder,
    load_tensors,
    save_tensors,
    temporary_sibling,
    write_json_atomic,
    write_text_atomic,
)


def _tree(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_text_atomic_creates_and_replaces(tmp_path):
    path = tmp_path / "results.md"
    write_text_atomic(path, "first")
    assert path.read_text() == "first"
    write_text_atomic(path, "second, longer than the first")
    assert path.read_text() == "second, longer than the first"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # no temporary sibling left


def test_write_text_atomic_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_text_atomic(path, "old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with pytest.raises(OSError):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"


def test_write_json_atomic_round_trip(tmp_path):
    data = {"matrix": [[None, 1.5]], "tasks": ["shape"], "nested": {"ok": True}}
    write_json_atomic(tmp_path / "r.json", data)
    assert json.loads((tmp_path / "r.json").read_text()) == data


def test_temporary_sibling_is_hidden_and_per_process(tmp_path):
    tmp = temporary_sibling(tmp_path / "stage-01-shape")
    assert tmp.parent == tmp_path and tmp.name == f".stage-01-shape.tmp-{os.getpid()}"


def test_atomic_folder_creates_and_replaces_whole(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        assert tmp != out and not out.exists()  # built aside, published at the end
        (tmp / "a.txt").write_text("one")
    assert _tree(out) == {"a.txt": "one"}
    with atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("two")
        assert _tree(out) == {"a.txt": "one"}  # the old folder is intact while the new one is built
    assert _tree(out) == {"b.txt": "two"}  # replaced whole: the old file is gone
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_atomic_folder_leaves_the_old_folder_intact_when_the_body_raises(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "adapter.safetensors").write_text("old weights")
    (out / "sub").mkdir()
    (out / "sub" / "README.md").write_text("old card")
    before = _tree(out)
    with pytest.raises(KeyboardInterrupt):  # BaseException too: Ctrl-C mid-export
        with atomic_folder(out) as tmp:
            (tmp / "adapter.safetensors").write_text("half-written")
            raise KeyboardInterrupt
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the temporary folder is removed


def test_atomic_folder_creates_nothing_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(tmp_path / "new") as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_tensors_round_trip_and_a_missing_file_is_empty(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "ids": torch.tensor([3, 1, 2])}
    save_tensors(tensors, tmp_path / "t.safetensors")  # a non-contiguous view is saved too
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert load_tensors(tmp_path / "missing.safetensors") == {}
