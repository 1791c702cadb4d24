"""benchmarks/kaggle_scale.py: every stage runs end to end and reports positive numbers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from whale_ml.data.kaggle_shape import KAGGLE_TEST_PHOTOS, KAGGLE_TRAIN_PHOTOS, KaggleShapeConfig, generate_kaggle_shape

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kaggle_scale.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kaggle_scale_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_counts_every_competition_photo(bench: ModuleType) -> None:
    """The parent keeps its own copy of the photo count (it imports nothing heavy): it must be the generator's."""
    assert bench.FULL_PHOTOS == KAGGLE_TRAIN_PHOTOS + KAGGLE_TEST_PHOTOS


def test_a_filled_image_hook_is_timed_and_tabled(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``run_image_stage`` filled in, the harness times it over every photo and the table projects it."""
    data = generate_kaggle_shape(tmp_path / "data", KaggleShapeConfig(scale=0.0002, min_width=48, max_width=96, seed=1), workers=1)
    seen: list[tuple[str, int, int]] = []

    def stage(name: str, photos: list[Path], workers: int) -> dict[str, int]:
        seen.append((name, len(photos), workers))
        return {"photos": len(photos)}

    monkeypatch.setattr(bench, "run_image_stage", stage)
    out = bench.child_image({"photos": str(data), "name": "boxes_and_crops", "workers": 2})
    n = len(list((data / "train_images").iterdir())) + len(list((data / "test_images").iterdir()))
    assert seen == [("boxes_and_crops", n, 2)] and out["returned"] == {"photos": n}
    record = out["parts"][0]
    assert record["rows"] == n and record["seconds"] > 0 and record["peak_rss_mib"] > 0
    res = {"environment": {"cores": 2}, "config": {"scale": 0.0002, "photos": {"count": n, "min_width": 48, "max_width": 96}},
           "stages": {"image": [out]}}  # fmt: skip
    assert "| boxes_and_crops, 2 worker(s) | 2 |" in bench.markdown(res)


@pytest.mark.slow
def test_quick_run_reports_every_stage(tmp_path: Path) -> None:
    """``--quick``: every stage in its own process, each part with positive time, rate and memory (~1 min)."""
    out = tmp_path / "quick.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(tmp_path / "work")], check=True, timeout=600)
    res = json.loads(out.read_text())
    assert set(res["stages"]) == {"metadata", "folds", "arcface", "gallery", "threshold", "submission", "decode", "image"}
    parts = [(s, p) for s, run in res["stages"].items() if s != "image" for p in run["parts"]]
    assert len(parts) >= 16
    for stage, part in parts:
        for key in ("rows", "seconds", "rows_per_s", "peak_rss_mib"):
            assert part[key] > 0, (stage, part["name"], key)
    arcface = res["stages"]["arcface"]["parts"]
    assert [p.get("baseline_head", False) for p in arcface] == [True, False, False]
    assert arcface[2]["head_weights_mib"] == pytest.approx(2 * arcface[1]["head_weights_mib"], rel=0.01)  # two centres a class
    for run in res["stages"]["image"]:  # the lead's hook: timed once filled in, said so until then
        for part in run["parts"]:
            assert part.get("status") == "not implemented" or part["seconds"] > 0
    assert res["config"]["counts"] == {"train": 510, "individuals": 156, "test": 280}
    assert "| decode | " not in res["markdown"] and "PIL full decode, serial" in res["markdown"]
    assert res["environment"]["cores"] >= 1 and res["environment"]["date"]
