"""ArcFace class centres: a second similarity of a query to each known individual.

An ArcFace head learns one direction per individual (``sub_centers`` of them with
sub-center ArcFace): the training pulls every photo of the individual towards its
nearest sub-centre. A query's cosine to an individual's best sub-centre is therefore
a second opinion beside its cosine to the individual's best gallery photo: one summary
of all the individual's training photos instead of its single most similar one.

* :class:`ClassCentres`: one fold model's centres of the individuals it trained on, unit
  length, ``(individuals, sub_centers, d)``, with the individual of each row. They are
  kept in the model's ``best.pt`` (:func:`whale_ml.training.losses.class_centres`),
  written beside the fold's embeddings by ``fold_embeddings`` and into every gallery
  version, so that each reader takes them from the same checkpoint as the embeddings.
* :func:`centre_similarity`: one model's queries against candidate individuals.
* :func:`ensemble_centre_similarity`: ensemble queries (concatenated per-model parts,
  :func:`whale_ml.retrieval.store.ensemble`) against the fold models' centres: each
  model's own part against its own centres, averaged over the models that have a centre
  for the individual.

An individual without a centre (in no fold model's training, e.g. enrolled later) gets
NaN here; :class:`~whale_ml.retrieval.fusion.Fusion` then scores it by its gallery photos
alone (see there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from whale_ml.io import atomic_path

CHECKPOINT_KEY = "class_centres"  # in best.pt: {"vectors": (n, s, d) tensor, "individual_ids": [n ids]}
CENTRES_FILE, CENTRE_IDS_FILE = "centres.npy", "centres_ids.csv"
_CHUNK = 4096  # queries per block: (block, K, sub_centers, d) floats stay small at the real scale


@dataclass(frozen=True)
class ClassCentres:
    """One fold model's class centres.

    Attributes:
        ids: (n,) the individual of each centre row (distinct).
        vectors: (n, sub_centers, d) float32, each sub-centre of unit length.
    """

    ids: np.ndarray
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if self.vectors.ndim != 3 or len(self.vectors) != len(self.ids):
            raise ValueError(
                f"class centres must be (individuals, sub_centers, d) with one id a row, got {self.vectors.shape} for {len(self.ids)} ids"
            )
        if len(set(self.ids.tolist())) != len(self.ids):
            raise ValueError("class centres hold an individual twice")

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[2])

    @classmethod
    def from_weights(cls, weights: np.ndarray, sub_centers: int, individual_of_label: dict[int, str]) -> ClassCentres:
        """The centres of some labels from an ArcFace weight matrix.

        Args:
            weights: (d, classes * sub_centers), pytorch-metric-learning's ``W``: column
                ``label * sub_centers + s`` is sub-centre ``s`` of ``label``.
            individual_of_label: the labels kept (those the model trained on) -> individual.
        """
        w = np.asarray(weights, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] % sub_centers:
            raise ValueError(f"an ArcFace weight matrix of {sub_centers} sub-centres per class cannot be {w.shape}")
        per_class = w.T.reshape(-1, sub_centers, w.shape[0])  # (classes, s, d)
        labels = sorted(individual_of_label)
        if labels and (labels[0] < 0 or labels[-1] >= len(per_class)):
            raise ValueError(f"labels {labels[0]}..{labels[-1]} outside the {len(per_class)} classes of the weight matrix")
        vectors = per_class[labels]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=2, keepdims=True), 1e-12)
        return cls(np.array([str(individual_of_label[label]) for label in labels], dtype=object), vectors.astype(np.float32))

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain tensors and strings: loads with ``weights_only``."""
        return {"vectors": torch.from_numpy(np.ascontiguousarray(self.vectors)), "individual_ids": [str(i) for i in self.ids]}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> ClassCentres | None:
        """The centres a ``best.pt`` holds; None for a checkpoint made before they were kept."""
        saved = ckpt.get(CHECKPOINT_KEY)
        if saved is None:
            return None
        return cls(np.array(saved["individual_ids"], dtype=object), saved["vectors"].detach().cpu().numpy().astype(np.float32))

    def save(self, folder: str | Path) -> Path:
        """``centres.npy`` and ``centres_ids.csv`` in ``folder``, each written atomically."""
        folder = Path(folder)
        with atomic_path(folder / CENTRES_FILE) as tmp_npy:
            np.save(tmp_npy, np.ascontiguousarray(self.vectors, dtype=np.float32))
            with atomic_path(folder / CENTRE_IDS_FILE) as tmp_csv:
                pd.DataFrame({"individual_id": self.ids}).to_csv(tmp_csv, index=False)
        return folder / CENTRES_FILE

    @classmethod
    def load(cls, folder: str | Path) -> ClassCentres | None:
        """What :meth:`save` wrote in ``folder``; None when it holds no centres."""
        folder = Path(folder)
        if not (folder / CENTRES_FILE).exists():
            return None
        ids = pd.read_csv(folder / CENTRE_IDS_FILE, dtype=str, keep_default_na=False)["individual_id"].to_numpy(dtype=object)
        vectors = np.load(folder / CENTRES_FILE, allow_pickle=False)
        if len(vectors) != len(ids):
            raise ValueError(f"{folder}/{CENTRES_FILE}: {len(vectors)} centres but {len(ids)} individual ids in {CENTRE_IDS_FILE}")
        return cls(ids, vectors)


