"""The faiss gallery search, the embedding store and gallery versions (whale_ml.retrieval.faiss_index /
.store / .review, whale_ml.gallery.versions)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from whale_ml.retrieval import store
from whale_ml.retrieval.faiss_import import faiss
from whale_ml.retrieval.faiss_index import build_index, index_recall, l2_normalise, load_index, save_index, search_gallery


def _brute_force(gallery: np.ndarray, gallery_ids: np.ndarray, queries: np.ndarray, top: int = 5):
    """Cosine similarity in numpy, then the first ``top`` distinct individuals per query."""
    g = l2_normalise(gallery).astype(np.float64)
    q = l2_normalise(queries).astype(np.float64)
    sims = q @ g.T
    out_sims = np.full((len(q), top), -np.inf)
    out_ids = np.full((len(q), top), "", dtype=object)
    for row in range(len(q)):
        seen: list[str] = []
        for j in np.argsort(-sims[row], kind="stable"):
            if gallery_ids[j] in seen:
                continue
            out_sims[row, len(seen)] = sims[row, j]
            out_ids[row, len(seen)] = gallery_ids[j]
            seen.append(gallery_ids[j])
            if len(seen) == top:
                break
    return out_sims, out_ids


def _assert_same_ranking(sims, ids, ref_sims, ref_ids, atol: float = 1e-5) -> None:
    """Same similarities, and same ids except where two neighbours are tied within float32 noise."""
    np.testing.assert_allclose(sims, ref_sims, atol=atol)
    for row in range(len(ids)):
        for col in range(ids.shape[1]):
            if ids[row, col] == ref_ids[row, col]:
                continue
            near = np.abs(ref_sims[row] - ref_sims[row, col]) <= atol
            assert ids[row, col] in set(ref_ids[row, near]), (row, col, ids[row], ref_ids[row])


def _random_gallery(seed: int, n: int = 200, n_ind: int = 40, d: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ind, d))
    owner = rng.integers(0, n_ind, size=n)
    gallery = centres[owner] + 0.8 * rng.normal(size=(n, d))
    ids = np.array([f"ind{o:02d}" for o in owner], dtype=object)
    queries = centres[rng.integers(0, n_ind, size=20)] + 0.8 * rng.normal(size=(20, d))
    return gallery, ids, queries


@pytest.mark.parametrize("k", [5, 10, 50])
@pytest.mark.parametrize("seed", [0, 1])
def test_search_matches_brute_force(seed: int, k: int) -> None:
    """faiss search + collapse = numpy cosine + collapse, for shallow and deep first searches."""
    gallery, ids, queries = _random_gallery(seed)
    index = build_index(gallery)
    sims, got_ids = search_gallery(index, ids, queries, k=k)
    ref_sims, ref_ids = _brute_force(gallery, ids, queries)
    assert sims.shape == got_ids.shape == (20, 5)
    _assert_same_ranking(sims, got_ids, ref_sims, ref_ids)
    # Five distinct individuals per query, best first.
    assert all(len(set(row)) == 5 and "" not in row for row in got_ids)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_search_goes_deeper_when_one_individual_fills_the_neighbours() -> None:
    """60 near-identical photos of one whale fill the first k: the search digs for 5 individuals."""
    rng = np.random.default_rng(3)
    d = 8
    eye = np.eye(d)
    big = eye[0] + 0.01 * rng.normal(size=(60, d))
    others = np.stack([eye[i] + 0.1 * (6 - i) * eye[0] for i in range(1, 6)])
    gallery = np.concatenate([big, others])
    ids = np.array(["big"] * 60 + [f"o{i}" for i in range(1, 6)], dtype=object)
    query = eye[0][None, :]
    sims, got = search_gallery(build_index(gallery), ids, query, k=10)
    assert got[0].tolist() == ["big", "o1", "o2", "o3", "o4"]
    ref_sims, ref_ids = _brute_force(gallery, ids, query)
    _assert_same_ranking(sims, got, ref_sims, ref_ids)


def test_search_small_gallery_is_padded() -> None:
    """A gallery of three individuals gives three ids then '' / -inf padding."""
    rng = np.random.default_rng(4)
    gallery = rng.normal(size=(9, 6))
    ids = np.array(["a", "b", "c"] * 3, dtype=object)
    sims, got = search_gallery(build_index(gallery), ids, rng.normal(size=(4, 6)), k=2)
    for row_ids, row_sims in zip(got, sims, strict=True):
        assert sorted(row_ids[:3]) == ["a", "b", "c"]
        assert row_ids[3:].tolist() == ["", ""]
        assert np.all(np.isfinite(row_sims[:3]))
        assert np.all(np.isneginf(row_sims[3:]))


def test_search_rejects_mismatched_gallery_ids() -> None:
    """The id list must have one entry per indexed vector."""
    index = build_index(np.eye(4))
    with pytest.raises(ValueError, match="gallery ids"):
        search_gallery(index, np.array(["a", "b", "c"], dtype=object), np.eye(4)[:1])


def test_l2_normalise_unit_rows_float32() -> None:
    """Rows come back unit length and float32; a zero row stays finite."""
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    y = l2_normalise(x)
    assert y.dtype == np.float32 and y.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(y[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(y[1], [0.0, 0.0])
    np.testing.assert_allclose(np.linalg.norm(y[[0, 2]], axis=1), 1.0, rtol=1e-6)


def test_index_save_load_round_trip(tmp_path: Path) -> None:
    """A saved index answers the same searches after loading."""
    gallery, ids, queries = _random_gallery(7, n=50, n_ind=10)
    index = build_index(gallery)
    path = save_index(index, tmp_path / "idx" / "gallery.faiss")
    loaded = load_index(path)
    a = search_gallery(index, ids, queries)
    b = search_gallery(loaded, ids, queries)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert [p.name for p in path.parent.iterdir()] == ["gallery.faiss"]


# ---------------------------------------------------------------- approximate indexes


def _clustered(seed: int, n: int = 3000, n_ind: int = 300, d: int = 32, n_q: int = 200):
    """Photos scattered around one centre per individual, queries near random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ind, d))
    owner = rng.integers(0, n_ind, size=n)
    gallery = centres[owner] + 0.3 * rng.normal(size=(n, d))
    queries = centres[rng.integers(0, n_ind, size=n_q)] + 0.3 * rng.normal(size=(n_q, d))
    return gallery.astype(np.float32), np.array([f"ind{o:03d}" for o in owner], dtype=object), queries.astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall_against_flat(kind: str, tmp_path: Path) -> None:
    """HNSW and IVF find (nearly) what flat finds on clustered data, and keep their settings through save/load."""
    gallery, ids, queries = _clustered(0)
    index = build_index(gallery, kind, ef_search=64, nprobe=8)
    recall = index_recall(index, gallery, ids, queries)
    assert recall["queries"] == len(queries) and recall["k"] == 5
    assert recall["image_recall_at_k"] >= 0.9
    assert recall["individual_recall_at_k"] >= 0.8
    # The recall is measured, not assumed: a one-cell probe of a many-cell IVF loses neighbours.
    if kind == "ivf":
        poor = build_index(gallery, "ivf", nlist=64, nprobe=1)
        assert index_recall(poor, gallery, ids, queries)["image_recall_at_k"] < recall["image_recall_at_k"]
    loaded = load_index(save_index(index, tmp_path / f"{kind}.faiss"))
    np.testing.assert_array_equal(search_gallery(index, ids, queries)[1], search_gallery(loaded, ids, queries)[1])
    # Predictions keep five distinct individuals, searching deeper through the approximate index too.
    _, got = search_gallery(loaded, ids, queries, k=5)
    assert all(len(set(row)) == 5 and "" not in row for row in got)


