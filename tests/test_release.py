"""The release and the champion decision (whale_ml.gallery.champion, .release), on a real SQLite
MLflow store: the rule, the release run with its nested fold runs, aliases moved together, the
home's champion record, and the gallery line it serves. The decision on two real pipeline
releases, and `whale identify` after a retrain that loses: tests/test_pipeline.py."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from whale_ml.data.folds import make_folds, validation_digest
from whale_ml.data.metadata import read_train_metadata
from whale_ml.gallery.champion import ReleaseCandidate, publish_release, release_promotion
from whale_ml.gallery.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.gallery.matchers import models_key
from whale_ml.gallery.release import ChampionRecord, Release, ReleasePointerError, read_release, record_champion, record_release
from whale_ml.gallery.versions import list_versions, load_version, prune_versions, write_version
from whale_ml.home import HomeLayout
from whale_ml.io import read_json
from whale_ml.registry import PARENT_RUN_TAG, SHA_TAG, ReleaseScore
from whale_ml.retrieval.faiss_index import l2_normalise
from whale_ml.retrieval.matcher import Matcher, TunedMatcher

NAME = "test-arcface"
FOLDS = ("fold0", "fold1")


@pytest.mark.parametrize(
    ("new", "champion", "promoted", "why"),
    [
        (ReleaseScore("b", 0.5, "d1"), None, True, "first release: no champion yet (or its MLflow run is gone)"),
        (ReleaseScore("a", 0.5, "d1"), ReleaseScore("a", 0.5, "d1"), True, "already champion"),
        (ReleaseScore("b", 0.1, "d2"), ReleaseScore("a", 0.9, "d1"), True, "validated on other data: not comparable"),
        (ReleaseScore("b", 0.5, "d1"), ReleaseScore("a", 0.5, "d1"), True, "out-of-fold MAP@5 0.5000 >= the champion's 0.5000"),
        (ReleaseScore("b", 0.4, "d1"), ReleaseScore("a", 0.5, "d1"), False, "0.4000 < the champion's 0.5000: champion kept"),
        (ReleaseScore("b", math.nan, "d1"), ReleaseScore("a", 0.5, "d1"), False, "champion kept"),  # a score that is not a number
        (ReleaseScore("b", 0.4, "d1"), ReleaseScore("a", math.nan, "d1"), True, ">= the champion's nan"),
    ],
)
def test_release_promotion_rule(new: ReleaseScore, champion: ReleaseScore | None, promoted: bool, why: str) -> None:
    got, reason = release_promotion(new, champion)
    assert got is promoted and why in reason


def test_the_validation_digest_names_the_questions_and_their_answers(tiny_data: Path) -> None:
    """The same validation photos and truths give the same digest, training-side rows (a later
    round's pseudo-labelled photos) change nothing, and other folds change it."""
    train = read_train_metadata(tiny_data)
    folds = make_folds(train, 2, 0.2, 0)
    digest = validation_digest(folds, [0, 1])
    assert digest == validation_digest(folds.sample(frac=1.0, random_state=3), [0, 1]) and len(digest) == 16
    pseudo = folds.iloc[:3].assign(image=["p0.jpg", "p1.jpg", "p2.jpg"], pseudo=True, fold=0)
    assert validation_digest(pd.concat([folds.assign(pseudo=False), pseudo], ignore_index=True), [0, 1]) == digest
    assert validation_digest(make_folds(train, 2, 0.2, 1), [0, 1]) != digest
    assert validation_digest(folds, [0]) != digest


# ---------------------------------------------------------------- a store with two fold models per release


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """An empty SQLite MLflow store with one experiment, and an empty home."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("release-test", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model(NAME)
    yield {"uri": uri, "client": client, "experiment": experiment, "layout": HomeLayout(tmp_path / "home"), "source": str(tmp_path)}
    mlflow.set_tracking_uri(None)


def _fold_models(store: dict, tag: str, best: float = 0.3) -> list[FoldModel]:
    """Two fold models as the training and embedding stages leave them in MLflow: a training
    run per fold (with its best validation MAP@5) and the registry version logged from it, and
    an embedding run tagged with the checkpoint's digest."""
    client, models = store["client"], []
    for fold in FOLDS:
        sha = f"{tag}-{fold}".ljust(64, "0")
        training = client.create_run(store["experiment"], tags={"stage": "training", "fold": fold})
        client.log_metric(training.info.run_id, "best_val_map5", best)
        version = client.create_model_version(NAME, source=store["source"], run_id=training.info.run_id, tags={SHA_TAG: sha})
        client.create_run(store["experiment"], tags={"stage": "embedding", "fold": fold, SHA_TAG: sha})
        models.append(FoldModel(fold=fold, checkpoint_sha256=sha, registered_model=NAME, version=str(version.version)))
    return models


def _candidate(store: dict, models: list[FoldModel], oof: float, digest: str = "d1", number: int = 1, gallery: str = "v0001") -> tuple[ReleaseCandidate, str]:
    """A release of ``models`` scoring ``oof``, with its threshold run, and its release run (not open)."""
    key = models_key(models)
    store["client"].create_run(store["experiment"], tags={"stage": "retrieval", "models_key": key})
    tuned = TunedMatcher(Matcher(0.5), oof, 0.2, 26).for_models([m.model_dump() for m in models], key)
    run = store["client"].create_run(store["experiment"], tags={"stage": "release"})
    candidate = ReleaseCandidate(number, gallery, models, key, oof, 0.5, 0.2, 26, digest, tuned, test_map5=0.6)
    return candidate, run.info.run_id


def _aliases(store: dict, role: str, label: str = "{fold}") -> list[str]:
    return [str(store["client"].get_model_version_by_alias(NAME, f"{role}_{label.format(fold=f)}").version) for f in FOLDS]


@pytest.mark.slow  # a real SQLite store, seconds to create
def test_a_release_is_one_run_with_its_fold_runs_nested_and_the_champion_moves_whole(store: dict) -> None:
    """The first release becomes champion; a worse one on the same validation data does not
    (the challenger aliases move, the champion ones and the home's record stay); one validated on
    other data does, whatever it scores; one that ties does. Every decision is tagged on its run."""
    client, layout = store["client"], store["layout"]
    first_models = _fold_models(store, "a", best=0.31)
    first, first_run = _candidate(store, first_models, 0.5)
    decision = publish_release(layout, store["uri"], first_run, store["experiment"], first)
    assert decision.promoted and decision.before is None and decision.nested == 5  # 2 training, 2 embedding, 1 threshold
    run = client.get_run(first_run)
    assert run.data.metrics == {
        "oof_map5": 0.5, "threshold": 0.5, "new_share": 0.2, "queries": 26.0, "test_map5": 0.6, "fold0_val_map5": 0.31, "fold1_val_map5": 0.31
    }  # fmt: skip
    assert run.data.params == {
        "round": "1", "gallery_version": "v0001", "models_key": first.models_key, "registered_model": NAME,
        "validation_digest": "d1", "fold0_model_version": "1", "fold1_model_version": "2",
    }  # fmt: skip
    assert (run.data.tags["champion"], run.data.tags["champion_before"]) == ("true", "")
    children = client.search_runs([store["experiment"]], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{first_run}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["embedding", "embedding", "retrieval", "training", "training"]
    assert {r.info.run_id for r in children if r.data.tags["stage"] == "training"} == {
        client.get_model_version(NAME, m.version).run_id for m in first_models
    }
    assert _aliases(store, "champion") == _aliases(store, "challenger") == ["1", "2"]
    record = read_release(layout).champion
    assert record is not None and (record.run_id, record.models_key, record.oof_map5, record.round) == (first_run, first.models_key, 0.5, 1)
    assert (layout.gallery_dir / "matchers" / record.matcher).is_file()

    worse, worse_run = _candidate(store, _fold_models(store, "b"), 0.4, gallery="v0002")
    decision = publish_release(layout, store["uri"], worse_run, store["experiment"], worse)
    assert not decision.promoted and "champion kept" in decision.reason and decision.before_map5 == 0.5
    assert _aliases(store, "champion") == ["1", "2"] and _aliases(store, "challenger") == ["3", "4"]
    assert read_release(layout).champion == record
    tags = client.get_run(worse_run).data.tags
    assert (tags["champion"], tags["champion_before"]) == ("false", first_run) and "champion kept" in tags["decision"]

    other, other_run = _candidate(store, _fold_models(store, "c"), 0.1, digest="d2", gallery="v0003")
    decision = publish_release(layout, store["uri"], other_run, store["experiment"], other)
    assert decision.promoted and "not comparable" in decision.reason
    assert _aliases(store, "champion") == _aliases(store, "challenger") == ["5", "6"]
    assert client.get_run(first_run).data.tags["champion"] == "false", "the dethroned release says so"
    # Published again (a retried step): the same run, "already champion", nothing moves.
    again = publish_release(layout, store["uri"], other_run, store["experiment"], other)
    assert again.promoted and again.reason == "already champion" and _aliases(store, "champion") == ["5", "6"]

    # A later round's release moves that round's aliases, and the home serves its round.
    second = layout.in_round("round2")
    tie, tie_run = _candidate(store, _fold_models(store, "d"), 0.1, digest="d2", number=2)
    decision = publish_release(second, store["uri"], tie_run, store["experiment"], tie)
    assert decision.promoted and ">=" in decision.reason
    assert _aliases(store, "champion", "round2_{fold}") == ["7", "8"] and _aliases(store, "champion") == ["5", "6"]
    release = read_release(layout)
    assert (release.number, release.layout, release.models_key) == (2, second, tie.models_key)


def test_a_release_with_an_unregistered_fold_model_is_refused(tmp_path: Path) -> None:
    """Refused before MLflow is asked anything: ``whale identify`` could not find its models by alias."""
    models = [FoldModel(fold=f, checkpoint_sha256=f.ljust(64, "0"), registered_model=NAME, version="1") for f in FOLDS]
    models[1] = models[1].model_copy(update={"version": None})
    tuned = TunedMatcher(Matcher(0.5), 0.5, 0.2, 26).for_models([m.model_dump() for m in models], models_key(models))
    candidate = ReleaseCandidate(1, "v0001", models, tuned.models_key, 0.5, 0.5, 0.2, 26, "d1", tuned)
    layout = HomeLayout(tmp_path)
    with pytest.raises(LineageError, match="the fold1 model"):
        publish_release(layout, f"sqlite:///{tmp_path / 'never-made.db'}", "run", "0", candidate)
    assert read_release(layout).champion is None and not (tmp_path / "never-made.db").exists()


# ---------------------------------------------------------------- the line the home serves


def _lineage(tag: str) -> GalleryLineage:
    models = [FoldModel(fold=f, checkpoint_sha256=f"{tag}-{f}".ljust(64, "0"), registered_model=NAME, version="1") for f in FOLDS]
    return GalleryLineage(models=models, detector_sha256=None, detector_imgsz=64, min_confidence=0.25, expand=1.2, crop_size=64, resize="pad")


def _version(layout: HomeLayout, lineage: GalleryLineage, rows: int) -> str:
    table = pd.DataFrame(
        {"image": [f"p{j}.jpg" for j in range(rows)], "individual_id": "a", "species": "s", "crop_path": "", "source": "pipeline"}
    )
    emb = l2_normalise(np.random.default_rng(rows).normal(size=(rows, 8)).astype(np.float32))
    return write_version(layout, table, emb, lineage, made_by="test").name


def _champion(lineage: GalleryLineage, number: int = 1) -> ChampionRecord:
    return ChampionRecord(
        round=number, models=lineage.models, models_key=models_key(lineage.models), gallery_version="v0001", matcher="m.json",
        run_id="r1", oof_map5=0.5, validation_digest="d1", decided="2026-01-01T00:00:00Z",
    )  # fmt: skip


def test_the_champion_s_line_is_served_whatever_a_later_release_built(tmp_path: Path) -> None:
    """The champion's models built v0001 and v0003 (an enrolment); a losing release built v0002
    and v0004, the newest. Served: v0003, the newest of the champion's line (and an older one of
    that line when it is broken); a prune keeps it; the newest release's round is recorded
    beside the champion without replacing it."""
    layout = HomeLayout(tmp_path)
    champion, loser = _lineage("a"), _lineage("b")
    for lineage, rows in ((champion, 4), (loser, 5), (champion, 6), (loser, 7)):
        _version(layout, lineage, rows)
    key = models_key(champion.models)
    assert read_release(layout) == Release(1, layout)  # no record: the newest version serves, as before
    assert load_version(layout).name == "v0004" and load_version(layout, models_key=key).name == "v0003"
    record_release(layout, 1)
    record_champion(layout, _champion(champion))
    record_release(layout, 1)  # a later gallery build of the release round keeps the champion
    assert read_json(layout.release_pointer)["champion"]["models_key"] == key
    release = read_release(layout)
    assert release.models_key == key and release.number == 1 and release.champion == _champion(champion)

    (layout.gallery_versions_dir / "v0003" / "embeddings.npy").write_bytes(b"broken")
    fallback = load_version(layout, models_key=key)
    assert (fallback.name, fallback.fallback_from) == ("v0001", "v0003"), "an older version of the same line, never the loser's"
    with pytest.raises(LineageError, match="no gallery version .* was built with the champion release's models"):
        load_version(layout, models_key="0" * 16)

    assert prune_versions(layout, 1, keep_line=key) == ["v0001", "v0002"]  # v0004 is current, v0003 the champion's newest
    assert list_versions(layout)["version"].tolist() == ["v0003", "v0004"]


def test_a_malformed_champion_record_is_named(tmp_path: Path) -> None:
    layout = HomeLayout(tmp_path)
    layout.release_pointer.parent.mkdir(parents=True, exist_ok=True)
    layout.release_pointer.write_text('{"round": 1, "champion": {"round": 1}}')
    with pytest.raises(ReleasePointerError, match="release.json: the champion record is malformed"):
        read_release(layout)


# ---------------------------------------------------------------- a store that is locked

# Holds the SQLite database at argv[1] locked (BEGIN EXCLUSIVE: no other connection may
# read or write it) until killed, and says so on stdout once it holds the lock.
_LOCK_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_a_locked_store_fails_the_decision_and_keeps_the_better_champion(store: dict, tmp_path: Path) -> None:
    """A champion release (out-of-fold MAP@5 0.9) and a worse new one (0.4); another process
    holds the SQLite store locked while the new one is published. A locked store is not "no
    champion": publishing raises a transient error (the step's retry policy tries it again),
    and no alias and no record moves. Slow by MLflow's design: its SQLite sessions wait 20 s
    (``PRAGMA busy_timeout``, not configurable) before they report the lock."""
    from whale_assets.retries import is_transient

    layout = store["layout"]
    best, best_run = _candidate(store, _fold_models(store, "a"), 0.9)
    publish_release(layout, store["uri"], best_run, store["experiment"], best)
    worse, worse_run = _candidate(store, _fold_models(store, "b"), 0.4, gallery="v0002")
    record = read_release(layout).champion

    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(tmp_path / "mlflow.db")], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # type: ignore[union-attr]
        started = time.monotonic()
        with pytest.raises(Exception) as raised:
            publish_release(layout, store["uri"], worse_run, store["experiment"], worse)
        print(f"locked store: {type(raised.value).__name__} after {time.monotonic() - started:.1f} s: {str(raised.value)[:200]}")
        assert is_transient(raised.value), raised.value
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    assert _aliases(store, "champion") == _aliases(store, "challenger") == ["1", "2"]
    assert read_release(layout).champion == record
