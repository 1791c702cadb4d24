"""The embedding network: timm backbone -> GeM pooling -> linear -> BatchNorm neck.

Any timm model works: the backbone is created with ``num_classes=0`` and
``global_pool=''`` so it returns its last feature map, which GeM pools.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from whale_ml.checkpoints import load_weights_only
from whale_ml.stage_configs import TrainConfig


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent ``p``.

    p=1 is average pooling and p->inf max pooling; re-ID models learn a value
    in between that weights the strongest local marks more than the mean.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:  # fixed p (p=1: plain average pooling, as the reference notebook pooled)
            self.register_buffer("p", torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool in fp32: x**p overflows half precision for large activations.
        p = self.p.float().clamp(min=1.0)
        pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1).pow(1.0 / p)
        return pooled.flatten(1)


class EmbeddingNet(nn.Module):
    """Image -> identity embedding (not L2-normalised; normalise for retrieval).

    Takes uint8 images (0-255) or floats in [0, 1], NCHW, and applies the
    backbone's mean/std itself: the checkpoint carries its own input
    normalisation, and images cross data loaders as compact uint8.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_size: int,
        gem_p: float,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        learn_p: bool = True,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.backbone = backbone
        self.pool = GeM(gem_p, learnable=learn_p)
        self.fc = nn.Linear(feature_dim, embedding_size)
        self.neck = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        x = (x - self.mean) / self.std
        features = self.backbone(x)
        if features.ndim == 4 and features.shape[1] != self.fc.in_features and features.shape[-1] == self.fc.in_features:
            features = features.permute(0, 3, 1, 2)  # NHWC backbones (some ViT/ConvNeXt variants)
        pooled = self.pool(features) if features.ndim == 4 else features.float()
        return self.neck(self.fc(pooled))

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the backbone: trained at the head learning rate."""
        return [*self.pool.parameters(), *self.fc.parameters(), *self.neck.parameters()]


def create_backbone(name: str, pretrained: bool = False, weights_file: str | None = None) -> tuple[nn.Module, int]:
    """A timm backbone returning its unpooled feature map, and its channel count.

    Args:
        name: any timm model name.
        pretrained: load pretrained weights: from ``weights_file`` when given
            (offline), else from the Hugging Face hub.
        weights_file: local ``.safetensors``/``.pth`` backbone weights.
    """
    kwargs: dict[str, Any] = {"pretrained": pretrained or weights_file is not None, "num_classes": 0, "global_pool": ""}
    if weights_file:
        if not str(weights_file).endswith(".safetensors"):
            # timm loads .pth with weights_only=True too; this gives the refusal a clear message first.
            load_weights_only(weights_file)
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
    model = timm.create_model(name, **kwargs)
    return model, int(model.num_features)


def create_embedding_model(cfg: TrainConfig, pretrained: bool | None = None) -> EmbeddingNet:
    """The embedding network a recipe describes.

    Args:
        cfg: the recipe.
        pretrained: override ``cfg.pretrained`` (False when loading a
            checkpoint, whose weights replace the pretrained ones anyway).
    """
    use_pretrained = cfg.pretrained if pretrained is None else pretrained
    backbone, dim = create_backbone(cfg.backbone, use_pretrained, cfg.weights_file if use_pretrained else None)
    mean, std = normalisation(cfg.backbone)
    if cfg.pooling == "avg":
        return EmbeddingNet(backbone, dim, cfg.embedding_size, 1.0, mean, std, learn_p=False)
    return EmbeddingNet(backbone, dim, cfg.embedding_size, cfg.gem_p, mean, std)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone's pretrained weights expect (ImageNet's when unknown).

    From-scratch models use them too, so that a recipe can switch
    ``pretrained`` on without changing its input pipeline.
    """
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)
