"""File writes that are either complete or never seen: the one home of that rule.

`atomic_write(path, write)` calls `write(tmp)` on a temporary file in the same folder (a unique
name, so two writers never share one), fsyncs the file, renames it over `path` and fsyncs the
folder, so that after a crash `path` holds the old content or the new, never a part. A failed
`write` leaves no temporary file behind. `mode` sets the file's permissions before any byte is
written (0o600 for private keys).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], mode: int = 0o644) -> Path:
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), mode)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda p: p.write_text(text), mode)
