"""The faiss index under a gallery: inner-product search on L2-normalised embeddings.

Exact (flat) by default; HNSW, IVF or IVF-PQ (compressed) as named presets for
galleries past ~1M images, or any faiss ``index_factory`` string (OPQ, scalar
quantisers, an HNSW coarse quantizer, ...), with :func:`index_recall` to measure
what they lose.

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


INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")  # the named presets; any faiss index_factory string works too
# build_index's options of the index itself, as GalleryConfig names them (a gallery
# version's lineage records them, so that a rebuilt index is the same).
INDEX_OPTIONS = ("hnsw_m", "ef_search", "nlist", "nprobe", "pq_m", "pq_nbits")
_ADD_BLOCK = 65_536  # rows normalised and added at a time (128 MiB at 512 dimensions)
# Rows an index's codebooks (PQ, OPQ, SQ) train on at least: faiss caps a k-means at 256
# points a centroid, and an 8-bit PQ has 256 centroids per sub-vector.
_CODEBOOK_TRAINING_ROWS = 256 * 256


def ivf_cells(n: int, nlist: int | None = None) -> int:
    """The IVF cell count of the presets: ``nlist`` or ``4 * sqrt(n)``, at most ``n / 39``
    (faiss's minimum training points per cell), at least 1."""
    cells = nlist or int(4 * np.sqrt(n))
    return max(1, min(cells, n // 39 or 1))


def factory_string(
    kind: str, n: int, d: int, *, hnsw_m: int = 32, nlist: int | None = None, pq_m: int = 64, pq_nbits: int = 8
) -> str:
    """The faiss ``index_factory`` string of a preset ``kind`` for ``n`` vectors of dimension ``d``;
    any other ``kind`` is taken to be a factory string already and returned as it is.

    ``flat`` -> ``Flat``, ``hnsw`` -> ``HNSW{hnsw_m},Flat``, ``ivf`` -> ``IVF{cells},Flat``,
    ``ivfpq`` -> ``IVF{cells},PQ{pq_m}x{pq_nbits}`` (cells: :func:`ivf_cells`).

    Raises:
        ValueError: an ``ivfpq`` that cannot be built (``pq_m`` not dividing ``d``, too few
            vectors for the codes), or an empty ``kind``.
    """
    kind = kind.strip()
    if not kind:
        raise ValueError("empty index kind: expected one of " + ", ".join(INDEX_KINDS) + " or a faiss index_factory string")
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    if kind == "ivf":
        return f"IVF{ivf_cells(n, nlist)},Flat"
    if kind == "ivfpq":
        if d % pq_m:
            raise ValueError(f"ivfpq: pq_m={pq_m} must divide the embedding dimension {d}")
        if n < 2**pq_nbits:
            raise ValueError(f"ivfpq: {n} gallery vectors cannot train {2**pq_nbits} codes (pq_nbits={pq_nbits}); use flat or ivf")
        return f"IVF{ivf_cells(n, nlist)},PQ{pq_m}x{pq_nbits}"
    return kind


def _inner(index: faiss.Index) -> faiss.Index:
    """The index under any pre-transforms (OPQ, PCA, ...), as its own class."""
    while isinstance(index, faiss.IndexPreTransform):
        index = index.index
    return faiss.downcast_index(index)


def _training_rows(index: faiss.Index, n: int, seed: int) -> np.ndarray | slice:
    """Which gallery rows an untrained index learns from: a seeded sample, as small as its
    parts allow (k-means uses at most 256 points a cell; codebooks want 65,536 rows)."""
    ivf = faiss.try_extract_index_ivf(index)
    cells = ivf.nlist if ivf is not None else 0
    # A plain IVF-Flat trains its cells only; anything else (PQ, SQ, OPQ, PCA ...) trains more.
    plain_ivf = ivf is not None and isinstance(_inner(index), faiss.IndexIVFFlat) and not isinstance(index, faiss.IndexPreTransform)
    limit = max(256 * cells, 0 if plain_ivf else _CODEBOOK_TRAINING_ROWS)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False)) if n > limit else slice(None)


def _seed(index: faiss.Index, seed: int) -> None:
    """Seed the k-means of the IVF cells and of a product quantizer, so that a rebuilt index is the same."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    inner = _inner(index)
    if hasattr(inner, "pq"):
        inner.pq.cp.seed = seed


def _set_search_options(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """nprobe (IVF; at most its cells) and efSearch (HNSW graph, or an HNSW coarse quantizer),
    through faiss's ParameterSpace, which reaches through pre-transforms."""
    space = faiss.ParameterSpace()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        space.set_index_parameter(index, "nprobe", min(nprobe, ivf.nlist))
        if hasattr(faiss.downcast_index(ivf.quantizer), "hnsw"):
            space.set_index_parameter(index, "quantizer_efSearch", ef_search)
    if hasattr(_inner(index), "hnsw"):
        space.set_index_parameter(index, "efSearch", ef_search)


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
        kind: a preset: ``"flat"`` (exact; the default, and right up to ~1M images),
            ``"hnsw"`` (graph, no training, fast queries, ~1.1x the memory) or
            ``"ivf"`` (inverted lists over k-means cells; trained here) or
            ``"ivfpq"`` (the same cells, each vector stored as ``pq_m`` codes of
            ``pq_nbits`` bits: ~``pq_m`` bytes a photo instead of ``4 * d``); or any
            faiss ``index_factory`` string (``"OPQ64,IVF1024,PQ64"``, ``"IVF256,SQ8"``,
            ``"IVF1024_HNSW32,Flat"``, ...; :func:`factory_string` gives a preset's).
        hnsw_m: HNSW links per node (the ``hnsw`` preset).
        ef_search: HNSW candidate list length at query time, for an HNSW index or an
            HNSW coarse quantizer (raised to ``k`` when smaller).
        nlist: IVF cells of the presets; default ``4 * sqrt(n)``, at most ``n / 39``
            (faiss's minimum training points per cell).
        nprobe: IVF cells visited per query (any index with IVF cells; at most their number).
        pq_m: IVF-PQ sub-vectors per embedding (must divide the dimension).
        pq_nbits: IVF-PQ bits per sub-vector code.
        seed: the k-means seed of the IVF cells and PQ codebooks, and of the training
            sample, so that a rebuilt index is the same.

    Raises:
        ValueError: a kind that faiss cannot build or train (the message names the string
            and faiss's reason).

    Approximate indexes miss some neighbours: measure what they lose with
    :func:`index_recall` before using one.
    """
    n, d = embeddings.shape
    spec = factory_string(kind, n, d, hnsw_m=hnsw_m, nlist=nlist, pq_m=pq_m, pq_nbits=pq_nbits)
    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(
            f"faiss cannot build index {spec!r} for {d}-dimensional embeddings: {_faiss_reason(exc)} "
            f"(expected one of {', '.join(INDEX_KINDS)} or a faiss index_factory string such as 'IVF256,SQ8')"
        ) from exc
    if kind.strip() == "hnsw":  # the preset's graph: a longer candidate list while building than faiss's 40 for M > 20
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    if not index.is_trained:
        _seed(index, seed)
        try:
            index.train(l2_normalise(embeddings[_training_rows(index, n, seed)]))
        except RuntimeError as exc:
            raise ValueError(f"faiss cannot train index {spec!r} on {n} gallery vectors: {_faiss_reason(exc)}") from exc
    _set_search_options(index, nprobe, ef_search)
    # Normalised and added in blocks: a million-photo gallery never exists twice in memory.
    for start in range(0, n, _ADD_BLOCK):
        index.add(l2_normalise(embeddings[start : start + _ADD_BLOCK]))
    return index


def _faiss_reason(exc: RuntimeError) -> str:
    """faiss's message without its C++ location (``Error in <signature> at <file>:<line>: <reason>``)."""
    text = str(exc).strip()
    return text.split(": ", 1)[1].strip() if text.startswith("Error in ") and ": " in text else text


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
