"""Embedding files: one float32 matrix per split, with its image order beside it."""

from __future__ import annotations

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


def load_embeddings_of(folder: str | Path, name: str, *tables: pd.DataFrame) -> list[np.ndarray]:
    """``name``'s embeddings of each table's photos (its ``image`` column), row for row."""
    embeddings, images = load_embeddings(folder, name)
    row_of = {img: r for r, img in enumerate(images)}
    return [embeddings[[row_of[x] for x in table["image"]]] for table in tables]


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
