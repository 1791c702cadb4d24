"""Local features (whale_ml/retrieval/local_features.py): real SIFT/ORB and RANSAC on drawn photos."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from whale_ml.data.demo import Individual, render_individual, render_photo
from whale_ml.data.images import ImageReadError
from whale_ml.retrieval.local_features import (
    FeatureStore,
    box_patch,
    candidate_inliers,
    candidate_photos,
    count_inliers,
    describe,
    extract_features,
    inlier_pairs,
    save_features,
)
from whale_ml.retrieval.match_drawing import DRAW_WIDTH, GAP, draw_matches, keypoint_matches
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
    inl, where = candidate_inliers([fa1, None], [[[1, 2], [0]], [[1]]], [fb, fb, fa2], cfg, workers=1)
    assert inl.shape == where.shape == (2, 2)
    assert inl[0, 0] == count_inliers(fa1, fa2, cfg) > 0 and inl[0, 1] == count_inliers(fa1, fb, cfg)
    assert where[0, 0] == 2  # the candidate's photo that gave its inliers (fa2, row 2), not fb (row 1)
    assert inl[1].tolist() == [0, 0] and where[1].tolist() == [-1, -1]  # a query without features has no local evidence


@pytest.mark.parametrize("method", ["sift", "orb"])
def test_inlier_pairs_are_what_count_inliers_counts(tmp_path, method):
    cfg = LocalFeatureConfig(method=method)
    path, box, copy_path, copy_box = _shifted_copy(tmp_path)
    a = _photos(tmp_path, 1, "fluke", 2)  # another encounter of one animal (few inliers or none)
    b = _photos(tmp_path, 101, "fluke", 1)  # another animal
    photos = ((path, box), (copy_path, copy_box), *a, *b)
    f0, f1, fa1, fa2, fb = (describe(box_patch(p, bx, cfg.size), cfg) for p, bx in photos)
    found = 0
    for one, other in ((f0, f1), (f1, f0), (fa1, fa2), (fa1, fb), (f0, fb)):
        src, dst = inlier_pairs(one, other, cfg)
        assert src.shape == dst.shape == (count_inliers(one, other, cfg), 2)
        # Each pair joins a keypoint of one photo to a keypoint of the other.
        assert all((one.points == p).all(axis=1).any() for p in src) and all((other.points == p).all(axis=1).any() for p in dst)
        found += len(src)
    assert found > 0


def _shifted_copy(tmp_path, dx: int = 23, dy: int = 11) -> tuple[Path, tuple[int, int, int, int], Path, tuple[int, int, int, int]]:
    """A drawn photo and a copy of it cropped by ``(dx, dy)`` at the top left (a shifted
    view of the same marks), each with the animal's box in its own pixels."""
    path, box = _photos(tmp_path, 6, "fluke", 1)[0]
    from PIL import Image

    with Image.open(path) as im:
        copy = im.crop((dx, dy, im.width, im.height))
    copy_path = tmp_path / "copy.png"  # lossless: the copy differs by the shift alone
    copy.save(copy_path)
    return Path(path), box, copy_path, (box[0] - dx, box[1] - dy, box[2] - dx, box[3] - dy)


def _expected_size(q: np.ndarray, g: np.ndarray) -> tuple[int, int]:
    raw_w, raw_h = q.shape[1] + GAP + g.shape[1], max(q.shape[0], g.shape[0])
    return DRAW_WIDTH, round(raw_h * DRAW_WIDTH / raw_w)


def test_a_photo_drawn_against_a_shifted_copy_of_itself_shows_its_inliers(tmp_path):
    cfg = LocalFeatureConfig()
    path, box, copy_path, copy_box = _shifted_copy(tmp_path)
    image, inliers = keypoint_matches(path, box, copy_path, copy_box, cfg)
    q, g = box_patch(path, box, cfg.size), box_patch(copy_path, copy_box, cfg.size)
    assert inliers == count_inliers(describe(q, cfg), describe(g, cfg), cfg) and inliers >= 20
    assert image.mode == "RGB" and image.size == _expected_size(q, g)
    # The lines are drawn in colour over grey patches.
    rgb = np.asarray(image).astype(int)
    assert (np.ptp(rgb, axis=2) > 100).sum() > 50 * inliers

    # No box: the whole photo, as the feature stage takes a photo without a detection.
    whole, n = keypoint_matches(path, None, copy_path, None, cfg)
    assert n >= 10 and whole.width == DRAW_WIDTH


