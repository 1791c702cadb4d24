"""The faiss gallery: exact inner-product search on L2-normalised embeddings.

Searches return neighbours already collapsed per individual (best similarity
per individual), and search deeper for the queries whose first ``k``
neighbours hold too few individuals, so that every query gets five distinct
ids whenever the gallery has them.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from whale_ml.io import atomic_path
from whale_ml.retrieval.ranking import TOP, collapse_by_individual


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as contiguous float32 (what faiss wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def build_index(embeddings: np.ndarray) -> faiss.Index:
    """A flat inner-product index of normalised embeddings (cosine similarity)."""
    emb = l2_normalise(embeddings)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    return index


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
