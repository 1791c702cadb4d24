"""The gpu pool holds one step at a time; a `whale run` killed mid-step does not keep its slot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from whale_assets.instance import prepare_dagster_home, release_dead_cli_runs


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.kill
def test_killed_cli_run_gives_its_gpu_slot_back(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "WHALE_HOME": str(home), "WHALE_DATA_DIR": str(tiny_data), "DAGSTER_HOME": str(home / "dagster_home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    for key in ("WHALE_HOME", "WHALE_DATA_DIR", "DAGSTER_HOME"):
        monkeypatch.setenv(key, env[key])
    prepare_dagster_home()
    assert "default_limit: 1" in (home / "dagster_home" / "dagster.yaml").read_text()

    # A `whale run` whose detector training (a gpu-pool step) is killed with SIGKILL.
    child = textwrap.dedent(
        """
        from whale_assets.run import load_recipe, run_pipeline
        recipe = load_recipe("configs/tiny.yaml")
        recipe["ops"]["fluke_detector"]["config"]["epochs"] = 500  # long enough to be killed in
        run_pipeline(recipe, log=lambda m: print(m, flush=True))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=Path(__file__).parent.parent, env=env, start_new_session=True)
    instance = dg.DagsterInstance.get()
    try:
        deadline = time.monotonic() + 180
        while not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots:
            assert proc.poll() is None and time.monotonic() < deadline, "the detector step never took its gpu slot"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots) == 1  # left behind

    released = release_dead_cli_runs(instance)
    assert len(released) == 1
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    assert instance.get_run_by_id(released[0]).status == dg.DagsterRunStatus.FAILURE
    assert release_dead_cli_runs(instance) == []  # nothing else to release; live runs are never touched
