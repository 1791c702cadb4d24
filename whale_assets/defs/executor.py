"""The executor: Dagster's default, or one Kubernetes Job per step (``WHALE_EXECUTOR=k8s``)."""

import dagster as dg

from whale_assets.k8s import configured_executor


@dg.definitions
def executor() -> dg.Definitions:
    chosen = configured_executor()
    return dg.Definitions(executor=chosen) if chosen is not None else dg.Definitions()
