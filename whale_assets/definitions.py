"""The code location: every module under ``whale_assets/defs`` is loaded."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from whale_ml.offline import configure_environment
from whale_ml.settings import default_home

# Before anything imports ultralytics or mlflow: offline switches, settings in the home.
configure_environment(default_home())


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
