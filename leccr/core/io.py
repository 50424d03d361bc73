"""Atomic, durable writes: the one place the store writes a file.

Every file goes through a temporary name in the same folder, an fsync, a rename and an fsync of the
folder, so a crash or a power cut leaves the old content or the new one, never a cut file under a
committed name (HF `datasets`' temp file + move; open_clip's checkpoint `os.replace`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def durable_replace(tmp: Path, path: Path) -> None:
    """`os.replace(tmp, path)` that survives a crash: data on disk before the rename, the rename after."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform without directory fds (Windows): the rename is as durable as it gets
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network mounts) refuse fsync on a folder; the file itself is synced
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """The hidden name a file is written under before its rename (never globbed as a shard)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # threads of one process too


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write through a temporary name, fsync, rename, fsync the folder: all or nothing, even on power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.write_bytes(data)
    durable_replace(tmp, path)
    return path


def _read_umask() -> int:
    umask = os.umask(0o022)  # Python 3.11 can only read the umask by setting it
    os.umask(umask)
    return umask


# Read once at import (setting the umask, even back, races with threads creating files).
_UMASK = _read_umask()


def give_default_mode(path: Path) -> Path:
    """Set a file's permissions to what `open()` would have given it (0644 under the usual umask 022).

    safetensors (0.8) writes its files 0600, so a model saved for others to load was readable by its
    owner only."""
    os.chmod(path, 0o666 & ~_UMASK)
    return path
