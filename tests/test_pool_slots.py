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

from whale_assets.instance import (
    LOCK_TAG,
    PID_TAG,
    RUN_LOCKS,
    START_TAG,
    cli_run_process_gone,
    cli_run_tags,
    prepare_dagster_home,
    release_dead_cli_runs,
)


def _killed_whale_run(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dg.DagsterInstance:
    """A `whale run` (a real process) killed with SIGKILL while its detector training, a
    gpu-pool step, holds the pool's one slot; the instance it ran on (this process's now)."""
    home = tmp_path / "home"
    env = {**os.environ, "WHALE_HOME": str(home), "WHALE_DATA_DIR": str(tiny_data), "DAGSTER_HOME": str(home / "dagster_home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    for key in ("WHALE_HOME", "WHALE_DATA_DIR", "DAGSTER_HOME"):
        monkeypatch.setenv(key, env[key])
    prepare_dagster_home()
    assert "default_limit: 1" in (home / "dagster_home" / "dagster.yaml").read_text()

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
    return instance


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.kill
def test_killed_cli_run_gives_its_gpu_slot_back(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = _killed_whale_run(tiny_data, tmp_path, monkeypatch)
    released = release_dead_cli_runs(instance)
    assert len(released) == 1
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    assert instance.get_run_by_id(released[0]).status == dg.DagsterRunStatus.FAILURE
    assert release_dead_cli_runs(instance) == []  # nothing else to release; live runs are never touched


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.kill
def test_a_killed_run_whose_pid_the_next_run_got_again_gives_its_slot_back(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the Docker image `whale run` is PID 1, and so is the next container's: the killed
    run's record names the pid of the live process judging it. It is still judged gone (its
    lock is free; its start time is not this process's), its slot is freed and the next run's
    gpu step runs."""
    instance = _killed_whale_run(tiny_data, tmp_path, monkeypatch)
    (dead,) = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    instance.add_run_tags(dead.run_id, {PID_TAG: str(os.getpid())})  # PID 1 again, in the next container
    lock_dir = Path(instance.root_directory) / RUN_LOCKS
    tags = instance.get_run_by_id(dead.run_id).tags
    assert cli_run_process_gone(tags, lock_dir)  # by its lock, free since the kill
    without_lock = {k: v for k, v in tags.items() if k != LOCK_TAG}  # where flock is not available: pid and start time
    assert START_TAG in without_lock and cli_run_process_gone(without_lock, lock_dir)
    with cli_run_tags(instance) as live:  # a live run, judged from this same process: never gone
        assert not cli_run_process_gone(live, lock_dir)
        assert not cli_run_process_gone({k: v for k, v in live.items() if k != LOCK_TAG}, lock_dir)

        assert release_dead_cli_runs(instance) == [dead.run_id]
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots

        @dg.asset(pool="gpu")
        def next_gpu_step() -> int:
            return 1

        started = time.monotonic()
        assert dg.materialize([next_gpu_step], instance=instance, tags=live).success  # the slot is free: it runs at once
        assert time.monotonic() - started < 60
    assert release_dead_cli_runs(instance) == []
    assert list(lock_dir.iterdir()) == []  # the dead run's lock swept, the live one removed at its end
