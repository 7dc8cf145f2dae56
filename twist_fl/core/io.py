"""File writes that are either complete or never seen: the one home of that rule.

`atomic_write(path, write)` calls `write(tmp)` on a temporary file in the same folder (a unique
name, so two writers never share one), fsyncs the file, renames it over `path` and fsyncs the
folder, so that after a crash `path` holds the old content or the new, never a part. A failed
`write` leaves no temporary file behind. `mode` sets the file's permissions before any byte is
written (0o600 for private keys). `write_json` writes strict JSON (no NaN), and
`check_output` is where a command may write: never onto its input, never over what exists
unless asked.
"""

from __future__ import annotations

import json
import math
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


def finite_json(obj: object) -> object:
    """`obj` with every NaN or infinite float replaced by None: Python's json module would write
    them as bare `NaN`/`Infinity` tokens, which are not JSON and which other readers refuse. (A
    diverged run's loss is recorded as null; the verbs refuse a non-finite result before this.)"""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json(path: Path, obj: object, mode: int = 0o644) -> Path:
    """`obj` as valid JSON (`finite_json`), atomically."""
    return atomic_write_text(path, json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n", mode)


def json_line(obj: object) -> str:
    """One line of a .jsonl file, valid JSON as `write_json`."""
    return json.dumps(finite_json(obj), allow_nan=False) + "\n"


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False,
                 what: str = "--out") -> Path:
    """The one rule for where a command may write, checked before any work starts.

    An output equal to, inside, or containing an input is always refused (writing it would
    destroy what is being read). An output that exists is refused unless it is an empty folder
    or `force` is given. The parent folder must exist. Returns the resolved output path."""
    p = Path(out).expanduser().resolve()
    for i in inputs:
        src = Path(i).expanduser().resolve()
        if _within(p, src) or _within(src, p):
            raise ValueError(f"{what} {str(out)!r} is, is inside, or contains the input {str(i)!r}; "
                             "choose an output outside it")
    if not p.parent.is_dir():
        raise ValueError(f"{what} {str(out)!r}: its folder {str(p.parent)!r} does not exist")
    if p.exists() and not force and not (p.is_dir() and not any(p.iterdir())):
        raise ValueError(f"{what} {str(out)!r} already exists; pass --force to overwrite it, or choose another path")
    return p
