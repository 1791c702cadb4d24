"""Enrolling reviewed photos: the pending decisions of a batch join the gallery through
the very path ``whale enroll`` takes (:func:`whale_ml.identify.enroll.enroll_rows`), under
the catalogue's writer lock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from whale_ml.data.metadata import MetadataError, check_names_and_files
from whale_ml.gallery.catalogue import catalogue_lock
from whale_ml.gallery.lineage import GalleryLineage
from whale_ml.gallery.models import ResolvedModel
from whale_ml.home import HomeLayout
from whale_ml.identify.enroll import check_confirmed, enroll_rows
from whale_ml.progress import PhaseProgress, ProgressFn
from whale_ml.review.batches import Batch
from whale_ml.review.decisions import Decision, DecisionLog


def enrol_decisions(
    layout: HomeLayout,
    batch: Batch,
    reviewer: str,
    models_for: Callable[[HomeLayout, GalleryLineage], list[ResolvedModel]],
    device: str = "cpu",
    log: DecisionLog | None = None,
    progress: PhaseProgress | None = None,
) -> tuple[dict[str, Any] | None, list[Decision]]:
    """Enrol every pending decision of ``batch`` (any reviewer's) as one new gallery version.

    The catalogue lock is held from claiming the decisions to recording the version, so
    two reviewers enrolling at once take turns and no decision is enrolled twice: the
    second finds only what the first left. Should the enrolment fail (a photo moved away,
    a name already in the catalogue), the decisions stay pending and the error is raised.

    Returns:
        ``whale enroll``'s summary (None when nothing was pending) and the decisions enrolled.

    Raises:
        MetadataError: the photos cannot be enrolled (naming them).
    """
    log = log or DecisionLog(layout)
    with catalogue_lock(layout, f"whale review ({reviewer})"):
        claim, pending = log.claim(batch, reviewer)
        if not pending:
            return None, []
        try:

            def rows(catalogue: pd.DataFrame, ledger: pd.DataFrame, progress_fn: ProgressFn | None) -> pd.DataFrame:
                df = pd.DataFrame(
                    {
                        "image": [d.image for d in pending],
                        "individual_id": [d.individual_id for d in pending],
                        "source_path": [batch.photo(d.photo)["path"] for d in pending],
                    },
                    index=[d.photo for d in pending],
                )
                where = f"batch {batch.id} (by photo number)"
                problems = check_names_and_files(df, batch.folder, check_files=False)  # two photos of one name
                problems += new_ids_taken(pending, catalogue)
                if problems:
                    raise MetadataError(f"{where}: " + "; ".join(problems))
                return check_confirmed(df, catalogue, ledger, where, progress_fn)

            summary = enroll_rows(rows, layout, models_for, device, progress=progress)
        except BaseException as exc:
            log.settle(claim, None, reviewer, error=str(exc))
            raise
        log.settle(claim, summary["version"], reviewer)
    for d in pending:
        d.enrolled_in = summary["version"]
    return summary, pending


def new_ids_taken(decisions: list[Decision], catalogue: pd.DataFrame) -> list[str]:
    """A problem per "new individual" decision whose id the gallery already holds: enrolled
    as it is, the photo would silently join that other animal."""
    known = set(catalogue["individual_id"])
    return [
        f"photo {d.photo} ({d.image}) was marked as a new individual {d.individual_id}, but the gallery already holds "
        f"{d.individual_id}: confirm it, or give the new animal another id"
        for d in decisions
        if d.action == "new" and d.individual_id in known
    ]
