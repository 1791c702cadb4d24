"""Local features: keypoints of each photo's box, and geometrically consistent matches.

What Wildbook's HotSpotter and wildlife-tools' local matchers do for flukes and fins:
describe each photo by keypoints (OpenCV's SIFT; ORB as the patent-free, faster
alternative: both ship with opencv, which ultralytics installs, and need no
downloaded weights), match a query's descriptors against a candidate photo's with
Lowe's ratio test, and count the matches that one similarity transform (rotation,
scale, shift) explains, by RANSAC. The same marks seen again give many such
inliers; another animal's marks give few, whatever the pose and light.

The keypoints are taken from the detector's box in the *original* photo at
``size`` pixels on its long side -- more pixels than the embedding models see
(marks a 64 px crop blurs away still match at 256 px) -- decoded at the
coarsest JPEG draft scale that keeps them (:func:`~whale_ml.data.images.decode_photo`).

Storage: one folder per split holding sets of ``points.npy`` (float32, (N, 2)),
``descriptors.npy`` (uint8, (N, D), memory-mapped when read), ``offsets.npy`` (photo i
owns rows ``offsets[i]:offsets[i+1]``), ``images.csv`` and ``settings.json``. The files
only mean something together, so they are published as one set (:mod:`whale_ml.filesets`:
``sets/features-<n>/`` named by ``current.json``). A reader resolves the current set once
and reads every file from it: it sees the old set or the new one, never a mix, and a
writer killed at any point leaves the previous set current.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from whale_ml.data.images import ImageReadError, decode_photo
from whale_ml.home import HomeLayout
from whale_ml.filesets import current_set, new_set
from whale_ml.progress import ProgressFn
from whale_ml.stage_configs import LocalFeatureConfig
from whale_ml.threads import pipeline_threads

# Matches RANSAC must explain before a pair counts as geometrically consistent at all:
# two or three matches fit any similarity transform.
MIN_INLIERS = 4
# Both photos' boxes are resized to the same patch size, so the same marks appear at about
# the same scale; a fit that shrinks or grows the query more than this is degenerate.
MAX_SCALE_CHANGE = 2.0


@dataclass(frozen=True)
class PhotoFeatures:
    """One photo's keypoints: ``points`` (n, 2) in pixels of the ``size`` patch, ``descriptors`` (n, D) uint8."""

    points: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


_local = threading.local()  # one detector per thread: OpenCV's are not safe to share


def _detector(cfg: LocalFeatureConfig):  # type: ignore[no-untyped-def]
    import cv2

    key = (cfg.method, cfg.max_keypoints, cfg.contrast_threshold)
    if getattr(_local, "key", None) != key:
        _local.key = key
        if cfg.method == "sift":
            _local.detector = cv2.SIFT_create(nfeatures=cfg.max_keypoints, contrastThreshold=cfg.contrast_threshold)
        else:
            _local.detector = cv2.ORB_create(nfeatures=cfg.max_keypoints)
    return _local.detector


