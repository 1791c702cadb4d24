"""Embedding images with a trained model: L2-normalised float32, optional flip TTA.

Two input paths. ``decode="cpu"`` (default): loader workers decode and resize each
photo with PIL. ``decode="device"``: workers only read the file bytes, and JPEGs
are decoded in batches by ``torchvision.io.decode_jpeg`` on the model's device
(nvJPEG on a GPU), which removes the CPU decoding bound of fast GPUs; anything
that is not a JPEG, or fails to decode there, falls back to the PIL path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from whale_ml.progress import ProgressFn
from whale_ml.data.images import ImageDataset, eval_transform, load_rgb
from whale_ml.models.embedding import EmbeddingNet
from whale_ml.threads import using_threads

# Called as progress(done, total) after each batch of a loop over photos (the last call has done == total).


def native_cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16), as oneDNN's bf16
    convolutions need to be fast; elsewhere bf16 is emulated and slower than fp32.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read when omitted; no such file, as on
            macOS or Windows: False).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
        if not torch.backends.mkldnn.is_available():
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_for(device: torch.device, precision: str = "auto") -> tuple[torch.dtype | None, bool]:
    """Mixed precision for a device: (autocast dtype or None, whether a grad scaler is needed).

    ``"auto"``: bf16 on GPUs that support it (no scaler needed: bf16 has fp32's
    range), fp16 on older GPUs, full fp32 on CPU. bf16 on a CPU is a choice, not the
    default: with native bf16 (:func:`native_cpu_bf16`) the training step measured 1.2x
    (64 px) to 1.9x (128 px) faster on 2 cores, but the demo pipeline, whose 64 px
    training is bound by its loader, gained nothing end to end and scored lower out of
    fold (docs/benchmarks.md, "Training step speed on 2 CPU cores"). An explicit
    ``"fp16"`` always comes with a scaler: without one, small fp16 gradients underflow to
    zero (one of the reference notebook's defects: docs/training.md).
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


@functools.cache
def native_cpu_bf16_here() -> bool:
    """:func:`native_cpu_bf16` of this machine, read once."""
    return native_cpu_bf16()


def uses_channels_last(device: torch.device, memory_format: str = "auto", amp_dtype: torch.dtype | None = None) -> bool:
    """Whether a model and its batches go channels_last (NHWC) on ``device``.

    ``"auto"``: on GPUs (cuDNN's fast layout for convolutions under autocast) and for
    bf16 autocast on CPU, where oneDNN's bf16 convolutions take NHWC and would otherwise
    reorder every input; not for fp32 on CPU, where it measured slower
    (docs/benchmarks.md, "Training step speed on 2 CPU cores").
    """
    if memory_format not in ("auto", "channels_last", "contiguous"):
        raise ValueError(f"unknown memory_format {memory_format!r}: expected auto, channels_last or contiguous")
    if memory_format != "auto":
        return memory_format == "channels_last"
    return device.type == "cuda" or amp_dtype == torch.bfloat16


class _FileBytes(Dataset):
    """The raw bytes of each file (decoded later, on the device)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with open(self.paths[i], "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), i


def _as_list(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], list[int]]:
    return [b for b, _ in batch], [i for _, i in batch]


def _decode_on_device(data: list[torch.Tensor], rows: list[int], paths: Sequence[str], size: int, device: torch.device) -> torch.Tensor:
    """A uint8 (N, 3, size, size) batch on ``device``: JPEGs decoded there, the rest via PIL."""
    out: list[torch.Tensor | None] = [None] * len(data)
    jpeg = [k for k, d in enumerate(data) if len(d) > 3 and d[0] == 0xFF and d[1] == 0xD8]
    if jpeg:
        try:
            decoded = decode_jpeg([data[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)
            for k, img in zip(jpeg, decoded, strict=True):
                out[k] = img
        except RuntimeError:  # one bad file fails the batch: decode those on the CPU path instead
            pass
    cpu = eval_transform(size)
    for k, img in enumerate(out):
        if img is None:
            out[k] = cpu(load_rgb(paths[rows[k]])).to(device)
        elif img.shape[-2:] != (size, size):  # crops are written at the model's size; others are resized
            resized = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True)
            out[k] = resized[0].round().clamp(0, 255).to(torch.uint8)
    return torch.stack(out)  # type: ignore[arg-type]


@torch.inference_mode()
def embed_paths(
    model: EmbeddingNet,
    paths: Sequence[str],
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    flip_tta: bool = False,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
    decode: str = "cpu",
    threads: int | None = None,
) -> np.ndarray:
    """Embeddings of images, in the order of ``paths``.

    The model runs with ``threads`` torch threads (default ``$WHALE_THREADS`` or every
    core: :func:`whale_ml.threads.pipeline_threads`), whatever a library left behind.
    ``progress(done, total)`` is called after every batch, and once with ``(0, 0)`` for
    no paths, so that a caller always sees its loop end.

    Returns:
        (len(paths), embedding_size) float32 with unit-length rows. With
        ``flip_tta`` each row is the renormalised mean of the image's and its
        mirror's embeddings.
    """
    device = torch.device(device)
    if decode not in ("cpu", "device"):
        raise ValueError(f"unknown decode {decode!r}: expected 'cpu' or 'device'")
    on_device = decode == "device"
    loader = DataLoader(
        _FileBytes(paths) if on_device else ImageDataset(paths, eval_transform(image_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda" and not on_device,
        collate_fn=_as_list if on_device else None,
    )
    was_training = model.training
    model.eval()
    amp_dtype, _ = autocast_for(device)
    chunks = []
    done = 0
    with using_threads(threads):
        for images, rows in loader:
            if on_device:
                images = _decode_on_device(images, rows, paths, image_size, device)
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
    if progress is not None and not paths:
        progress(0, 0)
    if not chunks:
        return np.zeros((0, model.fc.out_features), dtype=np.float32)
    return np.concatenate(chunks)
