"""Keypoint evidence a reviewer can see: the inlier matches between two photos, drawn.

The ``local`` part of a ranking score is a count of RANSAC inliers
(:mod:`whale_ml.retrieval.local_features`); this module shows which marks they are. Each
photo's box is taken and described exactly as the feature stage does it
(:func:`~whale_ml.retrieval.local_features.box_patch` at ``cfg.size`` on the long side,
then :func:`~whale_ml.retrieval.local_features.describe`), the two are matched by
:func:`~whale_ml.retrieval.local_features.inlier_pairs`, and the patches are drawn side by
side, query on the left, with one line per inlier pair. So the count under the drawing is
the count the matcher weighs for that pair of photos, and the same settings must be given:
the feature store's (``FeatureStore.config``), or the matcher's ``rerank.features``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from whale_ml.data.images import photo_size
from whale_ml.retrieval.local_features import box_patch, describe, inlier_pairs
from whale_ml.stage_configs import LocalFeatureConfig

DRAW_WIDTH = 640  # the drawing's width in pixels: both patches readable on a review page
GAP = 8  # patch pixels between the two patches
MAX_LINES = 60  # more lines than this hide each other at DRAW_WIDTH
_BACKGROUND = (24, 28, 34)
_GOLDEN = 0.618033988749895  # hue steps of the golden ratio: neighbouring lines get far-apart colours


def match_colour(i: int) -> tuple[int, int, int]:
    """The ``i``-th line's colour: bright, saturated, and distinct from its neighbours'."""
    r, g, b = colorsys.hsv_to_rgb((i * _GOLDEN) % 1.0, 0.85, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def _rgb(patch: np.ndarray) -> Image.Image:
    """A grey (h, w) or RGB (h, w, 3) uint8 patch as an RGB image (grey stays grey: the lines carry the colour)."""
    a = np.asarray(patch)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"a patch must be grey (h, w) or RGB (h, w, 3), got shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a).astype(np.uint8)).convert("RGB")


def draw_matches(
    query_patch: np.ndarray,
    gallery_patch: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    width: int = DRAW_WIDTH,
    max_lines: int = MAX_LINES,
) -> Image.Image:
    """The two patches side by side (query left, gallery right, :data:`GAP` apart, centred
    vertically), scaled together to ``width`` pixels wide, with a line in its own colour
    from each query point to its gallery point and a ring at both ends. Beyond
    ``max_lines`` pairs, ``max_lines`` of them evenly spread over the list are drawn: a
    wall of lines shows no single match (the count is the caller's to state).

    Args:
        query_patch, gallery_patch: grey (h, w) or RGB (h, w, 3) uint8 arrays.
        pairs: ``(query_points, gallery_points)``, each (m, 2) ``(x, y)`` in its patch's
            pixels, as :func:`~whale_ml.retrieval.local_features.inlier_pairs` returns them.
        width: the drawing's width; its height keeps the patches' proportions.
        max_lines: the most pairs drawn.

    Returns:
        An RGB image ``width`` x ``round(scale * max(hq, hg))``, ``scale = width / (wq + GAP + wg)``.
    """
    q, g = _rgb(query_patch), _rgb(gallery_patch)
    src, dst = (np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in pairs)
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} query points for {len(dst)} gallery points")
    if len(src) > max_lines:
        keep = np.unique(np.linspace(0, len(src) - 1, max(1, max_lines)).round().astype(int))
        src, dst = src[keep], dst[keep]
    raw_w, raw_h = q.width + GAP + g.width, max(q.height, g.height)
    scale = width / raw_w
    canvas = Image.new("RGB", (width, max(1, round(raw_h * scale))), _BACKGROUND)
    # Each patch's top-left corner on the canvas, in patch pixels before scaling.
    origins = ((0.0, (raw_h - q.height) / 2), (q.width + GAP, (raw_h - g.height) / 2))
    for patch, (ox, oy) in zip((q, g), origins, strict=True):
        size = (max(1, round(patch.width * scale)), max(1, round(patch.height * scale)))
        canvas.paste(patch.resize(size, Image.Resampling.BICUBIC), (round(ox * scale), round(oy * scale)))
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(width / 320))  # 2 px at the default width: thin enough to tell lines apart
    ring = 2 * line + 1
    for i, (a, b) in enumerate(zip(src, dst, strict=True)):
        colour = match_colour(i)
        # Patch pixel centres: OpenCV's keypoints are in pixel coordinates, PIL draws at pixel corners.
        ends = [((x + 0.5 + ox) * scale, (y + 0.5 + oy) * scale) for (x, y), (ox, oy) in zip((a, b), origins, strict=True)]
        draw.line(ends, fill=colour, width=line)
        for x, y in ends:
            draw.ellipse((x - ring, y - ring, x + ring, y + ring), outline=colour, width=line)
    return canvas


def whole_photo(path: str | Path) -> tuple[float, float, float, float]:
    """The box of a whole photo: ``(0, 0, width, height)`` as oriented (read from its header).

    Raises:
        ImageReadError: the photo cannot be read (the message names it).
    """
    w, h = photo_size(path)
    return 0.0, 0.0, float(w), float(h)


def keypoint_matches(
    query_path: str | Path,
    query_box: Sequence[float] | None,
    gallery_path: str | Path,
    gallery_box: Sequence[float] | None,
    cfg: LocalFeatureConfig,
    width: int = DRAW_WIDTH,
    max_lines: int = MAX_LINES,
) -> tuple[Image.Image, int]:
    """The inlier matches between a query photo's box and a gallery photo's, drawn
    (:func:`draw_matches`), and how many there are (``count_inliers`` of the two).

    Args:
        query_path, gallery_path: the original photos (not their crops: the feature stage
            describes the box in the original, at more pixels than the crop holds).
        query_box, gallery_box: ``(x0, y0, x1, y1)`` in the photo's oriented full-size
            pixels, as the result's ``box`` and the gallery table's; None: the whole photo.
        cfg: the settings the features were made with.
        width, max_lines: as :func:`draw_matches`.

    Raises:
        ImageReadError: a photo cannot be read (the message names the file).
    """
    patches = []
    for path, box in ((query_path, query_box), (gallery_path, gallery_box)):
        patches.append(box_patch(path, box if box is not None else whole_photo(path), cfg.size))
    pairs = inlier_pairs(describe(patches[0], cfg), describe(patches[1], cfg), cfg)
    return draw_matches(patches[0], patches[1], pairs, width, max_lines), len(pairs[0])
