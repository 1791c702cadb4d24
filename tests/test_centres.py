"""ArcFace class centres as a second similarity (whale_ml/retrieval/centres.py), against hand-worked values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whale_ml.retrieval.centres import ClassCentres, centre_similarity, ensemble_centre_similarity, remove_centres
from whale_ml.retrieval.store import ensemble
from whale_ml.stage_configs import TrainConfig
from whale_ml.training.checkpoint_saver import save_checkpoint
from whale_ml.training.losses import class_centres, create_loss
from whale_ml.training.trainer import load_class_centres

# Two individuals with two sub-centres each in 3-D, written as pytorch-metric-learning's
# W (d, classes * sub_centers): column label * 2 + s. Label 0 = "x": e1 and e2; label 1 = "y":
# e3 and -e1 (scaled, to check that centres are normalised); label 2 = "z" was never trained on.
W = np.array(
    [
        [1.0, 0.0, 0.0, -2.0, 5.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 5.0, 0.0],
        [0.0, 0.0, 3.0, 0.0, 0.0, 5.0],
    ],
    dtype=np.float32,
)


def _centres() -> ClassCentres:
    return ClassCentres.from_weights(W, 2, {0: "x", 1: "y"})


def test_centres_are_the_trained_labels_sub_centres_normalised() -> None:
    c = _centres()
    assert c.ids.tolist() == ["x", "y"] and c.vectors.shape == (2, 2, 3)
    assert np.allclose(c.vectors[1], [[0, 0, 1], [-1, 0, 0]])


def test_centre_similarity_is_the_best_sub_centre_by_hand() -> None:
    # q1 = (0.6, 0.8, 0): x's sub-centres give 0.6 and 0.8 -> 0.8; y's 0 and -0.6 -> 0.
    # q2 = (-0.6, 0, 0.8): x -> max(-0.6, 0) = 0; y -> max(0.8, 0.6) = 0.8. "z" has no centre, "" is padding.
    q = np.array([[0.6, 0.8, 0.0], [-0.6, 0.0, 0.8]], dtype=np.float32)
    cand = np.array([["x", "y", "z"], ["y", "x", ""]], dtype=object)
    got = centre_similarity(q, _centres(), cand)
    assert np.allclose(got[:, :2], [[0.8, 0.0], [0.8, 0.0]], atol=1e-6)
    assert np.isnan(got[0, 2]) and np.isnan(got[1, 2])
    with pytest.raises(ValueError, match="dimension"):
        centre_similarity(np.ones((2, 4), np.float32), _centres(), cand)


def test_ensemble_scores_each_model_in_its_own_space_and_averages_those_with_a_centre() -> None:
    # Model A: the centres above. Model B: "x" only, at (0, 0, 1). The ensemble query is A's and
    # B's unit embeddings concatenated / sqrt(2), so each model must see its own part again.
    a = _centres()
    b = ClassCentres(np.array(["x"], dtype=object), np.array([[[0.0, 0.0, 1.0]]], dtype=np.float32))
    qa = np.array([[0.6, 0.8, 0.0]], dtype=np.float32)
    qb = np.array([[0.0, 0.6, 0.8]], dtype=np.float32)
    q = ensemble([qa, qb])
    got = ensemble_centre_similarity(q, [a, b], np.array([["x", "y", "z"]], dtype=object))
    # x: mean(0.8 by A, 0.8 by B) = 0.8; y: A alone, 0; z: no model has it.
    assert np.allclose(got[0, :2], [0.8, 0.0], atol=1e-6) and np.isnan(got[0, 2])
    # A model without centres adds nothing; one with them is still scored in its own slice.
    got = ensemble_centre_similarity(q, [None, b], np.array([["x", "y"]], dtype=object))
    assert got[0, 0] == pytest.approx(0.8, abs=1e-6) and np.isnan(got[0, 1])
    with pytest.raises(ValueError, match="no fold model"):
        ensemble_centre_similarity(q, [None, None], np.array([["x"]], dtype=object))


def test_centres_from_a_sub_center_arcface_loss_and_through_files(tmp_path: Path) -> None:
    cfg = TrainConfig(backbone="test_resnet", image_size=32, embedding_size=8, sub_centers=2, device="cpu")
    loss = create_loss(cfg, num_classes=3)
    with torch.no_grad():  # the 3-D case above, padded with zeros to the smallest embedding the recipe allows
        loss.W.copy_(torch.from_numpy(np.concatenate([W, np.zeros((5, 6), np.float32)])))
    c = class_centres(loss, {0: "x", 1: "y"})
    assert c.ids.tolist() == ["x", "y"] and np.allclose(c.vectors[..., :3], _centres().vectors) and not c.vectors[..., 3:].any()
    c.save(tmp_path)
    again = ClassCentres.load(tmp_path)
    assert again is not None and again.ids.tolist() == ["x", "y"] and np.array_equal(again.vectors, c.vectors)
    remove_centres(tmp_path)
    assert ClassCentres.load(tmp_path) is None


def test_a_checkpoint_from_before_centres_were_kept_still_loads_without_them(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "old.pt", {"model": {}, "config": {}})
    assert load_class_centres(tmp_path / "old.pt") is None
    save_checkpoint(tmp_path / "new.pt", {"model": {}, "class_centres": _centres().to_checkpoint()})
    loaded = load_class_centres(tmp_path / "new.pt")
    assert loaded is not None and loaded.ids.tolist() == ["x", "y"] and np.allclose(loaded.vectors, _centres().vectors)
