"""What makes the detection stage stale in Dagster, on a real materialisation of ``prepare_data``
on the tiny set: a relabelled photo does not (the detector, boxes, crops and local features read
the ``photos`` table, which has no labels); the folds, which read the labels, do. And a
detector rematerialised with nothing changed is reused, with the same data version."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from whale_assets.instance import prepare_dagster_home
from whale_assets.run import load_recipe, stage_run_config
from whale_assets.stages import PREPARE_DATA, asset_names
from whale_ml.home import HomeLayout

REPO = Path(__file__).resolve().parent.parent
DETECTION = ["fluke_detector", "bboxes", "crops", "local_features"]


def _recipe() -> dict:
    """The tiny recipe, its detector trained for one epoch."""
    recipe = load_recipe(REPO / "configs" / "tiny.yaml")
    recipe["ops"]["fluke_detector"]["config"]["epochs"] = 1
    return recipe


def _materialise(*names: str) -> dg.ExecuteInProcessResult:
    from whale_assets.definitions import defs

    job = defs().resolve_implicit_global_asset_job_def()
    keys = [dg.AssetKey(n) for n in names]
    result = job.execute_in_process(run_config=stage_run_config(_recipe(), list(names)), instance=dg.DagsterInstance.get(), asset_selection=keys)
    assert result.success
    return result


def _resolver() -> object:
    """What the UI asks for stale status and data versions, made now (it caches)."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from whale_assets.definitions import defs

    instance = dg.DagsterInstance.get()
    return CachingStaleStatusResolver(instance, defs().resolve_asset_graph(), LoadingContextForTest(instance))


def _status() -> Callable[[str], str]:
    resolver = _resolver()
    return lambda name: resolver.get_status(dg.AssetKey(name)).value  # type: ignore[attr-defined]


def _version(name: str) -> str:
    return _resolver().get_current_data_version(dg.AssetKey(name)).value  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[dict[str, Path]]:
    """``prepare_data`` materialised once on a copy of the tiny set, shared (read-only) by the tests."""
    root = tmp_path_factory.mktemp("prepared")
    shutil.copytree(tiny_data, root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHALE_HOME", str(root / "home"))
        mp.setenv("WHALE_DATA_DIR", str(root / "data"))
        mp.setenv("DAGSTER_HOME", str(root / "home" / "dagster_home"))
        prepare_dagster_home()
        _materialise(*asset_names(PREPARE_DATA, 1))
        yield {"home": root / "home", "data": root / "data"}


@pytest.fixture
def own(prepared: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A copy of the prepared home and data set (``copytree`` keeps the photos' times) for a test that changes them."""
    own = {k: tmp_path / k for k in prepared}
    for k, path in prepared.items():
        shutil.copytree(path, own[k], symlinks=True)
    monkeypatch.setenv("WHALE_HOME", str(own["home"]))
    monkeypatch.setenv("WHALE_DATA_DIR", str(own["data"]))
    monkeypatch.setenv("DAGSTER_HOME", str(own["home"] / "dagster_home"))
    return own


@pytest.mark.e2e
def test_a_relabelled_photo_leaves_the_detection_stage_fresh_and_makes_the_folds_stale(own: dict[str, Path]) -> None:
    status = _status()
    assert {n: status(n) for n in ["photos", *DETECTION, "cv_folds"]} == dict.fromkeys(["photos", *DETECTION, "cv_folds"], "FRESH")
    before = {n: _version(n) for n in ("train_metadata", "photos")}
    train = pd.read_csv(own["data"] / "train.csv")
    others = train["individual_id"] != train.loc[0, "individual_id"]
    train.loc[0, "individual_id"] = train.loc[others, "individual_id"].iloc[0]  # photo 0 is someone else
    train.to_csv(own["data"] / "train.csv", index=False)

    _materialise("train_metadata", "photos")
    assert _version("train_metadata") != before["train_metadata"] and _version("photos") == before["photos"]
    status = _status()
    assert {n: status(n) for n in DETECTION} == dict.fromkeys(DETECTION, "FRESH")
    assert status("cv_folds") == "STALE"


@pytest.mark.e2e
def test_an_unchanged_detector_is_reused_with_the_same_data_version(own: dict[str, Path]) -> None:
    weights = HomeLayout(own["home"]).detector_dir / "detector.pt"
    before = (_version("fluke_detector"), weights.stat().st_mtime_ns, weights.read_bytes())

    result = _materialise("fluke_detector")
    (mat,) = result.asset_materializations_for_node("fluke_detector")
    assert mat.metadata["reused"].value is True and "val_map50" in mat.metadata
    assert (_version("fluke_detector"), weights.stat().st_mtime_ns, weights.read_bytes()) == before
    status = _status()
    assert {n: status(n) for n in DETECTION} == dict.fromkeys(DETECTION, "FRESH")
