"""Atomic writes: a target is either the old file or the complete new one, never half-written,
and the data and the rename are synced to disk."""
import os

import pytest

from mpod_core import atomic
from mpod_core.atomic import atomic_paths, atomic_write


def test_writes_all_files_and_leaves_no_temporaries(tmp_path):
    a, b = tmp_path / "x" / "a.bin", tmp_path / "b.txt"
    atomic_write({a: b"alpha", b: b"beta"})
    assert a.read_bytes() == b"alpha" and b.read_bytes() == b"beta"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.bin", "b.txt"]


def test_an_error_while_writing_keeps_the_old_files(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"old")

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted):
        with atomic_paths([a, b]) as (ta, tb):
            ta.write_bytes(b"new, complete")
            tb.write_bytes(b"half")
            raise Interrupted  # ComfyUI's Cancel, mid-write
    assert a.read_bytes() == b"old" and not b.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_syncs_every_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", spy)
    target = tmp_path / "sub" / "f.bin"
    atomic_write({target: b"data"})
    assert str(target.parent) in synced, synced  # the folder, after the rename
    assert any(str(s).startswith(str(target.parent / ".f.bin.")) for s in synced), synced  # the data, before it
