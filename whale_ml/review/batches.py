"""Identification batches kept in the home: what ``whale identify`` answered, for review.

Each call of ``whale identify`` keeps its answer as one batch, ``review/batches/<id>/``:

* ``batch.json``: the identify result (docs/identify.md: every photo's candidates, scores
  and decision), who asked and when, the served release, and the local-feature settings
  the keypoint drawings use;
* ``crops/``: the query crops the models embedded (a few KB each).

The photos themselves stay where they were (``path`` of each row): a batch is small at
any scale, and enrolment copies a confirmed photo into the ledger from there. A batch is
built in a staging folder and renamed into place whole, so a reader never sees half of
one, and a killed ``whale identify`` leaves only a staging folder the next one sweeps.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whale_ml.filesets import current_set
from whale_ml.home import HomeLayout
from whale_ml.io import flush_tree, fsync_dir, read_json, staging_dir, write_json
from whale_ml.stage_configs import LocalFeatureConfig

if TYPE_CHECKING:  # the decision log's writers import this module: keep them light (no faiss, no OpenCV)
    from whale_ml.retrieval.matcher import Matcher

BATCH_FILE = "batch.json"
CROPS = "crops"
STAGING_TAG = "batch"
# <UTC time>-<6 hex>: sorts by time, and is checked before it ever reaches a path.
BATCH_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


class BatchError(ValueError):
    """A batch that does not exist or cannot be read (the message names it)."""


def batches_dir(layout: HomeLayout) -> Path:
    return layout.review_dir / "batches"


@dataclass(frozen=True)
class Batch:
    """One kept identification batch.

    Attributes:
        id: its name (``20261206T191500Z-1a2b3c``).
        folder: ``review/batches/<id>``.
        data: ``batch.json``, with each row's ``crop_path`` made absolute again.
    """

    id: str
    folder: Path
    data: dict[str, Any]

    @property
    def photos(self) -> list[dict[str, Any]]:
        """The identify result's rows, in the order asked (a row's index is its photo number)."""
        return list(self.data["photos"])

    @property
    def source_folders(self) -> list[Path]:
        """The folders the batch's photos came from: with the home, all the review page serves files from."""
        return sorted({Path(row["path"]).parent for row in self.data["photos"]})

    def photo(self, number: int) -> dict[str, Any]:
        """Row ``number`` (0-based).

        Raises:
            BatchError: no such photo in the batch.
        """
        rows = self.data["photos"]
        if not 0 <= number < len(rows):
            raise BatchError(f"batch {self.id} has photos 0 to {len(rows) - 1}, not {number}")
        return dict(rows[number])


def batch_workspace(layout: HomeLayout) -> Path:
    """A new empty staging folder for a batch (its crops are written into ``crops/``).
    Staging folders of killed processes are swept first."""
    folder = batches_dir(layout)
    folder.mkdir(parents=True, exist_ok=True)
    return staging_dir(folder, STAGING_TAG)


def save_batch(layout: HomeLayout, workspace: Path, result: dict[str, Any], **about: Any) -> Batch:
    """Keep ``result`` (an :func:`~whale_ml.identify.identify_photos` result whose crops lie
    in ``workspace``) as a new batch: ``batch.json`` is written into the workspace, which is
    then renamed into place.

    Args:
        about: more to record (the served round, the release run, the feature settings).
    """
    created = time.gmtime()
    batch_id = time.strftime("%Y%m%dT%H%M%SZ", created) + "-" + secrets.token_hex(3)
    rows = []
    for row in result["photos"]:
        row = dict(row)
        crop = row.get("crop_path")
        if crop and Path(crop).resolve().is_relative_to(workspace.resolve()):
            row["crop_path"] = os.path.relpath(Path(crop).resolve(), workspace.resolve())
        rows.append(row)
    data = {
        **result,
        **about,
        "photos": rows,
        "batch": batch_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", created),
        "asked_by": f"{_user()}@{socket.gethostname()}",
    }
    write_json(workspace / BATCH_FILE, data)
    target = batches_dir(layout) / batch_id
    flush_tree(workspace)  # its files on disk before the name that points at them
    os.replace(workspace, target)
    fsync_dir(target.parent)
    return load_batch(layout, batch_id)


def feature_settings(layout: HomeLayout, matcher: Matcher) -> LocalFeatureConfig:
    """The local-feature settings the gallery's photos were described with (the keypoint
    drawings describe a pair as the re-ranking did): the matcher's when it re-ranks, else
    the home's ``local_features``, else the defaults."""
    from whale_ml.retrieval.local_features import features_saved

    if matcher.rerank is not None:
        return matcher.rerank.features
    train = layout.local_features_dir("train")
    if features_saved(train):
        return LocalFeatureConfig.model_validate_json((current_set(train) / "settings.json").read_text())
    return LocalFeatureConfig()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return str(os.getuid())


def load_batch(layout: HomeLayout, batch_id: str) -> Batch:
    """The batch named ``batch_id``.

    Raises:
        BatchError: not a batch name, no such batch, or an unreadable ``batch.json``.
    """
    if not BATCH_ID.match(batch_id or ""):
        raise BatchError(f"{batch_id!r} is not a batch name (like 20261206T191500Z-1a2b3c)")
    folder = batches_dir(layout) / batch_id
    try:
        data = read_json(folder / BATCH_FILE)
    except FileNotFoundError:
        raise BatchError(f"no batch {batch_id} in {batches_dir(layout)}") from None
    except (OSError, ValueError) as exc:
        raise BatchError(f"batch {batch_id}: {folder / BATCH_FILE} cannot be read ({exc})") from exc
    for row in data.get("photos", []):
        if row.get("crop_path") and not Path(row["crop_path"]).is_absolute():
            row["crop_path"] = str(folder / row["crop_path"])
    return Batch(batch_id, folder, data)


def list_batches(layout: HomeLayout) -> list[Batch]:
    """Every readable batch of the home, newest first (an unreadable one is left out)."""
    folder = batches_dir(layout)
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted((e.name for e in folder.iterdir() if BATCH_ID.match(e.name)), reverse=True):
        try:
            found.append(load_batch(layout, entry))
        except BatchError:
            continue
    return found
