"""A synthetic data set with the real Happywhale competition's shape (``--preset kaggle``).

The ``demo`` and ``tiny`` presets (whale_ml/data/demo.py) are small and even: every
known individual has 4-12 photos of a few hundred pixels. The real competition is
neither, and the stages' cost at scale depends on what it is instead (see
docs/kaggle_scale.md). This module writes that shape at any scale ``F``, in the
same Kaggle layout and with the same photo drawing as the demo set:

* counts: ``round(51,033 F)`` training photos of ``round(15,587 F)`` individuals,
  ``round(27,956 F)`` test photos;
* photos per individual: a long tail fitted to the real ``train.csv``
  (:func:`photos_per_individual_law`): 59% singletons, a few individuals with
  hundreds of photos at ``F = 1``;
* species: the real 30 raw labels (misspellings and aliases included) with the
  real share of photos each;
* test: about 16% of test photos show individuals absent from train;
* photos 1,500-4,000 px wide, drawn in parallel (``workers``) with output that
  does not depend on the number of workers.

Deterministic by seed: the plan comes from one seeded generator, photo ``i``
from its own generator seeded by ``(seed, i, individual seed)``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops
from pydantic import BaseModel, Field, model_validator

from whale_ml.data.demo import Individual, render_individual, render_photo
from whale_ml.data.metadata import NEW_INDIVIDUAL, SPECIES_ALIASES

# The real competition's counts (Kaggle "Happywhale", 2022; docs/kaggle_scale.md).
KAGGLE_TRAIN_PHOTOS = 51_033
KAGGLE_INDIVIDUALS = 15_587
KAGGLE_TEST_PHOTOS = 27_956
KAGGLE_SINGLETONS = 9_258  # individuals with exactly one training photo
KAGGLE_MAX_PHOTOS = 400  # cap of the tail: "a few individuals with hundreds" of photos (an assumption, not a checked count)
KAGGLE_NEW_SHARE = 0.16  # test photos of individuals absent from train (1st and 3rd place estimates)
KAGGLE_BOXES = 1_200  # the public whale-fluke box set

# (raw label in train.csv, canonical species, body part photographed, training photos in the real train.csv).
# The 30 raw labels and their photo counts sum to the real 51,033; five are misspellings or aliases
# that whale_ml.data.metadata.SPECIES_ALIASES merges, leaving 26 species.
KAGGLE_SPECIES: list[tuple[str, str, str, int]] = [
    ("bottlenose_dolphin", "bottlenose_dolphin", "dorsal", 9664),
    ("beluga", "beluga_whale", "body", 7443),
    ("humpback_whale", "humpback_whale", "fluke", 7392),
    ("blue_whale", "blue_whale", "body", 4830),
    ("false_killer_whale", "false_killer_whale", "dorsal", 3326),
    ("dusky_dolphin", "dusky_dolphin", "dorsal", 3139),
    ("spinner_dolphin", "spinner_dolphin", "dorsal", 1700),
    ("melon_headed_whale", "melon_headed_whale", "dorsal", 1689),
    ("minke_whale", "minke_whale", "dorsal", 1608),
    ("killer_whale", "killer_whale", "dorsal", 1493),
    ("fin_whale", "fin_whale", "dorsal", 1324),
    ("gray_whale", "gray_whale", "fluke", 1123),
    ("bottlenose_dolpin", "bottlenose_dolphin", "dorsal", 1117),
    ("kiler_whale", "killer_whale", "dorsal", 962),
    ("southern_right_whale", "southern_right_whale", "body", 866),
    ("spotted_dolphin", "spotted_dolphin", "dorsal", 490),
    ("sei_whale", "sei_whale", "dorsal", 428),
    ("short_finned_pilot_whale", "short_finned_pilot_whale", "dorsal", 367),
    ("common_dolphin", "common_dolphin", "dorsal", 347),
    ("cuviers_beaked_whale", "cuviers_beaked_whale", "body", 341),
    ("pilot_whale", "short_finned_pilot_whale", "dorsal", 262),
    ("long_finned_pilot_whale", "long_finned_pilot_whale", "dorsal", 238),
    ("white_sided_dolphin", "white_sided_dolphin", "dorsal", 229),
    ("brydes_whale", "brydes_whale", "dorsal", 154),
    ("pantropic_spotted_dolphin", "pantropic_spotted_dolphin", "dorsal", 145),
    ("globis", "short_finned_pilot_whale", "dorsal", 116),
    ("commersons_dolphin", "commersons_dolphin", "body", 90),
    ("pygmy_killer_whale", "pygmy_killer_whale", "dorsal", 76),
    ("rough_toothed_dolphin", "rough_toothed_dolphin", "dorsal", 60),
    ("frasiers_dolphin", "frasiers_dolphin", "dorsal", 14),
]

# Above this width a photo is drawn at this width and enlarged, with sensor grain added at full
# size: drawing a 4,000 px scene directly costs ~3 s, enlarging a 1,000 px one a tenth of that.
DRAW_PX = 1000


class KaggleShapeConfig(BaseModel):
    """Scale, photo size and seed of a Kaggle-shaped set (docs/kaggle_scale.md)."""

    scale: float = Field(1.0, gt=0.0, le=4.0, description="F: 1 gives the real counts; every count scales with it.")
    min_width: int = Field(1500, ge=32, description="Narrowest photo in pixels (survey photos: 1,500).")
    max_width: int = Field(4000, ge=32, description="Widest photo in pixels (survey photos: 4,000).")
    new_share: float = Field(KAGGLE_NEW_SHARE, ge=0.0, lt=1.0, description="Share of test photos showing new individuals.")
    seed: int = 0

    @model_validator(mode="after")
    def _widths_ordered(self) -> KaggleShapeConfig:
        if self.min_width > self.max_width:
            raise ValueError(f"min_width {self.min_width} > max_width {self.max_width}")
        return self


# ---------------------------------------------------------------- the counts


def _law_mean(exponent: float, singleton_share: float, max_photos: int) -> float:
    k = np.arange(2, max_photos + 1, dtype=np.float64)
    p = k**-exponent
    return singleton_share + (1 - singleton_share) * float((p * k).sum() / p.sum())


def photos_per_individual_law(
    mean: float = KAGGLE_TRAIN_PHOTOS / KAGGLE_INDIVIDUALS,
    singleton_share: float = KAGGLE_SINGLETONS / KAGGLE_INDIVIDUALS,
    max_photos: int = KAGGLE_MAX_PHOTOS,
) -> np.ndarray:
    """The probability of ``k`` photos per individual, ``k = 0 .. max_photos`` (index = k; P(0) = 0).

    A discrete power law with a separate weight at one photo: ``P(1) = singleton_share``
    and ``P(k) ∝ k^-a`` for ``2 <= k <= max_photos``, with the exponent ``a`` solved
    (bisection) so that the mean is ``mean``. With the defaults it is fitted to three
    facts of the real ``train.csv``: 9,258 of 15,587 individuals seen once, 51,033
    photos (mean 3.27 per individual, which gives ``a`` about 2.16), and a tail capped
    at 400 photos (an assumption: "a few individuals with hundreds"). Photo-ID catalogues are long-tailed because
    sightings are: most animals are met once, a few resident ones again and again;
    a power law is the usual model of that, and the singleton weight is set apart
    because a pure Zipf law cannot match both the singleton share and the mean.
    The same law serves any scale and the test set's new individuals, so the shape
    carries over.
    """
    lo, hi = 1.01, 6.0  # the mean falls as the exponent grows
    if not _law_mean(hi, singleton_share, max_photos) <= mean <= _law_mean(lo, singleton_share, max_photos):
        raise ValueError(f"no power law up to {max_photos} photos has mean {mean} with {singleton_share:.0%} singletons")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _law_mean(mid, singleton_share, max_photos) > mean else (lo, mid)
    k = np.arange(max_photos + 1, dtype=np.float64)
    p = np.zeros(max_photos + 1)
    p[2:] = k[2:] ** -((lo + hi) / 2)
    p[2:] *= (1 - singleton_share) / p[2:].sum()
    p[1] = singleton_share
    return p


def long_tail_counts(n_individuals: int, n_photos: int, law: np.ndarray) -> np.ndarray:
    """Photos per individual, summing to ``n_photos`` exactly, shaped like ``law``; sorted ascending.

    The counts are the law's quantiles at ``(i + 0.5) / n`` (a stratified sample:
    the singleton share and the tail come out at any ``n`` without sampling noise).
    The quantiles cannot reach the far tail's mass (fewer photos than the law's mean
    times ``n``, by 5 of 51,033 at the real counts and 17 of 102 at 31 individuals):
    the most photographed individual gets the missing photos, as the tail would have
    given them to someone. Photos over the total are taken one at a time from the
    individuals with three or more, largest first, or else from any above one.
    """
    if not 1 <= n_individuals <= n_photos:
        raise ValueError(f"need 1 <= individuals ({n_individuals}) <= photos ({n_photos})")
    cdf = np.cumsum(law)
    counts = np.searchsorted(cdf, (np.arange(n_individuals) + 0.5) / n_individuals, side="right").astype(np.int64)
    counts = np.sort(np.clip(counts, 1, len(law) - 1))
    diff = n_photos - int(counts.sum())
    if diff > 0:
        counts[-1] += diff
    while diff < 0:
        many = np.flatnonzero(counts >= 3)[::-1]
        step = (many if len(many) else np.flatnonzero(counts >= 2)[::-1])[:-diff]
        counts[step] -= 1
        diff += len(step)
    return np.sort(counts)


def _unique_hex(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    """``n`` distinct random hex strings of ``digits`` digits (the real ids' and names' form)."""
    while True:
        values = rng.integers(0, 16**digits, size=n, dtype=np.int64)
        if len(np.unique(values)) == n:
            return [f"{v:0{digits}x}" for v in values]


def plan_kaggle_shape(config: KaggleShapeConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every individual and every photo of the set, without drawing any photo.

    Known individuals get training photos from :func:`long_tail_counts`; test photos
    of known individuals go to individual ``i`` with probability proportional to its
    training photos (the same survey photographs the same animals); new individuals
    get their photos from the same law. Each individual's raw label is drawn with the
    real label's share of photos, so each label's expected photo share is the real one.

    Returns:
        ``individuals`` (individual_id, label, species, part, seed, known) and
        ``photos`` (image, split, individual: row in ``individuals``, photo: index seeding the
        photo's generator, boxed: listed in fluke_boxes.csv), photos in drawing order.
    """
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    law = photos_per_individual_law()
    n_train = max(1, round(KAGGLE_TRAIN_PHOTOS * cfg.scale))
    n_known = min(n_train, max(1, round(KAGGLE_INDIVIDUALS * cfg.scale)))
    n_test = max(1, round(KAGGLE_TEST_PHOTOS * cfg.scale))
    n_new_photos = round(n_test * cfg.new_share)
    n_new = min(n_new_photos, round(n_new_photos * n_known / n_train))
    n_new = max(n_new, 1) if n_new_photos else 0

    train_counts = rng.permutation(long_tail_counts(n_known, n_train, law))
    test_known = np.bincount(rng.choice(n_known, size=n_test - n_new_photos, p=train_counts / n_train), minlength=n_known)
    new_counts = rng.permutation(long_tail_counts(n_new, n_new_photos, law)) if n_new else np.zeros(0, np.int64)

    weights = np.array([count for *_, count in KAGGLE_SPECIES], dtype=np.float64)
    labels = rng.choice(len(KAGGLE_SPECIES), size=n_known + n_new, p=weights / weights.sum())
    individuals = pd.DataFrame(
        {
            "individual_id": _unique_hex(rng, n_known + n_new, 12),
            "label": [KAGGLE_SPECIES[i][0] for i in labels],
            "species": [KAGGLE_SPECIES[i][1] for i in labels],
            "part": [KAGGLE_SPECIES[i][2] for i in labels],
            "seed": rng.integers(0, 2**31, size=n_known + n_new),
            "known": np.arange(n_known + n_new) < n_known,
        }
    )
    who = np.concatenate([np.repeat(np.arange(n_known), train_counts), np.repeat(np.arange(n_known), test_known),
                          n_known + np.repeat(np.arange(n_new), new_counts)])  # fmt: skip
    split = np.array(["train"] * n_train + ["test"] * n_test)
    order = rng.permutation(len(who))
    photos = pd.DataFrame({"image": [h + ".jpg" for h in _unique_hex(rng, len(who), 14)], "split": split[order],
                           "individual": who[order], "photo": np.arange(len(who))})  # fmt: skip
    # Boxes for as many training photos as the public fluke box set has, scaled (at least 50: enough to train a detector on).
    n_boxes = min(n_train, max(50, round(KAGGLE_BOXES * cfg.scale)))
    boxed = rng.choice(np.flatnonzero(photos["split"] == "train"), size=n_boxes, replace=False)
    photos["boxed"] = np.isin(np.arange(len(photos)), boxed)
    return individuals, photos


