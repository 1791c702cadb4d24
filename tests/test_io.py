"""Durable writes (whale_ml/io.py): the file reaches the disk before its name, the name after.

A power loss cannot be staged in a test, so these check what can be observed: what was
flushed, in which order relative to the rename, and how failures and unsupported flushes
are reported. ``os.fsync`` is wrapped (recording each flushed inode, then flushing for
real), not replaced: the order of flushes and renames is what is under test, not the kernel.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from whale_ml import io as wio
from whale_ml.io import ArtifactWriteError, atomic_path, durable_replace, fsync_dir, is_temp_name, write_json, write_text

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX folder flush")


class Flushes(list):
    """Every fsync, as (inode, the names in ``folder`` at that moment)."""

    folder: Path | None = None


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> Flushes:
    calls = Flushes()
    real = os.fsync

    def recording(fd: int) -> None:
        calls.append((os.fstat(fd).st_ino, set(os.listdir(calls.folder)) if calls.folder else set()))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    monkeypatch.delenv("WHALE_FSYNC", raising=False)
    return calls


def test_durable_replace_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, flushed: Flushes) -> None:
    flushed.folder = tmp_path
    src, dst = tmp_path / ".x.tmp", tmp_path / "x.bin"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    old_inode = dst.stat().st_ino
    assert durable_replace(src, dst) == (True, True)
    assert dst.read_bytes() == b"new" and not src.exists()
    new_inode = dst.stat().st_ino
    assert new_inode != old_inode
    (file_inode, names_then), (dir_inode, names_after) = flushed
    # The file was flushed under its temp name, while the real name still held the old file.
    assert file_inode == new_inode and names_then == {".x.tmp", "x.bin"}
    # Then the folder, once the rename was done.
    assert dir_inode == tmp_path.stat().st_ino and names_after == {"x.bin"}


def test_a_batch_of_renames_flushes_every_file_and_the_folder_once(tmp_path: Path, flushed: Flushes) -> None:
    for i in range(3):
        with atomic_path(tmp_path / f"crop{i}.jpg", sweep=False, sync_dir=False) as tmp:
            tmp.write_bytes(b"jpeg")
    assert fsync_dir(tmp_path)
    inodes = [ino for ino, _ in flushed]
    assert inodes == [(tmp_path / f"crop{i}.jpg").stat().st_ino for i in range(3)] + [tmp_path.stat().st_ino]


def test_whale_fsync_0_renames_without_flushing(tmp_path: Path, flushed: Flushes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHALE_FSYNC", "0")
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_text("x")
    assert durable_replace(src, dst) == (False, False)
    assert dst.read_text() == "x" and flushed == []
    write_json(tmp_path / "c.json", {"a": 1})
    assert flushed == []


def test_the_writers_flush_what_they_write(tmp_path: Path, flushed: Flushes) -> None:
    path = write_text(tmp_path / "sub" / "note.txt", "hello\n")
    assert path.read_text() == "hello\n"
    assert [ino for ino, _ in flushed] == [path.stat().st_ino, path.parent.stat().st_ino]
    assert wio.read_json(write_json(tmp_path / "d.json", {"b": [1, 2]})) == {"b": [1, 2]}
    assert not [p for p in tmp_path.rglob("*") if is_temp_name(p.name)]


def test_a_folder_that_cannot_be_flushed_is_skipped_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File systems without folder fsync answer EINVAL: the write still succeeds."""
    real = os.fsync

    def no_dir_fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}") if sys.platform == "linux" else False:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    if sys.platform != "linux":
        pytest.skip("tells folders from files through /proc/self/fd")
    monkeypatch.setattr(os, "fsync", no_dir_fsync)
    assert fsync_dir(tmp_path) is False
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_text("x")
    assert durable_replace(src, dst) == (True, False)
    assert dst.read_text() == "x"


def test_a_flush_that_fails_is_a_failed_write_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from fsync means the data may not be on disk: the artifact must not get its name."""

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    (tmp_path / "report.json").write_text('{"old": true}')
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(ArtifactWriteError, match=r"could not write .*report\.json.*Input/output error"):
        write_json(tmp_path / "report.json", {"new": True})
    assert (tmp_path / "report.json").read_text() == '{"old": true}'
    assert os.listdir(tmp_path) == ["report.json"]
