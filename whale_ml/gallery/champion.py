"""The champion decision: which release serves, decided per release on its logged scores.

A retrain makes a new release (fold models, the gallery version built with them, the
matcher tuned for them). :func:`publish_release` logs it to its MLflow release run (one
run per release, the same parameter and metric names in every one, so that MLflow's
compare view sets two retrains side by side), nests the runs that made its fold models
under that run, and decides whether it becomes the champion:

* the rule (:func:`release_promotion`) compares the out-of-fold MAP@5 the new release's run
  logged with the one the champion release's run logged, both read back from MLflow, and
  only when both were measured on the same validation data (the same
  :func:`whale_ml.data.folds.validation_digest`); on other data they do not compare, and
  the newer release wins;
* the winner's fold models get the aliases ``champion_<fold>`` all together, and the home
  records it (``release.json``: :mod:`whale_ml.gallery.release`), under the catalogue's
  writer lock; ``challenger_<fold>`` always names the newest release's models;
* the decision is tagged on the release run (``champion``, ``decision``, ``champion_before``).

``whale identify`` serves the champion release: its models (by the champion aliases), its
matcher and the newest gallery version built with its models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from whale_ml.gallery.catalogue import catalogue_lock
from whale_ml.gallery.lineage import FoldModel, LineageError
from whale_ml.gallery.matchers import save_release_matcher
from whale_ml.gallery.release import ChampionRecord, read_champion, record_champion
from whale_ml.home import HomeLayout
from whale_ml.retrieval.matcher import TunedMatcher
from whale_ml.registry import (
    OOF_MAP5,
    RELEASE_STAGE,
    VALIDATION_DIGEST,
    FoldRuns,
    ReleaseScore,
    log_release_run,
    nest_runs,
    point_aliases,
    release_fold_runs,
    release_score,
    runs_tagged,
)


@dataclass(frozen=True)
class ReleaseCandidate:
    """A release as the ``release`` asset found it: what answers, and how well it scored.

    Attributes:
        number: its training round.
        gallery_version: the gallery version its gallery stage built.
        models: its fold models (the gallery's lineage), all in the MLflow registry.
        models_key: their digest (:func:`whale_ml.gallery.matchers.models_key`).
        oof_map5: the matcher's out-of-fold MAP@5 (the species' thresholds where tuned).
        threshold: the matcher's global new_individual threshold.
        new_share: the share of validation photos predicted new first.
        queries: the validation photos pooled over folds.
        validation_digest: the validation data those were measured on.
        matcher: the matcher tuned for the models, as the release scored it (the champion's is
            kept apart from the file a later re-tuning of the same models replaces).
        test_map5: the submission's MAP@5 against ``test_truth.csv``; None without one.
    """

    number: int
    gallery_version: str
    models: Sequence[FoldModel]
    models_key: str
    oof_map5: float
    threshold: float
    new_share: float
    queries: int
    validation_digest: str
    matcher: TunedMatcher
    test_map5: float | None = None

    def params(self) -> dict[str, str]:
        """Its MLflow parameters, named alike in every release (folds by their key, not their round's label)."""
        versions = {f"{m.fold}_model_version": m.version or "" for m in self.models}
        return {
            "round": str(self.number),
            "gallery_version": self.gallery_version,
            "models_key": self.models_key,
            "registered_model": ", ".join(sorted({m.registered_model or "" for m in self.models})),
            VALIDATION_DIGEST: self.validation_digest,
            **versions,
        }

    def metrics(self) -> dict[str, float]:
        """Its MLflow metrics; ``test_map5`` only when it was scored."""
        found = {OOF_MAP5: self.oof_map5, "threshold": self.threshold, "new_share": self.new_share, "queries": float(self.queries)}
        return found if self.test_map5 is None else {**found, "test_map5": self.test_map5}


@dataclass(frozen=True)
class ReleaseDecision:
    """What :func:`publish_release` decided, and on which scores."""

    promoted: bool
    reason: str
    champion: ChampionRecord  # the champion after the decision
    before: ChampionRecord | None
    before_map5: float | None  # the previous champion's logged oof_map5, read back from MLflow
    fold_runs: list[FoldRuns]
    nested: int  # runs nested under the release run


def release_promotion(new: ReleaseScore, champion: ReleaseScore | None) -> tuple[bool, str]:
    """The champion/challenger rule on releases: whether ``new`` becomes champion, and why.

    It does when there is no champion yet (or its run is gone from MLflow), when the two were
    validated on other data (not comparable: the newer release wins), and when its out-of-fold
    MAP@5 is at least the champion's. A new score that is not a number never wins a comparison;
    a champion's that is not one (a run logged without it) loses to any number.
    """
    if champion is None:
        return True, "first release: no champion yet (or its MLflow run is gone)"
    if champion.run_id == new.run_id:
        return True, "already champion"
    if champion.validation_digest != new.validation_digest:
        return True, "the champion release was validated on other data: not comparable, the newer release wins"
    if not math.isnan(new.oof_map5) and (math.isnan(champion.oof_map5) or new.oof_map5 >= champion.oof_map5):
        return True, f"out-of-fold MAP@5 {new.oof_map5:.4f} >= the champion's {champion.oof_map5:.4f}"
    return False, f"out-of-fold MAP@5 {new.oof_map5:.4f} < the champion's {champion.oof_map5:.4f}: champion kept"


def publish_release(
    layout: HomeLayout, tracking_uri: str, run_id: str, experiment_id: str, candidate: ReleaseCandidate
) -> ReleaseDecision:
    """Log ``candidate`` to its release run, nest its fold runs under it, and decide whether it
    becomes the champion (the module's docstring). Safe to repeat for the same run (a retried step).

    Args:
        layout: the home's paths in the release's round.
        run_id: the release run (open or not) in ``experiment_id``.

    Raises:
        LineageError: a fold model is not in the registry (identify could not serve it by alias).
        MlflowRefusedError, MlflowException: MLflow refused or failed; nothing was decided
            before every score was read.
    """
    unregistered = [m.fold for m in candidate.models if m.registered_model is None or m.version is None]
    if unregistered:
        raise LineageError(f"the {', '.join(unregistered)} model(s) of this release are not in the MLflow registry: rematerialise arcface_model")
    models = [(m.fold, m.registered_model or "", m.version or "", m.checkpoint_sha256) for m in candidate.models]
    fold_runs = release_fold_runs(tracking_uri, experiment_id, models)
    best = {f"{f.fold}_val_map5": f.best_val_map5 for f in fold_runs if f.best_val_map5 is not None}
    tags = {"stage": RELEASE_STAGE, "models_key": candidate.models_key}
    log_release_run(tracking_uri, run_id, candidate.params(), {**candidate.metrics(), **best}, tags)
    threshold_runs = runs_tagged(tracking_uri, experiment_id, {"stage": "retrieval", "models_key": candidate.models_key})
    children = {*(f.training for f in fold_runs), *(r for f in fold_runs for r in f.embedding), *threshold_runs} - {run_id}
    nest_runs(tracking_uri, run_id, sorted(children))
    return _decide(layout, tracking_uri, run_id, candidate, fold_runs, len(children))


def _decide(
    layout: HomeLayout, tracking_uri: str, run_id: str, candidate: ReleaseCandidate, fold_runs: list[FoldRuns], nested: int
) -> ReleaseDecision:
    """The decision, under the catalogue's writer lock: from reading the champion to recording
    the next, so two releases decided at once take turns and neither overwrites the other's."""
    with catalogue_lock(layout, "release decision"):
        before = read_champion(layout)
        new = release_score(tracking_uri, run_id)
        if new is None:
            raise LineageError(f"the release's MLflow run {run_id} is gone: it was deleted while the release was published")
        old = release_score(tracking_uri, before.run_id) if before is not None else None
        promoted, reason = release_promotion(new, old)
        _point(tracking_uri, layout, candidate.models, "challenger")
        champion = before
        if promoted:
            # Every fold's alias moves to the winner together, and the home follows: the
            # aliases, the record and the gallery line identify serves name one release.
            _point(tracking_uri, layout, candidate.models, "champion")
            champion = ChampionRecord(
                round=candidate.number,
                models=list(candidate.models),
                models_key=candidate.models_key,
                gallery_version=candidate.gallery_version,
                matcher=save_release_matcher(layout, run_id, candidate.matcher).name,
                run_id=run_id,
                oof_map5=new.oof_map5,
                validation_digest=candidate.validation_digest,
                decided=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            record_champion(layout, champion)
            if old is not None and before is not None and before.run_id != run_id:
                log_release_run(tracking_uri, before.run_id, tags={"champion": "false"})
        log_release_run(
            tracking_uri,
            run_id,
            tags={"champion": str(promoted).lower(), "decision": reason, "champion_before": before.run_id if before is not None else ""},
        )
    assert champion is not None  # promoted whenever there was none
    return ReleaseDecision(promoted, reason, champion, before, old.oof_map5 if old is not None else None, fold_runs, nested)


def _point(tracking_uri: str, layout: HomeLayout, models: Sequence[FoldModel], role: str) -> None:
    """Point ``<role>_<fold label>`` at each fold model's version (labels of ``layout``'s round)."""
    for m in models:
        point_aliases(tracking_uri, m.registered_model or "", {f"{role}_{layout.fold_label(m.fold)}": m.version or ""})
