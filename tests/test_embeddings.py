"""Embedding photos with a model (whale_ml.retrieval.embeddings): unit float32 rows, order kept, flip TTA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from whale_ml.stage_configs import TrainConfig
from whale_ml.models.embedding import create_embedding_model
from whale_ml.retrieval.embeddings import embed_paths

SIZE = 32


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_embedding_model(TrainConfig(backbone="test_resnet", image_size=SIZE, embedding_size=16, pretrained=False))
    return net.eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    """Five asymmetric photos (PNG, so pixels are exact) and their mirror images."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths, mirrored = [], []
    for i in range(5):
        pixels = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        pixels[:, : SIZE // 3] = 255 * (i % 2)  # a band on one side only: the mirror really differs
        img = Image.fromarray(pixels)
        paths.append(str(folder / f"p{i}.png"))
        mirrored.append(str(folder / f"p{i}_mirror.png"))
        img.save(paths[-1])
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored[-1])
    return paths, mirrored


def test_unit_float32_rows_in_path_order(model: torch.nn.Module, photos: tuple[list[str], list[str]]) -> None:
    paths, _ = photos
    emb = embed_paths(model, paths, SIZE, batch_size=2)
    assert emb.dtype == np.float32 and emb.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # Batching does not change a photo's row, and the rows follow the paths.
    np.testing.assert_allclose(embed_paths(model, paths[::-1], SIZE, batch_size=3), emb[::-1], atol=1e-5)


def test_flip_tta_is_the_renormalised_mean_with_the_mirror_image(model: torch.nn.Module, photos: tuple[list[str], list[str]]) -> None:
    paths, mirrored = photos
    plain = embed_paths(model, paths, SIZE)
    mirror = embed_paths(model, mirrored, SIZE)
    tta = embed_paths(model, paths, SIZE, flip_tta=True)
    expected = plain + mirror
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tta, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-3), "the mirror image must change the embedding"


def test_progress_is_reported_to_the_end(model: torch.nn.Module, photos: tuple[list[str], list[str]]) -> None:
    seen: list[tuple[int, int]] = []
    embed_paths(model, photos[0], SIZE, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_no_paths_gives_an_empty_matrix(model: torch.nn.Module) -> None:
    seen: list[tuple[int, int]] = []
    assert embed_paths(model, [], SIZE, progress=lambda done, total: seen.append((done, total))).shape == (0, 16)
    assert seen == [(0, 0)], "the loop's end is reported even when it had nothing to do"


def test_decoding_on_the_device_matches_the_pil_path(model: torch.nn.Module, tmp_path: Path) -> None:
    """decode='device' (decode_jpeg on the model's device; here the CPU) gives the PIL path's embeddings:
    the same pixels for crops at the model's size, close ones after a resize, and PIL for non-JPEGs."""
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h, fmt) in enumerate([(SIZE, SIZE, "JPEG"), (SIZE, SIZE, "JPEG"), (SIZE, SIZE, "PNG"), (3 * SIZE, 2 * SIZE, "JPEG")]):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = tmp_path / f"c{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(pixels).filter(ImageFilter.SMOOTH).save(path, format=fmt)
        paths.append(str(path))
    cpu = embed_paths(model, paths, SIZE, batch_size=3)
    dev = embed_paths(model, paths, SIZE, batch_size=3, decode="device")
    np.testing.assert_allclose(dev[:3], cpu[:3], atol=1e-5)  # same decoder (libjpeg-turbo), no resize; PNG via PIL
    assert float(dev[3] @ cpu[3]) > 0.98  # resized on the device: bilinear vs PIL's, nearly the same
    with pytest.raises(ValueError, match="unknown decode"):
        embed_paths(model, paths, SIZE, decode="gpu")
