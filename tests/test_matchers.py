"""Matchers stored under the digest of the fold models they were tuned on (whale_ml.gallery.matchers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from whale_ml.gallery.lineage import FoldModel, GalleryLineage, LineageError
from whale_ml.gallery.matchers import check_matcher, load_matcher, matcher_path, models_key, read_matcher, save_matcher
from whale_ml.retrieval.matcher import Matcher, TunedMatcher
from whale_ml.home import HomeLayout


def _tuned(threshold: float) -> TunedMatcher:
    return TunedMatcher(Matcher(threshold), map5=0.5, new_share=0.2, queries=10)


def _lineage(*shas: str, flip: bool = False) -> GalleryLineage:
    models = [FoldModel(fold=f"fold{i}", checkpoint_sha256=sha, registered_model="m", version=str(i + 1), flip_tta=flip) for i, sha in enumerate(shas)]
    return GalleryLineage(models=models, detector_sha256=None, detector_imgsz=64, min_confidence=0.25, expand=1.2, crop_size=64, resize="letterbox")


def test_a_gallery_finds_the_matcher_of_its_own_models_whichever_was_tuned_last(tmp_path: Path) -> None:
    layout = HomeLayout(tmp_path)
    old, new = _lineage("a" * 64, "b" * 64), _lineage("c" * 64, "b" * 64)
    save_matcher(layout, old.models, _tuned(0.3))
    saved = save_matcher(layout, new.models, _tuned(0.7))  # the newer tuning does not replace the older one
    assert saved.models_key == models_key(new.models) and [m["checkpoint_sha256"] for m in saved.models] == ["c" * 64, "b" * 64]
    assert load_matcher(layout, old, "v0001").matcher.threshold == 0.3
    assert load_matcher(layout, new, "v0002").matcher.threshold == 0.7
    assert matcher_path(layout, old.models) != matcher_path(layout, new.models)


def test_the_key_covers_order_checkpoint_and_flip_tta() -> None:
    base = _lineage("a" * 64, "b" * 64).models
    assert models_key(base) == models_key(_lineage("a" * 64, "b" * 64).models)
    assert models_key(base) != models_key(list(reversed(base)))
    assert models_key(base) != models_key(_lineage("a" * 64, "b" * 64, flip=True).models)
    assert models_key(base) != models_key(_lineage("a" * 64, "d" * 64).models)


def test_a_matcher_of_other_models_is_refused_naming_both(tmp_path: Path) -> None:
    layout = HomeLayout(tmp_path)
    tuned, built = _lineage("a" * 64), _lineage("e" * 64)
    value = save_matcher(layout, tuned.models, _tuned(0.5))
    with pytest.raises(LineageError, match=r"tuned for models fold0 v1, but gallery v0007 was built with fold0 v1"):
        check_matcher(value, built, "v0007")  # same registry number, other checkpoint: refused by digest
    with pytest.raises(LineageError, match=r"no matcher tuned for the models of gallery v0007 \(fold0 v1\)"):
        load_matcher(layout, built, "v0007")
    with pytest.raises(LineageError, match="does not record which models it was tuned for"):
        read_matcher({"threshold": 0.5})  # written by an older version of the project: no models recorded
    check_matcher(value, tuned, "v0001")
