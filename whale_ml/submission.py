"""The Kaggle submission: writing it, checking its format, scoring it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.io import atomic_path
from whale_ml.retrieval.ranking import TOP, map_at_5


def make_submission(images: Sequence[str], predictions: Sequence[Sequence[str]]) -> pd.DataFrame:
    """``image,predictions`` rows, predictions space-separated."""
    if len(images) != len(predictions):
        raise ValueError(f"{len(predictions)} prediction lists for {len(images)} images")
    return pd.DataFrame({"image": list(images), "predictions": [" ".join(p) for p in predictions]})


def prior_predictions(train_ids: Sequence[str]) -> list[str]:
    """The answer for a photo that could not be read: new_individual, then the most photographed ids."""
    common = pd.Series(list(train_ids)).value_counts().index[: TOP - 1].tolist()
    return [NEW_INDIVIDUAL, *common]


class SubmissionFormatError(ValueError):
    """A submission failed its format check; the file it would have replaced is untouched."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        super().__init__(f"{path} not written: the submission fails its format check: {'; '.join(problems)}")


def write_submission(
    df: pd.DataFrame, path: str | Path, expected_images: Sequence[str] | None = None, ids_per_row: int = TOP
) -> Path:
    """Write ``df`` as ``path`` atomically.

    With ``expected_images`` the staged file (the very bytes that would become ``path``) is
    checked by :func:`submission_problems` before it is renamed into place: a submission that
    fails the check never replaces the previous one, which a user may be about to upload.

    Raises:
        SubmissionFormatError: the staged file fails the check (it is removed; ``path`` keeps
            the previous submission, if any).
    """
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
        if expected_images is not None:
            problems = submission_problems(tmp, expected_images, ids_per_row)
            if problems:
                raise SubmissionFormatError(Path(path), problems)
    return Path(path)


def submission_problems(path: str | Path, expected_images: Sequence[str], ids_per_row: int = TOP) -> list[str]:
    """Everything wrong with a submission file's format (empty list: valid).

    Checks the header, that its images are exactly ``expected_images`` in that
    order, and that each row has ``ids_per_row`` distinct space-separated ids.
    """
    path = Path(path)
    if not path.exists():
        return [f"{path} does not exist"]
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    problems = []
    if list(df.columns) != ["image", "predictions"]:
        problems.append(f"header is {','.join(df.columns)}, expected image,predictions")
        return problems
    if df["image"].tolist() != list(expected_images):
        missing = set(expected_images) - set(df["image"])
        extra = set(df["image"]) - set(expected_images)
        problems.append(f"images differ from sample_submission.csv (missing {len(missing)}, extra {len(extra)}, or another order)")
    ids = df["predictions"].str.split()
    wrong = df.loc[ids.map(lambda p: len(p) != ids_per_row or len(set(p)) != len(p)), "image"].tolist()
    if wrong:
        problems.append(f"{len(wrong)} row(s) without {ids_per_row} distinct ids, e.g. {', '.join(wrong[:5])}")
    return problems


def score_submission(path: str | Path, truth: pd.DataFrame) -> float:
    """MAP@5 of a submission file against ``image,individual_id`` truth."""
    sub = pd.read_csv(path, dtype=str, keep_default_na=False).set_index("image")
    missing = set(truth["image"]) - set(sub.index)
    if missing:
        raise ValueError(f"{path}: no prediction for {len(missing)} truth image(s), e.g. {sorted(missing)[:3]}")
    preds = [sub.at[img, "predictions"].split() for img in truth["image"]]
    return map_at_5(preds, truth["individual_id"].tolist())
