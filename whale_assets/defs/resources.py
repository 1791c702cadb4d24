"""Resources and the IO manager, bound in one place."""

import dagster as dg

from whale_assets.io_manager import TableIOManager
from whale_assets.resources import MlflowTracking, WhaleHome


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "whale": WhaleHome(),
            "mlflow": MlflowTracking(),
            "io_manager": TableIOManager(),
        }
    )
