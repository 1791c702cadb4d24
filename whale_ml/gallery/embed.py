"""New photos into the gallery's embedding space: the same detector, boxes, crops and
fold models the gallery was made with (its :class:`GalleryLineage`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from whale_ml.detection.photo_pass import BoxRule, CropRule
from whale_ml.detection.yolo import box_and_crop
from whale_ml.gallery.lineage import GalleryLineage, LineageError
from whale_ml.io import sha256_file
from whale_ml.progress import ProgressFn
from whale_ml.retrieval.embeddings import embed_paths
from whale_ml.retrieval.store import ensemble
from whale_ml.home import HomeLayout
from whale_ml.training.trainer import load_model

if TYPE_CHECKING:
    from whale_ml.gallery.models import ResolvedModel


def detector_for(lineage: GalleryLineage, layout: HomeLayout) -> Path | None:
    """The detector file the gallery's boxes came from (None: full frames), checked by digest."""
    if lineage.detector_sha256 is None:
        return None
    path = layout.detector_dir / "detector.pt"
    if not path.exists() or sha256_file(path) != lineage.detector_sha256:
        raise LineageError(
            f"the detector at {path} is not the one the gallery's crops were cut with: rematerialise bboxes, crops, "
            "fold_embeddings and gallery (whale run) before identifying"
        )
    return path


def crop_photos(
    paths: Sequence[Path],
    lineage: GalleryLineage,
    layout: HomeLayout,
    out_dir: Path,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> pd.DataFrame:
    """Detect, box and crop each photo exactly as the pipeline did for the gallery.

    Args:
        progress: called with (photos done, total) after each batch.

    Returns:
        One row per path, in order: ``key, image, path, box (x0, y0, x1, y1), full_frame,
        box_note, crop_path, error``; ``crop_path`` is empty and ``error`` says why when
        the photo could not be read.
    """
    photos = pd.DataFrame({"path": [str(p) for p in paths], "image": [Path(p).name for p in paths]})
    # Names may repeat across folders: the detector and the crop files get a unique key.
    photos["key"] = [f"{i:05d}_{name}" for i, name in enumerate(photos["image"])]
    if photos.empty:
        return photos.assign(box=[], full_frame=[], box_note=[], crop_path=[], error=[])
    done = box_and_crop(
        photos[["key", "path"]].rename(columns={"key": "image"}),
        detector_for(lineage, layout),
        BoxRule(lineage.min_confidence, lineage.expand, lineage.detector_imgsz),
        CropRule(Path(out_dir), lineage.crop_size, lineage.resize),
        device=device,
        home=layout.home,
        progress=progress,
    )
    boxes, crops = done.boxes, done.crops
    assert crops is not None
    photos["box"] = [
        (int(r.x_min), int(r.y_min), int(r.x_max), int(r.y_max)) if r.source != "unreadable" else None for r in boxes.itertuples()
    ]
    photos["full_frame"] = (boxes["source"] != "detector").to_numpy()
    photos["box_note"] = boxes["note"].where(boxes["source"] != "unreadable", "").to_numpy()
    photos["crop_path"] = crops["crop_path"].to_numpy()
    photos["error"] = crops["error"].to_numpy()
    return photos


def embed_crops(
    crop_paths: Sequence[str],
    models: Sequence[ResolvedModel],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """The ensemble embedding of each crop: every fold model (in the gallery's order,
    with its flip TTA), normalised and concatenated as the gallery stage does.

    Args:
        progress: called after each batch of each model with (crops done, total), a crop
            counting whole once every model has embedded it: the rate and the time left
            are the ensemble's.
    """
    parts = []
    for k, resolved in enumerate(models):
        model, cfg = load_model(resolved.checkpoint, device)
        counted = _pass(progress, k, len(models))
        parts.append(embed_paths(model, list(crop_paths), cfg.image_size, device, batch_size, resolved.flip_tta, progress=counted))
    return ensemble(parts)


def _pass(progress: ProgressFn | None, k: int, passes: int) -> ProgressFn | None:
    """Model ``k``'s progress (of ``passes`` models) in the ensemble's count: each crop it
    embeds is 1/``passes`` of a crop done."""
    if progress is None:
        return None
    return lambda done, total: progress((k * total + done) // passes, total)