# ---------------------------------------------------------------- drawing


@lru_cache(maxsize=4096)
def _sprite(part: str, seed: int) -> Image.Image:
    return render_individual(Individual("", "", "", part, seed))


def _draw_photo(task: tuple[str, str, int, int, int, int, int]) -> tuple[str, tuple[int, int, int, int]]:
    """Draw and save one photo; return its name and the animal's box (runs in a worker).

    ``task`` is (path, body part, individual seed, photo index, set seed, min width, max width).
    """
    path, part, ind_seed, photo, seed, lo, hi = task
    rng = np.random.default_rng([seed, photo, ind_seed])
    width = int(rng.integers(lo, hi + 1))
    drawn_width = min(width, DRAW_PX)
    image, box = render_photo(_sprite(part, ind_seed), rng, (drawn_width, drawn_width))
    if width > drawn_width:
        factor = width / drawn_width
        image = image.resize((width, round(image.height * factor)), Image.BILINEAR)
        # Grain of +-6 levels, the same on the three channels (luminance noise), clipped to 0..255.
        grain = Image.fromarray(rng.integers(0, 13, size=(image.height, width), dtype=np.uint8)).convert("RGB")
        image = ImageChops.add(image, grain, scale=1.0, offset=-6)
        box = (
            math.floor(box[0] * factor), math.floor(box[1] * factor),
            min(width, math.ceil(box[2] * factor)), min(image.height, math.ceil(box[3] * factor)),
        )  # fmt: skip
    image.save(path, quality=int(rng.integers(80, 96)))
    return Path(path).name, box


