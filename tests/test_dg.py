"""The `dg` command line (dagster-dg-cli) on this project, as CI and a developer run it
from the checkout: the project is found through pyproject.toml's ``[tool.dg]``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from whale_assets.stages import all_asset_names, stages

pytestmark = pytest.mark.slow  # each loads the code location in a new process (~12 s of CPU)

REPO = Path(__file__).resolve().parent.parent
DG = Path(sys.executable).with_name("dg")


def _dg(*args: str) -> subprocess.CompletedProcess[str]:
    assert DG.exists(), f"{DG} missing: dagster-dg-cli is in the dev extra (pip install -e '.[dev]')"
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([str(DG), *args], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dg_check_defs_passes(whale_env: Path) -> None:
    """`dg check defs`, the check create-dagster's template runs in CI: the definitions load
    and validate (schedules, sensors, jobs, asset checks, partitions, resources)."""
    proc = _dg("check", "defs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All definitions loaded successfully." in proc.stdout


def test_dg_list_defs_shows_the_code_location(whale_env: Path) -> None:
    """`dg list defs` (what `dg dev` serves) finds every asset, job, schedule and sensor."""
    proc = _dg("list", "defs", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = json.loads(proc.stdout)
    assert sorted(a["asset_key"] for a in listed["assets"]) == all_asset_names()
    assert {j["name"] for j in listed["jobs"]} == {s.name for s in stages()} | {"rethreshold_and_submit"}
    assert listed["schedules"] == [{"name": "weekly_retrain", "cron_schedule": "0 3 * * 0"}]
    assert {s["name"] for s in listed["sensors"]} == {"training_data_changed", "rebuild_after_folds"}
