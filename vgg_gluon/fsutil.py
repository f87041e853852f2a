"""Durable files: atomic writes (temp file in the same folder, fsync, rename, fsync the folder),
fsync helpers and file hashes; shared by checkpoints, data caches, reports and run markers."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

#: Prefix of every temporary name; `checkpoint.cleanup_temp` removes leftovers of a crash.
TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename/create inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """np.savez (uncompressed: loads at disk speed), atomically like atomic_write."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        unlink_quietly(Path(tmp_name))
        raise
    fsync_dir(path.parent)


def hash_file(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(path, "sha256")
