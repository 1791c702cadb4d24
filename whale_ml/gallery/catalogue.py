"""One writer at a time for the catalogue, and readers that never see half a version.

The catalogue is what ``whale enroll``, the ``gallery`` asset and ``whale prune-gallery``
change: the enrollment ledger, the enrolled photos' local features, the gallery versions
and the ``current.json`` pointer. Each change reads the current state and publishes a
new one, so two changes at once would each miss the other's (two enrolments that both
extend ``v0002``: the second's ``v0004`` lacks the first's animals). :func:`catalogue_lock`
makes them take turns, across processes and across hosts that share the home:

* It is ``flock`` on ``<home>/catalogue.lock``. The kernel drops the lock with the
  process that held it, so a killed writer never leaves the catalogue locked. Linux
  maps ``flock`` on NFS (v4, or v3 with ``lockd``) to the server's byte-range locks, so
  hosts sharing a home over NFS take turns too; a file system without locks fails at
  the first lock with the OS error, rather than letting writers through.
* A writer holds it from reading the current version to publishing the next one.
  Within one process it is re-entrant (a gallery build that prunes after publishing
  takes it once).
* A writer that has to wait says who holds it (the holder writes its pid, host and
  command into the lock file) and waits as long as it takes; enrolments take seconds
  to minutes.

Readers (``whale identify``, the submission) take no writer lock: versions are
immutable folders renamed into place whole, so a reader sees a whole version or none.
The one thing that removes a version, pruning, takes :func:`versions_lock` exclusively
for its renames, and loading a version takes it shared while it reads the folder; so a
prune never deletes a version while it is being read, and a reader waits at most for a
few renames. Once loaded, a version is in memory and a prune cannot touch it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from whale_ml.home import HomeLayout
from whale_ml.io import write_error

LOCK_FILE = "catalogue.lock"
READERS_LOCK_FILE = ".versions.lock"  # beside gallery/versions

# Re-entrancy within a process: flock locks belong to an open file, so a second
# open-and-lock in the same process would wait for itself.
_held: dict[str, int] = {}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _open_lock(path: Path) -> int:
    """The lock file, opened (created with its folder when missing).

    Raises:
        ArtifactWriteError: the home refuses it (no permission, a file where a folder
            should be), naming the path and the cause as every other write does.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise write_error(Path(exc.filename) if exc.filename else path, exc) from exc


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        if data:
            return f"pid {data.get('pid')} on {data.get('host')} ({data.get('what')}, since {data.get('since')})"
    return "another process"


@contextlib.contextmanager
def catalogue_lock(layout: HomeLayout, what: str, wait: Callable[[str], None] = _say) -> Iterator[None]:
    """Hold the catalogue's writer lock for the block (see the module's docstring).

    Args:
        what: who is writing (``whale enroll``, ``gallery asset``): shown to a writer that waits.
        wait: told once, with the holder, when the lock is busy (default: stderr).
    """
    path = layout.home / LOCK_FILE
    key = str(path)
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            started = time.monotonic()
            wait(f"{what}: waiting for the catalogue's writer lock ({path}), held by {_holder(fd)}")
            fcntl.flock(fd, fcntl.LOCK_EX)
            wait(f"{what}: got the catalogue's writer lock after {time.monotonic() - started:.1f} s")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with contextlib.suppress(OSError):  # who holds it is for messages only: a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _holding(fd: int, mode: int) -> Iterator[None]:
    """``flock(fd, mode)`` for the block; ``fd`` is closed after."""
    try:
        fcntl.flock(fd, mode)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """``flock`` held exclusively on ``path`` (created with its folder) for the block: a plain
    lock for writers that hold it for milliseconds (the review's decision log)."""
    with _holding(_open_lock(path), fcntl.LOCK_EX):
        yield


@contextlib.contextmanager
def versions_lock(versions_dir: Path, exclusive: bool) -> Iterator[None]:
    """Shared while a version is read, exclusive while versions are renamed away (pruning).

    Held for milliseconds to seconds either way. The lock file lies beside ``versions_dir``
    (created with its folder when missing)."""
    path = versions_dir.parent / READERS_LOCK_FILE
    try:
        fd = _open_lock(path)
    except OSError as exc:
        # A reader without write access to the home (a read-only mount, another user's
        # home): lock the file read-only if it is there; with no such file, no prune can
        # run on this home either, and there is nothing to wait for.
        if exclusive or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            raise
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
    with _holding(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
        yield
