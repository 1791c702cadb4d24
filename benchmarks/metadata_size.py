#!/usr/bin/env python
"""How much each asset puts in Dagster's event log: the size of its latest materialisation's
metadata, and the longest Markdown table in it, against the asset's row count.

    DAGSTER_HOME=/path/to/home/dagster_home python benchmarks/metadata_size.py

Run it on a home that ran the pipeline on a set with more than 50 photos per split (e.g. the
Kaggle-shaped set at ``--scale 0.01``): a table that grew with the photo count would show here as
a table as long as the asset. Images (contact sheet, curves) are inline PNGs of a fixed size.
"""

from __future__ import annotations

import json

import dagster as dg


def main() -> None:
    instance = dg.DagsterInstance.get()
    print("| asset | partition | metadata bytes (images) | metadata bytes (the rest) | longest table, rows | asset rows |")
    print("|---|---|---:|---:|---:|---:|")
    for key in sorted(instance.get_asset_keys(), key=lambda k: k.to_user_string()):
        for partition in sorted(instance.get_materialized_partitions(key)) or [None]:
            event = instance.get_latest_materialization_event(key) if partition is None else None
            if partition is not None:
                records = instance.fetch_materializations(dg.AssetRecordsFilter(key, asset_partitions=[partition]), limit=1).records
                event = records[0].event_log_entry if records else None
            if event is None or event.asset_materialization is None:
                continue
            metadata = event.asset_materialization.metadata
            images = rest = longest = 0
            for value in metadata.values():
                text = value.value if isinstance(value.value, str) else json.dumps(value.value, default=str)
                if isinstance(value, dg.MarkdownMetadataValue) and "data:image" in text:
                    images += len(text)
                    continue
                rest += len(text)
                if isinstance(value, dg.MarkdownMetadataValue):
                    longest = max(longest, sum(1 for line in text.splitlines() if line.startswith("|")) - 2)
            rows = metadata.get("dagster/row_count")
            print(f"| {key.to_user_string()} | {partition or ''} | {images:,} | {rest:,} | {max(longest, 0)} | {rows.value if rows else ''} |")


if __name__ == "__main__":
    main()
