"""Hand-made identification batches for the review tests that need no models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from whale_ml.home import HomeLayout
from whale_ml.review import Batch, save_batch
from whale_ml.review.batches import batch_workspace


def make_batch(
    layout: HomeLayout, photos_dir: Path, margins: list[float | None], ids: list[str] | None = None, names: list[str] | None = None
) -> Batch:
    """A kept batch of len(margins) photos whose decision score lies ``margin`` from the
    threshold 0.5 (None: a photo that could not be identified)."""
    photos_dir.mkdir(parents=True, exist_ok=True)
    workspace = batch_workspace(layout)
    (workspace / "crops").mkdir()
    rows: list[dict[str, Any]] = []
    for i, margin in enumerate(margins):
        path = photos_dir / (names[i] if names else f"p{i}.jpg")
        Image.new("RGB", (40, 30), (10 * i, 80, 120)).save(path)
        crop = workspace / "crops" / f"{i:05d}_p{i}.jpg"
        Image.new("RGB", (16, 16), (200, 10 * i, 0)).save(crop)
        if margin is None:
            rows.append({"image": path.name, "path": str(path), "status": "error", "error": "cannot be read", "candidates": [], "crop_path": None})
            continue
        cands = [
            {"rank": r, "individual_id": (ids or ["a", "b", "c", "d", "e"])[r - 1], "similarity": 0.5 + margin - 0.1 * (r - 1),
             "embedding_similarity": 0.4, "inliers": None, "above_threshold": r == 1 and margin >= 0,
             "gallery_image": f"g{r}.jpg", "gallery_crop": str(crop), "gallery_source": "train"}
            for r in range(1, 6)
        ]  # fmt: skip
        rows.append(
            {"image": path.name, "path": str(path), "status": "ok", "error": None, "box": [0, 0, 40, 30], "crop_is_full_frame": False,
             "crop_path": str(crop), "threshold": 0.5, "decision_score": 0.5 + margin, "decision": "a" if margin >= 0 else "new_individual",
             "new_individual": margin < 0, "candidates": cands, "predictions": ["a", "b", "c", "d", "e"]}
        )  # fmt: skip
    result = {"schema_version": 2, "gallery": {"version": "v0001", "photos": 5, "individuals": 5, "enrolled_photos": 0}, "threshold": 0.5, "photos": rows}
    return save_batch(layout, workspace, result)
