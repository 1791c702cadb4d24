"""Embedding files: one float32 matrix per split, with its image order beside it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from whale_ml.io import atomic_path


def save_embeddings(folder: str | Path, name: str, embeddings: np.ndarray, images: list[str]) -> Path:
    """Write ``name.npy`` and ``name_images.csv`` (the row order) atomically, as a pair:
    both are written in full before either is renamed into place, so a failed or killed
    write leaves the earlier pair as it was."""
    if len(embeddings) != len(images):
        raise ValueError(f"{len(embeddings)} embeddings for {len(images)} images")
    folder = Path(folder)
    with atomic_path(folder / f"{name}.npy") as tmp_npy:
        np.save(tmp_npy, np.ascontiguousarray(embeddings, dtype=np.float32))
        with atomic_path(folder / f"{name}_images.csv") as tmp_csv:  # nested: each error names its own file
            pd.DataFrame({"image": images}).to_csv(tmp_csv, index=False)
    return folder / f"{name}.npy"


def load_embeddings(folder: str | Path, name: str) -> tuple[np.ndarray, list[str]]:
    folder = Path(folder)
    images = pd.read_csv(folder / f"{name}_images.csv", dtype=str, keep_default_na=False)["image"].tolist()
    embeddings = np.load(folder / f"{name}.npy", allow_pickle=False)  # an object array would unpickle
    if len(embeddings) != len(images):
        raise ValueError(f"{folder}/{name}: {len(embeddings)} embeddings but {len(images)} image names")
    return embeddings, images


def ensemble(embeddings: list[np.ndarray]) -> np.ndarray:
    """Concatenate normalised per-model embeddings, scaled to unit length.

    The cosine similarity of two such vectors is the mean of the models'
    cosine similarities, so the ensemble lives on the same scale as each
    model and a threshold tuned on single-model validation still applies.
    """
    if not embeddings:
        raise ValueError("no embeddings to combine")
    parts = [e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) for e in embeddings]
    return (np.concatenate(parts, axis=1) / np.sqrt(len(parts))).astype(np.float32)


def out_of_fold_search(
    folds: pd.DataFrame, embeddings_dir: Callable[[str], Path], fold_keys: list[str], k: int = 50
) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]]:
    """Per fold with validation photos: its training and validation rows, and the validation
    photos' best five individuals among that fold's training photos, by that fold's model.

    Args:
        folds: the ``cv_folds`` table.
        embeddings_dir: fold key -> the folder of its ``train`` embeddings.
        fold_keys: ``fold0``, ``fold1``, ... in order.

    Yields:
        ``(fold, train, val, sims, ids)`` as :func:`search_gallery` returns them; ``val``
        has the ``truth`` column (``new_individual`` where the fold's training lacks the id).
    """
    from whale_ml.data.folds import fold_split
    from whale_ml.retrieval.gallery import build_index, search_gallery

    for i, fold in enumerate(fold_keys):
        train, val = fold_split(folds, i)
        if val.empty:
            continue
        emb, images = load_embeddings(embeddings_dir(fold), "train")
        row_of = {img: r for r, img in enumerate(images)}
        gallery = emb[[row_of[x] for x in train["image"]]]
        queries = emb[[row_of[x] for x in val["image"]]]
        sims, ids = search_gallery(build_index(gallery), train["individual_id"].to_numpy(), queries, k=k)
        yield fold, train, val, sims, ids
