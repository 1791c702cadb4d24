"""ArcFace losses from pytorch-metric-learning, with per-individual (dynamic) margins.

The library's ``ArcFaceLoss`` / ``SubCenterArcFaceLoss`` take one margin for
every class. The Happywhale winners shrank the margin for individuals with
many photos: ``m = a * n**-b + c`` (1st place: a=0.271, b=0.364, c=0.05), so
that rare individuals, which the model sees least, are pushed apart hardest.
The subclasses here keep the library's loss and replace only the margin: a
tensor indexed by each sample's label instead of one number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pytorch_metric_learning import losses

from whale_ml.retrieval.centres import ClassCentres
from whale_ml.stage_configs import TrainConfig


def dynamic_margins(counts: Sequence[int] | np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """Margin in radians per class: ``a * n**-b + c`` with ``n`` the class's photo count (at least 1)."""
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return a * n**-b + c


class _PerClassMargin:
    """Mixin: ``self.margin`` becomes the per-sample margin tensor while a batch is scored."""

    class_margins: torch.Tensor

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):  # type: ignore[no-untyped-def]
        fixed = self.margin
        # The library scores target cosines in batch order (one per row), so the
        # margins of the batch's labels line up with them.
        self.margin = self.class_margins.to(embeddings.device, embeddings.dtype)[labels]
        try:
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)  # type: ignore[misc]
        finally:
            self.margin = fixed

    def modify_cosine_of_target_classes(self, cosine_of_target_classes: torch.Tensor) -> torch.Tensor:
        # The library's formula, in torch ops so that the margin may be a tensor (on any device).
        angles = self.get_angles(cosine_of_target_classes)  # type: ignore[attr-defined]
        m = torch.as_tensor(self.margin, dtype=angles.dtype, device=angles.device)
        return torch.where(angles <= math.pi - m, torch.cos(angles + m), torch.cos(angles) - m * torch.sin(m))


class DynamicMarginArcFaceLoss(_PerClassMargin, losses.ArcFaceLoss):
    """ArcFace with one margin (radians) per class."""

    def __init__(self, class_margins: np.ndarray, embedding_size: int, scale: float) -> None:
        super().__init__(num_classes=len(class_margins), embedding_size=embedding_size, margin=0.0, scale=scale)
        self.register_buffer("class_margins", torch.as_tensor(class_margins, dtype=torch.float32))


class DynamicMarginSubCenterArcFaceLoss(_PerClassMargin, losses.SubCenterArcFaceLoss):
    """Sub-center ArcFace with one margin (radians) per class."""

    def __init__(self, class_margins: np.ndarray, embedding_size: int, scale: float, sub_centers: int) -> None:
        super().__init__(num_classes=len(class_margins), embedding_size=embedding_size, margin=0.0, scale=scale, sub_centers=sub_centers)
        self.register_buffer("class_margins", torch.as_tensor(class_margins, dtype=torch.float32))


def create_loss(cfg: TrainConfig, num_classes: int, class_counts: Sequence[int] | np.ndarray | None = None) -> torch.nn.Module:
    """ArcFace (or sub-center ArcFace) from pytorch-metric-learning.

    Args:
        cfg: the recipe; ``margin`` is in radians as the papers and Kaggle
            write-ups state it (the library takes degrees).
        num_classes: individuals (rows of the class-centre matrix).
        class_counts: photos per class in the training set; needed for
            ``dynamic_margin`` (a class without photos gets the n=1 margin,
            which never matters: it is never a target).
    """
    if cfg.dynamic_margin:
        counts = np.zeros(num_classes) if class_counts is None else np.asarray(class_counts)
        if class_counts is None or len(counts) != num_classes:
            raise ValueError(
                f"dynamic_margin needs one photo count per class ({num_classes}), got {None if class_counts is None else len(counts)}"
            )
        margins = dynamic_margins(counts, cfg.margin_a, cfg.margin_b, cfg.margin_c)
        if cfg.sub_centers > 1:
            return DynamicMarginSubCenterArcFaceLoss(margins, cfg.embedding_size, cfg.scale, cfg.sub_centers)
        return DynamicMarginArcFaceLoss(margins, cfg.embedding_size, cfg.scale)
    margin_deg = math.degrees(cfg.margin)
    if cfg.sub_centers > 1:
        return losses.SubCenterArcFaceLoss(
            num_classes=num_classes, embedding_size=cfg.embedding_size, margin=margin_deg, scale=cfg.scale, sub_centers=cfg.sub_centers
        )
    return losses.ArcFaceLoss(num_classes=num_classes, embedding_size=cfg.embedding_size, margin=margin_deg, scale=cfg.scale)


def create_species_loss(cfg: TrainConfig, num_species: int) -> torch.nn.Module:
    """The optional species head: an ArcFace over species on the same embedding (as the 1st place did)."""
    return losses.ArcFaceLoss(num_classes=num_species, embedding_size=cfg.embedding_size, margin=math.degrees(cfg.margin), scale=cfg.scale)


def class_centres(loss_fn: torch.nn.Module, individual_of_label: dict[int, str]) -> ClassCentres:
    """The loss's learned class centres of the given labels (the individuals a fold model
    trained on: the others' rows were never pulled towards any photo), unit length.

    Works for pytorch-metric-learning's ArcFace and sub-center ArcFace (and the
    dynamic-margin subclasses here): ``W`` is (d, classes * sub_centers).
    """
    sub_centers = int(getattr(loss_fn, "sub_centers", 1))
    weights = loss_fn.W.detach().float().cpu().numpy()  # type: ignore[union-attr]
    return ClassCentres.from_weights(weights, sub_centers, individual_of_label)
