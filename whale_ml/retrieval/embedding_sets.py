"""A fold's embedding set: published whole, read whole.

One fold model's embeddings are several files that only make sense together: the
``train`` and ``test`` matrices with their image lists, the model's class centres and
``embeddings.json``, the record of the checkpoint that made them. A reader (the
gallery, the threshold, the submission) that took ``train`` from one checkpoint and
``test`` or the record from the next would compare vectors of two different spaces,
and nothing would say so.

So a fold's folder (``HomeLayout.embeddings_root``) holds immutable sets and a pointer::

    embeddings/<fold>/current.json          {"set": "<sha12>-<n>", "checkpoint_sha256": ...}
    embeddings/<fold>/sets/<sha12>-<n>/     train.npy, train_images.csv, test.npy, ...

:func:`new_set` builds a set in a hidden staging folder, renames it into ``sets/`` and
then replaces ``current.json`` (one atomic rename): a reader sees the previous set or
the new one, never a mix, and a writer killed at any moment leaves the previous set
current and complete (its staging folder or unpublished set is swept by the next
writer). :func:`current_set` is the one way to find a fold's set; a reader resolves
it once and reads every file from that folder (``HomeLayout.embeddings_dir``,
``HomeLayout.with_current_embeddings``). A folder without ``current.json`` (written
by hand, or before sets) is its own set.

The sets a reader may still be reading are kept: the current one and the newest
``keep`` (default 2, so the set current just before the last publish survives it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from whale_ml.io import fsync_dir, fsync_enabled, read_json, remove_stale_staging, staging_dir, write_error, write_json

POINTER = "current.json"
SETS = "sets"
KEEP = 2
_SET = re.compile(r"^(?P<sha>[0-9a-f]{1,64})-(?P<n>\d+)$")
# The files of a set, as they were written straight into the fold's folder before sets.
_LOOSE = ("train.npy", "train_images.csv", "test.npy", "test_images.csv", "centres.npy", "centres_ids.csv", "embeddings.json")


def current_set(root: str | os.PathLike[str]) -> Path:
    """The folder of the fold's current embedding set: the set ``current.json`` names,
    or ``root`` itself when it has no pointer (a folder of loose files)."""
    root = Path(root)
    try:
        name = str(read_json(root / POINTER)["set"])
    except FileNotFoundError:
        return root
    if not _SET.match(name):
        raise ValueError(f"{root / POINTER}: {name!r} is not an embedding set name")
    return root / SETS / name


def _sets(root: Path) -> list[tuple[int, str]]:
    """The published sets in ``root/sets``, oldest first, as (number, name)."""
    try:
        entries = list(os.scandir(root / SETS))
    except FileNotFoundError:
        return []
    found = [(int(m["n"]), e.name) for e in entries if (m := _SET.match(e.name)) and e.is_dir(follow_symlinks=False)]
    return sorted(found)


@contextlib.contextmanager
def new_set(root: str | os.PathLike[str], checkpoint_sha256: str, keep: int = KEEP) -> Iterator[Path]:
    """Yield an empty folder to write a whole set into; publish it as the fold's current
    set when the block ends without an error (nothing is published otherwise).

    Args:
        root: the fold's folder (``HomeLayout.embeddings_root(fold)``).
        checkpoint_sha256: the sha256 of the checkpoint that made the set (its name starts
            with it, so a listing says which model made which set).
        keep: how many of the newest sets to keep besides the current one (readers that
            resolved the pointer before this publish may still be reading the previous one).

    Raises:
        ArtifactWriteError: the set could not be written or published.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    root = Path(root)
    sets = root / SETS
    try:
        sets.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(sets, "set")  # a killed writer's staging folder is swept here
    except OSError as exc:
        raise write_error(Path(exc.filename) if exc.filename else sets, exc) from exc
    try:
        yield staging
        name = _claim(sets, staging, checkpoint_sha256[:12])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json(root / POINTER, {"set": name, "checkpoint_sha256": checkpoint_sha256})
    sweep_sets(root, keep)


def _claim(sets: Path, staging: Path, prefix: str) -> str:
    """Rename ``staging`` to the next free ``<prefix>-<n>``. The name is claimed by the
    rename itself: a writer beside this one that took the same number makes ours fail
    (a folder is not renamed onto a non-empty one), and we take the next."""
    if fsync_enabled():  # the files' names are on disk before the folder gets its real name
        fsync_dir(staging)
    while True:
        taken = _sets(sets.parent)
        name = f"{prefix}-{taken[-1][0] + 1 if taken else 1}"
        try:
            os.rename(staging, sets / name)
        except OSError as exc:
            if (sets / name).exists():
                continue
            raise write_error(sets / name, exc) from exc
        if fsync_enabled():
            fsync_dir(sets)
        return name


def sweep_sets(root: str | os.PathLike[str], keep: int = KEEP) -> list[str]:
    """Delete the sets of ``root`` but the current one and the newest ``keep``, the staging
    folders of dead writers, and loose files from before sets (once a set is current,
    nothing reads them). A set is renamed to a hidden name before it is deleted, so nothing
    finds half of one under its name, even if this is killed.

    Returns:
        The deleted sets' names, oldest first.
    """
    root = Path(root)
    sets = root / SETS
    remove_stale_staging(sets, "set")
    remove_stale_staging(sets, "deleting")
    current = current_set(root)
    if current == root:
        return []
    for loose in _LOOSE:
        (root / loose).unlink(missing_ok=True)
    doomed = [name for _, name in _sets(root)[:-keep] if name != current.name]
    for name in doomed:
        trash = staging_dir(sets, "deleting", name)
        try:
            os.rename(sets / name, trash)
        except FileNotFoundError:  # a writer beside this one swept it first
            continue
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


