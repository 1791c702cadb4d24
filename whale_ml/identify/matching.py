"""Identify new photos against the current gallery: the five most similar individuals,
the photo of each that matched best, and the ``new_individual`` decision by the same
rule and threshold as the submission.

The result is a plain JSON-able dict whose schema is documented in ``docs/identify.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.gallery.embed import crop_photos, embed_crops
from whale_ml.gallery.versions import GalleryVersion
from whale_ml.gallery.models import ResolvedModel
from whale_ml.identify.explain import format_lead, format_parts, lead_json, score_parts_json
from whale_ml.progress import PhaseProgress, phase
from whale_ml.retrieval.faiss_index import best_photo_per_candidate
from whale_ml.retrieval.local_features import extract_features, home_feature_store
from whale_ml.retrieval.matcher import TunedMatcher, match_queries
from whale_ml.retrieval.ranking import TOP
from whale_ml.home import HomeLayout

SCHEMA_VERSION = 2


def identify_photos(
    paths: Sequence[Path],
    layout: HomeLayout,
    gallery: GalleryVersion,
    models: Sequence[ResolvedModel],
    tuned: TunedMatcher,
    work_dir: Path,
    device: str = "cpu",
    progress: PhaseProgress | None = None,
) -> dict[str, Any]:
    """Identify each photo; one result row per path, in order, errors included.

    Args:
        paths: photo files (a missing or unreadable one gets ``status: error``).
        gallery: the gallery version to search (normally the current one).
        models: the fold models, in the gallery's fold order (:func:`whale_ml.gallery.models.resolve_models`).
        tuned: the matcher tuned for the gallery's models (:func:`~whale_ml.gallery.matchers.load_matcher`).
        work_dir: where the query crops are written (the report reads them there).
        progress: the callbacks of the phases, in order: ``cropping``, ``embedding``, and
            with local re-ranking ``local features`` and ``matching``.
    """
    lineage, matcher = gallery.lineage, tuned.matcher
    photos = crop_photos(paths, lineage, layout, work_dir, device, phase(progress, "cropping"))
    ok = photos["crop_path"] != ""
    if ok.any():
        emb = embed_crops(photos.loc[ok, "crop_path"].tolist(), models, device, progress=phase(progress, "embedding"))
    else:
        emb = np.zeros((0, 1), np.float32)
    if len(emb):
        query_features, store, matching = None, None, None
        if matcher.rerank is not None:
            # The threshold applies to fused scores: describe the queries as the gallery's photos were.
            store = home_feature_store(layout)
            settings = store.config or matcher.rerank.features
            cropped = photos.loc[ok]
            boxes = [list(b) for b in cropped["box"]]
            query_features, _ = extract_features(cropped["path"].tolist(), boxes, settings, progress=phase(progress, "local features"))
            matching = phase(progress, "matching")  # without re-ranking, matching is a search: no phase of its own
        found = match_queries(gallery, emb, matcher, query_features, store, progress=matching)
        sims, ids, thresholds, predictions = found.sims, found.ids, found.thresholds, found.predictions
        decisions, leads = found.decisions, found.leads
        inliers, parts, inlier_photos = found.inliers, found.parts, found.inlier_photos
        matched = best_photo_per_candidate(gallery.embeddings, gallery.table["individual_id"].to_numpy(), emb, ids.tolist())
    rows: list[dict[str, Any]] = []
    q = 0
    for photo in photos.itertuples():
        row: dict[str, Any] = {
            "image": photo.image,
            "path": str(Path(photo.path).resolve()) if Path(photo.path).exists() else str(photo.path),
            "status": "error",
            "error": photo.error or None,
            "box": list(photo.box) if photo.box is not None else None,
            "crop_is_full_frame": bool(photo.full_frame) if photo.box is not None else None,
            "box_note": photo.box_note or None,
            "crop_path": photo.crop_path or None,
            "threshold": None,
            "decision_score": None,
            "lead": None,
            "decision": None,
            "new_individual": None,
            "candidates": [],
            "predictions": [],
        }
        if photo.crop_path:
            candidates = []
            for rank, (ind, sim, (grow, photo_sim)) in enumerate(zip(ids[q], sims[q], matched[q], strict=True), start=1):
                if not ind:  # a gallery with fewer than five individuals
                    continue
                g = gallery.table.iloc[grow]
                candidates.append(
                    {
                        "rank": rank,
                        "individual_id": str(ind),
                        # The ranking score: the fused one with a fusion (local features, class centres), else the cosine.
                        "similarity": round(float(sim), 6),
                        "embedding_similarity": round(float(photo_sim), 6),
                        "inliers": int(inliers[q, rank - 1]) if inliers is not None else None,
                        # Each matcher's share of `similarity`: why this candidate stands where it does.
                        "score_parts": score_parts_json(parts, q, rank - 1),
                        # What the threshold is compared with: `similarity`, plus the lead's share for the first.
                        "decision_score": round(float(decisions[q, rank - 1]), 6),
                        "above_threshold": bool(decisions[q, rank - 1] >= thresholds[q]),
                        "gallery_image": g["image"],
                        "gallery_crop": g["crop_path"],
                        "gallery_source": g["source"],
                        # The gallery photo that gave `inliers` (the review page draws its keypoints).
                        "inlier_image": _inlier_image(gallery, inlier_photos, q, rank - 1),
                    }
                )
            row.update(
                {
                    "status": "ok",
                    "error": None,
                    "threshold": float(thresholds[q]),
                    "decision_score": round(float(decisions[q, 0]), 6),
                    "lead": lead_json(float(leads[q]), matcher.lead_weight),
                    "decision": predictions[q][0],
                    "new_individual": predictions[q][0] == NEW_INDIVIDUAL,
                    "candidates": candidates,
                    "predictions": predictions[q],
                }
            )
            q += 1
        rows.append(row)
    return {
        "schema_version": SCHEMA_VERSION,
        "gallery": _gallery_summary(gallery),
        "threshold": float(matcher.threshold),
        "local_rerank": matcher.rerank is not None,
        "lead_weight": float(matcher.lead_weight),
        # The weight of each matcher in the ranking score (null: the cosine similarity alone).
        "fusion_weights": dict(matcher.fusion.weights) if matcher.fusion is not None else None,
        "species_thresholds": dict(matcher.species_thresholds),
        "models": [m.describe() for m in models],
        "matcher": tuned.models_key,  # gallery/matchers/<this>.json: tuned for these models
        "top": TOP,
        "photos": rows,
    }


def _gallery_summary(gallery: GalleryVersion) -> dict[str, Any]:
    """The result's ``gallery``: the version searched and its counts."""
    return {
        "version": gallery.name,
        "photos": len(gallery.table),
        "individuals": int(gallery.table["individual_id"].nunique()),
        "enrolled_photos": int((gallery.table["source"] == "enrolled").sum()),
    }


