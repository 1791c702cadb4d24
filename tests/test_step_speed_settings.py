"""The training step's speed settings (``precision``, ``memory_format``): each trains, and none changes what the model computes.

Measured choices behind the defaults: docs/benchmarks.md, "Training step speed on 2 CPU cores".
"""

from __future__ import annotations

import math

import pytest
import torch

from whale_ml.models.embedding import create_embedding_model
from whale_ml.retrieval.embeddings import uses_channels_last
from whale_ml.stage_configs import TrainConfig
from whale_ml.training.trainer import build_training, seed_everything, train_one_epoch

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("memory_format", "device", "amp_dtype", "expected"),
    [
        ("auto", "cpu", None, False),  # fp32 on CPU: measured slower channels_last
        ("auto", "cpu", torch.bfloat16, True),  # oneDNN's bf16 convolutions take NHWC
        ("auto", "cuda", None, True),
        ("auto", "cuda", torch.float16, True),
        ("channels_last", "cpu", None, True),
        ("contiguous", "cpu", torch.bfloat16, False),
        ("contiguous", "cuda", torch.bfloat16, False),
    ],
)
def test_memory_format_choices(memory_format: str, device: str, amp_dtype: torch.dtype | None, expected: bool) -> None:
    assert uses_channels_last(torch.device(device), memory_format, amp_dtype) is expected


def test_an_unknown_memory_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="nhwc"):
        uses_channels_last(CPU, "nhwc")
    with pytest.raises(ValueError, match="memory_format"):
        TrainConfig(memory_format="nhwc")  # type: ignore[arg-type]


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights of the convolutions whose layout shows (a 1x1 kernel is NCHW- and NHWC-contiguous at once)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-2:] != (1, 1)]


@pytest.mark.parametrize(
    ("precision", "memory_format", "channels_last"),
    [("fp32", "channels_last", True), ("bf16", "auto", True), ("bf16", "contiguous", False)],  # fp32 + auto: every other training test
)
def test_each_precision_and_memory_format_trains_with_a_finite_loss(
    fold, precision: str, memory_format: str, channels_last: bool, tiny_config
) -> None:
    train, _, n_classes = fold
    cfg = tiny_config(precision=precision, memory_format=memory_format)
    seed_everything(0)
    parts = build_training(cfg, train, n_classes, CPU, log=lambda _m: None)
    weights = _conv_weights(parts.model)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in weights)
    before = [p.detach().clone() for p in parts.model.parameters()]
    loss = train_one_epoch(1, parts.step, parts.loader, parts.optimizer, parts.scheduler, parts.scaler, CPU).train_loss
    assert math.isfinite(loss) and loss > 0
    assert all(torch.isfinite(p).all() for p in parts.model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, parts.model.parameters(), strict=True)), "every parameter trained"
    # An optimiser step keeps the layout (AdamW's updates are elementwise): the step stays in the format it was built for.
    assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in _conv_weights(parts.model))


@pytest.mark.parametrize("train_mode", [False, True])
def test_channels_last_computes_the_same_embeddings(train_mode: bool, tiny_config) -> None:
    """The same weights give the same embeddings in either layout (eval, and train-mode BatchNorm)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    plain = create_embedding_model(cfg).train(train_mode)
    nhwc = create_embedding_model(cfg).train(train_mode)
    nhwc.load_state_dict(plain.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(images)
        got = nhwc(images.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape == (6, 16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_embeddings_point_where_the_fp32_ones_do(tiny_config) -> None:
    """bf16 keeps ~3 significant digits: the embeddings of the same weights agree in direction, not to the last bit."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = create_embedding_model(cfg).eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images.contiguous(memory_format=torch.channels_last)).float()
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
    assert cosine.min() > 0.99, cosine
    assert not torch.equal(fp32, bf16)  # it did run in bf16
