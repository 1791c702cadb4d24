"""The ensemble gallery builder and the searches of a gallery version (whale_ml.gallery.build,
.search), on a tiny home of random fold embeddings and the stages' records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from whale_ml.stage_configs import GalleryConfig
from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.retrieval.matcher import Matcher
from whale_ml.gallery import LineageError, build_gallery, current_version, fold_ensemble, load_version, match_queries, query_embeddings
from whale_ml.gallery.ledger import LEDGER_COLUMNS, write_ledger
from whale_ml.gallery.lineage import record_boxes, record_crops, record_embeddings
from whale_ml.retrieval.store import save_embeddings
from whale_ml.io import sha256_file
from whale_ml.home import HomeLayout

FOLDS = ["fold0", "fold1"]


def _no_models(lineage: object) -> list:
    raise AssertionError("no enrolled photo needs embedding here: the models must not be fetched")


def _parts(layout: HomeLayout, split: str) -> list[np.ndarray]:
    return [np.load(layout.embeddings_dir(f) / f"{split}.npy") for f in FOLDS]


@pytest.fixture
def home(tmp_path: Path) -> dict:
    """Fold embeddings of 24 training photos of 6 individuals (two species) and 5 test
    photos, and the bboxes, crops and fold embeddings stages' records."""
    layout = HomeLayout(tmp_path)
    rng = np.random.default_rng(0)
    train = pd.DataFrame(
        {
            "image": [f"t{i:02d}.jpg" for i in range(24)],
            "individual_id": [f"ind{i % 6}" for i in range(24)],
            "species": ["orca" if i % 6 < 3 else "beluga" for i in range(24)],
        }
    )
    order = rng.permutation(24)  # the embeddings' row order is not train.csv's
    images = train["image"].to_numpy()[order].tolist()
    tests = [f"q{i}.jpg" for i in range(5)]
    record_boxes(layout, 0.25, 1.2, 64, None)
    record_crops(layout, 64, "pad")
    for k, fold in enumerate(FOLDS):
        save_embeddings(layout.embeddings_dir(fold), "train", rng.normal(size=(24, 4 + k)).astype(np.float32), images)
        save_embeddings(layout.embeddings_dir(fold), "test", rng.normal(size=(5, 4 + k)).astype(np.float32), tests)
        checkpoint = layout.model_dir(fold) / "best.pt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(fold.encode())
        record_embeddings(layout, fold, sha256_file(checkpoint), flip_tta=False)
    crops = pd.DataFrame({"image": [*train["image"], *tests], "crop_path": [f"/crops/{x}" for x in [*train["image"], *tests]]})
    return {"layout": layout, "train": train.sample(frac=1.0, random_state=1), "crops": crops, "images": images, "tests": tests}


def test_build_gallery_writes_the_ensemble_as_the_current_version(home: dict) -> None:
    layout = home["layout"]
    version, stats = build_gallery(layout, FOLDS, home["train"], home["crops"], GalleryConfig(), _no_models)
    parts = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in _parts(layout, "train")]
    want = np.concatenate(parts, axis=1) / np.sqrt(2)
    np.testing.assert_allclose(version.embeddings, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(version.embeddings, axis=1), 1.0, rtol=1e-6)
    truth = home["train"].set_index("image")
    assert version.table["image"].tolist() == home["images"]
    assert version.table["individual_id"].tolist() == truth.loc[home["images"], "individual_id"].tolist()
    assert version.table["species"].tolist() == truth.loc[home["images"], "species"].tolist()
    assert version.table["crop_path"].tolist() == [f"/crops/{x}" for x in home["images"]]
    assert set(version.table["source"]) == {"pipeline"}
    assert current_version(layout) == version.name == "v0001" and load_version(layout).name == "v0001"
    assert version.index.ntotal == 24 and version.info["carried_enrolled"] == 0
    lineage = version.lineage
    assert [m.fold for m in lineage.models] == FOLDS and lineage.index == "flat" and lineage.k == 50
    assert lineage.index_options == {"hnsw_m": 32, "ef_search": 128, "nlist": None, "nprobe": 16, "pq_m": 64, "pq_nbits": 8}
    assert (stats.photos, stats.individuals, stats.models, stats.dimension, stats.index) == (24, 6, FOLDS, 9, "flat")
    assert stats.recall is None and stats.pruned == []