def test_ivfpq_compresses_and_keeps_most_of_flats_neighbours(tmp_path: Path) -> None:
    """IVF-PQ stores pq_m codes per photo instead of the vector: a fraction of flat's bytes,
    most of its top-5, and more of it with more codes; settings survive save/load."""
    gallery, ids, queries = _clustered(0)
    index = build_index(gallery, "ivfpq", nprobe=8, pq_m=16, pq_nbits=6)
    recall = index_recall(index, gallery, ids, queries)
    assert recall["image_recall_at_k"] >= 0.6 and recall["individual_recall_at_k"] >= 0.6
    coarse = build_index(gallery, "ivfpq", nprobe=8, pq_m=2, pq_nbits=6)
    assert index_recall(coarse, gallery, ids, queries)["image_recall_at_k"] < recall["image_recall_at_k"]
    flat_bytes = save_index(build_index(gallery), tmp_path / "flat.faiss").stat().st_size
    loaded = load_index(save_index(index, tmp_path / "ivfpq.faiss"))
    assert (tmp_path / "ivfpq.faiss").stat().st_size < flat_bytes / 2
    assert loaded.nprobe == 8
    np.testing.assert_array_equal(search_gallery(index, ids, queries)[1], search_gallery(loaded, ids, queries)[1])


def test_ivfpq_rejects_settings_it_cannot_build() -> None:
    gallery, _, _ = _clustered(1, n=500, n_ind=50, n_q=5)
    with pytest.raises(ValueError, match="pq_m=5 must divide the embedding dimension 32"):
        build_index(gallery, "ivfpq", pq_m=5)
    with pytest.raises(ValueError, match="500 gallery vectors cannot train 1024 codes"):
        build_index(gallery, "ivfpq", pq_m=8, pq_nbits=10)


