"""Embedding images with a trained model: L2-normalised float32, optional flip TTA."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from whale_ml.data.images import ImageDataset, eval_transform
from whale_ml.models.embedding import EmbeddingNet


def autocast_for(device: torch.device, precision: str = "auto") -> tuple[torch.dtype | None, bool]:
    """Mixed precision for a device: (autocast dtype or None, whether a grad scaler is needed).

    ``"auto"``: bf16 on GPUs that support it (no scaler needed: bf16 has fp32's
    range), fp16 on older GPUs, full fp32 on CPU. An explicit ``"fp16"``
    always comes with a scaler: without one, small fp16 gradients underflow to
    zero (one of the reference notebook's defects).
    """
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "fp16":
        return torch.float16, True
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}: expected auto, fp32, bf16 or fp16")
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


@torch.inference_mode()
def embed_paths(
    model: EmbeddingNet,
    paths: Sequence[str],
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    flip_tta: bool = False,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Embeddings of images, in the order of ``paths``.

    Returns:
        (len(paths), embedding_size) float32 with unit-length rows. With
        ``flip_tta`` each row is the renormalised mean of the image's and its
        mirror's embeddings.
    """
    device = torch.device(device)
    loader = DataLoader(
        ImageDataset(paths, eval_transform(image_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    amp_dtype, _ = autocast_for(device)
    chunks = []
    done = 0
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            emb = torch.nn.functional.normalize(model(images).float(), dim=1)
            if flip_tta:
                flipped = torch.nn.functional.normalize(model(torch.flip(images, dims=[3])).float(), dim=1)
                emb = torch.nn.functional.normalize(emb + flipped, dim=1)
        chunks.append(emb.cpu().numpy().astype(np.float32))
        done += len(images)
        if progress is not None:
            progress(done, len(paths))
    model.train(was_training)
    if not chunks:
        return np.zeros((0, model.fc.out_features), dtype=np.float32)
    return np.concatenate(chunks)
