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
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
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
    """Open a photo as RGB with its EXIF orientation applied.

    Raises:
        ImageReadError: missing, empty, truncated, not an image, or too large.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: file is empty")
        # PIL warns above ~89 MP and refuses at twice that; refuse at the warning,
        # so that a hostile or absurd file is never decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pil_open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                return im.convert("RGB")
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