def box_patch(path: str | Path, box: Sequence[float], size: int) -> np.ndarray:
    """The box of the photo at ``path`` as a grey patch ``size`` pixels on its long side.

    Raises:
        ImageReadError: the photo cannot be read (the message names it).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    scale = size / max(w, h)
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    # The coarsest draft scale that still holds the box at the patch's resolution.
    photo = decode_photo(path, choose=lambda stored: _draft_for(stored, w, h, size))
    region = photo.box_in_image((x0, y0, x1, y1))
    return np.asarray(photo.image.convert("L").resize(out, resample=3, box=region))  # 3: bicubic


def _draft_for(stored: tuple[int, int], box_w: float, box_h: float, size: int) -> int:
    for r in (8, 4, 2):
        if max(box_w, box_h) / r >= size:
            return r
    return 1


def describe(patch: np.ndarray, cfg: LocalFeatureConfig) -> PhotoFeatures:
    """Keypoints and descriptors of a grey patch. SIFT descriptors become RootSIFT
    (L1-normalised, square-rooted: Euclidean distance then compares them as the Hellinger
    kernel does, which matches better; Arandjelovic & Zisserman 2012), stored as uint8."""
    kps, desc = _detector(cfg).detectAndCompute(patch, None)
    if desc is None or not kps:
        width = 128 if cfg.method == "sift" else 32
        return PhotoFeatures(np.zeros((0, 2), np.float32), np.zeros((0, width), np.uint8))
    points = np.array([k.pt for k in kps], dtype=np.float32)
    if cfg.method == "sift":
        d = desc.astype(np.float32)
        d = np.sqrt(d / np.maximum(d.sum(axis=1, keepdims=True), 1e-7))
        desc = np.clip(np.round(d * 255.0), 0, 255)
    return PhotoFeatures(points, np.ascontiguousarray(desc, dtype=np.uint8))


def inlier_pairs(query: PhotoFeatures, candidate: PhotoFeatures, cfg: LocalFeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The matches between two photos that one similarity transform explains (RANSAC), as
    point pairs: ``(query_points, candidate_points)``, each (m, 2) float32 in pixels of the
    ``size`` patches, row i of one matching row i of the other; (0, 2) each when the
    matches count as none.

    Matches pass Lowe's ratio test (best distance below ``cfg.ratio`` times the second
    best); fewer than :data:`MIN_INLIERS` consistent ones count as none.
    """
    import cv2

    none = (np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))
    if len(query) < 2 or len(candidate) < 2:
        return none
    if cfg.method == "sift":
        matcher = cv2.BFMatcher(cv2.NORM_L2)
        pairs = matcher.knnMatch(query.descriptors.astype(np.float32), candidate.descriptors.astype(np.float32), k=2)
    else:
        pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(query.descriptors, candidate.descriptors, k=2)
    # One match per candidate keypoint (the closest): otherwise a photo with a handful of
    # keypoints takes every query keypoint onto the same few points, and a transform that
    # shrinks the query to a point "explains" them all.
    best: dict[int, object] = {}
    for p in pairs:
        if len(p) == 2 and p[0].distance < cfg.ratio * p[1].distance:
            m = p[0]
            if m.trainIdx not in best or m.distance < best[m.trainIdx].distance:  # type: ignore[attr-defined]
                best[m.trainIdx] = m
    good = list(best.values())
    if len(good) < MIN_INLIERS:
        return none
    src = query.points[[m.queryIdx for m in good]]  # type: ignore[attr-defined]
    dst = candidate.points[[m.trainIdx for m in good]]  # type: ignore[attr-defined]
    transform, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_tolerance * cfg.size, maxIters=2000, confidence=0.99, refineIters=0
    )
    if transform is None or mask is None:
        return none
    # The same animal at the same patch size: the scale between the two views is near 1
    # (both boxes are resized to `size`); a collapse or blow-up is a degenerate fit.
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    if not MAX_SCALE_CHANGE**-1 <= scale <= MAX_SCALE_CHANGE:
        return none
    kept = mask.ravel().astype(bool)
    if int(kept.sum()) < MIN_INLIERS:
        return none
    return np.asarray(src[kept], np.float32), np.asarray(dst[kept], np.float32)


def count_inliers(query: PhotoFeatures, candidate: PhotoFeatures, cfg: LocalFeatureConfig) -> int:
    """Matches between two photos that one similarity transform explains (RANSAC): how
    many :func:`inlier_pairs` finds (0 below :data:`MIN_INLIERS`)."""
    return len(inlier_pairs(query, candidate, cfg)[0])


@dataclass
class FeatureFailure:
    image: str
    error: str


def extract_features(
    paths: Sequence[str | Path],
    boxes: Sequence[Sequence[float]],
    cfg: LocalFeatureConfig,
    workers: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[list[PhotoFeatures | None], list[FeatureFailure]]:
    """Features of each photo's box, in order, on ``workers`` threads (0: every core).

    OpenCV and Pillow's decoder release the GIL, so threads use every core. A photo
    that cannot be read gets ``None`` and a :class:`FeatureFailure` naming it; the
    others are still processed.
    """
    if len(paths) != len(boxes):
        raise ValueError(f"{len(paths)} photos for {len(boxes)} boxes")

    def one(i: int) -> tuple[PhotoFeatures | None, str]:
        try:
            return describe(box_patch(paths[i], boxes[i], cfg.size), cfg), ""
        except ImageReadError as exc:
            return None, str(exc)

    out: list[PhotoFeatures | None] = [None] * len(paths)
    failures: list[FeatureFailure] = []
    with ThreadPoolExecutor(pipeline_threads(workers or None)) as pool:
        for i, (feats, error) in enumerate(pool.map(one, range(len(paths)))):
            out[i] = feats
            if error:
                failures.append(FeatureFailure(Path(paths[i]).name, error))
            if progress is not None:
                progress(i + 1, len(paths))
    return out, failures


_PARTS = ("points.npy", "descriptors.npy", "offsets.npy", "images.csv", "settings.json")


def save_features(
    folder: str | Path, images: Sequence[str], features: Sequence[PhotoFeatures | None], cfg: LocalFeatureConfig
) -> Path:
    """Write one split's features (``None``: a photo without any) and the settings they were
    made with (``settings.json``: queries must be described alike) as one set, published
    atomically (module docstring): readers see this set whole or the one before it."""
    if len(images) != len(features):
        raise ValueError(f"{len(features)} feature sets for {len(images)} images")
    folder = Path(folder)
    width = next((f.descriptors.shape[1] for f in features if f is not None and len(f)), 128)
    points = [f.points if f is not None else np.zeros((0, 2), np.float32) for f in features]
    descs = [f.descriptors if f is not None and len(f) else np.zeros((0, width), np.uint8) for f in features]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in points])]).astype(np.int64)
    arrays = {
        "points.npy": np.concatenate(points).astype(np.float32) if points else np.zeros((0, 2), np.float32),
        "descriptors.npy": np.concatenate(descs).astype(np.uint8) if descs else np.zeros((0, width), np.uint8),
        "offsets.npy": offsets,
    }
    with new_set(folder, "features", loose=_PARTS) as staged:
        for name, array in arrays.items():
            np.save(staged / name, array)
        pd.DataFrame({"image": list(images)}).to_csv(staged / "images.csv", index=False)
        (staged / "settings.json").write_text(cfg.model_dump_json(indent=1))
    return folder


