"""Tables as parquet, small records as JSON: what flows between assets.

Models, crops, embeddings and indexes are files under the data home, written
by the assets themselves and passed on as paths; nothing is pickled here.

Errors raised here are final: a missing input or an unstorable value fails the step
at its first attempt, whatever its retry policy (docs/reliability.md, "Retry policy").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from whale_ml.io import atomic_path, write_json
from whale_ml.environment import default_home
from whale_ml.home import HomeLayout


class TableIOManager(dg.ConfigurableIOManager):
    """Stores pandas DataFrames as parquet and dicts as JSON under ``$WHALE_HOME/tables``."""

    base_dir: str = Field(default_factory=lambda: str(HomeLayout(default_home()).tables))

    def _stem(self, context: dg.OutputContext | dg.InputContext) -> Path:
        path = Path(self.base_dir, *context.asset_key.path)
        if context.has_asset_partitions and len(context.asset_partition_keys) == 1:
            path = path / context.asset_partition_keys[0]
        return path

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        stem = self._stem(context)
        if isinstance(obj, pd.DataFrame):
            with atomic_path(stem.with_suffix(".parquet")) as tmp:
                obj.to_parquet(tmp, index=False)
            context.add_output_metadata({"path": dg.MetadataValue.path(str(stem.with_suffix(".parquet")))})
        elif isinstance(obj, dict):
            write_json(stem.with_suffix(".json"), obj)
        else:
            raise dg.Failure(
                f"{context.asset_key.to_user_string()}: TableIOManager stores DataFrames and dicts, not {type(obj).__name__}",
                allow_retries=False,
            )

    def load_input(self, context: dg.InputContext) -> Any:
        stem = self._stem(context)
        if stem.with_suffix(".parquet").exists():
            return pd.read_parquet(stem.with_suffix(".parquet"))
        if stem.with_suffix(".json").exists():
            return json.loads(stem.with_suffix(".json").read_text())
        raise missing_input(context, stem)


def missing_input(context: dg.InputContext, stem: Path) -> dg.Failure:
    """The error for an input whose upstream asset was never materialised (or whose files
    were removed): a ``dg.Failure`` that disallows retries, since no retry can create the
    input, naming the asset, its partition and what to materialise first."""
    asset = context.asset_key.to_user_string()
    one_partition = context.has_asset_partitions and len(context.asset_partition_keys) == 1
    part = f" partition {context.asset_partition_keys[0]}" if one_partition else ""
    return dg.Failure(
        description=(
            f"input {asset}{part} has not been materialised yet (nothing at {stem}.parquet/.json): materialise {asset} first "
            "(in the UI, with the job of its stage, or all stages in order with `whale run`), then this step again."
        ),
        metadata={"missing_asset": asset, "expected_at": dg.MetadataValue.path(f"{stem}.parquet")},
        allow_retries=False,
    )
