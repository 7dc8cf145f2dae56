"""File writes that are either complete or never seen: the one home of that rule.

`atomic_write(path, write)` calls `write(tmp)` on a temporary file in the same folder (a unique
name, so two writers never share one), fsyncs the file, renames it over `path` and fsyncs the
folder, so that after a crash `path` holds the old content or the new, never a part. A failed
`write` leaves no temporary file behind. `mode` sets the file's permissions before any byte is
written (0o600 for private keys). `write_json` writes strict JSON (no NaN), and
`check_output` is where a command may write: never onto its input, never over what exists
unless asked. `staged_folder` does for a whole output folder what `atomic_write` does for a
file: it is written aside and renamed into place complete, or not at all. A failed write (a
full disk, a read-only folder) raises `WriteError`, one line naming the path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class WriteError(OSError):
    """A file or folder could not be written (full disk, read-only, no permission): the message
    names the path and the reason; nothing half-written is left behind."""

    reason: str = ""


def _write_error(path: Path, e: BaseException) -> WriteError:
    """A WriteError naming `path` (a staged folder names the user's folder, not its own files)."""
    if isinstance(e, WriteError):
        reason, code = e.reason, e.errno
    elif isinstance(e, OSError) and e.strerror:
        reason, code = e.strerror, e.errno or errno.EIO
    else:
        reason, code = (str(e).strip().splitlines() or [type(e).__name__])[-1], errno.EIO
    err = WriteError(f"cannot write {path}: {reason}")
    err.errno, err.reason = code, reason
    return err


def _is_write_failure(e: BaseException) -> bool:
    """An OSError, or a library's wrapper of one (safetensors, onnx, matplotlib raise their own)."""
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return any(w in text for w in ("no space left", "read-only file system", "permission denied", "disk quota",
                                   "i/o error", "ioerror", "failed to write"))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], mode: int = 0o644) -> Path:
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and _is_write_failure(e):
            raise _write_error(path, e) from None
        raise
    return path


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; once it is complete it becomes `out` in one rename
    (or, where `out` is a folder that already holds files and `check_output` allowed it,
    each of its files replaces its namesake in one rename), so nothing is ever seen
    half-written. On failure the temporary folder is removed and `out` is as it was. Temporary
    folders of writers that died are removed by the next writer of the same `out`."""
    out = Path(out)
    for old in out.parent.glob(f".{out.name}.staged-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = out.parent / f".{out.name}.staged-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise _write_error(out, e) from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
            # --force on a folder that holds files: each new file replaces its namesake whole
            # (one rename each); the folder's other files stay, as they were not asked for
            for entry in sorted(tmp.iterdir()):
                target = out / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            fsync_dir(out)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _is_write_failure(e):
            raise _write_error(out, e) from None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                 what: str = "--out", kind: str = "folder") -> Path:
    """The one rule for where a command may write, checked before any work starts.

    An output equal to, inside, or containing an input is always refused (writing it would
    destroy what is being read). An output that exists is refused unless it is an empty folder
    or `force` is given, and even with `force` when it is not of `kind` (`folder` or `file`):
    --force replaces a folder's or a file's content, never one kind with the other. The parent
    folder must exist and be writable. Returns the resolved output path."""
    p = Path(out).expanduser().resolve()
    for i in inputs:
        src = Path(i).expanduser().resolve()
        if _within(p, src) or _within(src, p):
            raise ValueError(f"{what} {str(out)!r} is, is inside, or contains the input {str(i)!r}; "
                             "choose an output outside it")
    if not p.parent.is_dir():
        raise ValueError(f"{what} {str(out)!r}: its folder {str(p.parent)!r} does not exist")
    if p.exists() and kind == "folder" and not p.is_dir():
        raise ValueError(f"{what} {str(out)!r} is an existing file; it takes a folder (choose a new path)")
    if p.exists() and kind == "file" and p.is_dir():
        raise ValueError(f"{what} {str(out)!r} is an existing folder; it takes a file path (e.g. result.json)")
    if p.exists() and not force and not (p.is_dir() and not any(p.iterdir())):
        raise ValueError(f"{what} {str(out)!r} already exists; pass --force to overwrite it, or choose another path")
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{what} {str(out)!r}: its folder {str(p.parent)!r} is not writable")
    return p
