"""A match-review sheet: test photos beside the gallery photos they were matched to.

One row per query: its crop, then its five predictions in order -- for each
individual, its most similar gallery photo with the similarity, and a blank
``new_individual`` tile where the rule put it. With a known truth, the correct
tile is framed green. It is for eyes, not for scores: a user sees at a glance
whether the matches are the same animal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from whale_ml.data.images import ImageReadError, load_rgb
from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.retrieval.faiss_index import best_photo_per_candidate


def review_sheet(
    query_paths: Sequence[str],
    predictions: Sequence[Sequence[str]],
    matches: Sequence[Sequence[tuple[int, float]]],
    gallery_paths: Sequence[str],
    truths: Sequence[str] | None = None,
    tile: int = 112,
) -> Image.Image:
    """The sheet: rows of query crop + five prediction tiles (id, similarity)."""
    cols = 6
    sheet = Image.new("RGB", (cols * tile, len(query_paths) * (tile + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def paste(path: str, x: int, y: int) -> None:
        try:
            sheet.paste(load_rgb(path).resize((tile, tile)), (x, y))
        except ImageReadError:
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=(200, 0, 0))

    for r, (query, preds, found) in enumerate(zip(query_paths, predictions, matches, strict=True)):
        y = r * (tile + 14)
        paste(query, 0, y)
        draw.text((2, y + tile), "query" if truths is None else f"truth {truths[r]}"[:20], fill=(0, 0, 0))
        for c, (pred, (row, sim)) in enumerate(zip(preds, found, strict=True), start=1):
            x = c * tile
            if pred == NEW_INDIVIDUAL:
                draw.rectangle([x + 4, y + 4, x + tile - 5, y + tile - 5], fill=(230, 230, 230))
                draw.text((x + 10, y + tile // 2 - 6), "new_individual", fill=(0, 0, 0))
            elif row >= 0:
                paste(gallery_paths[row], x, y)
            label = pred if pred == NEW_INDIVIDUAL else f"{pred[:10]} {sim:.2f}" if np.isfinite(sim) else pred[:14]
            draw.text((x + 2, y + tile), label, fill=(0, 0, 0))
            if truths is not None and pred == truths[r]:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=(0, 170, 0), width=4)
    return sheet


def sample_review(
    query_images: Sequence[str],
    queries: np.ndarray,
    predictions: Sequence[Sequence[str]],
    query_crops: Mapping[str, str],
    gallery_embeddings: np.ndarray,
    gallery_ids: np.ndarray,
    gallery_crops: Sequence[str],
    truth_of: Mapping[str, str] | None = None,
    n: int = 8,
) -> Image.Image | None:
    """The review sheet of ``n`` queries drawn at random (seeded: the same ones every time),
    each prediction shown by its best-matching gallery photo.

    Args:
        query_images, queries, predictions: the queries' names, unit-length embeddings and
            five predictions, row for row.
        query_crops: image name -> crop file of each query.
        gallery_embeddings, gallery_ids, gallery_crops: the gallery's rows.
        truth_of: image -> true individual, when known; an individual the gallery lacks
            is shown as ``new_individual`` (what a correct prediction says).

    Returns:
        The sheet, or None when there are no queries.
    """
    if not len(query_images):
        return None
    rows = sorted(np.random.default_rng(0).choice(len(query_images), min(n, len(query_images)), replace=False).tolist())
    names = [query_images[r] for r in rows]
    preds = [predictions[r] for r in rows]
    matches = best_photo_per_candidate(gallery_embeddings, gallery_ids, queries[rows], preds)
    truths = None
    if truth_of is not None:
        known = set(gallery_ids)
        truths = [t if (t := truth_of.get(name, "?")) in known else NEW_INDIVIDUAL for name in names]
    return review_sheet([query_crops[name] for name in names], preds, matches, gallery_crops, truths)
