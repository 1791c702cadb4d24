"""Atomic file writing: every artifact appears whole or not at all.

A crash (or a kill -9) in the middle of a write leaves at most a hidden temp
file behind, never a truncated artifact under its real name, because the final
name is only ever produced by ``os.replace`` of a complete file.

A power loss needs more than that: the kernel may write the rename to disk before
the file's data, so that after a reboot the real name holds an empty or partial
file. :func:`durable_replace` therefore flushes the file's data to disk
(``fsync``) before the rename, and the folder after it, so that the new name
itself survives. ``WHALE_FSYNC=0`` turns both off (a scratch home on tmpfs, a
throw-away run); the costs are in docs/benchmarks.md ("Durable writes").

Temp files are named ``.<stem>.p<pid>.<random>.tmp<suffix>``: the writing
process's id lets a later write remove the leftovers of a process that died,
and only those (a live writer's temp file beside it is left alone).

A write that fails (disk full, file-size limit, no permission, a file where a
folder should be) raises :class:`ArtifactWriteError`, which names the file and
the cause, and leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from whale_ml.environment import fsync_setting

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_TEMP = re.compile(r"^\.(?P<stem>.*?)\.(?:p(?P<pid>\d+)\.)?[^.]*\.tmp(?P<suffix>\.[^.]*)?$")
# Whole folders built beside their final place (a gallery version, a download):
# ``.<tag>.p<pid>.<random>.partial``.
_STAGING = re.compile(r"^\.(?P<tag>[\w-]+)\.p(?P<pid>\d+)\.[^.]*\.partial$")


class ArtifactWriteError(OSError):
    """An artifact could not be written; the message names the file and the cause.

    An ``OSError`` (with the errno of the failure where there was one), so code that
    handles I/O errors still catches it; the original error is its ``__cause__``.
    """

    def __init__(self, code: int, message: str, path: Path) -> None:
        super().__init__(code, message, str(path))

    def __str__(self) -> str:
        return str(self.strerror)


# A temp name adds about 25 bytes to its target's stem; file systems allow 255 bytes a name.
# A target whose name is near that limit (a photo's 244-byte name, say) gets a temp name
# from the first bytes of its stem and a digest of the rest, so that it can still be written.
_TEMP_STEM_BYTES = 100


def temp_stem(stem: str) -> str:
    """The part of a target's stem its temp files carry: the stem itself, or, past
    ``_TEMP_STEM_BYTES`` bytes, its first bytes and a digest of the whole (still one per target)."""
    raw = stem.encode()
    if len(raw) <= _TEMP_STEM_BYTES:
        return stem
    head = raw[: _TEMP_STEM_BYTES - 9].decode(errors="ignore")
    return f"{head}~{hashlib.sha1(raw).hexdigest()[:8]}"


def is_temp_name(name: str) -> bool:
    """True for the hidden temp files :func:`atomic_path` writes (readers skip them)."""
    return _TEMP.match(name) is not None


def is_staging_name(name: str) -> bool:
    """True for the hidden folders :func:`staging_dir` makes (their files are not artifacts yet)."""
    return _STAGING.match(name) is not None


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs on this host (a process of another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _left_by_dead_writers(folder: str | os.PathLike[str], pattern: re.Pattern[str]) -> Iterator[tuple[os.DirEntry[str], re.Match[str]]]:
    """The entries of ``folder`` named by ``pattern`` whose writing process is gone (its
    pid is in the name; a name without one is from before pids were recorded)."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m is not None and (m["pid"] is None or not pid_alive(int(m["pid"]))):
            yield entry, m


