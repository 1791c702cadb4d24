"""How well the boxes cover the photos: which splits and species fell back to the full frame.

A crop that is the full frame holds mostly sea, so a high fallback share in one
split or species is the first thing to look at when matching gets worse.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

TEST_SPECIES = "(test: unknown)"

PHOTO_COLUMNS = ("image", "path", "split", "species", "file_bytes", "file_mtime_ns")


def photos_to_box(train_metadata: pd.DataFrame, test_metadata: pd.DataFrame) -> pd.DataFrame:
    """Train then test photos in one table, so that the detector is loaded once for both:
    ``image, path, split, species`` and each file's size and modification time (-1 for a
    listed photo that is missing). Test photos' species is unknown.

    Nothing about identities: the detection stage reads this table, so relabelling a
    photo leaves it unchanged, while a photo replaced under the same name changes it."""
    photos = pd.concat(
        [train_metadata.assign(split="train"), test_metadata.assign(split="test", species=TEST_SPECIES)], ignore_index=True
    )
    stats = [_file_identity(p) for p in photos["path"]]
    photos["file_bytes"] = pd.Series([s[0] for s in stats], dtype="int64")
    photos["file_mtime_ns"] = pd.Series([s[1] for s in stats], dtype="int64")
    return photos[list(PHOTO_COLUMNS)]


def _file_identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


@dataclass
class BoxSummary:
    """The fallback shares of a box table, for the UI and the asset check.

    Attributes:
        by_split_and_source: photos per split (rows) and box source (columns).
        full_frame_by_species: ``split, species, photos, full_frame_share``, worst first within a split.
        full_frame_share: share of all photos without a detector box.
        per_split: that share per split, splits in name order.
        mean_confidence: mean confidence of the detector boxes; 0 when there are none.
        unreadable: ``image, split, note`` of the photos that could not be read.
        too_high: the splits whose share exceeds the warning threshold (never any without a detector).
    """

    by_split_and_source: pd.DataFrame
    full_frame_by_species: pd.DataFrame
    full_frame_share: float
    per_split: dict[str, float]
    mean_confidence: float
    unreadable: pd.DataFrame
    too_high: dict[str, float]

    @property
    def too_high_text(self) -> str:
        """The splits over the threshold as ``test 45%, train 31%``, or ``none``."""
        return ", ".join(f"{s} {v:.0%}" for s, v in self.too_high.items()) or "none"


def summarise_boxes(boxes: pd.DataFrame, species: Sequence[str], warn_share: float, detector: bool) -> BoxSummary:
    """Fallback shares per split and species, the unreadable photos, and the splits to warn about.

    Args:
        boxes: :func:`whale_ml.detection.yolo.detect_boxes` rows with a ``split`` column.
        species: each row's species, in the rows' order.
        warn_share: a split whose full-frame share exceeds it is listed in ``too_high``.
        detector: whether a detector made the boxes; without one every photo is a
            full frame by choice, so no split is too high.
    """
    fallback = boxes["source"] != "detector"
    flagged = boxes.assign(fallback=fallback.to_numpy())
    by_species = (
        flagged.assign(species=list(species))
        .groupby(["split", "species"])
        .agg(photos=("image", "size"), full_frame_share=("fallback", "mean"))
        .reset_index()
        .sort_values(["split", "full_frame_share"], ascending=[True, False])
    )
    per_split = {str(s): float(v) for s, v in flagged.groupby("split")["fallback"].mean().items()}
    found = boxes["source"] == "detector"
    return BoxSummary(
        by_split_and_source=boxes.groupby(["split", "source"]).size().unstack(fill_value=0).reset_index(),
        full_frame_by_species=by_species,
        full_frame_share=float(fallback.mean()),
        per_split=per_split,
        mean_confidence=float(boxes.loc[found, "confidence"].mean()) if found.any() else 0.0,
        unreadable=boxes.loc[boxes["source"] == "unreadable", ["image", "split", "note"]],
        too_high={s: v for s, v in per_split.items() if v > warn_share} if detector else {},
    )