def test_flat_index_recall_is_one() -> None:
    gallery, ids, queries = _clustered(1, n=500, n_ind=50, n_q=40)
    recall = index_recall(build_index(gallery), gallery, ids, queries)
    assert recall["image_recall_at_k"] == recall["individual_recall_at_k"] == 1.0


def test_index_recall_samples_queries() -> None:
    gallery, ids, queries = _clustered(2, n=500, n_ind=50, n_q=40)
    assert index_recall(build_index(gallery, "hnsw"), gallery, ids, queries, max_queries=10)["queries"] == 10


def test_build_index_rejects_a_string_faiss_cannot_build_naming_it() -> None:
    cannot_parse = r"faiss cannot build index 'annoy' for 4-dimensional embeddings: could not parse index string annoy"
    with pytest.raises(ValueError, match=cannot_parse):
        build_index(np.eye(4), "annoy")
    gallery, _, _ = _clustered(1, n=500, n_ind=50, n_q=5)
    with pytest.raises(ValueError, match=r"faiss cannot build index 'PQ5'.*multiple of the number of subquantizers"):
        build_index(gallery, "PQ5")
    too_few = r"faiss cannot train index 'IVF1024,Flat' on 500 gallery vectors: .*at least as large as number of clusters"
    with pytest.raises(ValueError, match=too_few):
        build_index(gallery, "IVF1024,Flat")
    with pytest.raises(ValueError, match="empty index kind"):
        build_index(gallery, " ")


def test_each_preset_is_its_factory_string() -> None:
    """A preset builds exactly the index of the factory string it names (same searches, same settings)."""
    from whale_ml.retrieval.faiss_index import factory_string

    gallery, ids, queries = _clustered(4, n=1200, n_ind=120, d=16, n_q=50)
    options = {"hnsw_m": 8, "nlist": 16, "pq_m": 4, "pq_nbits": 4}
    expected = {"flat": "Flat", "hnsw": "HNSW8,Flat", "ivf": "IVF16,Flat", "ivfpq": "IVF16,PQ4x4"}
    for kind, spec in expected.items():
        assert factory_string(kind, len(gallery), gallery.shape[1], **options) == spec
        preset, spelled = build_index(gallery, kind, nprobe=4, **options), build_index(gallery, spec, nprobe=4)
        assert type(preset) is type(spelled) and preset.ntotal == spelled.ntotal == len(gallery)
        got = search_gallery(preset, ids, queries)
        if kind != "hnsw":  # the hnsw preset builds with a longer candidate list (efConstruction) than faiss's default
            want = search_gallery(spelled, ids, queries)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert factory_string("IVF256,SQ8", 10, 32) == "IVF256,SQ8"  # anything else is passed to faiss as it is


