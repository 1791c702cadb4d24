"""Stage 1 -- raw: the Kaggle CSVs, validated and normalised."""

from pathlib import Path

import dagster as dg
import pandas as pd

from whale_assets.metadata import table_md
from whale_assets.resources import WhaleHome
from whale_assets.settings import MetadataSettings
from whale_ml.data.demo import ensure_demo_data
from whale_ml.data.metadata import SPECIES_ALIASES, MetadataError, read_test_metadata, read_train_metadata
from whale_ml.identify.enroll import ledger_path, ledger_train_rows


def _ensure_data(context: dg.AssetExecutionContext, whale: WhaleHome) -> None:
    if whale.is_default_demo:
        _, made = ensure_demo_data(whale.data_path)
        if made:
            context.log.info(f"no data set given ($WHALE_DATA_DIR unset): generated the demo set at {whale.data_path}")


@dg.asset(group_name="raw", kinds={"pandas"}, code_version="2")
def train_metadata(context: dg.AssetExecutionContext, config: MetadataSettings, whale: WhaleHome) -> dg.MaterializeResult:
    """Training photos from ``train.csv``: checked (columns, duplicates, plain file
    names, files present), species aliases merged, an integer label per individual.
    Photos enrolled with ``whale enroll`` (the home's ledger, ``enrolled/enrolled.csv``)
    are training photos too: the next retraining learns them."""
    _ensure_data(context, whale)
    df = read_train_metadata(whale.data_path, check_files=config.check_files)
    enrolled = ledger_train_rows(whale.layout)
    if len(enrolled):
        clash = sorted(set(enrolled["image"]) & set(df["image"]))
        if clash:
            raise MetadataError(
                f"{ledger_path(whale.layout)}: enrolled photo name(s) also in {whale.data_path / 'train.csv'}: {', '.join(clash[:10])}"
            )
        df = pd.concat([df.drop(columns="label"), enrolled], ignore_index=True)
        # Labels number the individuals in sorted id order, now including the enrolled ones.
        ids = sorted(df["individual_id"].unique())
        df["label"] = df["individual_id"].map({k: i for i, k in enumerate(ids)}).astype("int64")
        df = df[["image", "species", "species_raw", "individual_id", "label", "path"]]
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
        metadata={
            "dagster/row_count": len(df),
            "individuals": int(df["individual_id"].nunique()),
            "species": int(df["species"].nunique()),
            "singleton_individuals": int((per_individual == 1).sum()),
            "enrolled_photos": len(enrolled),
            "enrolled_individuals": int(enrolled["individual_id"].nunique()),
            "alias_rows_merged": int(merged.sum()),
            "species_table": table_md(species),
            "data_dir": dg.MetadataValue.path(str(whale.data_path)),
        },
    )


@dg.asset(group_name="raw", kinds={"pandas"}, code_version="1")
def test_metadata(context: dg.AssetExecutionContext, config: MetadataSettings, whale: WhaleHome) -> dg.MaterializeResult:
    """Test photos in ``sample_submission.csv`` order (the submission's order), checked
    like the training CSV. A listed photo that is missing keeps its row (it will get the
    prior answer) unless ``missing_test_images`` is ``fail``."""
    _ensure_data(context, whale)
    df = read_test_metadata(whale.data_path, check_files=config.check_files and config.missing_test_images == "fail")
    missing = [img for img, path in zip(df["image"], df["path"], strict=True) if not Path(path).is_file()]
    for img in missing:
        context.log.warning(f"{whale.data_path / 'test_images' / img}: listed but missing; its row will get the prior answer")
    metadata: dict[str, object] = {
        "dagster/row_count": len(df),
        "missing_files": len(missing),
        "data_dir": dg.MetadataValue.path(str(whale.data_path)),
    }
    if missing:
        metadata["missing"] = dg.MetadataValue.md("\n".join(f"- `{m}`" for m in missing[:50]))
    return dg.MaterializeResult(value=df, metadata=metadata)


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
