"""No half-written file: every writer on a full disk. A small tmpfs is mounted where the machine
allows it (root); elsewhere the disk is filled by an injected OSError(ENOSPC) at the writers'
fsync. Each verb must exit 2 with one line naming the path (no traceback), leave no partial or
temporary file, and leave every earlier file byte-identical."""

import errno
import os
import shutil
import subprocess

import pytest

from twist_fl.core.io import WriteError
from twist_fl.tools.cli import main

from .helpers import run_local


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fd")
    run_local(root, "twist", num_nodes=2, keep=2, num_server_rounds=1, optimizer_state="reset")
    run_local(root, "dense", num_nodes=2, strategy="fedavg", num_server_rounds=1)
    return root


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """A folder on an almost full disk, holding one earlier file (`earlier.txt`)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    (mnt / "earlier.txt").write_text("an earlier result\n")
    if mounted:
        fill(mnt)
    else:
        import twist_fl.core.io as io

        real = os.fsync

        def fsync(fd):
            if str(mnt) in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)

        monkeypatch.setattr(io.os, "fsync", fsync)
    yield mnt
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt, slack=12 * 1024):
    """Leave `slack` bytes free on a mounted disk: enough to start writing a model, not to finish."""
    (mnt / "filler").unlink(missing_ok=True)
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - slack))


def listing(folder):
    return {str(f.relative_to(folder)): f.read_bytes() if f.is_file() else None for f in sorted(folder.rglob("*"))}


def refused(capsys, path):
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "it/s]" not in line and line.strip()]
    assert "Traceback" not in err and len(errors) == 1, err  # (progress bars aside)
    assert "error: cannot write" in err and str(path) in err, err


@pytest.mark.parametrize("verb", ["prune", "export-onnx", "export-hf", "heatmap", "evaluate-json", "report"])
@pytest.mark.parametrize("force", [False, True])
def test_every_verb_on_a_full_disk_leaves_what_was_there(trained, disk, capsys, verb, force):
    out = disk / ("r.json" if verb == "evaluate-json" else "out")
    if force:  # an earlier output that --force would replace
        if verb == "evaluate-json":
            out.write_text('{"earlier": true}\n')
        else:
            out.mkdir()
            (out / "earlier.md").write_text("an earlier output\n")
    if verb == "evaluate-json" and (disk / "filler").exists():
        fill(disk, slack=0)  # a JSON file is smaller than any slack worth leaving
    before = listing(disk)
    model = str(trained / "twist")
    argv = {"prune": ["prune", model, "--keep", "2", "--out", str(out)],
            "export-onnx": ["export", model, "--format", "onnx", "--out", str(out)],
            "export-hf": ["export", model, "--format", "hf", "--out", str(out)],
            "heatmap": ["heatmap", model, "--keeps", "2", "--draws", "1", "--eval-tokens", "256", "--out", str(out)],
            "evaluate-json": ["evaluate", model, "--eval-tokens", "256", "--json", str(out)],
            "report": ["report", "--twist", model, "--dense", str(trained / "dense"), "--keeps", "2", "--draws", "1",
                       "--k", "1", "--eval-tokens", "256", "--calib-tokens", "256", "--out", str(out)]}[verb]

    assert main(argv + (["--force"] if force else [])) == 2

    refused(capsys, out)
    assert listing(disk) == before  # nothing partial, no temporary file, the earlier files intact


def test_a_resume_on_a_full_disk_changes_nothing_and_leaves_no_temporary_checkpoint(trained, disk):
    run = disk / "run"
    (disk / "filler").unlink(missing_ok=True)
    shutil.copytree(trained / "twist", run, ignore=shutil.ignore_patterns("model", "summary.json", "*.png"))
    if (disk / "earlier.txt").stat().st_dev != (trained / "twist").stat().st_dev:  # a mounted disk: fill it again
        fill(disk)
    before = listing(disk)

    with pytest.raises(WriteError, match=r"cannot write .*"):
        run_local(disk, "ignored", num_nodes=2, keep=2, num_server_rounds=2, optimizer_state="reset",
                  resume_from=str(run))

    after = listing(disk)
    assert {k: v for k, v in after.items() if k != "run/.lock"} == \
        {k: v for k, v in before.items() if k != "run/.lock"}
    assert not list(run.rglob(".tmp-*")) and not list(run.rglob("*.tmp"))