def _separable(seed: int, n: int = 600, n_ind: int = 60, d: int = 16, n_q: int = 200):
    """Like ``_clustered`` with a tenth of the spread: every individual a tight cluster far from the rest."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ind, d))
    owner = rng.integers(0, n_ind, size=n)
    truth = rng.integers(0, n_ind, size=n_q)
    gallery = centres[owner] + 0.03 * rng.normal(size=(n, d))
    queries = centres[truth] + 0.03 * rng.normal(size=(n_q, d))
    names = np.array([f"ind{o:03d}" for o in range(n_ind)], dtype=object)
    return gallery.astype(np.float32), names[owner], queries.astype(np.float32), names[truth]


@pytest.fixture
def one_faiss_thread() -> Iterator[None]:
    """faiss on one OpenMP thread for the test: OPQ trains its rotation through hundreds of
    tiny k-means, whose parallel regions cost more in OpenMP barriers than they compute on
    a busy 2-core machine (measured: 14 s of CPU on 2 threads, 1.2 s on one)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize(
    "spec",
    [
        "OPQ4,IVF8,PQ8x4",  # a learned rotation before a product quantiser
        "IVF8,SQ8",  # one byte per dimension
        "IVF8_HNSW16,Flat",  # an HNSW graph as the coarse quantiser (nprobe and its efSearch)
    ],
)
def test_factory_strings_build_search_and_find_the_right_individual(spec: str, tmp_path: Path, one_faiss_thread: None) -> None:
    """Any faiss index_factory string: trained, searched with nprobe set, saved and loaded;
    on a separable gallery it finds each query's own individual first and keeps most of flat's top-5."""
    gallery, ids, queries, truth = _separable(5)
    index = build_index(gallery, spec, nprobe=4, ef_search=32)
    ivf = faiss.extract_index_ivf(index)
    assert index.is_trained and index.ntotal == len(gallery) and ivf.nlist == 8 and ivf.nprobe == 4
    if "HNSW" in spec:
        assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 32
    _, got = search_gallery(index, ids, queries)
    assert np.mean(got[:, 0] == truth) >= 0.97
    assert all(len(set(row)) == 5 for row in got)
    recall = index_recall(index, gallery, ids, queries)
    assert recall["individual_recall_at_k"] >= 0.5
    loaded = load_index(save_index(index, tmp_path / "index.faiss"))
    assert faiss.extract_index_ivf(loaded).nprobe == 4
    np.testing.assert_array_equal(search_gallery(loaded, ids, queries)[1], got)


# ---------------------------------------------------------------- store