def features_saved(folder: str | Path) -> bool:
    """Whether ``folder`` holds a published set of features (or the older one-file-each layout)."""
    return (current_set(folder) / "settings.json").is_file()


def _read_set(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], list[str], LocalFeatureConfig]:
    """One whole set of ``folder``: the one ``current.json`` names when it is read.

    A writer sweeps the set before the previous one; a reader that loses its set that way
    (a file gone between reading the pointer and opening it) reads the pointer again.
    """
    for _attempt in range(5):
        where = current_set(folder)  # the folder itself in the layout before sets
        try:
            offsets = np.load(where / "offsets.npy")
            part = (np.load(where / "points.npy"), np.load(where / "descriptors.npy", mmap_mode="r"), offsets)
            images = pd.read_csv(where / "images.csv", dtype=str, keep_default_na=False)["image"].tolist()
            config = LocalFeatureConfig.model_validate_json((where / "settings.json").read_text())
        except FileNotFoundError:
            if where != folder and current_set(folder) != where:
                continue  # a newer set was published meanwhile
            missing = [part for part in _PARTS if not (where / part).exists()]
            raise FileNotFoundError(
                f"{folder}: local features incomplete (missing {', '.join(missing) or 'a file'}); rematerialise local_features"
            ) from None
        if len(images) != len(offsets) - 1:
            raise ValueError(f"{where}: {len(images)} images but {len(offsets) - 1} feature sets")
        return part, images, config
    raise RuntimeError(f"{folder}: the local features kept changing while being read (5 tries); read them again")


class FeatureStore:
    """Read-only view of saved features, by image name, over one or more split folders."""

    def __init__(self, folders: Sequence[str | Path]) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._where: dict[str, tuple[int, int]] = {}
        self.config: LocalFeatureConfig | None = None
        self.images: list[str] = []
        for folder in folders:
            folder = Path(folder)
            part, images, config = _read_set(folder)
            if self.config is not None and config != self.config:
                raise ValueError(f"{folder}: features made with other settings than {folders[0]}; rematerialise local_features")
            self.config = config
            self._parts.append(part)
            self.images += images
            for i, image in enumerate(images):
                self._where[image] = (len(self._parts) - 1, i)

    def __contains__(self, image: str) -> bool:
        return image in self._where

    def __len__(self) -> int:
        return len(self._where)

    def get(self, image: str) -> PhotoFeatures | None:
        """The image's features, or ``None`` when the store has none for it."""
        where = self._where.get(image)
        if where is None:
            return None
        points, descs, offsets = self._parts[where[0]]
        a, b = offsets[where[1]], offsets[where[1] + 1]
        return PhotoFeatures(points[a:b], np.asarray(descs[a:b]))


