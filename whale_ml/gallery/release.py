"""The release: the training round whose models, gallery and matcher answer a photo.

The asset graph runs one or more training rounds (``whale_assets/rounds.py``); the last
one is the release. Its gallery stage publishes each new version and, in the same hold of
the catalogue's writer lock (:mod:`whale_ml.gallery.catalogue`), records its round in
``<home>/release.json``. Everything that serves photos outside the asset graph (``whale
identify``, ``whale enroll``, ``whale prune-gallery``) resolves the release here, from
that file, so it needs no Dagster definitions to know which round's files to read. A home
without the file serves its first round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whale_ml.home import HomeLayout, round_name
from whale_ml.io import read_json, write_json


class ReleasePointerError(ValueError):
    """``release.json`` holds something other than a round number (the message names the file)."""


def record_release(layout: HomeLayout, number: int) -> None:
    """Make round ``number`` (``layout``'s round) the home's release. The caller holds the
    catalogue's writer lock, from publishing the round's gallery version to here: an
    enrolment then extends either the previous release, before the new version was built
    (and the build carries its photos from the ledger), or the new one."""
    if round_name(number) != layout.round:
        raise ValueError(f"round {number} is not {layout.round or 'the first round'}, the layout's")
    write_json(layout.release_pointer, {"round": number})


@dataclass(frozen=True)
class Release:
    """The home's release: its round's number and the home's paths in that round (its models,
    gallery versions and matchers)."""

    number: int
    layout: HomeLayout


def read_release(layout: HomeLayout) -> Release:
    """The home's release, as ``release.json`` records it; round 1 when there is none.

    Read it where the choice is acted on: under the catalogue's writer lock for a writer
    (an enrolment), once per command for a reader.

    Raises:
        ReleasePointerError: the file is there but names no round.
    """
    number = _recorded_round(layout.release_pointer)
    return Release(number, layout.in_round(round_name(number)))


def _recorded_round(path: Path) -> int:
    if not path.exists():
        return 1
    try:
        data: Any = read_json(path)
    except ValueError as exc:  # (written atomically: only a hand edit leaves it unreadable)
        raise ReleasePointerError(f"{path} is not JSON ({exc}); rematerialise the release round's gallery") from exc
    found = data.get("round") if isinstance(data, dict) else None
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ReleasePointerError(f"{path}: 'round' should be a round number (1, 2, ...), not {found!r}; rematerialise the release round's gallery")
    return found
