"""Group ``raw`` (stage ``prepare_data``): the Kaggle CSVs, validated and normalised, and the photos they list."""

from pathlib import Path

import dagster as dg
import pandas as pd

from whale_assets.metadata import photo_list, table_meta
from whale_assets.resources import WhaleHome
from whale_assets.due import READS_FILES
from whale_assets.versions import table_version
from whale_assets.launchpad import MetadataSettings
from whale_ml.data.demo import ensure_demo_data
from whale_ml.data.metadata import SPECIES_ALIASES, MetadataError, find_train_overlap, read_test_metadata, read_train_metadata
from whale_ml.detection.box_summary import photos_to_box
from whale_ml.gallery.ledger import with_ledger


def _ensure_data(context: dg.AssetExecutionContext, whale: WhaleHome) -> None:
    if whale.is_default_demo:
        _, made = ensure_demo_data(whale.data_path)
        if made:
            context.log.info(f"no data set given ($WHALE_DATA_DIR unset): generated the demo set at {whale.data_path}")


def _warnings_md(lines: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- {line}" for line in lines))


@dg.asset(group_name="raw", kinds={"pandas"}, code_version="2")
def train_metadata(context: dg.AssetExecutionContext, config: MetadataSettings, whale: WhaleHome) -> dg.MaterializeResult:
    """Training photos from ``train.csv``: checked (columns, duplicates, plain file
    names, files present, ids the submission can carry), species aliases merged, an integer
    label per individual. What is accepted but ignored (extra columns, blank rows) is
    logged as a warning and listed under ``warnings``. Photos enrolled with ``whale enroll``
    (the home's ledger, ``enrolled/enrolled.csv``) are training photos too: the next
    retraining learns them."""
    _ensure_data(context, whale)
    notes: list[str] = []
    df = read_train_metadata(whale.data_path, check_files=config.check_files, warn=notes.append, require_folder=True)
    for note in notes:
        context.log.warning(note)
    df, enrolled = with_ledger(df, whale.layout, whale.data_path / "train.csv")
    species = (
        df.groupby("species")
        .agg(images=("image", "size"), individuals=("individual_id", "nunique"))
        .reset_index()
        .sort_values("images", ascending=False)
    )
    merged = df.loc[df["species_raw"].str.lower().isin(SPECIES_ALIASES), "species_raw"].value_counts()
    per_individual = df["individual_id"].value_counts()
    return dg.MaterializeResult(
        value=df,
        data_version=table_version(df),
        metadata={
            "dagster/row_count": len(df),
            "individuals": int(df["individual_id"].nunique()),
            "species": int(df["species"].nunique()),
            "singleton_individuals": int((per_individual == 1).sum()),
            "enrolled_photos": len(enrolled),
            "enrolled_individuals": int(enrolled["individual_id"].nunique()),
            "alias_rows_merged": int(merged.sum()),
            "species_table": table_meta(species),
            "data_dir": dg.MetadataValue.path(str(whale.data_path)),
            **({"warnings": _warnings_md(notes)} if notes else {}),
        },
    )


@dg.asset(group_name="raw", kinds={"pandas"}, code_version="1")
def test_metadata(context: dg.AssetExecutionContext, config: MetadataSettings, whale: WhaleHome) -> dg.MaterializeResult:
    """Test photos in ``sample_submission.csv`` order (the submission's order), checked
    like the training CSV. A listed photo that is missing keeps its row (it will get the
    prior answer) unless ``missing_test_images`` is ``fail``. A test photo that is also a
    training photo (same name, or same bytes) is kept and predicted like any other, with a
    warning and the pairs listed under ``also_in_train``."""
    _ensure_data(context, whale)
    notes: list[str] = []
    df = read_test_metadata(
        whale.data_path, check_files=config.check_files and config.missing_test_images == "fail", warn=notes.append, require_folder=True
    )
    missing = [img for img, path in zip(df["image"], df["path"], strict=True) if not Path(path).is_file()]
    missing_list = photo_list(
        notes.append,
        f"photo(s) listed in sample_submission.csv but missing from {whale.data_path / 'test_images'} (their rows get the prior answer)",
        pd.DataFrame({"image": missing, "reason": "listed but missing"}),
        whale.layout.reports_dir / "missing_test_photos.csv",
    )
    metadata: dict[str, object] = {
        "dagster/row_count": len(df),
        "missing_files": len(missing),
        "data_dir": dg.MetadataValue.path(str(whale.data_path)),
    }
    if missing:
        metadata["missing"] = dg.MetadataValue.md("\n".join(f"- `{m}`" for m in missing[:50]))
        metadata["missing_list"] = missing_list
    try:
        # check_files=False: a broken train set is train_metadata's error to report, not this asset's.
        train = read_train_metadata(whale.data_path, check_files=False, warn=lambda _m: None)
    except MetadataError as exc:
        notes.append(f"test photos not compared with the training photos: {exc}")
        metadata["also_in_train"] = "not checked"
    else:
        overlap = find_train_overlap(train, df)
        metadata["also_in_train"] = int(overlap["test_image"].nunique())
        if len(overlap):
            notes.append(
                f"{overlap['test_image'].nunique()} test photo(s) share a name or identical bytes with training photos "
                "(kept and predicted like any other; a validation or truth score on them is optimistic): "
                + ", ".join(f"{r.test_image} = train {r.train_image} ({r.match})" for r in overlap.head(10).itertuples())
            )
            metadata["also_in_train_pairs"] = table_meta(overlap.head(50))
    for note in notes:
        context.log.warning(note)
    if notes:
        metadata["warnings"] = _warnings_md(notes[:50])
    return dg.MaterializeResult(value=df, metadata=metadata, data_version=table_version(df))


# Each photo's size and time are read from disk: a photo replaced under the same name changes
# this table though the CSVs do not, so `whale run` reads it again every run (whale_assets/due.py).
@dg.asset(group_name="raw", kinds={"pandas"}, code_version="1", tags=READS_FILES)
def photos(train_metadata: pd.DataFrame, test_metadata: pd.DataFrame) -> dg.MaterializeResult:
    """Every photo the detection stage boxes and crops, training photos then test photos:
    ``image, path, split, species`` (test photos' species is unknown) and each file's size
    and modification time. No individual ids: relabelling a photo in ``train.csv`` leaves
    this table's data version as it was, so the detector, boxes, crops and local features
    stay up to date, while the folds, which read the labels, go stale. A photo added,
    removed or replaced changes it."""
    table = photos_to_box(train_metadata, test_metadata)
    counts = table["split"].value_counts()
    return dg.MaterializeResult(
        value=table,
        data_version=table_version(table),
        metadata={
            "dagster/row_count": len(table),
            "train_photos": int(counts.get("train", 0)),
            "test_photos": int(counts.get("test", 0)),
            "missing_files": int((table["file_bytes"] < 0).sum()),
        },
    )


@dg.asset_check(asset=train_metadata, blocking=True)
def train_metadata_is_clean(train_metadata: pd.DataFrame) -> dg.AssetCheckResult:
    """No duplicate images, no unknown species aliases left, labels 0..n-1."""
    dup = int(train_metadata["image"].duplicated().sum())
    aliases_left = int(train_metadata["species"].isin(SPECIES_ALIASES).sum())
    labels_ok = set(train_metadata["label"]) == set(range(train_metadata["individual_id"].nunique()))
    return dg.AssetCheckResult(
        passed=dup == 0 and aliases_left == 0 and labels_ok,
        metadata={"duplicate_images": dup, "unmerged_alias_rows": aliases_left, "labels_contiguous": labels_ok},
    )
