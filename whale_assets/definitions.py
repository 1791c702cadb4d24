"""The code location: every module under ``whale_assets/defs`` (the asset groups' modules, plus jobs,
automation and the executor), with the resources bound here, in one place.

The modules with round-dependent assets (training, retrieval, submission, pseudo-labels,
jobs, automation) build them in a ``@dg.definitions`` function, called each time
:func:`defs` is: the graph holds the rounds asked for then (``$WHALE_ROUNDS``, or
``whale_assets.rounds.building_rounds``), though Python imports the modules once."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from whale_ml.environment import default_home
from whale_ml.offline import configure_environment

# Before anything imports ultralytics or mlflow: offline switches, settings in the home.
configure_environment(default_home())


def deployment_resources() -> dict[str, object]:
    """The resources every asset uses. A deployment changes them through the environment
    (``WHALE_HOME``, ``WHALE_DATA_DIR``, ``MLFLOW_TRACKING_URI``...: docs/deployment.md),
    read when a run uses them, so one definition serves any home."""
    from whale_assets.io_manager import TableIOManager
    from whale_assets.resources import MlflowTracking, WhaleHome

    return {"whale": WhaleHome(), "mlflow": MlflowTracking(), "io_manager": TableIOManager()}


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(resources=deployment_resources()),
    )
