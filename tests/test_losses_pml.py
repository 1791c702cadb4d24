"""The dynamic-margin ArcFace losses (whale_ml/training/losses.py) against the pinned
pytorch-metric-learning: they override the library's internals (``compute_loss``,
``modify_cosine_of_target_classes``, the ``margin`` attribute), so a release that moves
them must fail here, not train silently with the wrong margins.

pyproject.toml pins the library (``==``) for this reason; these tests check that what is
installed is the pinned release, that the internals the override relies on are there with
the signatures it calls, and that the override gives the ArcFace loss computed by hand.
"""

from __future__ import annotations

import inspect
import math
import re
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.losses.large_margin_softmax_loss import LargeMarginSoftmaxLoss

from whale_ml.training.losses import DynamicMarginArcFaceLoss, DynamicMarginSubCenterArcFaceLoss

REPO = Path(__file__).resolve().parent.parent


def _pin(text: str) -> str:
    found = re.search(r"pytorch-metric-learning==([\w.]+)", text)
    assert found, "pytorch-metric-learning is not pinned with =="
    return found.group(1)


def test_the_installed_release_is_the_pinned_one() -> None:
    pinned = _pin((REPO / "pyproject.toml").read_text())
    assert pinned == _pin((REPO / "requirements" / "constraints.txt").read_text())
    assert version("pytorch-metric-learning") == pinned


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_internals_the_override_uses_are_there() -> None:
    """The names and signatures whale_ml.training.losses calls or replaces."""
    # compute_loss is wrapped (the margin is swapped in around the library's own).
    assert _params(LargeMarginSoftmaxLoss.compute_loss) == ["self", "embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels"]
    assert losses.ArcFaceLoss.compute_loss is LargeMarginSoftmaxLoss.compute_loss
    assert losses.SubCenterArcFaceLoss.compute_loss is LargeMarginSoftmaxLoss.compute_loss
    # The one documented hook, replaced; get_angles, called from it.
    assert _params(losses.ArcFaceLoss.modify_cosine_of_target_classes) == ["self", "cosine_of_target_classes"]
    assert _params(LargeMarginSoftmaxLoss.get_angles) == ["self", "cosine_of_target_classes"]
    # The constructors the subclasses call, and the margin kept in radians in ``margin``.
    assert {"num_classes", "embedding_size", "margin", "scale"} <= set(_params(losses.ArcFaceLoss.__init__))
    assert {"margin", "scale", "sub_centers"} <= set(_params(losses.SubCenterArcFaceLoss.__init__))
    assert losses.ArcFaceLoss(num_classes=2, embedding_size=3, margin=90.0).margin == pytest.approx(math.pi / 2)
    # The target cosines are taken in batch order (one per row), which lines them up with
    # the batch's labels: cosine[mask == 1] in compute_loss.
    assert "cosine[mask == 1]" in inspect.getsource(LargeMarginSoftmaxLoss.compute_loss)
    # The class centres: W is (embedding_size, classes * sub_centers), a class's sub-centres side by side.
    sub = losses.SubCenterArcFaceLoss(num_classes=3, embedding_size=4, sub_centers=2)
    assert tuple(sub.W.shape) == (4, 6) and sub.num_classes == 3 and sub.sub_centers == 2


def _arcface_by_hand(emb: np.ndarray, centres: np.ndarray, labels: list[int], margins: np.ndarray, scale: float, sub: int) -> float:
    """ArcFace with per-class margins, in float64 numpy: cos(theta + m) for the target class
    (cos(theta) - m sin(m) past pi - m, keeping the logit monotonic), softmax cross-entropy
    over scaled cosines, mean over the batch. With ``sub`` sub-centres a class's cosine is
    the best of its own."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = centres / np.linalg.norm(centres, axis=0, keepdims=True)
    cos = (e @ w).reshape(len(e), -1, sub).max(axis=2)
    total = 0.0
    for i, t in enumerate(labels):
        theta, m = math.acos(min(1.0, max(-1.0, cos[i, t]))), margins[t]
        logits = cos[i].copy()
        logits[t] = math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)
        logits *= scale
        total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[t]
    return total / len(labels)


@pytest.mark.parametrize("sub_centers", [1, 2])
def test_the_override_is_arcface_with_each_classs_margin_by_hand(sub_centers: int) -> None:
    margins = np.array([0.1, 0.3, 0.5])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 3 * sub_centers))
    emb = rng.normal(size=(5, 3))
    labels = [0, 1, 2, 2, 1]
    # Row 3 points away from every centre of its class: theta past pi - m (the other branch).
    emb[3] = -centres[:, 2 * sub_centers : 3 * sub_centers].sum(axis=1)
    if sub_centers == 1:
        loss = DynamicMarginArcFaceLoss(margins, embedding_size=3, scale=10.0)
    else:
        loss = DynamicMarginSubCenterArcFaceLoss(margins, embedding_size=3, scale=10.0, sub_centers=sub_centers)
    loss.W.data.copy_(torch.as_tensor(centres, dtype=torch.float32))
    got = loss(torch.as_tensor(emb, dtype=torch.float32), torch.tensor(labels)).item()
    want = _arcface_by_hand(emb, centres, labels, margins, 10.0, sub_centers)
    assert got == pytest.approx(want, rel=1e-5)
    # The margins count: with all of them 0 it is plain softmax over scaled cosines, a different number.
    assert _arcface_by_hand(emb, centres, labels, np.zeros(3), 10.0, sub_centers) < want - 0.1
    # The batch's margin tensor is put back: the fixed margin the library keeps is untouched.
    assert loss.margin == 0.0