def candidate_photos(
    gallery_embeddings: np.ndarray,
    gallery_ids: np.ndarray,
    queries: np.ndarray,
    candidates: np.ndarray,
    per_candidate: int,
) -> list[list[list[int]]]:
    """For each query and candidate individual, its ``per_candidate`` gallery photos most
    similar to the query by the embeddings (rows of the gallery), best first.

    Matching every photo of an individual seen 400 times would cost 400 matches; its few
    photos most like the query are where the same view, hence the same marks, are likely.
    """
    gallery_ids = np.asarray(gallery_ids, dtype=object)
    order = np.argsort(gallery_ids, kind="stable")
    names, starts = np.unique(gallery_ids[order], return_index=True)
    rows_of = dict(zip(names, np.split(order, starts[1:]), strict=True)) if len(order) else {}
    out: list[list[list[int]]] = []
    for q, row in enumerate(np.asarray(candidates, dtype=object)):
        per_query = []
        for ind in row:
            rows = rows_of.get(ind)
            if rows is None or not ind:
                per_query.append([])
                continue
            if len(rows) > per_candidate:
                sims = gallery_embeddings[rows] @ queries[q]
                rows = rows[np.argsort(-sims, kind="stable")[:per_candidate]]
            per_query.append([int(r) for r in rows])
        out.append(per_query)
    return out


def candidate_inliers(
    query_features: Sequence[PhotoFeatures | None],
    candidate_rows: Sequence[Sequence[Sequence[int]]],
    gallery_features: Sequence[PhotoFeatures | None],
    cfg: LocalFeatureConfig,
    workers: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query and candidate individual, the most inliers over the candidate's photos, and
    the gallery row of the photo that gave them: two (n, K) arrays (row -1: no inlier found).

    A query or gallery photo without features contributes 0 (no local evidence).
    Queries are spread over ``workers`` threads (OpenCV releases the GIL).
    """
    n = len(candidate_rows)
    k = max((len(r) for r in candidate_rows), default=0)
    out = np.zeros((n, k), dtype=np.int32)
    where = np.full((n, k), -1, dtype=np.int64)

    def one(q: int) -> tuple[np.ndarray, np.ndarray]:
        row, at = np.zeros(k, dtype=np.int32), np.full(k, -1, dtype=np.int64)
        feats = query_features[q]
        if feats is None or len(feats) == 0:
            return row, at
        for c, rows in enumerate(candidate_rows[q]):
            for g in rows:
                other = gallery_features[g]
                found = count_inliers(feats, other, cfg) if other is not None else 0
                if found > row[c]:
                    row[c], at[c] = found, g
        return row, at

    with ThreadPoolExecutor(pipeline_threads(workers or None)) as pool:
        for q, (row, at) in enumerate(pool.map(one, range(n))):
            out[q], where[q] = row, at
            if progress is not None:
                progress(q + 1, n)
    return out, where


def inlier_evidence(inliers: np.ndarray) -> np.ndarray:
    """The calibrators' input: ``log1p(inliers)``, so that 4 against 8 weighs as 40 against 80."""
    return np.log1p(np.maximum(np.asarray(inliers, dtype=np.float64), 0.0))


FEATURE_SPLITS = ("train", "test", "enrolled")


def home_feature_store(layout: HomeLayout) -> FeatureStore:
    """The home's local features: the ``local_features`` asset's train and test folders, and
    the photos ``whale enroll`` added since (when any were).

    Raises:
        FileNotFoundError: the asset has not been materialised in this home.
    """
    folders = [layout.local_features_dir(s) for s in FEATURE_SPLITS]
    return FeatureStore([f for f in folders[:2]] + [f for f in folders[2:] if features_saved(f)])


def add_enrolled_features(
    layout: HomeLayout,
    images: Sequence[str],
    paths: Sequence[str | Path],
    boxes: Sequence[Sequence[float]],
    progress: ProgressFn | None = None,
) -> int:
    """Describe enrolled photos as the asset described the catalogue's, into the home's
    ``enrolled`` folder (rewritten whole, atomically, with the earlier enrolled photos).
    ``progress(done, total)`` is called per photo described.

    Returns:
        How many photos were described; 0 when the home has no local features (nothing
        re-ranks with them there).
    """
    train_dir = layout.local_features_dir("train")
    if not features_saved(train_dir):
        return 0
    # The settings alone: the training split's points and image list are large at the real scale.
    cfg = LocalFeatureConfig.model_validate_json((current_set(train_dir) / "settings.json").read_text())
    folder = layout.local_features_dir("enrolled")
    feats, _ = extract_features(paths, boxes, cfg, progress=progress)
    new = dict(zip(images, feats, strict=True))
    if features_saved(folder):
        old = FeatureStore([folder])
        kept = [img for img in old.images if img not in new]
        new = {**{img: old.get(img) for img in kept}, **new}
    save_features(folder, list(new), list(new.values()), cfg)
    return len(images)
