"""Data versions of the tables: a digest of their content.

Every asset here has a ``code_version``, so without a reported data version Dagster
gives it a *logical* one, a hash of its code version and its inputs' versions. For
the metadata tables (no asset inputs) that hash never changes, whatever ``train.csv``
says, and nothing downstream would ever show as stale after a data change. With the
content digest instead, a rematerialisation that yields the same table keeps the same
version (the fold models stay up to date), and a changed table gets a new one (the
fold models show as stale). docs/architecture.md, "Data versions".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import dagster as dg
import pandas as pd


# Columns holding file paths, digested by file name: where the data set or the home
# lives is not what the files hold. A photo's name is its row's ``image``; a crop's name
# carries a digest of its photo (size, time), box, size and mode (whale_ml/detection/crops.py).
PATH_COLUMNS = ("path", "crop_path")


def table_version(df: pd.DataFrame, ignore: Iterable[str] = ()) -> dg.DataVersion:
    """A digest of the table as the assets downstream read it: column names, dtypes and
    every value, in row order (the order is part of some tables' meaning, e.g. the test
    photos' submission order). ``ignore`` names columns that describe the run rather
    than the content (whether a crop was written now or reused); the file path columns
    (``PATH_COLUMNS``) count by file name only, so a moved home or data set keeps its
    versions. The index is left out: it is not stored (parquet IO manager, ``reset_index``)."""
    table = df.drop(columns=[c for c in ignore if c in df.columns])
    for column in PATH_COLUMNS:
        if column in table.columns:
            table[column] = table[column].map(lambda p: os.path.basename(p) if isinstance(p, str) else p)
    digest = hashlib.sha256()
    digest.update(repr([(str(c), str(t)) for c, t in table.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return dg.DataVersion(digest.hexdigest()[:24])
