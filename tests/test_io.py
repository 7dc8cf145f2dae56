"""The one atomic writer: complete or never seen, no temporary file left, permissions set first."""

import os
import stat

import pytest

from twist_fl.core.io import atomic_write, atomic_write_bytes, atomic_write_text


def test_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")

    atomic_write_text(target, "new")

    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["config.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def half_then_crash(p):
        p.write_bytes(b"ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_crash)

    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_private_files_get_their_mode_before_any_byte(tmp_path):
    seen = {}

    def write(p):
        seen["mode"] = stat.S_IMODE(p.stat().st_mode)
        p.write_bytes(b"secret")

    atomic_write(tmp_path / "node.key", write, mode=0o600)
    atomic_write_bytes(tmp_path / "node.key.pub", b"public")

    assert seen["mode"] == 0o600 and stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "node.key.pub").stat().st_mode) == 0o644
