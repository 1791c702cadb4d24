"""The Dagster instance home, created with telemetry off."""

from __future__ import annotations

import os
from pathlib import Path

from whale_ml.io import write_text
from whale_ml.settings import HomeLayout, default_home

DAGSTER_YAML = """\
# Written by whale_assets.instance; edit freely, it is not overwritten.
telemetry:
  enabled: false
# No "join the community" sign-up dialog in the UI (it needs the internet anyway).
nux:
  enabled: false
# GPU-heavy assets (detector, training, embeddings) are in the "gpu" pool; to run
# them one at a time across runs: `dagster instance concurrency set gpu 1`.
"""


def prepare_dagster_home(home: Path | None = None) -> Path:
    """Set ``DAGSTER_HOME`` (unless set) to ``$WHALE_HOME/dagster_home`` and create it."""
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or HomeLayout(home or default_home()).dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        write_text(dagster_home / "dagster.yaml", DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home
