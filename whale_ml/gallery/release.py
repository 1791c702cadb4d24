"""The release: the fold models, gallery and matcher that answer a photo, and which one serves.

The asset graph runs one or more training rounds (``whale_assets/rounds.py``); the last
one makes a release. Its gallery stage publishes each new version and, in the same hold of
the catalogue's writer lock (:mod:`whale_ml.gallery.catalogue`), records its round in
``<home>/release.json`` (``round``: the newest release). The champion decision
(:mod:`whale_ml.gallery.champion`) then records there, under the same lock, which release
won (``champion``: its round, its models and the models' key, its MLflow run).

Everything that serves photos outside the asset graph (``whale identify``, ``whale
enroll``, ``whale prune-gallery``) resolves the release here, from that file, so it needs
no Dagster definitions to know which round's files to read: the champion release when one
is recorded (its round, and of that round's gallery versions the newest built with its
models: :func:`whale_ml.gallery.versions.load_version`'s ``models_key``), else the newest
release's round and its newest gallery version. A home without the file serves its first
round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from whale_ml.gallery.lineage import FoldModel
from whale_ml.home import HomeLayout, round_name
from whale_ml.io import read_json, write_json


class ReleasePointerError(ValueError):
    """``release.json`` holds something other than a round number and a champion record (the message names the file)."""


class ChampionRecord(BaseModel):
    """The champion release, as the home records it: what ``whale identify`` serves by default."""

    round: int = Field(ge=1, description="The training round whose models, galleries and matchers it is.")
    models: list[FoldModel] = Field(description="Its fold models, in fold order (registry versions and checkpoints).")
    models_key: str = Field(description="Their digest: the key of its matcher and of its line of gallery versions.")
    gallery_version: str = Field(description="The gallery version it was decided with (enrolments extend it into newer ones).")
    matcher: str = Field(description="Its matcher, as it was scored: a file of its round's gallery/matchers/.")
    run_id: str = Field(description="Its MLflow release run, whose logged oof_map5 the next decision compares with.")
    oof_map5: float
    validation_digest: str
    decided: str = Field(description="When it became champion (UTC).")


def record_release(layout: HomeLayout, number: int) -> None:
    """Make round ``number`` (``layout``'s round) the home's newest release, keeping the
    champion record. The caller holds the catalogue's writer lock, from publishing the round's
    gallery version to here: an enrolment then extends either the previous release, before
    the new version was built (and the build carries its photos from the ledger), or the new one."""
    if round_name(number) != layout.round:
        raise ValueError(f"round {number} is not {layout.round or 'the first round'}, the layout's")
    write_json(layout.release_pointer, {**_pointer(layout.release_pointer), "round": number})


def record_champion(layout: HomeLayout, champion: ChampionRecord) -> None:
    """Make ``champion`` the release the home serves, keeping the newest release's round. The
    caller holds the catalogue's writer lock from reading the previous champion to here."""
    write_json(layout.release_pointer, {**_pointer(layout.release_pointer), "champion": champion.model_dump()})


@dataclass(frozen=True)
class Release:
    """The release the home serves: its round's number, the home's paths in that round (its
    models, gallery versions and matchers) and, once a champion was decided, its record."""

    number: int
    layout: HomeLayout
    champion: ChampionRecord | None = None

    @property
    def models_key(self) -> str | None:
        """The key of the champion's models (the line of gallery versions it serves); None: no
        champion recorded, the newest gallery version serves."""
        return self.champion.models_key if self.champion is not None else None


def read_release(layout: HomeLayout) -> Release:
    """The release the home serves: the champion release when ``release.json`` records one,
    else the newest release's round (round 1 when there is no file).

    Read it where the choice is acted on: under the catalogue's writer lock for a writer
    (an enrolment), once per command for a reader.

    Raises:
        ReleasePointerError: the file is there but names no round, or its champion record is malformed.
    """
    path = layout.release_pointer
    data = _pointer(path)
    champion = read_champion(layout, data)
    number = champion.round if champion is not None else _round(path, data.get("round", 1))
    return Release(number, layout.in_round(round_name(number)), champion)


def read_champion(layout: HomeLayout, data: dict[str, Any] | None = None) -> ChampionRecord | None:
    """The champion record of ``release.json`` (None: no decision recorded yet).

    Raises:
        ReleasePointerError: the record is malformed.
    """
    found = (data if data is not None else _pointer(layout.release_pointer)).get("champion")
    if found is None:
        return None
    try:
        return ChampionRecord.model_validate(found)
    except ValidationError as exc:
        raise ReleasePointerError(
            f"{layout.release_pointer}: the champion record is malformed ({exc.errors()[0]['msg']}); rematerialise the release"
        ) from exc


def served_line(layout: HomeLayout) -> str | None:
    """The models key of the gallery line the home serves when it is ``layout``'s round's
    (the champion's): the versions a prune of that round must keep the newest of. None: the
    champion is another round's, or there is none."""
    champion = read_champion(layout)
    return champion.models_key if champion is not None and round_name(champion.round) == layout.round else None


def _pointer(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data: Any = read_json(path)
    except ValueError as exc:  # (written atomically: only a hand edit leaves it unreadable)
        raise ReleasePointerError(f"{path} is not JSON ({exc}); rematerialise the release round's gallery") from exc
    if not isinstance(data, dict):
        raise ReleasePointerError(f"{path}: expected an object with 'round', not {type(data).__name__}")
    return data


def _round(path: Path, found: Any) -> int:
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ReleasePointerError(f"{path}: 'round' should be a round number (1, 2, ...), not {found!r}; rematerialise the release round's gallery")
    return found
