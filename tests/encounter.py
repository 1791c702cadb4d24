"""Photos of an animal the tiny catalogue has never seen, for the identify-and-enrol loops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageEnhance

from whale_ml.data.demo import SPECIES_LABELS, Individual, render_individual, render_photo


def encounter(out: Path, n: int = 6, animal: str = "cafe0000beef", seed: int = 778) -> list[Path]:
    """Photos of one encounter with an animal the catalogue has never seen: one scene drawn
    like the demo set's, as a burst of frames (shifted by a few pixels, light and JPEG
    quality varying). Frames, not independent photos: the tests' 2-epoch model cannot
    re-identify an animal across unrelated scenes (see docs/identify.md), and these tests
    are about the loop, not about the model's skill."""
    label, species, part = SPECIES_LABELS[3]
    sprite = render_individual(Individual(animal, label, species, part, seed=seed))
    scene, _ = render_photo(sprite, np.random.default_rng(6), (130, 130))
    rng = np.random.default_rng(2)
    out.mkdir(parents=True)
    paths = []
    w, h = scene.size
    for i in range(n):
        dx, dy = rng.integers(0, 4, 2)
        frame = ImageEnhance.Brightness(scene.crop((dx, dy, w - 4 + dx, h - 4 + dy))).enhance(float(rng.uniform(0.97, 1.03)))
        frame.save(out / f"encounter_{i}.jpg", quality=int(rng.integers(85, 96)))
        paths.append(out / f"encounter_{i}.jpg")
    return paths