def remove_centres(folder: str | Path) -> None:
    """Delete the centres in ``folder``."""
    for name in (CENTRES_FILE, CENTRE_IDS_FILE):
        (Path(folder) / name).unlink(missing_ok=True)


def replace_centres(folder: str | Path, centres: ClassCentres | None) -> int:
    """Make ``centres`` the ones in ``folder``: saved, or, for a model without them (a
    checkpoint from before they were kept), none, so that no other model's stay behind.

    Returns:
        How many individuals have a centre now.
    """
    if centres is None:
        remove_centres(folder)
        return 0
    centres.save(folder)
    return len(centres.ids)


def centre_similarity(queries: np.ndarray, centres: ClassCentres, candidates: np.ndarray) -> np.ndarray:
    """Cosine of each query to each of its candidates' best sub-centre.

    Args:
        queries: (n, d) unit-length embeddings by the model the centres belong to.
        candidates: (n, K) individual ids (``""`` padding).

    Returns:
        (n, K) float64; NaN where the candidate has no centre (or is padding).
    """
    q = np.asarray(queries, dtype=np.float32)
    cand = np.asarray(candidates, dtype=object)
    if q.ndim != 2 or cand.ndim != 2 or len(q) != len(cand):
        raise ValueError(f"queries {q.shape} and candidates {cand.shape} must be (n, d) and (n, K)")
    if q.shape[1] != centres.dimension:
        raise ValueError(f"queries of dimension {q.shape[1]} against class centres of dimension {centres.dimension}")
    row_of = {ind: r for r, ind in enumerate(centres.ids.tolist())}
    rows = np.array([row_of.get(c, -1) for c in cand.ravel()], dtype=np.int64).reshape(cand.shape)
    out = np.full(cand.shape, np.nan)
    for start in range(0, len(q), _CHUNK):
        block = slice(start, start + _CHUNK)
        r = rows[block]
        gathered = centres.vectors[np.maximum(r, 0)]  # (b, K, s, d)
        cos = np.einsum("bd,bksd->bks", q[block], gathered).max(axis=2)
        out[block] = np.where(r >= 0, cos, np.nan)
    return out


def ensemble_centre_similarity(queries: np.ndarray, centres: Sequence[ClassCentres | None], candidates: np.ndarray) -> np.ndarray:
    """Centre similarity of ensemble queries: per fold model, then averaged.

    An ensemble vector is the K models' unit embeddings concatenated and scaled by
    1/sqrt(K), so model ``m``'s own embedding is its slice times sqrt(K). Each model's
    part is compared with that model's centres only (the models do not share a space);
    an individual's score is the mean over the models that have a centre for it.

    Args:
        queries: (n, sum of the models' d) ensemble embeddings, models in the order of ``centres``.
        centres: each fold model's centres (None: a model without them; it adds no score).
        candidates: (n, K) individual ids.

    Returns:
        (n, K): NaN where no model has a centre for the candidate.
    """
    q = np.asarray(queries, dtype=np.float32)
    if not centres or all(c is None for c in centres):
        raise ValueError("no fold model has class centres")
    dims = [c.dimension if c is not None else None for c in centres]
    known = {d for d in dims if d is not None}
    if len(known) != 1 or q.shape[1] != len(centres) * known.pop():
        raise ValueError(f"ensemble queries of dimension {q.shape[1]} do not split into {len(centres)} models of dimensions {dims}")
    d = q.shape[1] // len(centres)
    total = np.zeros(np.shape(candidates))
    count = np.zeros(np.shape(candidates))
    for m, model_centres in enumerate(centres):
        if model_centres is None:
            continue
        part = q[:, m * d : (m + 1) * d]
        part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        sim = centre_similarity(part, model_centres, candidates)
        has = np.isfinite(sim)
        total += np.where(has, sim, 0.0)
        count += has
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