def test_query_embeddings_are_the_folds_test_ensemble_of_the_versions_models(home: dict) -> None:
    layout = home["layout"]
    version, _ = build_gallery(layout, FOLDS, home["train"], home["crops"], GalleryConfig(), _no_models)
    queries, images = query_embeddings(layout, version)
    parts = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in _parts(layout, "test")]
    np.testing.assert_allclose(queries, np.concatenate(parts, axis=1) / np.sqrt(2), rtol=1e-6, atol=1e-7)
    assert images == home["tests"] and queries.dtype == np.float32
    assert np.array_equal(queries, fold_ensemble(layout, FOLDS, "test")[0])
    # fold1 re-embedded by another checkpoint since: its test vectors would not match the gallery's.
    other = layout.model_dir("fold1") / "retrained.pt"
    other.write_bytes(b"another model")
    record_embeddings(layout, "fold1", sha256_file(other), flip_tta=False)
    with pytest.raises(LineageError, match="fold1 embeddings were not made by the model gallery v0001 was built with"):
        query_embeddings(layout, version)


def test_folds_embedded_on_other_images_are_refused(home: dict) -> None:
    layout = home["layout"]
    emb = np.load(layout.embeddings_dir("fold1") / "train.npy")
    save_embeddings(layout.embeddings_dir("fold1"), "train", emb[:-1], home["images"][:-1])
    with pytest.raises(ValueError, match="fold1's embeddings cover other images than fold0's"):
        build_gallery(layout, FOLDS, home["train"], home["crops"], GalleryConfig(), _no_models)
    assert current_version(layout) is None


def test_approximate_index_recall_settings_and_pruning(home: dict) -> None:
    layout = home["layout"]
    build_gallery(layout, FOLDS, home["train"], home["crops"], GalleryConfig(), _no_models)
    settings = GalleryConfig(index="hnsw", hnsw_m=8, ef_search=16, k=7, keep_versions=1)
    version, stats = build_gallery(layout, FOLDS, home["train"], home["crops"], settings, _no_models)
    assert version.name == "v0002" and stats.pruned == ["v0001"]
    assert not (layout.gallery_versions_dir / "v0001").exists()
    assert version.lineage.index == "hnsw" and version.lineage.k == 7
    assert version.lineage.index_options["hnsw_m"] == 8 and version.lineage.index_options["ef_search"] == 16
    assert version.index.hnsw.efSearch == 16
    assert stats.recall is not None and stats.recall["queries"] == 5 and 0.0 <= stats.recall["individual_recall_at_k"] <= 1.0


def test_a_faiss_factory_string_is_a_gallery_index_like_a_preset(home: dict) -> None:
    """GalleryConfig.index takes any faiss index_factory string: built, searched with the
    configured nprobe, recorded in the lineage, and a bad one fails naming itself."""
    from whale_ml.retrieval.faiss_import import faiss

    layout = home["layout"]
    settings = GalleryConfig(index="IVF2,SQ8", nprobe=2)
    version, stats = build_gallery(layout, FOLDS, home["train"], home["crops"], settings, _no_models)
    assert version.lineage.index == "IVF2,SQ8" and stats.index == "IVF2,SQ8"
    assert stats.recall is not None and stats.recall["queries"] == 5
    loaded = load_version(layout)  # read back from index.faiss: the search settings went with it
    assert loaded.index.ntotal == 24 and faiss.extract_index_ivf(loaded.index).nprobe == 2
    matches = match_queries(loaded, query_embeddings(layout, loaded)[0], Matcher(0.3))
    assert len(matches.predictions) == 5 and all(len(set(p)) == 5 for p in matches.predictions)
    with pytest.raises(ValueError, match="faiss cannot build index 'IVF2,Flatt'"):
        build_gallery(layout, FOLDS, home["train"], home["crops"], GalleryConfig(index="IVF2,Flatt"), _no_models)
    assert current_version(layout) == version.name  # the failed build left the current version alone


def test_enrolled_photos_already_in_the_fold_embeddings_are_marked_not_embedded_again(home: dict) -> None:
    layout = home["layout"]
    enrolled = home["images"][:2]
    write_ledger(layout, pd.DataFrame({c: [""] * 2 for c in LEDGER_COLUMNS}).assign(image=enrolled, individual_id="ind0"))
    version, stats = build_gallery(layout, FOLDS, home["train"], home["crops"], GalleryConfig(), _no_models)
    assert stats.carried_enrolled == 0 and len(version.table) == 24
    assert version.table.loc[version.table["source"] == "enrolled", "image"].tolist() == enrolled
    assert version.info["enrolled_photos"] == 2


