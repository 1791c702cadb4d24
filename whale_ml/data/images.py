"""Loading photos safely, and the tensors the models see.

Evaluation transforms are deterministic (a resize); training
augmentation keeps identity marks intact: small affine moves, colour and blur
changes, and no horizontal flip, which would mirror the marks and turn one
individual into a look-alike of another.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import ExifTags, Image, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2


class ImageReadError(OSError):
    """A photo could not be read; the message names the file and why."""


def _pil_open(path: Path) -> Image.Image:
    """``PIL.Image.open`` itself. Ultralytics replaces it on import with a version that,
    on a file Pillow cannot identify, tries to pip-install a HEIF plugin and then fails
    with an ImportError naming that plugin: a misleading reason for a corrupt photo."""
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and Image.open is getattr(patches, "image_open", None):
        return patches._image_open(path)
    return Image.open(path)


def load_rgb(path: str | Path) -> Image.Image:
    """Open a photo as RGB, fully decoded, with its EXIF orientation applied.

    Raises:
        ImageReadError: missing, empty, truncated, not an image, or too large.
    """
    return decode_photo(path).image


# JPEG's DCT scaling decodes straight to 1/1, 1/2, 1/4 or 1/8 of the stored size
# (Pillow's ``draft``): at 1/4 it costs well under half of a full decode, and the
# reduced image is a proper low-pass of the photo, not an aliased subsample.
DRAFT_SCALES = (8, 4, 2, 1)


@dataclass(frozen=True)
class DecodedPhoto:
    """A photo decoded as RGB, EXIF orientation applied, perhaps at a reduced scale.

    Attributes:
        image: the decoded pixels (``reduction`` times smaller than the photo on each side, rounded up).
        full_size: the photo's oriented width and height at full scale; boxes are given in these.
        reduction: 1 (full decode), 2, 4 or 8.
    """

    image: Image.Image
    full_size: tuple[int, int]
    reduction: int

    def box_in_image(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A full-scale box ``(x0, y0, x1, y1)`` in this image's pixel coordinates."""
        sx, sy = self.image.width / self.full_size[0], self.image.height / self.full_size[1]
        return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def reduction_for(size: tuple[int, int], min_long: int = 0, min_short: int = 0) -> int:
    """The largest JPEG reduction (8, 4, 2 or 1) at which an image of ``size`` keeps a long
    side of at least ``min_long`` and a short side of at least ``min_short`` pixels."""
    long_side, short_side = max(size), min(size)
    for r in DRAFT_SCALES:
        if -(-long_side // r) >= min_long and -(-short_side // r) >= min_short:
            return r
    return 1


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turns every way a photo can fail to open or decode into an :class:`ImageReadError`
    naming the file and why. PIL warns above ~89 MP and refuses at twice that; this
    refuses at the warning, so that a hostile or absurd file is never decoded."""
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: file is empty")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: file not found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"{path}: image too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not an image format Pillow can read (corrupt, or not a photo)") from exc
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def decode_photo(
    path: str | Path,
    reduction: int = 1,
    *,
    min_size: tuple[int, int] | None = None,
    choose: Callable[[tuple[int, int]], int] | None = None,
) -> DecodedPhoto:
    """Decode a photo once, as small as its use allows.

    A JPEG is decoded with DCT scaling at ``reduction`` (1, 2, 4 or 8); with
    ``min_size=(long, short)``, at the largest reduction that keeps that many pixels on
    its long and short sides (:func:`reduction_for`); with ``choose``, at the reduction it
    returns for the stored size (read from the header). Other formats are decoded at full
    size. EXIF orientation is applied after decoding; ``full_size`` is the oriented size
    at full scale.

    Raises:
        ImageReadError: missing, empty, truncated, not an image, or too large.
    """
    path = Path(path)
    with _reading(path), _pil_open(path) as im:
        stored = im.size
        if min_size is not None:
            reduction = reduction_for(stored, *min_size)
        if choose is not None:
            reduction = choose(stored)
        if reduction > 1 and im.format == "JPEG":
            # Pillow picks the scale from the floor of the ratio; libjpeg then rounds the size up.
            im.draft("RGB", (max(1, stored[0] // reduction), max(1, stored[1] // reduction)))
        im.load()
        reduction = max(1, round(stored[0] / im.size[0]))
        oriented = ImageOps.exif_transpose(im)
        full = stored[::-1] if oriented.size == im.size[::-1] != im.size else stored
        return DecodedPhoto(oriented.convert("RGB"), (int(full[0]), int(full[1])), reduction)


# EXIF orientations 5-8 turn the stored image by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def photo_size(path: str | Path) -> tuple[int, int]:
    """A photo's oriented width and height, read from its header: no pixel is decoded.

    Raises:
        ImageReadError: as :func:`decode_photo`, for what the header alone can show
            (a truncated body is only found when the pixels are decoded).
    """
    path = Path(path)
    with _reading(path), _pil_open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


class RandomBoxBlur:
    """With probability ``p``, a box blur of random radius (PIL): a cheap stand-in for
    motion and focus blur, several times faster than a Gaussian blur at 384 px."""

    def __init__(self, p: float, radius: tuple[float, float]) -> None:
        self.p, self.radius = p, radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.BoxBlur(random.uniform(*self.radius)))


def eval_transform(size: int) -> v2.Compose:
    """Deterministic: resize to ``size`` x ``size``; a uint8 CHW tensor.

    Images cross the data loader as uint8 (4x less than float32) and are
    normalised on the device by the model itself (``EmbeddingNet``).
    """
    return v2.Compose([v2.Resize((size, size), antialias=True), v2.ToImage(), v2.ToPureTensor()])


def autoaugment_transform(size: int) -> v2.Compose:
    """The reference notebook's training augmentation (docs/training.md): torchvision's ImageNet AutoAugment
    policy (which includes colour inversions, posterising and solarising)."""
    return v2.Compose(
        [v2.Resize((size, size), antialias=True), v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), v2.ToImage(), v2.ToPureTensor()]
    )


def train_transform(size: int) -> v2.Compose:
    """Identity-preserving augmentation: affine, colour, blur; never a mirror flip.

    All on PIL images, where these ops are fastest (about 4 ms at 384 px on one
    core). No hue jitter: the colour of a mark is part of the identity.
    """
    return v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.RandomAffine(degrees=12, translate=(0.08, 0.08), scale=(0.85, 1.15), shear=6),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
            RandomBoxBlur(0.3, (0.3, 1.5)),
            v2.RandomGrayscale(p=0.05),
            v2.ToImage(),
            v2.ToPureTensor(),
        ]
    )


class ImageDataset(Dataset):
    """Images from paths, with optional integer labels (and an optional second label, e.g. species)."""

    def __init__(
        self,
        paths: Sequence[str],
        transform: v2.Compose,
        labels: Sequence[int] | None = None,
        second_labels: Sequence[int] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.labels = None if labels is None else [int(x) for x in labels]
        self.second = None if second_labels is None else [int(x) for x in second_labels]
        if self.second is not None and len(self.second) != len(self.paths):
            raise ValueError(f"{len(self.second)} second labels for {len(self.paths)} images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        image = self.transform(load_rgb(self.paths[i]))
        label = self.labels[i] if self.labels is not None else -1
        return (image, label) if self.second is None else (image, label, self.second[i])
