"""The Dagster instance home, created with telemetry off."""

from __future__ import annotations

import os
from pathlib import Path

from whale_ml.io import pid_alive, write_text
from whale_ml.environment import default_home
from whale_ml.home import HomeLayout

DAGSTER_YAML = """\
# Written by whale_assets.instance; edit freely, it is not overwritten.
telemetry:
  enabled: false
# No "join the community" sign-up dialog in the UI (it needs the internet anyway).
nux:
  enabled: false
# GPU-heavy assets (detector, training, embeddings) are in the "gpu" pool: one at a
# time across all runs. More at once: `dagster instance concurrency set gpu 2`.
concurrency:
  pools:
    default_limit: 1
# The daemon (started by `dagster dev` / `make ui`) fails runs whose worker died, which
# gives their pool slots back.
run_monitoring:
  enabled: true
"""


def prepare_dagster_home(home: Path | None = None) -> Path:
    """Set ``DAGSTER_HOME`` (unless set) to ``$WHALE_HOME/dagster_home`` and create it."""
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or HomeLayout(home or default_home()).dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        write_text(dagster_home / "dagster.yaml", DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


def release_dead_cli_runs(instance: object) -> list[str]:
    """Fail the ``whale run`` runs whose process is gone, and free their pool slots.

    A run executed in-process holds its ``gpu`` pool slot while a step runs; if the
    process is killed (kill -9, a crash) nothing gives the slot back and the next run
    would wait for it forever. ``whale run`` tags its runs with its pid and calls this
    first. Runs of live processes, and runs launched from the UI, are left alone.
    """
    import dagster as dg

    released = []
    live = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=live, tags={"whale/launched_by": "whale run"})):  # type: ignore[attr-defined]
        pid = int(run.tags.get("whale/pid", "0") or 0)
        if pid and not pid_alive(pid):
            instance.report_run_failed(run, f"the whale run process (pid {pid}) that executed this run is gone")  # type: ignore[attr-defined]
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)  # type: ignore[attr-defined]
            released.append(run.run_id)
    return released