def remove_stale_temps(folder: str | os.PathLike[str], stem: str | None = None, suffix: str | None = None) -> list[Path]:
    """Delete the temp files in ``folder`` whose writer is gone (a killed or crashed run).

    With ``stem``/``suffix``, only those of that one target (``stem`` as :func:`temp_stem`
    gives it). Temp files of a live
    process (another run writing beside this one) are kept. Returns what was removed.
    """
    removed: list[Path] = []
    for entry, m in _left_by_dead_writers(folder, _TEMP):
        if (stem is not None and m["stem"] != stem) or (suffix is not None and (m["suffix"] or "") != suffix):
            continue
        with contextlib.suppress(FileNotFoundError):  # a concurrent sweep got it first
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def staging_dir(parent: str | os.PathLike[str], tag: str, name: str | None = None) -> Path:
    """A hidden folder ``.<tag>.p<pid>.<name or random>.partial`` in ``parent``.

    For a folder that must appear whole (build it here, then rename it into place)
    or disappear whole (rename it here, then delete it). The pid in the name lets
    :func:`remove_stale_staging` delete what a killed process left, and only that;
    it is called here first. With ``name`` the path is returned without creating it
    (for a rename target); otherwise a new empty folder is made.
    """
    parent = Path(parent)
    remove_stale_staging(parent, tag)
    if name is not None:
        return parent / f".{tag}.p{os.getpid()}.{name}.partial"
    return Path(tempfile.mkdtemp(prefix=f".{tag}.p{os.getpid()}.", suffix=".partial", dir=parent))


def remove_stale_staging(parent: str | os.PathLike[str], tag: str) -> list[Path]:
    """Delete the :func:`staging_dir` folders of ``tag`` in ``parent`` whose process is gone."""
    removed: list[Path] = []
    for entry, m in _left_by_dead_writers(parent, _STAGING):
        if m["tag"] == tag and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def fsync_enabled() -> bool:
    """Whether writes are flushed to disk (``WHALE_FSYNC``, default on; ``0`` turns it off:
    :func:`whale_ml.environment.fsync_setting`)."""
    return fsync_setting()