def test_embeddings_round_trip(tmp_path: Path) -> None:
    """save/load keeps the matrix (as float32) and the image order, names kept as text."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 7))
    images = ["0012.jpg", "b.jpg", "a.jpg", "NA", "007"]
    path = store.save_embeddings(tmp_path / "emb", "train", emb, images)
    assert path == tmp_path / "emb" / "train.npy"
    loaded, names = store.load_embeddings(tmp_path / "emb", "train")
    assert names == images
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, emb.astype(np.float32))
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["train.npy", "train_images.csv"]


def test_save_embeddings_length_mismatch(tmp_path: Path) -> None:
    """One image name per row."""
    with pytest.raises(ValueError):
        store.save_embeddings(tmp_path, "x", np.zeros((3, 2)), ["a", "b"])


def test_load_embeddings_detects_mismatched_files(tmp_path: Path) -> None:
    """A matrix and an image list of different lengths are refused on load."""
    store.save_embeddings(tmp_path, "x", np.zeros((3, 2)), ["a", "b", "c"])
    np.save(tmp_path / "x.npy", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        store.load_embeddings(tmp_path, "x")


def test_ensemble_cosine_is_mean_of_model_cosines() -> None:
    """Ensembled vectors are unit length and their cosine is the mean of per-model cosines."""
    rng = np.random.default_rng(1)
    a1, b1 = rng.normal(size=(6, 4)) * 3, rng.normal(size=(5, 4))
    a2, b2 = rng.normal(size=(6, 9)), rng.normal(size=(5, 9)) * 0.1
    a3, b3 = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
    ens_a = store.ensemble([a1, a2, a3])
    ens_b = store.ensemble([b1, b2, b3])
    assert ens_a.shape == (6, 16) and ens_a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ens_a, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ens_b, axis=1), 1.0, rtol=1e-6)

    def cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return x @ y.T

    expected = (cos(a1, b1) + cos(a2, b2) + cos(a3, b3)) / 3
    np.testing.assert_allclose(ens_a.astype(np.float64) @ ens_b.T.astype(np.float64), expected, atol=1e-6)


def test_ensemble_of_one_is_the_normalised_model() -> None:
    """A single model's ensemble is just its normalised embeddings."""
    x = np.random.default_rng(2).normal(size=(4, 5))
    np.testing.assert_allclose(store.ensemble([x]), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)


def test_ensemble_of_nothing_raises() -> None:
    """An empty model list is an error."""
    with pytest.raises(ValueError):
        store.ensemble([])


def test_best_photo_per_candidate_points_at_the_most_similar_photo() -> None:
    from whale_ml.retrieval.faiss_index import best_photo_per_candidate
    from whale_ml.retrieval.review import review_sheet

    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    ids = np.array(["a", "b", "b", "c"], dtype=object)
    (found,) = best_photo_per_candidate(gallery, ids, np.array([[0.0, 1.0]]), [["b", "new_individual", "c", "zz", ""]])
    assert found[0] == (2, pytest.approx(1.0))  # b's photo 2, not photo 1
    assert [f[0] for f in found[1:2] + found[3:]] == [-1, -1, -1]  # new_individual, an unknown id, padding
    assert all(np.isnan(f[1]) for f in found[1:2] + found[3:])
    assert found[2] == (3, pytest.approx(0.8))
    preds, matches = [["b", "new_individual", "c", "zz", "a"]], [[*found[:4], (0, 0.0)]]
    sheet = review_sheet(["/nonexistent.jpg"], preds, matches, ["/x"] * 4, ["b"], tile=32)
    assert sheet.size == (6 * 32, 32 + 14)  # unreadable photos are framed, not fatal


@pytest.mark.parametrize("seed", range(5))
def test_best_photo_per_candidate_against_brute_force(seed: int) -> None:
    """Random galleries: each candidate's row is the argmax of the similarity over that
    individual's rows, found by looping over every gallery row."""
    from whale_ml.retrieval.faiss_index import best_photo_per_candidate

    rng = np.random.default_rng(seed)
    gallery = l2_normalise(rng.normal(size=(40, 6)))
    ids = rng.choice(["a", "b", "c", "d", "e", "f"], size=40).astype(object)
    queries = l2_normalise(rng.normal(size=(7, 6)))
    candidates = [list(rng.choice(["a", "b", "c", "d", "e", "f", "new_individual"], size=5, replace=False)) for _ in queries]
    found = best_photo_per_candidate(gallery, ids, queries, candidates)
    for q, (query, cands) in enumerate(zip(queries, candidates, strict=True)):
        for c, ind in enumerate(cands):
            best_row, best_sim = -1, float("nan")
            for row in range(len(gallery)):
                sim = float(gallery[row] @ query)
                if ids[row] == ind and (best_row < 0 or sim > best_sim):
                    best_row, best_sim = row, sim
            assert found[q][c][0] == best_row
            assert found[q][c][1] == pytest.approx(best_sim, abs=1e-6) if best_row >= 0 else np.isnan(found[q][c][1])


