"""submission_csv replaces submission.csv only with a file that passed its format check.

Real materialisations of ``submission_csv`` on a real gallery version (built from fold
embedding sets by ``build_gallery``); the upstream tables are small assets of the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from whale_assets.defs.submission import submission_csv_asset
from whale_assets.resources import WhaleHome
from whale_assets.rounds import Round
from whale_ml.gallery import build_gallery
from whale_ml.gallery.lineage import EMBEDDINGS_RECORD, FoldModel, record_boxes, record_crops
from whale_ml.gallery.matchers import save_matcher
from whale_ml.retrieval.matcher import Matcher, TunedMatcher
from whale_ml.home import HomeLayout
from whale_ml.io import write_json
from whale_ml.retrieval.store import save_embeddings
from whale_ml.stage_configs import GalleryConfig

FOLDS = ["fold0", "fold1"]
TESTS = [f"q{i}.jpg" for i in range(5)]


def _home(home: Path, individual: str) -> dict[str, Any]:
    """Two folds' embeddings of 24 training photos of 6 individuals named ``individual``
    + a number, and the gallery version built from them; the upstream assets' values."""
    layout = HomeLayout(home)
    rng = np.random.default_rng(0)
    train = pd.DataFrame(
        {"image": [f"t{i:02d}.jpg" for i in range(24)], "individual_id": [f"{individual}{i % 6}" for i in range(24)], "species": "orca"}
    )
    record_boxes(layout, 0.25, 1.2, 64, None)
    record_crops(layout, 64, "pad")
    for fold in FOLDS:  # a fold folder of loose files (no set pointer): written as tests and users may
        folder = layout.embeddings_dir(fold)
        save_embeddings(folder, "train", rng.normal(size=(24, 8)).astype(np.float32), train["image"].tolist())
        save_embeddings(folder, "test", rng.normal(size=(5, 8)).astype(np.float32), TESTS)
        write_json(folder / EMBEDDINGS_RECORD, FoldModel(fold=fold, checkpoint_sha256=fold.encode().hex().ljust(64, "0")).model_dump())
    crops = pd.DataFrame({"image": [*train["image"], *TESTS], "crop_path": ""})
    version, _ = build_gallery(layout, FOLDS, train, crops, GalleryConfig(), lambda _: [])
    return {
        "test_metadata": pd.DataFrame({"image": TESTS}),
        "train_metadata": train,
        "match_threshold": save_matcher(layout, version.lineage.models, TunedMatcher(Matcher(0.3), 0.5, 0.2, 10)).to_dict(),  # tuned for these models
        "gallery": {"version": version.name},
        "crops": crops,
    }


def _materialise(home: Path, values: dict[str, Any]) -> dg.ExecuteInProcessResult:
    def upstream(name: str) -> dg.AssetsDefinition:
        @dg.asset(name=name)
        def value() -> Any:
            return values[name]

        return value

    @dg.asset(name="local_features")
    def local_features() -> None:
        """submission_csv's dep (read only when the threshold was tuned with re-ranking)."""

    stubs = [upstream(name) for name in values]
    submission_csv = submission_csv_asset(Round(1, 1))
    resources = {"whale": WhaleHome(home=str(home)), "io_manager": dg.FilesystemIOManager(base_dir=str(home / "io"))}
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(stubs, resources=resources, instance=instance)
    return dg.materialize(
        [*stubs, local_features, submission_csv], selection=[submission_csv], resources=resources, instance=instance, raise_on_error=False
    )


@pytest.mark.slow
def test_a_submission_failing_its_format_check_never_replaces_the_previous_one(tmp_path: Path) -> None:
    """The first submission passes and is written; the next one (an individual id with a
    space: six tokens in a row) fails its blocking check on the staged file: the step fails
    naming the problem, and submission.csv is byte for byte the previous one, no temp left."""
    home = tmp_path / "home"
    good = _materialise(home, _home(home, "whale"))
    assert good.success
    path = HomeLayout(home).submission
    before = path.read_bytes()
    assert [c.passed for c in good.get_asset_check_evaluations()] == [True]

    bad = _materialise(home, _home(home, "whale "))  # "whale 0": two ids to the format
    assert not bad.success
    assert path.read_bytes() == before  # the previous submission, untouched
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.message if failure.step_failure_data.error else ""  # type: ignore[union-attr]
    assert "fails its format check" in message and "without 5 distinct ids" in message and "previous submission.csv" in message
    assert sorted(p.name for p in path.parent.glob("*submission*")) == ["submission.csv"]
