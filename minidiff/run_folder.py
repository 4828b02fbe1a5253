"""The folder a run writes into: checked before any model loads, locked while the run writes, swept of stale *.tmp.

    lock = run_folder.claim(args.out)          # OutputError (one line) if it is a file, read-only, or in use
    ...                                        # everything the run writes goes under args.out
    lock.release()                             # (also when the object goes away, and when the process dies)

The lock is `OUT/.minidiff.lock`, held with flock(2) by the running process. The kernel drops it when the process
ends, however it ends (SIGKILL too), so a lock file left behind never blocks the next run; it holds the pid of the
process that has it, for the message the second run prints. Every file minidiff writes goes to `NAME.tmp` first
and is renamed over NAME (minidiff/io.py); a killed run leaves its `.tmp` behind, which the next
run that claims the folder deletes (only the names our writers make, in the folders they write).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_NAME = ".minidiff.lock"
TMP_NAMES = ("*.safetensors.tmp", "*.json.tmp", "*.csv.tmp", "*.png.tmp", "*.txt.tmp")  # what our writers leave
SUBFOLDERS = ("checkpoints", "samples", "unet", "class-images")  # where the scripts write below OUT


def check_folder(path, flag="--out") -> Path:
    """`path` as a folder this process can write into (made if missing), else OutputError naming `flag`."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise OutputError(f"{flag} {path}: {p} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create the folder ({e.strerror})") from None
    probe = path / f".minidiff-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write into this folder ({e.strerror})") from None
    return path


def check_file_target(path, flag) -> Path:
    """The folder of an output file (e.g. --png x/y.png) checked like check_folder; a folder at `path` is refused."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder: give a file name, e.g. {path / 'out.png'}")
    check_folder(path.parent, flag)
    return path


def sweep_tmp(*folders) -> list:
    """Delete the `*.tmp` files our atomic writers leave when a run is killed mid-write; returns their paths."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        for pattern in TMP_NAMES if folder.is_dir() else ():
            for tmp in folder.glob(pattern):
                try:
                    tmp.unlink()
                    removed.append(tmp)
                except OSError:
                    pass  # not ours to remove after all (permissions): the writers overwrite it anyway
    return removed


class FolderLock:
    """flock(2) on OUT/.minidiff.lock, held until release() (or until this object or the process goes away)."""

    def __init__(self, folder, flag="--out"):
        self.folder, self.fd = Path(folder), None
        if fcntl is None:
            return
        try:
            self.fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"{flag} {folder}: cannot create its lock file ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise OutputError(
                f"{flag} {folder} is in use by another minidiff run (pid {holder}): wait for it to "
                f"finish or pass another {flag}"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    __del__ = release

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim(folder, flag="--out", also=()) -> FolderLock:
    """check_folder, lock it, then sweep stale *.tmp from it, its SUBFOLDERS and the folders in `also`."""
    folder = check_folder(folder, flag)
    lock = FolderLock(folder, flag)
    removed = sweep_tmp(folder, *(folder / s for s in SUBFOLDERS), *also)
    if removed:
        print(
            f"removed {len(removed)} unfinished file(s) a stopped run left in {folder}: "
            + ", ".join(p.name for p in removed[:3])
            + (" ..." if len(removed) > 3 else "")
        )
    return lock