def test_a_photo_drawn_against_noise_has_no_inliers(tmp_path):
    from PIL import Image

    cfg = LocalFeatureConfig()
    path, box, _, _ = _shifted_copy(tmp_path)
    noise_path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420), dtype=np.uint8)).save(noise_path)
    image, inliers = keypoint_matches(path, box, noise_path, None, cfg)
    assert inliers == 0
    q, g = box_patch(path, box, cfg.size), box_patch(noise_path, (0, 0, 420, 300), cfg.size)
    assert image.size == _expected_size(q, g)
    # Nothing drawn: the patches alone, grey, on the grey background.
    assert np.ptp(np.asarray(image).astype(int), axis=2).max() <= 10  # the background: (24, 28, 34)
    assert draw_matches(q, g, (np.zeros((0, 2)), np.zeros((0, 2)))).size == image.size


def test_an_unreadable_photo_is_named(tmp_path):
    cfg = LocalFeatureConfig()
    path, box, _, _ = _shifted_copy(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo at all")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        keypoint_matches(path, box, broken, None, cfg)
    with pytest.raises(ImageReadError, match="missing.jpg"):
        keypoint_matches(tmp_path / "missing.jpg", (0, 0, 10, 10), path, box, cfg)


# ---------------------------------------------------------------- the stored set, with a writer in another process

# A writer process rewriting one split's features forever: generation g holds photos
# ``g<g>_<i>.jpg`` whose every point is g and every descriptor byte g % 251, and one photo
# with many keypoints so that each write takes a while.
_WRITER = """
import sys
from pathlib import Path
import numpy as np
from whale_ml.retrieval.local_features import PhotoFeatures, save_features
from whale_ml.stage_configs import LocalFeatureConfig
folder, start, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = LocalFeatureConfig()
g = start
while count < 0 or g < start + count:
    n = 2 + g % 7
    sizes = [1 + (g + i) % 5 for i in range(n)]
    sizes[0] = 20000
    feats = [PhotoFeatures(np.full((m, 2), g, np.float32), np.full((m, 128), g % 251, np.uint8)) for m in sizes]
    save_features(folder, [f"g{g}_{i}.jpg" for i in range(n)], feats, cfg)
    print(g, flush=True)
    g += 1
"""


def _writer(folder, start: int, count: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(folder), str(start), str(count)], stdout=subprocess.PIPE, text=True, env=env)


def _one_generation(folder) -> int:
    """Read the folder's features and check they are all of one generation; return it."""
    store = FeatureStore([folder])
    g = int(store.images[0].split("_")[0][1:])
    n = 2 + g % 7
    assert store.images == [f"g{g}_{i}.jpg" for i in range(n)], store.images
    for i, image in enumerate(store.images):
        feats = store.get(image)
        assert len(feats) == (20000 if i == 0 else 1 + (g + i) % 5), (g, image, len(feats))
        assert (feats.points == g).all() and (np.asarray(feats.descriptors) == g % 251).all(), (g, image)
    return g


@pytest.mark.slow
def test_a_reader_never_sees_a_mixed_set_while_another_process_rewrites_it(tmp_path):
    folder = tmp_path / "feats"
    first = _writer(folder, 0, 1)
    assert first.wait(60) == 0
    writer = _writer(folder, 1, -1)
    seen: set[int] = set()
    try:
        writer.stdout.readline()  # started and writing (an import on busy cores can take seconds)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(seen) < 10:
            seen.add(_one_generation(folder))
    finally:
        writer.kill()
        writer.wait()
    assert len(seen) >= 3, seen  # the reads overlapped several rewrites
    sets = [p.name for p in (folder / "sets").iterdir() if not p.name.startswith(".")]
    assert len(sets) <= 3, sets  # older sets are swept (the current, the one before, one in flight)


@pytest.mark.kill
def test_a_writer_killed_mid_rewrite_leaves_a_whole_set(tmp_path):
    """kill -9 of a process rewriting the set in a loop, at five moments: each time the set
    read back is one whole generation, and the next write succeeds and sweeps what the dead
    writer left."""
    folder = tmp_path / "feats"
    assert _writer(folder, 0, 1).wait(60) == 0
    rng = np.random.default_rng(0)
    start = 1
    for _ in range(5):
        writer = _writer(folder, start, -1)
        writer.stdout.readline()  # it has written one generation: the next is under way
        time.sleep(float(rng.uniform(0.0, 0.15)))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        g = _one_generation(folder)
        assert g >= start, g
        start = g + 100
    assert _writer(folder, start, 1).wait(60) == 0
    assert _one_generation(folder) == start
    left = sorted(p.name for p in folder.iterdir())
    assert not [n for n in left if n.endswith(".partial")], left
