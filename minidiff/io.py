"""The one atomic writer: every file minidiff writes (text, JSON, safetensors, PNG, a tokenizer folder) goes through
`atomic(path)`.

The bytes go to `path.tmp` first, are flushed to the disk (fsync), and only then moved over `path` with `os.replace`
(atomic on POSIX and Windows). A run killed mid-write, or a full disk, leaves the previous good file where it was and
no `.tmp` behind (a SIGKILLed one leaves its `.tmp`, which the next run sweeps: run_folder.py); an OS error while
writing is an OutputError naming the file, one line for the user. Nothing is ever pickled: weights are safetensors
only. A safetensors file gets the mode of any file the user makes (0666 less the umask; safetensors alone makes
0600) and its metadata stored sorted, so the same tensors and metadata give the same bytes in every process.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
from safetensors import SafetensorError

from .errors import OutputError


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
    except OutputError:
        raise
    except (OSError, SafetensorError) as e:  # safetensors wraps the I/O error (disk full) in its own type
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise OutputError(f"cannot write {path}: {why} (the previous file, if any, is intact)") from None
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
    """safetensors.torch.save_file of `tensors` (detached, contiguous) with string `metadata`, atomically; the
    user's umask, sorted metadata (module docstring)."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
    return Path(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sort_metadata(file):
    """Rewrite a safetensors file's JSON header in place with `__metadata__` sorted by key (same length, padded with
    spaces as the format allows; safetensors writes it in hash-map order, which changes per process)."""
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def save_image(img, path, **pil_kwargs) -> Path:
    """Save the PIL image `img` as a PNG (`pil_kwargs`, e.g. pnginfo=, go to PIL), atomically."""
    with atomic(path) as tmp:
        img.save(tmp, format="PNG", **pil_kwargs)
    return Path(path)