def test_best_photo_per_candidate_empty_gallery_and_mismatch() -> None:
    from whale_ml.retrieval.faiss_index import best_photo_per_candidate

    assert best_photo_per_candidate(np.zeros((0, 3)), np.array([], dtype=object), np.ones((1, 3)), [["a"]])[0][0][0] == -1
    with pytest.raises(ValueError, match="2 gallery embeddings for 1 ids"):
        best_photo_per_candidate(np.zeros((2, 3)), np.array(["a"], dtype=object), np.ones((1, 3)), [["a"]])


def test_sample_review_draws_the_same_queries_every_time(tmp_path: Path) -> None:
    from PIL import Image

    from whale_ml.retrieval.review import sample_review

    crop = tmp_path / "c.jpg"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(crop)
    gallery = np.eye(3, dtype=np.float32)
    ids = np.array(["a", "b", "c"], dtype=object)
    names = [f"q{i}.jpg" for i in range(12)]
    queries = np.tile(gallery, (4, 1))
    preds = [[ids[i % 3], "new_individual", "x", "y", "z"] for i in range(12)]
    args = (names, queries, preds, dict.fromkeys(names, str(crop)), gallery, ids, [str(crop)] * 3)
    sheet = sample_review(*args, truth_of={"q0.jpg": "a"}, n=5)
    assert sheet is not None and sheet.size == (6 * 112, 5 * (112 + 14))
    assert np.array_equal(np.asarray(sheet), np.asarray(sample_review(*args, truth_of={"q0.jpg": "a"}, n=5)))  # seeded
    assert sample_review([], queries[:0], [], {}, gallery, ids, [str(crop)] * 3) is None


def _write_versions(home: Path, n: int) -> object:
    """``n`` real gallery versions (index, embeddings, table) of random unit vectors."""
    import pandas as pd

    from whale_ml.gallery import FoldModel, GalleryLineage, write_version
    from whale_ml.home import HomeLayout

    layout = HomeLayout(home)
    lineage = GalleryLineage(
        models=[FoldModel(fold="fold0", checkpoint_sha256="0" * 64)],
        detector_sha256=None,
        detector_imgsz=64,
        min_confidence=0.25,
        expand=1.2,
        crop_size=64,
        resize="pad",
    )
    rng = np.random.default_rng(0)
    for i in range(n):
        rows = 4 + i
        table = pd.DataFrame(
            {"image": [f"p{j}.jpg" for j in range(rows)], "individual_id": "a", "species": "s", "crop_path": "", "source": "pipeline"}
        )
        write_version(layout, table, l2_normalise(rng.normal(size=(rows, 8)).astype(np.float32)), lineage, made_by="test")
    return layout


def test_prune_keeps_the_newest_versions_and_always_the_current_one(tmp_path: Path) -> None:
    from whale_ml.gallery import list_versions, load_version, prune_versions
    from whale_ml.io import write_json

    layout = _write_versions(tmp_path, 5)
    # A user pointed current.json back at v0002 (a rollback): pruning must never take it.
    write_json(layout.gallery_versions_dir / "current.json", {"version": "v0002"})
    assert prune_versions(layout, 2, dry_run=True) == ["v0001", "v0003"]
    assert len(list_versions(layout)) == 5, "a dry run deletes nothing"
    assert prune_versions(layout, 2) == ["v0001", "v0003"]
    assert list_versions(layout)["version"].tolist() == ["v0002", "v0004", "v0005"]
    assert sorted(p.name for p in layout.gallery_versions_dir.iterdir()) == ["current.json", "v0002", "v0004", "v0005"]
    for name, rows in (("v0002", 5), ("v0004", 7), ("v0005", 8)):  # what is left still loads whole
        version = load_version(layout, name)
        assert version.index.ntotal == len(version.table) == rows
    assert prune_versions(layout, 10) == []
    with pytest.raises(ValueError, match="at least 1"):
        prune_versions(layout, 0)


