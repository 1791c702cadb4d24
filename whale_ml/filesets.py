"""Sets of files published whole and read whole: a folder of immutable sets and a pointer.

Some artifacts are several files that only make sense together. A fold's embeddings:
the ``train`` and ``test`` matrices with their image lists, the model's class centres
and ``embeddings.json``, the record of the checkpoint that made them; a reader that took
``train`` from one checkpoint and ``test`` from the next would compare two spaces. A
split's local features: points, descriptors, offsets, the image list and the settings.
Renaming such files into place one at a time lets a reader (or a kill -9 between two
renames) see a mix. So their folder holds immutable sets and a pointer::

    <root>/current.json                 {"set": "<label>-<n>", ...}
    <root>/sets/<label>-<n>/            the set's files

:func:`new_set` builds a set in a hidden staging folder, flushes it to disk, renames it
into ``sets/`` and then replaces ``current.json`` (one atomic rename): a reader sees the
previous set or the new one, never a mix, and a writer killed at any moment leaves the
previous set current and complete (its staging folder or unpublished set is swept by the
next writer). :func:`current_set` is the one way to find the current set; a reader
resolves it once and reads every file from that folder. A folder without
``current.json`` (written by hand, or before sets) is its own set.

The sets a reader may still be reading are kept: the current one and the newest
``keep`` (default 2, so the set current just before the last publish survives it).

Users: the fold embeddings (``HomeLayout.embeddings_dir``, label: the checkpoint's
sha256) and the local features (:func:`whale_ml.retrieval.local_features.save_features`,
label ``features``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from whale_ml.io import flush_tree, fsync_dir, fsync_enabled, read_json, remove_stale_staging, staging_dir, write_error, write_json

POINTER = "current.json"
SETS = "sets"
KEEP = 2
_SET = re.compile(r"^(?P<label>\w{1,64})-(?P<n>\d+)$")


def current_set(root: str | os.PathLike[str]) -> Path:
    """The folder of ``root``'s current set: the set ``current.json`` names, or ``root``
    itself when it has no pointer (a folder of loose files)."""
    root = Path(root)
    try:
        name = str(read_json(root / POINTER)["set"])
    except FileNotFoundError:
        return root
    if not _SET.match(name):
        raise ValueError(f"{root / POINTER}: {name!r} is not a set name")
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
def new_set(
    root: str | os.PathLike[str], label: str, keep: int = KEEP, loose: Sequence[str] = (), record: dict[str, str] | None = None
) -> Iterator[Path]:
    """Yield an empty folder to write a whole set into; publish it as ``root``'s current
    set when the block ends without an error (nothing is published otherwise).

    Args:
        root: the set's folder (``HomeLayout.embeddings_root(fold)``, a split's local
            features folder).
        label: the start of the set's name (word characters, at most 64), so that a
            listing says what made which set (a checkpoint's sha256 cut to 12).
        keep: how many of the newest sets to keep besides the current one (readers that
            resolved the pointer before this publish may still be reading the previous one).
        loose: the set's file names as they lay in ``root`` before sets: removed once a
            set is current (nothing reads them then).
        record: more to keep in ``current.json`` beside the set's name.

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
        name = _claim(sets, staging, label)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json(root / POINTER, {"set": name, **(record or {})})
    sweep_sets(root, keep, loose)


def _claim(sets: Path, staging: Path, prefix: str) -> str:
    """Rename ``staging`` to the next free ``<prefix>-<n>``. The name is claimed by the
    rename itself: a writer beside this one that took the same number makes ours fail
    (a folder is not renamed onto a non-empty one), and we take the next."""
    flush_tree(staging)  # the files, and their names, are on disk before the folder gets its real name
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


def sweep_sets(root: str | os.PathLike[str], keep: int = KEEP, loose: Sequence[str] = ()) -> list[str]:
    """Delete the sets of ``root`` but the current one and the newest ``keep``, the staging
    folders of dead writers, and the ``loose`` files from before sets (once a set is
    current, nothing reads them). A set is renamed to a hidden name before it is deleted, so nothing
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
    for name in loose:
        (root / name).unlink(missing_ok=True)
    doomed = [name for _, name in _sets(root)[:-keep] if name != current.name]
    for name in doomed:
        trash = staging_dir(sets, "deleting", name)
        try:
            os.rename(sets / name, trash)
        except FileNotFoundError:  # a writer beside this one swept it first
            continue
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


