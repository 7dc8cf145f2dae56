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


def checked_path(out: str | os.PathLike, what: str = "--out") -> Path:
    """`out` resolved (symlinks followed), or ValueError when the file system cannot hold that
    name (a part longer than its limit, a NUL byte)."""
    text = os.fspath(out)
    if "\0" in text:
        raise ValueError(f"{what} {text!r} holds a NUL byte; no file system takes it")
    p = Path(text).expanduser()
    limit = 255
    try:
        limit = os.pathconf(next(d for d in (p, *p.parents) if d.exists()), "PC_NAME_MAX")
    except (OSError, ValueError, StopIteration):
        pass
    long = [part for part in p.parts if len(os.fsencode(part)) > limit]
    if long:
        raise ValueError(f"{what}: the name {long[0][:40]!r}... is {len(os.fsencode(long[0]))} bytes long; the file "
                         f"system allows {limit}")
    try:
        return p.resolve()
    except OSError as e:
        raise ValueError(f"{what} {text!r} cannot be used: {e.strerror or e}") from None


def check_not_input(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...], what: str = "--out") -> Path:
    """The resolved `out`, unless it is, is inside, or contains one of `inputs` (symlinks resolved):
    then ValueError naming both."""
    p = checked_path(out, what)
    for i in inputs:
        src = Path(i).expanduser().resolve()
        if _within(p, src) or _within(src, p):
            raise ValueError(f"{what} {str(out)!r} is, is inside, or contains the input {str(i)!r}; "
                             "choose an output outside it")
    return p


def is_result_folder(path: Path) -> bool:
    """Whether `path` holds a model or a run (a trained result, never a place for new outputs)."""
    return (path / "config.json").is_file() and any((path / n).exists() for n in (
        "model.safetensors", "metrics.jsonl", "summary.json", "checkpoints", "model.onnx"))


def check_output(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False,
                 what: str = "--out", kind: str = "folder") -> Path:
    """The one rule for where a command may write, checked before any work starts.

    An output equal to, inside, or containing an input is always refused (writing it would
    destroy what is being read). An output that exists is refused unless it is an empty folder
    or `force` is given, and even with `force` when it is not of `kind` (`folder` or `file`):
    --force replaces a folder's or a file's content, never one kind with the other. The parent
    folder must exist and be writable. Returns the resolved output path."""
    p = check_not_input(out, inputs, what)
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


# --- one writer per output: locks that know their holder ---------------------------------------------


class HolderLock:
    """An exclusive flock on `path` that records its holder: PID, host, start time and command.

    The flock is the one truth of who writes: taken without waiting (a second writer is refused
    at once, with one line naming the holder), and dropped by the kernel when the holder's
    process ends, however it ends, so whether a lock is free never depends on timing. The record
    only explains: it is cleared on release, so a record found by the next writer means its
    holder ended without releasing (a crash, kill -9), which that writer says in a warning line."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    @staticmethod
    def _record(fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            rec = json.loads(data) if data else {}
            return rec if isinstance(rec, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def describe(rec: dict) -> str:
        if not rec.get("pid"):
            return "a process that left no record"
        return (f"PID {rec['pid']} on {rec.get('host', '?')}, started {rec.get('started', '?')}"
                + (f": {rec['command']}" if rec.get("command") else ""))

    def _try(self, mode: int) -> tuple[int | None, dict]:
        """Open the lock file and take the flock `mode` without waiting: (its descriptor, {}), or
        (None, the holder's record) when another process has it."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(self.path, e) from None
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            rec = self._record(fd)
            os.close(fd)
            return None, rec
        return fd, {}

    def acquire(self) -> HolderLock:
        import fcntl
        import logging
        import sys
        import time

        fd, rec = self._try(fcntl.LOCK_EX)
        if fd is None:
            raise ValueError(f"{self.what} is being written by another process ({self.describe(rec)}); wait for it "
                             "to end, or choose another output") from None
        previous = self._record(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            state = "has ended" if not _alive(int(previous["pid"])) else "no longer holds it"
            logging.getLogger(__name__).warning("%s: taking over the lock of %s, which %s without releasing it",
                                                self.what, self.describe(previous), state)
        rec = {"pid": os.getpid(), "host": os.uname().nodename, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str | None:
        """Who holds the lock now (`describe`), or None when it is free; takes nothing and writes
        nothing (a waiter asks this instead of taking the lock to find out)."""
        import fcntl

        fd, rec = self._try(fcntl.LOCK_SH)
        if fd is None:
            return self.describe(rec)
        os.close(fd)  # drops the probe's shared lock
        return None

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # released cleanly: no record for the next writer to warn about
            except OSError:
                pass
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


_claims: list[HolderLock] = []


def cache_dir() -> Path:
    """twist-fl's cache folder ($TWIST_FL_CACHE, default ~/.cache/twist-fl): token caches, locks."""
    d = Path(os.environ.get("TWIST_FL_CACHE", Path.home() / ".cache" / "twist-fl"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def lock_path(out: Path) -> Path:
    """Where the lock of an output path lives: a file named by the hash of the path, resolved (a
    relative path, a symlink and the absolute path of one folder share one lock), in the cache's
    locks/ folder (the output itself may not exist yet, and no lock file is left in it)."""
    import hashlib

    root = cache_dir() / "locks"
    root.mkdir(exist_ok=True)
    return root / (hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:32] + ".lock")


def claim_output(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False,
                 what: str = "--out", kind: str = "folder") -> Path:
    """`check_output`, with the output locked for the rest of the command (`release_claims`): a
    second writer of any kind to the same path is refused while this one runs, naming it."""
    p = checked_path(out, what)
    lock = HolderLock(lock_path(p), f"{what} {str(out)!r}").acquire()
    try:
        check_output(out, inputs, force, what, kind)
    except BaseException:
        lock.release()
        raise
    _claims.append(lock)
    return p


def release_claims() -> None:
    """Drop every output lock this process took (the end of a command)."""
    while _claims:
        _claims.pop().release()
