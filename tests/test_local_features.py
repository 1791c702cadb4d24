"""Local features (whale_ml/retrieval/local_features.py): real SIFT/ORB and RANSAC on drawn photos."""

from __future__ import annotations

import numpy as np
import pytest

from whale_ml.data.demo import Individual, render_individual, render_photo
from whale_ml.retrieval.local_features import (
    FeatureStore,
    box_patch,
    candidate_inliers,
    candidate_photos,
    count_inliers,
    describe,
    extract_features,
    save_features,
)
from whale_ml.stage_configs import LocalFeatureConfig


def _photos(tmp_path, seed: int, part: str, n: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """``n`` photos of one drawn individual (new pose, light, sea each time), saved as JPEG."""
    ind = Individual(f"ind{seed}", "humpback_whale", "humpback_whale", part, seed)
    sprite = render_individual(ind)
    out = []
    for j in range(n):
        photo, box = render_photo(sprite, np.random.default_rng(1000 * seed + j), (360, 400))
        path = tmp_path / f"{seed}_{j}.jpg"
        photo.save(path, quality=92)
        out.append((str(path), box))
    return out


@pytest.mark.parametrize("method", ["sift", "orb"])
def test_a_rephotographed_individual_outmatches_a_different_one(tmp_path, method):
    cfg = LocalFeatureConfig(method=method)
    wins = 0
    for seed in (1, 2, 3):
        a = _photos(tmp_path, seed, "fluke", 2)
        b = _photos(tmp_path, seed + 100, "fluke", 1)  # another animal of the same species and body part
        fa1, fa2, fb = (describe(box_patch(p, box, cfg.size), cfg) for p, box in (*a, *b))
        same, other = count_inliers(fa1, fa2, cfg), count_inliers(fa1, fb, cfg)
        wins += same > other
    # Every seed for SIFT; ORB, far less distinctive, at least two of three.
    assert wins >= (3 if method == "sift" else 2)


def test_no_features_means_no_inliers():
    cfg = LocalFeatureConfig()
    flat = describe(np.full((64, 64), 128, np.uint8), cfg)  # a featureless patch
    assert len(flat) == 0
    assert count_inliers(flat, flat, cfg) == 0


def test_store_round_trip_and_bad_photo_named(tmp_path):
    cfg = LocalFeatureConfig(size=128, max_keypoints=50)
    photos = _photos(tmp_path, 7, "dorsal", 2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [photos[0][0], str(bad), photos[1][0]]
    boxes = [photos[0][1], (0, 0, 10, 10), photos[1][1]]
    seen = []
    feats, failures = extract_features(paths, boxes, cfg, workers=2, progress=lambda d, t: seen.append((d, t)))
    assert feats[1] is None and feats[0] is not None and len(feats[0]) > 0
    assert [f.image for f in failures] == ["broken.jpg"] and "broken.jpg" in failures[0].error
    assert seen[-1] == (3, 3)
    save_features(tmp_path / "feats", ["a.jpg", "b.jpg", "c.jpg"], feats, cfg)
    store = FeatureStore([tmp_path / "feats"])
    assert store.config == cfg
    assert len(store) == 3 and "b.jpg" in store and "zzz.jpg" not in store
    np.testing.assert_array_equal(store.get("a.jpg").descriptors, feats[0].descriptors)
    np.testing.assert_array_equal(store.get("c.jpg").points, feats[2].points)
    assert len(store.get("b.jpg")) == 0 and store.get("zzz.jpg") is None


def test_store_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(FileNotFoundError, match="local features incomplete"):
        FeatureStore([tmp_path / "f"])


def test_candidates_take_the_photos_most_like_the_query_and_the_best_inliers(tmp_path):
    gallery = np.eye(4, dtype=np.float32)
    ids = np.array(["a", "a", "a", "b"], dtype=object)
    query = np.array([[0.1, 0.9, 0.5, 0.0]], dtype=np.float32)
    rows = candidate_photos(gallery, ids, query, np.array([["a", "b", ""]], dtype=object), per_candidate=2)
    assert rows == [[[1, 2], [3], []]]

    cfg = LocalFeatureConfig()
    a = _photos(tmp_path, 4, "fluke", 2)
    b = _photos(tmp_path, 104, "fluke", 1)
    fa1, fa2, fb = (describe(box_patch(p, box, cfg.size), cfg) for p, box in (*a, *b))
    inl = candidate_inliers([fa1, None], [[[1, 2], [0]], [[1]]], [fb, fb, fa2], cfg, workers=1)
    assert inl.shape == (2, 2)
    assert inl[0, 0] == count_inliers(fa1, fa2, cfg) and inl[0, 1] == count_inliers(fa1, fb, cfg)
    assert inl[1].tolist() == [0, 0]  # a query without features has no local evidence
