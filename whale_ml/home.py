"""The home: every path the pipeline writes to, below one folder.

``WHALE_HOME`` (resolved in whale_ml/environment.py) holds everything the pipeline
writes: tables, crops, models, embeddings, gallery versions, the MLflow store and
``DAGSTER_HOME``. The data set it reads (``WHALE_DATA_DIR``) is separate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path


def round_name(number: int) -> str | None:
    """Training round ``number``'s name in folders, asset keys and registry aliases: None for
    the first (its files are the home's own, as in a home that never ran another round),
    ``round<k>`` for a later one."""
    if number < 1:
        raise ValueError(f"training rounds are numbered from 1, not {number}")
    return None if number == 1 else f"round{number}"


def fold_label(round: str | None, fold: str) -> str:
    """A fold model's name in MLflow run names and registry aliases: ``fold0`` in the first
    round, ``round2_fold0`` in round ``round2``; so ``whale-arcface@champion_round2_fold0``."""
    return fold if round is None else f"{round}_{fold}"


@dataclass(frozen=True)
class HomeLayout:
    """Every path the pipeline writes to, below one home directory.

    ``round`` names a later training round (:func:`round_name`, ``round2``...): its fold
    models, embeddings, gallery versions, matchers and submission live under
    ``rounds/<round>/`` so that they never overwrite another round's; everything the
    rounds share (tables, crops, detector, MLflow, the enrollment ledger, the release
    pointer) stays where it is.
    """

    home: Path
    round: str | None = None
    # fold -> embedding set folder, resolved once (with_current_embeddings); empty: resolve at each call
    embedding_sets: tuple[tuple[str, Path], ...] = ()

    def in_round(self, name: str | None) -> HomeLayout:
        """The same home, with the models, embeddings, galleries and submission of round ``name`` (None: the first)."""
        return replace(self, round=name, embedding_sets=())  # the pinned sets were the other round's

    def fold_label(self, fold: str) -> str:
        """A fold model's name in this round's MLflow runs and registry aliases (:func:`fold_label`)."""
        return fold_label(self.round, fold)

    @property
    def release_pointer(self) -> Path:
        """The newest release's round and the champion release, the one ``whale identify`` and
        ``whale enroll`` serve (:mod:`whale_ml.gallery.release`); one per home."""
        return self.home / "release.json"

    @property
    def round_home(self) -> Path:
        """The folder of this round's models, embeddings, galleries and submission: the home itself for the first round."""
        return self.home if self.round is None else self.home / "rounds" / self.round

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster_home"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def tables(self) -> Path:
        return self.home / "tables"

    @property
    def detector_dir(self) -> Path:
        return self.home / "detector"

    @property
    def crops_dir(self) -> Path:
        return self.home / "crops"

    def local_features_dir(self, split: str) -> Path:
        """Keypoints of every photo's box, one folder per split (whale_ml/retrieval/local_features.py)."""
        return self.home / "local_features" / split

    def model_dir(self, fold: str) -> Path:
        return self.round_home / "models" / fold

    def embeddings_root(self, fold: str) -> Path:
        """The fold's embeddings folder: its sets and the pointer to the current one
        (:mod:`whale_ml.filesets`); what the fold embeddings stage writes."""
        return self.round_home / "embeddings" / fold

    def embeddings_dir(self, fold: str) -> Path:
        """The folder of the fold's current embedding set, the one every file of it is read
        from (train, test, centres, record). Resolved at each call unless pinned by
        :meth:`with_current_embeddings`: a reader of several files resolves once."""
        pinned = dict(self.embedding_sets)
        if fold in pinned:
            return pinned[fold]
        from whale_ml.filesets import current_set

        return current_set(self.embeddings_root(fold))

    def with_current_embeddings(self, folds: Iterable[str]) -> HomeLayout:
        """The same home with ``folds``' current embedding sets resolved now and kept: every
        later read through it takes all of a fold's files from one set, even if the fold
        embeddings stage publishes a new one meanwhile."""
        pinned = dict(self.embedding_sets)
        pinned.update({f: self.embeddings_dir(f) for f in folds})
        return replace(self, embedding_sets=tuple(sorted(pinned.items())))

    @property
    def gallery_dir(self) -> Path:
        return self.round_home / "gallery"

    @property
    def gallery_versions_dir(self) -> Path:
        """Every gallery version (``vNNNN/``) and ``current.json``, the pointer to the newest."""
        return self.gallery_dir / "versions"

    @property
    def enrolled_dir(self) -> Path:
        """The enrollment ledger: confirmed photos (``images/``), their crops and ``enrolled.csv``."""
        return self.home / "enrolled"

    @property
    def review_dir(self) -> Path:
        """The review's record: each batch ``whale identify`` answered (``batches/<id>/``) and
        every reviewer's decision (``decisions.jsonl``); one per home, across rounds."""
        return self.home / "review"

    @property
    def reports_dir(self) -> Path:
        """Lists too long for the run's log or metadata (every unreadable photo, say), one CSV each."""
        return self.round_home / "reports"

    @property
    def submission(self) -> Path:
        return self.round_home / "submission.csv"

    @property
    def match_review(self) -> Path:
        """The match-review sheet the submission stage draws."""
        return self.round_home / "match_review.png"

    @property
    def ultralytics_config(self) -> Path:
        return self.home / "ultralytics"
