"""A synthetic photo-ID data set in exactly the Happywhale (Kaggle) layout.

Nothing can be downloaded on the machines this project is built on, so the demo
and the tests run on photos this module draws. They are made to exercise every
stage for real:

* each individual is a silhouette (tail fluke, dorsal fin or body) with
  persistent identifying marks -- pigment patches, scars, trailing-edge
  notches -- that every photo of it shows;
* each photo sees the animal under a new pose (rotation, foreshortening),
  scale, position, lighting, colour cast, blur, water line and sea background,
  in frames of varying size and aspect, and the animal fills only part of the
  frame, so a detector and crops matter;
* species labels include the misspellings of the real ``train.csv``;
* some test photos show individuals absent from train (``new_individual``).

The ``kaggle`` preset, the real competition's counts and long tail at any scale
drawn with this module's photos, lives in whale_ml/data/kaggle_shape.py
(docs/kaggle_scale.md).

Everything is deterministic given the seed: individual ``i`` and photo ``j``
draw from their own seeded generators, so the set does not depend on the
order or number of workers that render it.

Output (the Kaggle layout, plus two files Kaggle keeps private)::

    OUT/train.csv              image,species,individual_id
    OUT/train_images/*.jpg
    OUT/test_images/*.jpg
    OUT/sample_submission.csv  image,predictions
    OUT/fluke_boxes.csv        image,x_min,y_min,x_max,y_max  (a subset of train)
    OUT/test_truth.csv         image,individual_id,species,animal_id   (new_individual for unseen; animal_id: the real animal)
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from pydantic import BaseModel, Field

from whale_ml.data.metadata import NEW_INDIVIDUAL

# (label written to the CSV, canonical species, body part photographed).
# Several labels are the real train.csv's misspellings or aliases, so the
# metadata stage has real normalisation work to do on the demo set too.
SPECIES_LABELS: list[tuple[str, str, str]] = [
    ("humpback_whale", "humpback_whale", "fluke"),
    ("gray_whale", "gray_whale", "fluke"),
    ("bottlenose_dolphin", "bottlenose_dolphin", "dorsal"),
    ("bottlenose_dolpin", "bottlenose_dolphin", "dorsal"),
    ("killer_whale", "killer_whale", "dorsal"),
    ("kiler_whale", "killer_whale", "dorsal"),
    ("globis", "short_finned_pilot_whale", "dorsal"),
    ("pilot_whale", "short_finned_pilot_whale", "dorsal"),
    ("beluga", "beluga_whale", "body"),
    ("blue_whale", "blue_whale", "body"),
]

SPRITE = 192  # side of the square canvas an individual is drawn on


class DemoDataConfig(BaseModel):
    """Size and difficulty of the generated data set."""

    n_individuals: int = Field(50, ge=2, description="Individuals seen in train.")
    n_new_individuals: int = Field(12, ge=0, description="Individuals seen only in test.")
    min_images: int = Field(4, ge=1, description="Fewest photos of a known individual.")
    max_images: int = Field(12, ge=1, description="Most photos of a known individual.")
    test_share: float = Field(0.3, ge=0.0, lt=1.0, description="Share of a known individual's photos that go to test.")
    new_images_max: int = Field(3, ge=1, description="Most photos of an individual seen only in test (at least one).")
    singleton_share: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of known individuals with one train photo, as in Kaggle's long tail."
    )
    min_width: int = Field(240, ge=32, description="Narrowest photo in pixels.")
    max_width: int = Field(400, ge=32, description="Widest photo in pixels.")
    box_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of train photos listed in the box file.")
    seed: int = 0


PRESETS: dict[str, DemoDataConfig] = {
    # The set `make demo` runs on: big enough to show learning, small enough for 2 CPU cores.
    "demo": DemoDataConfig(),
    # The set the end-to-end tests run on: seconds to generate and to learn from.
    "tiny": DemoDataConfig(n_individuals=10, n_new_individuals=3, min_images=3, max_images=5, min_width=96, max_width=144, box_share=0.7),
}


@dataclass(frozen=True)
class Individual:
    individual_id: str
    label: str
    species: str
    part: str
    seed: int


def _hex_id(rng: np.random.Generator, n: int) -> str:
    return "".join(f"{b:02x}" for b in rng.integers(0, 256, size=n // 2))


# ---------------------------------------------------------------- silhouettes


def _wavy_edge(rng: np.random.Generator, p0: np.ndarray, p1: np.ndarray, n: int, amp: float) -> list[np.ndarray]:
    """Points from p0 to p1 with a per-individual wave (part of its identity)."""
    t = np.linspace(0.0, 1.0, n)
    phase = rng.uniform(0, 2 * math.pi, size=2)
    freq = rng.uniform(2, 5, size=2)
    offset = amp * (np.sin(freq[0] * math.pi * t + phase[0]) + 0.5 * np.sin(freq[1] * math.pi * t + phase[1]))
    direction = p1 - p0
    normal = np.array([-direction[1], direction[0]]) / (np.linalg.norm(direction) + 1e-9)
    return [p0 + ti * direction + oi * normal * math.sin(math.pi * ti) for ti, oi in zip(t, offset, strict=True)]


def _fluke_polygon(rng: np.random.Generator) -> list[tuple[float, float]]:
    c = SPRITE / 2
    span = rng.uniform(0.40, 0.47) * SPRITE
    tip_y = c - rng.uniform(0.10, 0.22) * SPRITE
    notch_y = c + rng.uniform(-0.02, 0.06) * SPRITE
    stock_w = rng.uniform(0.05, 0.08) * SPRITE
    base_y = c + rng.uniform(0.30, 0.38) * SPRITE
    left_tip = np.array([c - span, tip_y])
    right_tip = np.array([c + span, tip_y])
    notch = np.array([c, notch_y])
    lead_y = c + rng.uniform(0.12, 0.2) * SPRITE
    pts = [np.array([c - stock_w, base_y]), np.array([c - span * 0.45, lead_y]), left_tip]
    pts += _wavy_edge(rng, left_tip, notch, 14, 0.025 * SPRITE)[1:]
    pts += _wavy_edge(rng, notch, right_tip, 14, 0.025 * SPRITE)[1:]
    pts += [np.array([c + span * 0.45, lead_y]), np.array([c + stock_w, base_y])]
    return [tuple(p) for p in pts]


def _dorsal_polygon(rng: np.random.Generator) -> list[tuple[float, float]]:
    c = SPRITE / 2
    base_y = c + 0.22 * SPRITE
    back_left = np.array([c - rng.uniform(0.42, 0.47) * SPRITE, base_y + 0.04 * SPRITE])
    fin_start = np.array([c - rng.uniform(0.18, 0.26) * SPRITE, base_y])
    tip = np.array([c + rng.uniform(0.0, 0.12) * SPRITE, c - rng.uniform(0.28, 0.4) * SPRITE])
    fin_end = np.array([c + rng.uniform(0.12, 0.2) * SPRITE, base_y])
    back_right = np.array([c + rng.uniform(0.42, 0.47) * SPRITE, base_y + 0.05 * SPRITE])
    lead_mid = (fin_start + tip) / 2 + np.array([-0.04, -0.05]) * SPRITE
    trail = _wavy_edge(rng, tip, fin_end, 16, 0.03 * SPRITE)
    bottom = [np.array([back_right[0], base_y + 0.16 * SPRITE]), np.array([back_left[0], base_y + 0.16 * SPRITE])]
    pts = [back_left, fin_start, lead_mid, *trail, back_right, *bottom]
    return [tuple(p) for p in pts]


def _body_polygon(rng: np.random.Generator) -> list[tuple[float, float]]:
    c = SPRITE / 2
    length = rng.uniform(0.40, 0.46) * SPRITE
    girth = rng.uniform(0.12, 0.18) * SPRITE
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    # An egg shape: a full head on the left tapering to the tail stock on the right.
    taper = 1.0 - 0.55 * (np.cos(t) + 1) / 2
    xs = c + length * np.cos(t)
    ys = c + girth * np.sin(t) * taper * rng.uniform(0.9, 1.1)
    pts = list(zip(xs, ys, strict=True))
    tail = [(c + length * 1.02, c - girth * 0.6), (c + length * 1.08, c), (c + length * 1.02, c + girth * 0.6)]
    return pts[:1] + tail + pts[1:]


_SHAPES: dict[str, Callable[[np.random.Generator], list[tuple[float, float]]]] = {
    "fluke": _fluke_polygon,
    "dorsal": _dorsal_polygon,
    "body": _body_polygon,
}

_MARK_COLOURS = [(245, 245, 240), (20, 20, 24), (200, 120, 60), (150, 160, 170), (235, 200, 90)]


def render_individual(ind: Individual) -> Image.Image:
    """Draw an individual's canonical appearance as an RGBA sprite.

    The silhouette, its notches and its marks come from the individual's own
    seed, so every photo of it carries the same identity.
    """
    rng = np.random.default_rng(ind.seed)
    polygon = _SHAPES[ind.part](rng)
    mask = Image.new("L", (SPRITE, SPRITE), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)

    # Trailing-edge notches: bites out of the silhouette's outline.
    draw_mask = ImageDraw.Draw(mask)
    outline = np.array(polygon)
    for _ in range(rng.integers(1, 4)):
        p = outline[rng.integers(0, len(outline))]
        r = rng.uniform(0.02, 0.045) * SPRITE
        draw_mask.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=0)

    base = int(rng.integers(40, 120))
    tint = rng.integers(-15, 16, size=3)
    body = Image.new("RGB", (SPRITE, SPRITE), tuple(int(np.clip(base + t, 0, 255)) for t in tint))
    draw = ImageDraw.Draw(body)
    xs, ys = outline[:, 0], outline[:, 1]
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    # Pigment patches: the main identity signal, as on humpback flukes.
    n_patches = int(rng.integers(3, 7))
    colours = rng.choice(len(_MARK_COLOURS), size=n_patches)
    for colour in colours:
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        rx, ry = rng.uniform(0.04, 0.14) * SPRITE, rng.uniform(0.03, 0.1) * SPRITE
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_MARK_COLOURS[colour])
    # Scars: thin pale lines.
    for _ in range(rng.integers(1, 4)):
        a = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
        b = a + rng.normal(0, 0.12 * SPRITE, size=2)
        draw.line([tuple(a), tuple(b)], fill=(230, 225, 215), width=int(rng.integers(2, 4)))
    sprite = body.convert("RGBA")
    sprite.putalpha(mask)
    return sprite


# ---------------------------------------------------------------- photos


def _sea(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A sea background: gradient, optional horizon and sky, and wave texture."""
    top = rng.integers(40, 140, size=3) * np.array([0.6, 0.85, 1.0])
    bottom = rng.integers(10, 90, size=3) * np.array([0.5, 0.8, 1.0])
    t = np.linspace(0, 1, h)[:, None, None]
    img = (1 - t) * top + t * bottom
    img = np.broadcast_to(img, (h, w, 3)).copy()
    if rng.random() < 0.4:
        horizon = int(rng.uniform(0.05, 0.3) * h)
        img[:horizon] = rng.integers(150, 230, size=3)
    img += rng.normal(0, rng.uniform(3, 12), size=(h, w, 1))
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(photo)
    for _ in range(int(rng.integers(10, 40))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        length = rng.uniform(0.03, 0.12) * w
        shade = int(rng.integers(120, 230))
        draw.line([(x, y), (x + length, y + rng.normal(0, 2))], fill=(shade, shade, shade), width=1)
    return photo


def render_photo(sprite: Image.Image, rng: np.random.Generator, width: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Place a sprite in a new photo; return the photo and the visible animal's box."""
    w = int(rng.integers(width[0], width[1] + 1))
    aspect = float(rng.choice([0.75, 1.0, 4 / 3, 1.5, 16 / 9]))
    h = max(32, round(w / aspect))
    photo = _sea(rng, w, h)

    # Pose: foreshortening and roll. No mirror flips: they would mirror the marks.
    squash = rng.uniform(0.7, 1.0)
    animal = sprite.resize((max(8, int(SPRITE * squash)), SPRITE), Image.BILINEAR)
    animal = animal.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, expand=True)
    # Scale: the animal spans 30-65% of the frame, so cropping it out matters.
    target = rng.uniform(0.3, 0.65) * min(w, h * 1.3)
    bbox = animal.getbbox() or (0, 0, animal.width, animal.height)
    animal = animal.crop(bbox)
    scale = target / max(animal.width, animal.height)
    animal = animal.resize((max(4, int(animal.width * scale)), max(4, int(animal.height * scale))), Image.BILINEAR)

    # Lighting of the animal itself (the sea got its own), then blur of the whole shot.
    rgb = animal.convert("RGB")
    rgb = ImageEnhance.Brightness(rgb).enhance(rng.uniform(0.6, 1.35))
    rgb = ImageEnhance.Contrast(rgb).enhance(rng.uniform(0.7, 1.3))
    rgb = ImageEnhance.Color(rgb).enhance(rng.uniform(0.6, 1.3))
    animal = Image.merge("RGBA", (*rgb.split(), animal.getchannel("A")))

    x = int(rng.uniform(0, max(1, w - animal.width)))
    y = int(rng.uniform(0, max(1, h - animal.height)))
    alpha = animal.getchannel("A")
    if rng.random() < 0.4:
        # Water line: the bottom of the animal is under water and hidden.
        cut = int(animal.height * rng.uniform(0.75, 0.95))
        ImageDraw.Draw(alpha).rectangle([0, cut, animal.width, animal.height], fill=0)
    photo.paste(animal.convert("RGB"), (x, y), alpha)

    full_alpha = Image.new("L", (w, h), 0)
    full_alpha.paste(alpha, (x, y))
    box = full_alpha.point(lambda v: 255 if v > 127 else 0).getbbox() or (x, y, x + animal.width, y + animal.height)

    # Colour cast of the whole shot (time of day, camera white balance).
    cast = rng.uniform(0.85, 1.15, size=3)
    arr = np.asarray(photo, dtype=np.float32) * cast
    photo = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.4)))
    return photo, box