def _brute_force_predictions(
    version: object, queries: np.ndarray, threshold: float, by_species: dict[str, float], lead_weight: float = 0.0
) -> list[list[str]]:
    """Every gallery photo compared in float64, best similarity per individual, the rule by hand
    (with a lead weight: the first individual judged by s1 + lead_weight * (s1 - s2))."""
    table = version.table
    species_of = dict(zip(table["individual_id"], table["species"], strict=True))
    out = []
    for q in queries / np.linalg.norm(queries, axis=1, keepdims=True):
        best: dict[str, float] = {}
        for row, ind in enumerate(table["individual_id"]):
            best[ind] = max(best.get(ind, -np.inf), float(version.embeddings[row].astype(np.float64) @ q))
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:5]
        cut = by_species.get(species_of[ranked[0][0]], threshold)
        if ranked[0][1] + lead_weight * (ranked[0][1] - ranked[1][1]) < cut:
            out.append([NEW_INDIVIDUAL] + [ind for ind, _ in ranked][:4])
            continue
        above = [ind for ind, sim in ranked[1:] if sim >= cut]
        out.append(([ranked[0][0], *above, NEW_INDIVIDUAL] + [ind for ind, sim in ranked[1:] if sim < cut])[:5])
    return out


@pytest.mark.parametrize(("by_species", "lead_weight"), [({}, 0.0), ({"orca": -1.0}, 0.0), ({"beluga": 1.5, "orca": 0.2}, 0.0), ({}, 2.0)])
def test_match_queries_against_brute_force(home: dict, by_species: dict[str, float], lead_weight: float) -> None:
    layout = home["layout"]
    version, _ = build_gallery(layout, FOLDS, home["train"], home["crops"], GalleryConfig(k=3), _no_models)
    queries, _ = query_embeddings(layout, version)
    queries = np.concatenate([queries, version.embeddings[:4]])  # and gallery photos, which find themselves
    threshold = 0.3
    if lead_weight:  # between a query's best similarity and its decision score: the lead_weight makes it known
        plain = match_queries(version, queries, Matcher(threshold))
        lead = plain.sims[:, 0] - plain.sims[:, 1]
        q = int(np.argmax(lead))
        threshold = float(plain.sims[q, 0] + lead_weight * lead[q] / 2)
        assert plain.sims[q, 0] < threshold < plain.sims[q, 0] + lead_weight * lead[q]
    matches = match_queries(version, queries, Matcher(threshold, by_species, lead_weight=lead_weight))
    assert matches.predictions == _brute_force_predictions(version, queries, threshold, by_species, lead_weight)
    if lead_weight:
        assert matches.lead_weight == lead_weight and matches.predictions[q][0] == matches.ids[q, 0] != NEW_INDIVIDUAL
        assert match_queries(version, queries, Matcher(threshold)).predictions[q][0] == NEW_INDIVIDUAL
    assert matches.sims.shape == matches.ids.shape == (9, 5)
    np.testing.assert_allclose(matches.sims[5:, 0], 1.0, atol=1e-5)
    species_of = dict(zip(version.table["individual_id"], version.table["species"], strict=True))
    assert matches.thresholds.tolist() == [by_species.get(species_of[i], threshold) for i in matches.ids[:, 0]]


def test_the_release_round_s_gallery_records_the_home_s_release(home: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A home without ``release.json`` serves round 1. A gallery built as the release records
    its round (while it still holds the catalogue's writer lock), and the release resolves
    to that round's paths and gallery; a round built before the release leaves it alone."""
    import shutil

    import whale_ml.gallery.build as build
    from whale_ml.gallery.catalogue import LOCK_FILE, _held
    from whale_ml.gallery.release import Release, ReleasePointerError, read_release, record_release
    from whale_ml.io import read_json

    layout = home["layout"]
    second = layout.in_round("round2")
    for part in ("embeddings", "models"):  # round 2's fold models and embeddings (the same, for the test)
        shutil.copytree(layout.home / part, second.round_home / part)
    recorded = []

    def record_under_the_lock(at: HomeLayout, number: int) -> None:
        recorded.append((number, _held.get(str(at.home / LOCK_FILE), 0)))
        record_release(at, number)

    monkeypatch.setattr(build, "record_release", record_under_the_lock)
    args = (FOLDS, home["train"], home["crops"], GalleryConfig(), _no_models)

    assert read_release(layout) == Release(1, layout)
    build_gallery(layout, *args)  # round 1 of two: not the release
    assert not layout.release_pointer.exists() and recorded == []
    version, _ = build_gallery(second, *args, release=2)
    assert recorded == [(2, 1)]  # recorded with the writer lock held
    assert read_json(layout.release_pointer) == {"round": 2}
    release = read_release(second)  # from any round's layout: the pointer is the home's
    assert release == Release(2, second) and release.layout.gallery_dir == layout.home / "rounds" / "round2" / "gallery"
    assert load_version(release.layout).name == version.name and version.folder.is_relative_to(second.round_home)
    build_gallery(layout, *args, release=1)  # a one-round graph again: round 1 is the release
    assert read_release(layout) == Release(1, layout)
    with pytest.raises(ValueError, match="round 2 is not the first round"):
        record_release(layout, 2)
    layout.release_pointer.write_text('{"round": "two"}')
    with pytest.raises(ReleasePointerError, match="release.json: 'round' should be a round number"):
        read_release(layout)
