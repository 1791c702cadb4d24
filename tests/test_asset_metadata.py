"""What the assets report besides their value: tables as Dagster table metadata
(``table_meta``) and data versions from the tables' content (``table_version``)."""

from __future__ import annotations

import json
import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from whale_assets.metadata import table_meta
from whale_assets.versions import table_version


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


# --- table_version ----------------------------------------------------------------------


@pytest.fixture
def crops() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": ["a.jpg", "b.jpg", "c.jpg"],
            "crop_path": ["/home1/crops/train/a_1f2e3d4c5b.jpg", "/home1/crops/train/b_99aa88bb77.jpg", ""],
            "written": [True, True, False],
            "error": ["", "", "c.jpg: cannot identify image file"],
            "split": ["train", "train", "test"],
        }
    )


def test_same_content_same_version(crops: pd.DataFrame) -> None:
    version = table_version(crops)
    assert isinstance(version, dg.DataVersion) and version == table_version(crops.copy())
    # Read back from parquet (the IO manager), the table keeps its version.
    assert table_version(pd.read_parquet(_parquet_roundtrip(crops))) == version


def _parquet_roundtrip(df: pd.DataFrame) -> object:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.assign(split=["train", "train", "train"]),  # a value
        lambda d: d.iloc[[1, 0, 2]].reset_index(drop=True),  # the order
        lambda d: d.iloc[:2],  # a row fewer
        lambda d: d.rename(columns={"split": "part"}),  # a column's name
        lambda d: d.assign(crop_path=d["crop_path"].str.replace("1f2e3d4c5b", "0000000000")),  # another crop file
        lambda d: d.drop(columns="error"),  # a column fewer
    ],
)
def test_other_content_another_version(crops: pd.DataFrame, change: object) -> None:
    assert table_version(change(crops)) != table_version(crops)  # type: ignore[operator]


def test_run_flags_and_directories_are_not_content(crops: pd.DataFrame) -> None:
    """Reused crops (``written`` False) in a moved home are the same crops; a table's index is not stored."""
    again = crops.assign(written=False, crop_path=crops["crop_path"].str.replace("/home1/", "/mnt/big/home/"))
    assert table_version(again, ignore=["written"]) == table_version(crops, ignore=["written"])
    assert table_version(again) != table_version(crops)  # without ignore, the flag counts
    assert table_version(crops.set_index(pd.Index([5, 6, 7]))) == table_version(crops)
    assert crops["crop_path"].iloc[0].startswith("/home1/")  # the caller's table is left as it was