# ---------------------------------------------------------------- the data set


def _individuals(cfg: DemoDataConfig, rng: np.random.Generator, n: int) -> list[Individual]:
    out = []
    for _ in range(n):
        label, species, part = SPECIES_LABELS[int(rng.integers(0, len(SPECIES_LABELS)))]
        out.append(Individual(_hex_id(rng, 12), label, species, part, int(rng.integers(0, 2**31))))
    return out


def generate_demo_data(
    out_dir: str | Path,
    config: DemoDataConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a demo data set in the Kaggle layout to ``out_dir``.

    The set is written to a temp folder beside ``out_dir`` and renamed into
    place at the end, so an interrupted run never leaves a half-written set
    that a later run would mistake for a complete one.

    Args:
        out_dir: folder to create; must not exist yet.
        config: size and seed of the set (default: the ``demo`` preset).
        progress: called as ``progress(done, total)`` while photos are drawn.

    Returns:
        The folder written.
    """
    cfg = config or PRESETS["demo"]
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A private temp folder: two processes generating the same set do not collide.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    (tmp / "train_images").mkdir()
    (tmp / "test_images").mkdir()

    rng = np.random.default_rng(cfg.seed)
    known = _individuals(cfg, rng, cfg.n_individuals)
    new = _individuals(cfg, rng, cfg.n_new_individuals)

    # Plan every photo first: (individual, split); then draw them.
    plan: list[tuple[Individual, str]] = []
    for ind in known:
        if rng.random() < cfg.singleton_share:
            n_train, n_test = 1, int(rng.integers(0, 2))
        else:
            n = int(rng.integers(cfg.min_images, cfg.max_images + 1))
            n_test = round(n * cfg.test_share)
            n_train = max(1, n - n_test)
        plan += [(ind, "train")] * n_train + [(ind, "test")] * n_test
    for ind in new:
        plan += [(ind, "test")] * int(rng.integers(1, cfg.new_images_max + 1))
    order = rng.permutation(len(plan))
    names = {_hex_id(rng, 14) + ".jpg" for _ in range(len(plan) * 2)}
    names_list = sorted(names)[: len(plan)]
    rng.shuffle(names_list)

    sprites: dict[str, Image.Image] = {}
    train_rows, test_rows, boxes = [], [], []
    for done, idx in enumerate(order):
        ind, split = plan[idx]
        name = names_list[done]
        sprite = sprites.get(ind.individual_id)
        if sprite is None:
            sprite = sprites[ind.individual_id] = render_individual(ind)
        photo_rng = np.random.default_rng([cfg.seed, int(idx), ind.seed])
        photo, box = render_photo(sprite, photo_rng, (cfg.min_width, cfg.max_width))
        photo.save(tmp / f"{split}_images" / name, quality=int(photo_rng.integers(80, 96)))
        if split == "train":
            train_rows.append((name, ind.label, ind.individual_id))
            if photo_rng.random() < cfg.box_share:
                boxes.append((name, *box))
        else:
            truth = ind.individual_id if ind in known else NEW_INDIVIDUAL
            # animal_id: which animal it really is, also for new ones (to try enrollment on).
            test_rows.append((name, truth, ind.species, ind.individual_id))
        if progress is not None:
            progress(done + 1, len(order))

    pd.DataFrame(train_rows, columns=["image", "species", "individual_id"]).to_csv(tmp / "train.csv", index=False)
    test = pd.DataFrame(test_rows, columns=["image", "individual_id", "species", "animal_id"]).sort_values("image")
    test.to_csv(tmp / "test_truth.csv", index=False)
    sample = pd.DataFrame({"image": test["image"], "predictions": f"{NEW_INDIVIDUAL} 37c7aba965a5 114207cab555 a6e325d8e924 19fbb960f07d"})
    sample.to_csv(tmp / "sample_submission.csv", index=False)
    pd.DataFrame(boxes, columns=["image", "x_min", "y_min", "x_max", "y_max"]).to_csv(tmp / "fluke_boxes.csv", index=False)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "train.csv").exists():
            raise
        shutil.rmtree(tmp)  # another process finished the same set first
    return out


def ensure_demo_data(out_dir: str | Path, preset: str = "demo") -> tuple[Path, bool]:
    """Generate the demo set at ``out_dir`` unless it is already there.

    Returns:
        The folder and whether it was generated now.
    """
    out = Path(out_dir)
    if (out / "train.csv").exists():
        return out, False
    return generate_demo_data(out, PRESETS[preset]), True


__all__ = [
    "NEW_INDIVIDUAL",
    "PRESETS",
    "SPECIES_LABELS",
    "DemoDataConfig",
    "ensure_demo_data",
    "generate_demo_data",
    "render_individual",
    "render_photo",
]