def _inlier_image(gallery: GalleryVersion, rows: np.ndarray | None, q: int, c: int) -> str | None:
    if rows is None or rows[q, c] < 0:
        return None
    return str(gallery.table["image"].iat[int(rows[q, c])])


def format_text(result: dict[str, Any]) -> str:
    """The result for a terminal: per photo the decision and the five candidates."""
    g = result["gallery"]
    lines = [
        f"gallery {g['version']}: {g['photos']} photos of {g['individuals']} individuals "
        f"({g['enrolled_photos']} enrolled); threshold {result['threshold']:.4f}; models "
        + ", ".join(f"{m['fold']}=v{m['version']}" for m in result["models"])
    ]
    for row in result["photos"]:
        if row["status"] != "ok":
            lines.append(f"\n{row['image']}: ERROR {row['error']}")
            continue
        best = row["decision_score"] if row["decision_score"] is not None else float("nan")
        name = "best" if not result.get("lead_weight") else "best + lead_weight x lead"
        why = f"{name} {best:.4f} {'<' if row['new_individual'] else '>='} threshold {row['threshold']:.4f}"
        crop = "full frame" if row["crop_is_full_frame"] else "detector box"
        lines.append(f"\n{row['image']}: {row['decision']}  ({why}; {crop})")
        lead = format_lead(row)
        if lead:
            lines.append(f"  {lead}")
        fused = result.get("fusion_weights") is not None
        for c in row["candidates"]:
            mark = " " if c["above_threshold"] else "-"
            lines.append(f"  {c['rank']}. {c['individual_id']:<24} {c['similarity']:.4f} {mark} best match {c['gallery_image']}")
            if fused:  # the plain cosine needs no explaining
                lines.append(f"       {format_parts(c)}")
        lines.append(f"  predictions: {' '.join(row['predictions'])}")
    return "\n".join(lines)