def _drawn(tasks: list[tuple], workers: int) -> Iterator[tuple[str, tuple[int, int, int, int]]]:
    if workers <= 1:
        yield from map(_draw_photo, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_draw_photo, tasks, chunksize=max(1, min(64, len(tasks) // (workers * 8))))


# ---------------------------------------------------------------- the data set


def generate_kaggle_shape(
    out_dir: str | Path,
    config: KaggleShapeConfig | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    images: bool = True,
) -> Path:
    """Write a Kaggle-shaped set to ``out_dir``: the files and columns of the demo set (whale_ml/data/demo.py).

    Photos are drawn by ``workers`` processes (default: every core); each photo's
    pixels depend only on the seed and its index, and the CSVs are written in image
    order, so the files are byte-identical for any number of workers. Like the demo
    set, it is written to a temp folder beside ``out_dir`` and renamed into place.

    Args:
        out_dir: folder to create; must not exist yet.
        config: scale, photo widths and seed (default: the real counts at survey size).
        workers: processes drawing photos; ``None`` for ``os.cpu_count()``.
        progress: called as ``progress(done, total)`` as photos are written.
        images: ``False`` writes the tables alone, in seconds at the real counts where the
            photos take hours: ``train.csv``, ``test_truth.csv`` and ``sample_submission.csv``
            byte-identical to a full set's, no image folders and no ``fluke_boxes.csv`` (the
            boxes come from drawing). For the stages whose cost depends on counts, not pixels
            (benchmarks/kaggle_scale.py).

    Returns:
        The folder written.
    """
    cfg = config or KaggleShapeConfig()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    individuals, photos = plan_kaggle_shape(cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        who = individuals.iloc[photos["individual"].to_numpy()].reset_index(drop=True)
        boxes: dict[str, tuple[int, int, int, int]] | None = None
        if images:
            (tmp / "train_images").mkdir()
            (tmp / "test_images").mkdir()
            tasks = [
                (str(tmp / f"{split}_images" / image), part, int(ind_seed), int(photo), cfg.seed, cfg.min_width, cfg.max_width)
                for image, split, part, ind_seed, photo in zip(photos["image"], photos["split"], who["part"], who["seed"],
                                                              photos["photo"], strict=True)
            ]  # fmt: skip
            boxes = {}
            for done, (name, box) in enumerate(_drawn(tasks, workers or os.cpu_count() or 1), start=1):
                boxes[name] = box
                if progress is not None:
                    progress(done, len(tasks))
        _write_tables(tmp, individuals, photos.assign(**who[["individual_id", "label", "species", "known"]]), boxes)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tables(folder: Path, individuals: pd.DataFrame, photos: pd.DataFrame, boxes: dict[str, tuple[int, ...]] | None) -> None:
    """train.csv, test_truth.csv, sample_submission.csv and (with ``boxes``) fluke_boxes.csv, each in image order."""
    photos = photos.sort_values("image", kind="stable")
    train = photos[photos["split"] == "train"]
    train[["image", "label", "individual_id"]].rename(columns={"label": "species"}).to_csv(folder / "train.csv", index=False)
    test = photos[photos["split"] == "test"]
    truth = pd.DataFrame({"image": test["image"], "individual_id": np.where(test["known"], test["individual_id"], NEW_INDIVIDUAL),
                          "species": test["species"], "animal_id": test["individual_id"]})  # fmt: skip
    truth.to_csv(folder / "test_truth.csv", index=False)
    # Five well-formed ids: new_individual and the four most photographed individuals.
    per_id = train.groupby("individual_id").size().reset_index(name="n").sort_values(["n", "individual_id"], ascending=[False, True])
    top = per_id["individual_id"].head(4).tolist()
    top += [f"{i:012x}" for i in range(4 - len(top))]
    sample = pd.DataFrame({"image": truth["image"], "predictions": " ".join([NEW_INDIVIDUAL, *top])})
    sample.to_csv(folder / "sample_submission.csv", index=False)
    if boxes is None:
        return
    rows = [(name, *boxes[name]) for name in train.loc[train["boxed"], "image"]]
    pd.DataFrame(rows, columns=["image", "x_min", "y_min", "x_max", "y_max"]).to_csv(folder / "fluke_boxes.csv", index=False)


def species_aliases_used() -> dict[str, str]:
    """The raw labels of :data:`KAGGLE_SPECIES` that are misspellings or aliases, with their species."""
    return {label: species for label, species, _, _ in KAGGLE_SPECIES if label != species and label in SPECIES_ALIASES}


__all__ = [
    "KAGGLE_SPECIES",
    "KaggleShapeConfig",
    "generate_kaggle_shape",
    "long_tail_counts",
    "photos_per_individual_law",
    "plan_kaggle_shape",
    "species_aliases_used",
]
