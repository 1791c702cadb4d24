"""Validation during training: what is scored, on which photos, and at which epochs.

:func:`validate` scores a model as the submission will be scored (MAP@5 with
``new_individual``, at its tuned threshold), searching a fold's validation photos
against its training photos. That means embedding the fold's whole gallery each
time: at the real scale, about 40k photos a fold, which costs about as much as a
training epoch. Two recipe settings bound it (docs/training.md, "What is measured
when"): ``val_every`` validates every N epochs and always after the last one
(:func:`validation_due`), and ``val_sample`` validates on a fixed, seeded sample
(:func:`validation_set`), the same photos every time, so that the scores of a run
compare with each other. The kept model's full evaluation happens afterwards, out
of fold, in ``fold_embeddings`` and ``match_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from whale_ml.models.embedding import EmbeddingNet
from whale_ml.progress import ProgressFn
from whale_ml.retrieval.embeddings import embed_paths
from whale_ml.retrieval.faiss_index import build_index, search_gallery
from whale_ml.retrieval.ranking import tune_threshold
from whale_ml.stage_configs import TrainConfig

# The metrics of a validation, in the order validate() returns them; NaN on an epoch without one.
VAL_METRICS = ("val_map5", "val_threshold")


def validation_due(epoch: int, cfg: TrainConfig) -> bool:
    """True when ``epoch`` (1-based) is validated: every ``val_every``-th epoch and the last one."""
    return epoch % cfg.val_every == 0 or epoch == cfg.epochs


@dataclass
class ValidationSet:
    """The photos a run validates on: ``gallery`` (``path, individual_id``) searched by ``queries`` (``path, truth``)."""

    gallery: pd.DataFrame
    queries: pd.DataFrame
    sampled: bool = False

    def describe(self) -> str:
        what = "a fixed sample: " if self.sampled else ""
        return f"{what}{len(self.queries)} validation photos against {len(self.gallery)} training photos"


def _by_path(frame: pd.DataFrame) -> np.ndarray:
    """Row positions in path order: the sample does not depend on how the rows came ordered."""
    return np.argsort(frame["path"].astype(str).to_numpy(), kind="stable")


def validation_set(train: pd.DataFrame, val: pd.DataFrame, sample: int, seed: int) -> ValidationSet:
    """The fold's validation photos and gallery, or a fixed sample of them.

    A sample keeps ``sample`` validation photos, drawn with ``seed``, and a gallery of
    the same share of the training photos: every photo of the sampled photos'
    individuals (so a known individual stays known, and ``new_individual`` stays new),
    filled up with a seeded draw of the others as distractors. Its MAP@5 is higher
    than the whole fold's (fewer distractors) and compares only with other
    validations on the same sample. The draw uses its own generator, not the global
    RNGs that training and its checkpoints depend on.

    Args:
        train: the fold's training photos (``path, individual_id``): the gallery.
        val: its validation photos (``path, truth``): the queries.
        sample: the validation photos to keep; 0, or at least ``len(val)``, keeps all.
        seed: the draw's seed (the recipe's).
    """
    if sample <= 0 or sample >= len(val):
        return ValidationSet(train, val)
    rng = np.random.default_rng(seed)
    chosen = np.sort(_by_path(val)[rng.choice(len(val), size=sample, replace=False)])
    queries = val.iloc[chosen]
    theirs = train["individual_id"].isin(set(queries["truth"])).to_numpy()
    target = round(len(train) * sample / len(val))
    in_order = _by_path(train)
    others = in_order[~theirs[in_order]]
    keep = theirs.copy()
    keep[rng.choice(others, size=max(0, min(len(others), target - int(theirs.sum()))), replace=False)] = True
    return ValidationSet(train[keep], queries, sampled=True)


def _shifted(progress: ProgressFn | None, start: int, total: int) -> ProgressFn | None:
    """One embedding pass's progress as a part of a longer count: ``start + done`` of ``total``."""
    if progress is None:
        return None
    return lambda done, _n: progress(start + done, total)


def validate(
    model: EmbeddingNet,
    cfg: TrainConfig,
    gallery: pd.DataFrame,
    queries: pd.DataFrame,
    device: torch.device,
    batch_size: int = 64,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Validation MAP@5 with new_individual (at its tuned threshold), and that threshold.

    The same retrieval as the submission: the training photos are the gallery, each
    validation photo a query whose truth may be ``new_individual``.

    Args:
        model: the embedding model (embedded in eval mode, its mode restored).
        cfg: the recipe (image size, DataLoader workers).
        gallery: ``path, individual_id`` of the known photos.
        queries: ``path, truth`` of the validation photos.
        device: where to embed.
        batch_size: images per embedding batch.
        progress: called as ``progress(done, total)`` per batch over gallery and queries
            together, ending at ``done == total``.

    Returns:
        ``val_map5`` and ``val_threshold``.
    """
    kw = {"image_size": cfg.image_size, "device": device, "batch_size": batch_size, "num_workers": cfg.num_workers}
    total = len(gallery) + len(queries)
    g = embed_paths(model, gallery["path"].tolist(), **kw, progress=_shifted(progress, 0, total))
    q = embed_paths(model, queries["path"].tolist(), **kw, progress=_shifted(progress, len(gallery), total))
    sims, ids = search_gallery(build_index(g), gallery["individual_id"].to_numpy(), q)
    result = tune_threshold(sims, ids, queries["truth"].tolist(), gallery_ids=gallery["individual_id"].tolist())
    return {"val_map5": result.map5, "val_threshold": result.threshold}


def skip_validation() -> dict[str, float]:
    """The metrics of an epoch that is not validated: NaN, so its history row keeps every column.

    It also draws from torch's global RNG what :func:`validate` draws (each of its two
    DataLoaders takes a base seed for its workers when iterated), so that the epochs
    after a skipped validation train on the batches and augmentations they would have
    had after a real one: ``val_every`` changes what is measured and which epoch is
    kept, never the training itself (``tests/test_validation_schedule.py`` holds this).
    """
    for _ in range(2):
        torch.empty((), dtype=torch.int64).random_()
    return dict.fromkeys(VAL_METRICS, float("nan"))