@pytest.mark.slow
def test_prune_gallery_command(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    _write_versions(tmp_path, 3)
    env = {**os.environ, "WHALE_HOME": str(tmp_path)}

    def whale(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "whale_assets.cli", *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    done = whale("prune-gallery", "--keep", "1", "--dry-run")
    assert done.returncode == 0 and "would delete 2 gallery version(s): v0001, v0002; kept v0003" in done.stdout
    assert (tmp_path / "gallery" / "versions" / "v0001").is_dir()
    done = whale("prune-gallery", "--keep", "1")
    assert done.returncode == 0 and "deleted 2 gallery version(s): v0001, v0002; kept v0003" in done.stdout
    assert not (tmp_path / "gallery" / "versions" / "v0001").exists()
    done = whale("prune-gallery", "--keep", "0")
    assert done.returncode == 2 and "--keep must be at least 1" in done.stderr


def test_index_options_are_build_index_keywords_and_gallery_settings() -> None:
    """The gallery settings reach build_index by these names: a renamed option on either side fails here."""
    import inspect

    from whale_ml.stage_configs import GalleryConfig
    from whale_ml.retrieval.faiss_index import INDEX_OPTIONS

    keywords = [p.name for p in inspect.signature(build_index).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert sorted(INDEX_OPTIONS) == sorted(set(keywords) - {"seed"})
    assert set(INDEX_OPTIONS) <= set(GalleryConfig.model_fields)


def test_an_unreadable_current_version_falls_back_to_the_newest_whole_one(tmp_path: Path) -> None:
    """What a power cut without flushing could leave: ``current.json`` naming a version whose
    files are empty. The default reader answers with the newest whole version and says which
    it could not read; a version asked for by name raises, naming it."""
    from whale_ml.gallery import LineageError, load_version
    from whale_ml.gallery.versions import BrokenVersionError

    layout = _write_versions(tmp_path, 3)
    (layout.gallery_versions_dir / "v0003" / "embeddings.npy").write_bytes(b"")
    (layout.gallery_versions_dir / "v0002" / "gallery.csv").write_text("image\n")  # whole files, but not one version
    version = load_version(layout)
    assert (version.name, version.fallback_from, len(version.table)) == ("v0001", "v0003", 4)
    with pytest.raises(BrokenVersionError, match="gallery version v0003 .* cannot be read"):
        load_version(layout, "v0003")
    with pytest.raises(BrokenVersionError, match="gallery version v0002 .* is not whole: 0 rows, 5 embeddings"):
        load_version(layout, "v0002")
    assert issubclass(BrokenVersionError, LineageError)  # the commands report it as they report a missing gallery


def test_publishing_flushes_the_staged_version_before_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file of a version, and its folder, reach the disk before the version gets its
    name, and the versions folder after: the order a power cut needs."""
    import whale_ml.gallery.versions as versions
    import whale_ml.io as io

    events: list[str] = []
    for module in (io, versions):  # the staged folder is flushed by io.flush_tree, the versions folder here
        monkeypatch.setattr(module, "fsync_dir", lambda p: events.append(f"dir {Path(p).name}") or True)
    monkeypatch.setattr(io, "fsync_file", lambda p: events.append(f"file {Path(p).name}"))
    real_rename = versions.os.rename
    monkeypatch.setattr(versions.os, "rename", lambda a, b: events.append(f"rename {Path(b).name}") or real_rename(a, b))
    monkeypatch.setenv("WHALE_FSYNC", "1")
    _write_versions(tmp_path, 1)
    rename = events.index("rename v0001")
    flushed = {e.split()[1] for e in events[:rename] if e.startswith("file ")}
    assert {"index.faiss", "embeddings.npy", "gallery.csv", "version.json"} <= flushed
    assert any(e.startswith("dir .staging") for e in events[:rename]) and events[rename + 1] == "dir versions"
