"""The release model's input contract, without a release: what ``predict`` refuses and how an
empty batch is answered (the model against ``whale identify`` on a real release:
tests/test_identify.py)."""

from __future__ import annotations

import pandas as pd
import pytest

from whale_ml.identify.serving import OUTPUT_COLUMNS, ReleaseModel


@pytest.mark.parametrize("model_input", [pd.DataFrame({"path": ["a.jpg"]}), ["a.jpg"]])
def test_predict_names_the_column_it_needs(model_input: object) -> None:
    with pytest.raises(ValueError, match="a column 'image_path'"):
        ReleaseModel().predict(None, model_input)  # type: ignore[arg-type]


def test_an_empty_batch_gets_an_empty_answer_with_the_output_columns() -> None:
    out = ReleaseModel().predict(None, pd.DataFrame({"image_path": pd.Series([], dtype=str)}))
    assert out.empty and tuple(out.columns) == OUTPUT_COLUMNS
