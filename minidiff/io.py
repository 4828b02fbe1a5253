"""The one atomic writer: every file minidiff writes (text, JSON, safetensors, PNG, a tokenizer folder) goes through
`atomic(path)`.

The bytes go to `path.tmp` first, are flushed to the disk (fsync), and only then moved over `path` with `os.replace`
(atomic on POSIX and Windows). A run killed mid-write, or a full disk, leaves the previous good file where it was and
no `.tmp` behind. Nothing is ever pickled: weights are safetensors only.
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch


@contextmanager
def atomic(path):
    """Yield `path.tmp` to write (a file or a folder); on success move it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        elif path.is_dir():  # a folder cannot be replaced in one step: the old one goes just before
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(tmp: Path):
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


def write_text(text: str, path) -> Path:
    """Write `text` to `path`, atomically."""
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj, path) -> Path:
    """Write `obj` as indented JSON (values JSON cannot hold written as str), atomically."""
    return write_text(json.dumps(obj, indent=2, default=str) + "\n", path)


def save_safetensors(tensors: dict, path, metadata=None) -> Path:
    """safetensors.torch.save_file of `tensors` (detached, contiguous) with string `metadata`, atomically."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_image(img, path, **pil_kwargs) -> Path:
    """Save the PIL image `img` as a PNG (`pil_kwargs`, e.g. pnginfo=, go to PIL), atomically."""
    with atomic(path) as tmp:
        img.save(tmp, format="PNG", **pil_kwargs)
    return Path(path)