def _flush(fd: int) -> None:
    # macOS's fsync leaves the data in the drive's cache; F_FULLFSYNC is its real flush.
    full = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None
    if full is not None:
        with contextlib.suppress(OSError):  # not every file system supports it: fsync then
            fcntl.fcntl(fd, full)
            return
    os.fsync(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and size to disk (``fsync``), so that a power loss cannot empty it."""
    # Windows flushes only a handle open for writing; POSIX any descriptor.
    fd = os.open(path, os.O_RDWR | os.O_BINARY if os.name == "nt" else os.O_RDONLY)
    try:
        _flush(fd)
    finally:
        os.close(fd)


# fsync of a folder: file systems that do not support it answer EINVAL (or ENOTSUP),
# and Windows cannot open a folder as a file at all (EACCES) and needs no folder flush
# (NTFS journals the rename with the file's metadata).
_NO_DIR_FSYNC = {
    errno.EINVAL,
    errno.EBADF,
    errno.EACCES,
    errno.EISDIR,
    getattr(errno, "ENOTSUP", errno.EINVAL),
    getattr(errno, "EOPNOTSUPP", errno.EINVAL),
}


def fsync_dir(folder: str | os.PathLike[str]) -> bool:
    """Flush a folder's entries to disk, so that a file renamed or created in it keeps
    its name after a power loss. Returns False, doing nothing, where the system cannot
    (Windows, file systems without folder fsync)."""
    if os.name == "nt":
        return False
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _NO_DIR_FSYNC:
            return False
        raise
    try:
        _flush(fd)
    except OSError as exc:
        if exc.errno in _NO_DIR_FSYNC:
            return False
        raise
    finally:
        os.close(fd)
    return True


def flush_tree(folder: str | os.PathLike[str]) -> None:
    """Every file under ``folder`` and every folder in it flushed to disk (data, then names),
    for a folder built whole before it is renamed into place; nothing with ``WHALE_FSYNC=0``."""
    if not fsync_enabled():
        return
    for parent, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(parent) / name)
        fsync_dir(parent)


def durable_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, sync_dir: bool = True) -> tuple[bool, bool]:
    """``os.replace(src, dst)`` that survives a power loss, not only a killed process.

    The file's data are flushed to disk before the rename, so that ``dst`` never names
    data the disk does not hold yet (ext4, XFS and others may otherwise commit the rename
    first: an empty file after a reboot); then the folder, so that the rename itself is
    on disk when this returns. With ``sync_dir=False`` the caller flushes the folder once
    after many renames (:func:`fsync_dir`): until then a power loss may undo a rename,
    which leaves the old file (or none), never a partial one. Both flushes are skipped
    when :func:`fsync_enabled` says so.

    Returns:
        Whether the file and whether the folder were flushed.
    """
    dst = Path(dst)
    if not fsync_enabled():
        os.replace(src, dst)
        return False, False
    fsync_file(src)
    os.replace(src, dst)
    return True, fsync_dir(dst.parent) if sync_dir else False


def _umask() -> int:
    """This process's umask (the only way to read it is to set it, then set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _cause(target: Path, exc: BaseException) -> str:
    """Why writing ``target`` failed, in words a user can act on.

    torch and faiss report a failed write as a RuntimeError, and numpy as an OSError
    without an errno, so where the errno is missing the disk and the limits are looked at.
    """
    folder = target.parent
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk holding {folder} (or the quota is used up); free some space and materialise again"
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        where = f"this process's file-size limit (ulimit -f) of {limit} bytes" if limit != resource.RLIM_INFINITY else "the file system"
        return f"file too large for {where}"
    if code in (errno.EACCES, errno.EPERM):
        try:
            st = folder.stat()
            owner = f" (owned by uid {st.st_uid}, mode {st.st_mode & 0o777:o}; this process runs as uid {os.geteuid()})"
        except OSError:
            owner = ""
        return f"no permission to write in {folder}{owner}; fix its permissions or point WHALE_HOME elsewhere"
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system; point WHALE_HOME at a writable place"
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file where a folder is needed; move it away"
    if code is None:
        free = _free_bytes(folder)
        if free is not None and free < 1 << 20:
            return f"no space left on the disk holding {folder} ({free} bytes free); free some space and materialise again"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return f"the write stopped short, and this process has a file-size limit (ulimit -f) of {limit} bytes"
    return "the write failed"


def write_error(target: Path, exc: BaseException) -> ArtifactWriteError:
    """The :class:`ArtifactWriteError` for ``exc``, raised while writing ``target``."""
    return ArtifactWriteError(
        getattr(exc, "errno", None) or errno.EIO,
        f"could not write {target}: {_cause(target, exc)} ({type(exc).__name__}: {exc})",
        target,
    )


def _about_other_file(exc: BaseException, *ours: Path) -> bool:
    """An OSError about a file other than the one being written (a missing source, say)."""
    names = [getattr(exc, "filename", None), getattr(exc, "filename2", None)]
    named = [str(n) for n in names if n is not None]
    return bool(named) and not any(n in {str(p) for p in ours} or Path(n) in [p.parent for p in ours] for n in named)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], sweep: bool = True, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` on success.

    The temp file keeps the target's suffix so that writers which infer the
    format from the name (PIL, pandas, faiss, torch) behave as usual. With
    ``sweep``, temp files of this target left by a dead process are removed first
    (pass ``False`` in loops over huge folders, and sweep the folder once instead).
    The rename is :func:`durable_replace`: the file is on disk before it gets its name,
    and with ``sync_dir`` the name is on disk when the block ends (pass ``False`` in
    loops writing many files to one folder, and :func:`fsync_dir` it once after them).

    Raises:
        ArtifactWriteError: the file could not be written (disk full, no
            permission, ...), naming the file and the cause.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stem = temp_stem(target.stem)
        if sweep:
            remove_stale_temps(target.parent, stem, target.suffix)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.p{os.getpid()}.", suffix=f".tmp{target.suffix}", dir=target.parent)
        try:
            # mkstemp makes the file private (0600); an artifact gets the mode any file
            # this process creates would get (0644 under the usual umask), so that a
            # report or submission can be shared like the rest of the home.
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(target, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        durable_replace(tmp, target, sync_dir=sync_dir)
    except (OSError, RuntimeError) as exc:
        # Diagnose before the temp file goes: its size is part of a full disk.
        error = None if isinstance(exc, ArtifactWriteError) or _about_other_file(exc, tmp, target) else write_error(target, exc)
        tmp.unlink(missing_ok=True)
        if error is None:
            raise
        raise error from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically and return the path."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())
