"""Embedding files: one float32 matrix per split, with its image order beside it, and a
fold's embeddings published as one set (:mod:`whale_ml.filesets`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from whale_ml.filesets import new_set
from whale_ml.io import atomic_path

# A fold set's files as they lay straight in the fold's folder before sets (swept once a set is current).
_LOOSE = ("train.npy", "train_images.csv", "test.npy", "test_images.csv", "centres.npy", "centres_ids.csv", "embeddings.json")


@contextlib.contextmanager
def new_embedding_set(root: Path, checkpoint_sha256: str) -> Iterator[Path]:
    """A folder to write one fold model's embeddings, centres and record into, published as
    the fold's current set when the block ends (``HomeLayout.embeddings_dir`` then reads it).

    Args:
        root: the fold's folder (``HomeLayout.embeddings_root(fold)``).
        checkpoint_sha256: the checkpoint that made them: the set's name starts with it.
    """
    with new_set(root, checkpoint_sha256[:12], loose=_LOOSE, record={"checkpoint_sha256": checkpoint_sha256}) as folder:
        yield folder


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
