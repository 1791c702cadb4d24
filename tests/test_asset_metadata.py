"""What the assets report besides their value: tables as Dagster table metadata (``table_meta``)."""

from __future__ import annotations

import json
import math

import dagster as dg
import numpy as np
import pandas as pd

from whale_assets.metadata import table_meta


def _table(value: dg.MetadataValue) -> tuple[dict[str, str], list[dict[str, object]]]:
    assert isinstance(value, dg.TableMetadataValue)
    return {c.name: c.type for c in value.schema.columns}, [r.data for r in value.records]


# --- table_meta -------------------------------------------------------------------------


def test_a_dataframe_becomes_a_typed_table() -> None:
    df = pd.DataFrame(
        {
            "fold": ["fold0", "fold1"],
            "val_images": np.array([12, 7], dtype=np.int64),
            "val_new_share": [0.1666666, np.nan],
            "held_out": np.array([True, False]),
            "ratio": [np.inf, -np.inf],
        }
    )
    types, rows = _table(table_meta(df))
    assert types == {"fold": "string", "val_images": "int", "val_new_share": "float", "held_out": "bool", "ratio": "string"}
    assert rows == [
        {"fold": "fold0", "val_images": 12, "val_new_share": 0.1667, "held_out": True, "ratio": "inf"},
        {"fold": "fold1", "val_images": 7, "val_new_share": None, "held_out": False, "ratio": "-inf"},
    ]
    # Plain Python values only: the records reach the UI as strict JSON.
    assert all(type(v) in (str, int, float, bool, type(None)) for row in rows for v in row.values())
    json.dumps(rows, allow_nan=False)


def test_rows_as_dicts_keep_integers_beside_missing_values() -> None:
    """Champion/challenger rows: versions are ints or None (a DataFrame would make them floats),
    and a key missing from some rows is an empty cell there."""
    rows = [
        {"fold": "fold0", "challenger": None, "decision": "no registered model for this fold"},
        {"fold": "fold1", "challenger": 3, "champion_after": 3, "challenger_map5": 0.51234, "decision": "first model of this fold"},
    ]
    types, records = _table(table_meta(rows))
    assert list(types) == ["fold", "challenger", "decision", "champion_after", "challenger_map5"]
    assert types["challenger"] == types["champion_after"] == "int" and types["challenger_map5"] == "float"
    assert records[0]["champion_after"] is None and records[1]["challenger"] == 3 and records[1]["challenger_map5"] == 0.5123


def test_digits_round_for_reading_or_keep_everything() -> None:
    df = pd.DataFrame({"x": [math.pi, 12345.678, 1e-7]})
    assert [r["x"] for r in _table(table_meta(df))[1]] == [3.142, 12350.0, 1e-7]
    assert [r["x"] for r in _table(table_meta(df, digits=None))[1]] == [math.pi, 12345.678, 1e-7]


def test_mixed_and_empty_columns_are_strings() -> None:
    df = pd.DataFrame({"a": [1, "x"], "b": [None, None], "when": pd.to_datetime(["2026-11-30", "2026-12-01"])})
    types, rows = _table(table_meta(df))
    assert types == {"a": "string", "b": "string", "when": "string"}
    assert rows[0] == {"a": 1, "b": None, "when": "2026-11-30 00:00:00"}
    types, rows = _table(table_meta(pd.DataFrame(columns=["image", "error"])))
    assert types == {"image": "string", "error": "string"} and rows == []


def test_a_table_survives_a_real_materialisation() -> None:
    """Stored in the instance's event log and read back as the UI reads it."""
    summary = pd.DataFrame({"fold": [0, 1], "val_images": [12, 7], "val_new_share": [0.25, 0.5]})

    @dg.asset
    def folds() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"fold_table": table_meta(summary)})

    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([folds], instance=instance).success
    stored = instance.get_latest_materialization_event(dg.AssetKey("folds")).asset_materialization.metadata  # type: ignore[union-attr]
    types, rows = _table(stored["fold_table"])
    assert types == {"fold": "int", "val_images": "int", "val_new_share": "float"}
    assert rows == summary.to_dict("records")
