"""The faiss index under a gallery: inner-product search on L2-normalised embeddings.

Exact (flat) by default; HNSW, IVF or IVF-PQ (compressed) as options for
galleries past ~1M images, with :func:`index_recall` to measure what they lose.

Searches return neighbours already collapsed per individual (best similarity
per individual), and search deeper for the queries whose first ``k``
neighbours hold too few individuals, so that every query gets five distinct
ids whenever the gallery has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from whale_ml.retrieval.faiss_import import faiss
import numpy as np

from whale_ml.io import atomic_path
from whale_ml.retrieval.ranking import TOP, collapse_by_individual


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as contiguous float32 (what faiss wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
# build_index's options of the index itself, as GalleryConfig names them (a gallery
# version's lineage records them, so that a rebuilt index is the same).
INDEX_OPTIONS = ("hnsw_m", "ef_search", "nlist", "nprobe", "pq_m", "pq_nbits")
_ADD_BLOCK = 65_536  # rows normalised and added at a time (128 MiB at 512 dimensions)


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    *,
    hnsw_m: int = 32,
    ef_search: int = 128,
    nlist: int | None = None,
    nprobe: int = 16,
    pq_m: int = 64,
    pq_nbits: int = 8,
    seed: int = 0,
) -> faiss.Index:
    """An inner-product index of normalised embeddings (cosine similarity).

    Args:
        embeddings: (n, d) gallery embeddings (normalised here).
        kind: ``"flat"`` (exact; the default, and right up to ~1M images),
            ``"hnsw"`` (graph, no training, fast queries, ~1.1x the memory) or
            ``"ivf"`` (inverted lists over k-means cells; trained here) or
            ``"ivfpq"`` (the same cells, each vector stored as ``pq_m`` codes of
            ``pq_nbits`` bits: ~``pq_m`` bytes a photo instead of ``4 * d``).
        hnsw_m: HNSW links per node (more: better recall, more memory).
        ef_search: HNSW candidate list length at query time (raised to ``k`` when smaller).
        nlist: IVF cells; default ``4 * sqrt(n)``, at most ``n / 39`` (faiss's
            minimum training points per cell).
        nprobe: IVF cells visited per query.
        pq_m: IVF-PQ sub-vectors per embedding (must divide the dimension).
        pq_nbits: IVF-PQ bits per sub-vector code.
        seed: IVF k-means seed, so that a rebuilt index is the same.

    Approximate indexes miss some neighbours: measure what they lose with
    :func:`index_recall` before using one.
    """
    n, d = embeddings.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
        index.hnsw.efSearch = ef_search
    elif kind in ("ivf", "ivfpq"):
        cells = nlist or int(4 * np.sqrt(n))
        cells = max(1, min(cells, n // 39 or 1))
        if kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        else:
            if d % pq_m:
                raise ValueError(f"ivfpq: pq_m={pq_m} must divide the embedding dimension {d}")
            if n < 2**pq_nbits:
                raise ValueError(f"ivfpq: {n} gallery vectors cannot train {2**pq_nbits} codes (pq_nbits={pq_nbits}); use flat or ivf")
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, cells, pq_m, pq_nbits, faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.seed = seed
        index.cp.seed = seed
        # k-means uses at most 256 points a cell (faiss's own cap): normalise only those.
        limit = 256 * cells
        rows = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False)) if n > limit else slice(None)
        index.train(l2_normalise(embeddings[rows]))
        index.nprobe = min(nprobe, cells)
    else:
        raise ValueError(f"unknown index kind {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    # Normalised and added in blocks: a million-photo gallery never exists twice in memory.
    for start in range(0, n, _ADD_BLOCK):
        index.add(l2_normalise(embeddings[start : start + _ADD_BLOCK]))
    return index


def index_recall(
    index: faiss.Index,
    embeddings: np.ndarray,
    gallery_ids: np.ndarray,
    queries: np.ndarray,
    k: int = TOP,
    max_queries: int = 2000,
    seed: int = 0,
    exact: faiss.Index | None = None,
) -> dict[str, float]:
    """How much of exact search an (approximate) index keeps, on a sample of queries.

    ``exact``: a flat index of the same ``embeddings``, when the caller has one
    (built here otherwise: at 1M photos that is 2 GB and a few seconds).

    Returns:
        ``image_recall_at_k``: share of the exact ``k`` nearest gallery images
        that the index also returns in its ``k``; ``individual_recall_at_k``:
        the same for the ``k`` best individuals after collapsing, which is
        what predictions are made of; ``queries``: how many were compared.
    """
    q = l2_normalise(queries)
    if len(q) > max_queries:
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), max_queries, replace=False))]
    exact = exact if exact is not None else build_index(embeddings)
    k = min(k, exact.ntotal)
    _, want = exact.search(q, k)
    _, got = index.search(q, k)
    image_recall = np.mean([len(set(a) & set(b[b >= 0])) / k for a, b in zip(want, got, strict=True)])
    _, want_ids = search_gallery(exact, gallery_ids, q, top=k)
    _, got_ids = search_gallery(index, gallery_ids, q, top=k)
    per_query = [len(set(a) & set(b) - {""}) / max(1, len(set(a) - {""})) for a, b in zip(want_ids, got_ids, strict=True)]
    return {"image_recall_at_k": float(image_recall), "individual_recall_at_k": float(np.mean(per_query)), "queries": len(q), "k": k}


def best_photo_per_candidate(
    embeddings: np.ndarray, gallery_ids: np.ndarray, queries: np.ndarray, candidates: Sequence[Sequence[str]]
) -> list[list[tuple[int, float]]]:
    """For each query and each of its candidate individuals, the gallery photo of that
    individual most similar to the query, and that similarity.

    What a person checks a match by: the candidate's photo that looks most like the
    query. Exact over every photo of the candidate (not limited to a search's first
    neighbours), so it holds for approximate indexes and deep candidates alike.

    Args:
        embeddings: (n, d) gallery embeddings, unit length as a gallery version stores them.
        gallery_ids: individual id of each gallery row.
        queries: (q, d) unit-length query embeddings.
        candidates: per query, individual ids (``new_individual`` and ``""`` allowed).

    Returns:
        Per query, per candidate: ``(gallery row, similarity)``; ``(-1, nan)`` for an id
        with no photo in the gallery (``new_individual``, padding).
    """
    gallery_ids = np.asarray(gallery_ids, dtype=object)
    if len(embeddings) != len(gallery_ids):
        raise ValueError(f"{len(embeddings)} gallery embeddings for {len(gallery_ids)} ids")
    order = np.argsort(gallery_ids, kind="stable")
    names, starts = np.unique(gallery_ids[order], return_index=True)
    rows_of = dict(zip(names, np.split(order, starts[1:]), strict=True)) if len(order) else {}
    out = []
    for query, ids in zip(queries, candidates, strict=True):
        found = []
        for ind in ids:
            rows = rows_of.get(ind)
            if rows is None:
                found.append((-1, float("nan")))
                continue
            sims = embeddings[rows] @ query
            best = int(np.argmax(sims))
            found.append((int(rows[best]), float(sims[best])))
        out.append(found)
    return out


def save_index(index: faiss.Index, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return Path(path)


def load_index(path: str | Path) -> faiss.Index:
    return faiss.read_index(str(path))


def search_gallery(
    index: faiss.Index,
    gallery_ids: np.ndarray,
    queries: np.ndarray,
    k: int = 50,
    top: int = TOP,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``top`` individuals per query, with their best similarity.

    Args:
        index: built by :func:`build_index` over the gallery embeddings.
        gallery_ids: individual id of each gallery row.
        queries: (n, d) query embeddings (normalised here).
        k: neighbours fetched per query at first; multiplied by four for the queries
            that need more to find ``top`` distinct individuals.
        top: distinct individuals returned per query.

    Returns:
        ``(sims, ids)`` of shape (n, top), best first, ``-inf``/``""`` padded
        when the gallery has fewer individuals. Both feed
        :func:`predict_top5` and :func:`tune_threshold` directly.
    """
    gallery_ids = np.asarray(gallery_ids, dtype=object)
    if index.ntotal != len(gallery_ids):
        raise ValueError(f"index holds {index.ntotal} vectors but {len(gallery_ids)} gallery ids were given")
    q = l2_normalise(queries)
    n = len(q)
    want = min(top, len(set(gallery_ids)))
    out_sims = np.full((n, top), -np.inf)
    out_ids = np.full((n, top), "", dtype=object)
    pending = np.arange(n)
    depth = min(max(k, top), index.ntotal)
    while len(pending):
        sims, idx = index.search(q[pending], depth)
        sims = np.where(idx >= 0, sims, -np.inf)
        ids = np.where(idx >= 0, gallery_ids[np.maximum(idx, 0)], "")
        c_sims, c_ids, counts = collapse_by_individual(sims, ids, top)
        done = (counts >= want) | (depth >= index.ntotal)
        out_sims[pending[done]] = c_sims[done]
        out_ids[pending[done]] = c_ids[done]
        pending = pending[~done]
        depth = min(depth * 4, index.ntotal)
    return out_sims, out_ids
