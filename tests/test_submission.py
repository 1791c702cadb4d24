"""Writing, checking and scoring the Kaggle submission (whale_ml.submission)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from whale_ml.data.metadata import NEW_INDIVIDUAL
from whale_ml.submission import (
    make_submission,
    prior_predictions,
    score_submission,
    submission_problems,
    write_submission,
)

NEW = NEW_INDIVIDUAL
IMAGES = ["q1.jpg", "q2.jpg", "q3.jpg"]
PREDICTIONS = [
    ["a", NEW, "b", "c", "d"],
    [NEW, "a", "b", "c", "d"],
    ["b", "c", "d", "e", NEW],
]


def _write_raw(path: Path, header: str, rows: list[tuple[str, str]]) -> Path:
    path.write_text("\n".join([header] + [f"{i},{p}" for i, p in rows]) + "\n")
    return path


def test_make_submission_joins_with_spaces() -> None:
    """One row per image, ids space-separated, in the given order."""
    df = make_submission(IMAGES, PREDICTIONS)
    assert list(df.columns) == ["image", "predictions"]
    assert df["image"].tolist() == IMAGES
    assert df["predictions"].tolist()[0] == f"a {NEW} b c d"


def test_make_submission_length_mismatch() -> None:
    """One prediction list per image."""
    with pytest.raises(ValueError):
        make_submission(IMAGES, PREDICTIONS[:2])


def test_written_submission_is_valid(tmp_path: Path) -> None:
    """A file written by write_submission passes the format check and leaves no temp file."""
    path = write_submission(make_submission(IMAGES, PREDICTIONS), tmp_path / "out" / "submission.csv")
    assert path == tmp_path / "out" / "submission.csv"
    assert submission_problems(path, IMAGES) == []
    assert path.read_text().splitlines()[0] == "image,predictions"
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


def test_missing_file(tmp_path: Path) -> None:
    """A missing submission is a problem, not an exception."""
    problems = submission_problems(tmp_path / "nope.csv", IMAGES)
    assert len(problems) == 1 and "does not exist" in problems[0]


def test_wrong_header(tmp_path: Path) -> None:
    """A wrong header is named."""
    path = _write_raw(tmp_path / "s.csv", "Image,Id", [(i, " ".join(p)) for i, p in zip(IMAGES, PREDICTIONS, strict=True)])
    problems = submission_problems(path, IMAGES)
    assert len(problems) == 1
    assert "header" in problems[0] and "Image,Id" in problems[0]


def test_wrong_order(tmp_path: Path) -> None:
    """Rows in another order than sample_submission.csv are a problem."""
    rows = [(i, " ".join(p)) for i, p in zip(IMAGES, PREDICTIONS, strict=True)]
    path = _write_raw(tmp_path / "s.csv", "image,predictions", rows[::-1])
    problems = submission_problems(path, IMAGES)
    assert len(problems) == 1
    assert "order" in problems[0] and "missing 0" in problems[0] and "extra 0" in problems[0]


def test_missing_and_extra_image(tmp_path: Path) -> None:
    """A missing image (replaced by another) is counted in the problem."""
    rows = [(i, " ".join(p)) for i, p in zip(IMAGES, PREDICTIONS, strict=True)]
    path = _write_raw(tmp_path / "s.csv", "image,predictions", rows[:2])
    problems = submission_problems(path, IMAGES)
    assert len(problems) == 1 and "missing 1" in problems[0]
    path = _write_raw(tmp_path / "t.csv", "image,predictions", [*rows[:2], ("zz.jpg", rows[2][1])])
    problems = submission_problems(path, IMAGES)
    assert len(problems) == 1 and "missing 1" in problems[0] and "extra 1" in problems[0]


@pytest.mark.parametrize(
    "bad",
    [
        "a b c d",  # four ids
        "a b c d e f",  # six ids
        "a b a c d",  # duplicate id
        f"{NEW} {NEW} a b c",
        "",
    ],
)
def test_row_without_five_distinct_ids(tmp_path: Path, bad: str) -> None:
    """A row without five distinct ids is named."""
    rows = [(IMAGES[0], "a b c d e"), (IMAGES[1], bad), (IMAGES[2], "e d c b a")]
    path = _write_raw(tmp_path / "s.csv", "image,predictions", rows)
    problems = submission_problems(path, IMAGES)
    assert len(problems) == 1
    assert "1 row(s) without 5 distinct ids" in problems[0]
    assert IMAGES[1] in problems[0] and IMAGES[0] not in problems[0]


def test_ids_per_row_parameter(tmp_path: Path) -> None:
    """The expected count of ids per row is configurable (e.g. a 3-id variant)."""
    rows = [(i, "a b c") for i in IMAGES]
    path = _write_raw(tmp_path / "s.csv", "image,predictions", rows)
    assert submission_problems(path, IMAGES, ids_per_row=3) == []
    assert submission_problems(path, IMAGES) != []


def test_score_submission_hand_worked(tmp_path: Path) -> None:
    """Scores: q1 truth a at rank 1, q2 new at rank 1, q3 truth e at rank 4 -> (1 + 1 + 1/4) / 3."""
    path = write_submission(make_submission(IMAGES, PREDICTIONS), tmp_path / "s.csv")
    # Truth in another order than the file: scoring goes by image name.
    truth = pd.DataFrame({"image": ["q3.jpg", "q1.jpg", "q2.jpg"], "individual_id": ["e", "a", NEW]})
    assert score_submission(path, truth) == pytest.approx((1 + 1 + 0.25) / 3, abs=1e-12)
    truth_wrong = pd.DataFrame({"image": IMAGES, "individual_id": ["zz", "zz", "zz"]})
    assert score_submission(path, truth_wrong) == 0.0


def test_score_submission_missing_prediction(tmp_path: Path) -> None:
    """A truth image with no prediction row is an error naming it."""
    path = write_submission(make_submission(IMAGES[:2], PREDICTIONS[:2]), tmp_path / "s.csv")
    truth = pd.DataFrame({"image": IMAGES, "individual_id": ["a", NEW, "e"]})
    with pytest.raises(ValueError, match="q3.jpg"):
        score_submission(path, truth)


def test_prior_predictions_new_then_most_frequent() -> None:
    """new_individual, then the four most photographed ids, most frequent first."""
    train_ids = ["a"] * 2 + ["b"] * 7 + ["c"] * 5 + ["d"] * 1 + ["e"] * 4 + ["f"] * 3
    assert prior_predictions(train_ids) == [NEW, "b", "c", "e", "f"]


def test_prior_predictions_few_ids() -> None:
    """With fewer than four ids, all of them follow new_individual."""
    assert prior_predictions(["x", "y", "y"]) == [NEW, "y", "x"]
