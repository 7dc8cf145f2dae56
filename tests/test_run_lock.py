"""One writer per run folder: a second run or resume of a folder that is being written is
refused at once, naming the folder, and changes nothing; a killed writer never blocks the next."""

import signal
import subprocess
import sys
import time

import pytest

from twist_fl.core.runs import RunFolder

from .helpers import run_local

HOLD = ("import sys, time; from twist_fl.core.runs import RunFolder; f = RunFolder.existing(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(600)")


def holder(folder):
    """Another process that holds the folder's writer lock (as a running resume does)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def snapshot(folder):
    return {f.relative_to(folder): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_second_writer_is_refused_and_a_killed_one_never_blocks(tmp_path):
    run_local(tmp_path, "r", num_server_rounds=1, optimizer_state="reset")
    folder = tmp_path / "r"
    before = snapshot(folder)
    p = holder(folder)
    try:
        t = time.monotonic()
        with pytest.raises(ValueError, match=rf"run folder {folder} is being written by another process"):
            run_local(tmp_path, "x", num_server_rounds=2, optimizer_state="reset", resume_from=str(folder))
        assert time.monotonic() - t < 10  # refused at once, not after a wait
        assert snapshot(folder) == before  # the record is intact
    finally:
        p.send_signal(signal.SIGKILL)  # the holder crashes
        p.wait()

    run_local(tmp_path, "x", num_server_rounds=2, optimizer_state="reset", resume_from=str(folder))
    assert [line.count('"round"') for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 1]


def test_two_new_runs_of_one_name_do_not_share_the_folder(tmp_path):
    (tmp_path / "n").mkdir()
    f = RunFolder(tmp_path / "n").lock()  # a run of that name has just made and locked it
    try:
        with pytest.raises(ValueError, match="being written by another process"):
            run_local(tmp_path, "n")
    finally:
        f.release()
    run_local(tmp_path, "n", num_server_rounds=1)
    assert (tmp_path / "n" / "model").is_dir()


def test_leftovers_of_a_crashed_writer_are_removed_on_resume(tmp_path):
    run_local(tmp_path, "c", num_server_rounds=1, optimizer_state="reset")
    folder = tmp_path / "c"
    (folder / "checkpoints" / ".tmp-round-00002-12345").mkdir()
    (folder / "checkpoints" / ".tmp-round-00002-12345" / "weights.safetensors").write_bytes(b"half")
    (folder / ".metrics.jsonl.abc.tmp").write_text("half")

    run_local(tmp_path, "x", num_server_rounds=2, optimizer_state="reset", resume_from=str(folder))

    assert not list(folder.rglob(".tmp-*")) and not list(folder.glob(".*.tmp"))


def test_one_folder_has_one_lock_by_any_path_and_its_holder_can_be_asked(tmp_path, monkeypatch):
    """A relative path, a symlink and the absolute path of one folder are one lock; `holder` names
    the process that has it without taking it (None when it is free)."""
    import os
    from pathlib import Path

    (tmp_path / "f").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "f")
    monkeypatch.chdir(tmp_path)
    assert RunFolder(Path("f")).holder() is None
    held = RunFolder(tmp_path / "f").lock()
    try:
        for other in (Path("f"), Path("link"), tmp_path / "link"):
            assert RunFolder(other).holder().startswith(f"PID {os.getpid()} on ")
            with pytest.raises(ValueError, match=f"run folder {other} is being written by another process "
                                                 rf"\(PID {os.getpid()} "):
                RunFolder(other).lock()
        assert RunFolder(Path("f")).holder() is not None  # asking took nothing
    finally:
        held.release()
    assert RunFolder(Path("f")).holder() is None and RunFolder(Path("link")).holder() is None
    RunFolder(Path("link")).lock().release()
