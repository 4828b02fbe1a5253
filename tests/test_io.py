"""io.py: the one atomic writer. A failed write keeps the previous file and leaves no .tmp behind."""

import json

import pytest
import safetensors.torch
import torch

from minidiff import io


# ----------------------------------------------------------------------------------------------- atomic writes
def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    io.save_safetensors({"w": torch.ones(3)}, path)
    real = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata)  # the bytes are on disk...
        with open(filename, "r+b") as f:
            f.truncate(10)  # ...partly, then the process dies
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="No space"):
        io.save_safetensors({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.ones(3))
    assert not (tmp_path / "w.safetensors.tmp").exists()


def test_failed_json_write_keeps_previous_file(tmp_path):
    path = io.write_json({"a": 1}, tmp_path / "m.json")
    with pytest.raises(TypeError):
        with io.atomic(path) as tmp:
            tmp.write_text("{half")
            raise TypeError("crash")
    assert json.loads(path.read_text()) == {"a": 1}
    assert not (tmp_path / "m.json.tmp").exists()


def test_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "tokenizer"
    with io.atomic(folder) as tmp:
        tmp.mkdir()
        (tmp / "old.txt").write_text("old")
    with io.atomic(folder) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"]
    assert not (tmp_path / "tokenizer.tmp").exists()
