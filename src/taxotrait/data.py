"""Images and their transforms, and the seeds of every random draw.

Every image is read by `load_image` and turned into a normalised tensor by `ImageTransform` (random with a generator,
the eval transform without); `ImageDataset` serves (image, label) pairs. All randomness comes from generators seeded
by `derived_generator(seed, ...)`, so every view is reproducible and independent of the order in which images are
processed. The cache of frozen tokens computed from these images is `taxotrait.token_cache`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .dataset import read_image
from .groundtruth import centre_crop, resized_size

if TYPE_CHECKING:  # the figures read images through this module without importing timm
    from .model import PromptCAM

def derived_seed(*keys: int) -> int:
    """A well-mixed seed from non-negative integer keys, e.g. (seed, epoch) or (seed, image, view)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with `derived_seed(*keys)`."""
    return torch.Generator().manual_seed(derived_seed(*keys))


@dataclass(frozen=True)
class AugmentConfig:
    """Shorter side resized to `resize`, then a random (`crop`) or central crop and a random horizontal flip."""

    resize: int = 240
    crop: bool = True
    hflip: bool = True

    @property
    def random(self) -> bool:
        return self.crop or self.hflip


EVAL = AugmentConfig(crop=False, hflip=False)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as upright 8-bit RGB (EXIF orientation applied; 16-bit scaled, transparency composited
    onto white, CMYK converted): `taxotrait.dataset.read_image`, the same code that vets images in `prepare`.
    Raises `taxotrait.dataset.ImageError` naming the file and the reason."""
    return read_image(path)


class ImageTransform:
    """PIL image -> normalised tensor [3, S, S]; random when called with a generator, the eval transform without."""

    def __init__(self, img_size: int, normalisation, augment: AugmentConfig | None = None):
        self.img_size, self.augment = img_size, augment or EVAL
        if self.augment.resize < img_size:
            raise ValueError(f"augment.resize ({self.augment.resize}) must be >= the image size {img_size}")
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in normalisation)

    @classmethod
    def for_model(cls, model: PromptCAM, augment: AugmentConfig | None = None) -> "ImageTransform":
        """The transform at the model's image size and normalisation."""
        return cls(int(model.backbone.patch_embed.img_size[0]), model.normalisation, augment)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        a, size = self.augment, self.img_size
        image = image.resize(resized_size(*image.size, a.resize), Image.Resampling.BICUBIC)
        w, h = image.size
        if generator is not None and a.crop:
            left = int(torch.randint(w - size + 1, (), generator=generator))
            top = int(torch.randint(h - size + 1, (), generator=generator))
        else:
            left, top = centre_crop(w, h, size)
        image = image.crop((left, top, left + size, top + size))
        if generator is not None and a.hflip and torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std


class ImageDataset(Dataset):
    """(image, label) pairs; `set_epoch(epoch, seed)` draws the augmentation from (seed, epoch, index).

    Without an epoch (the default, and in `predict`), images get the transform's deterministic eval version.
    """

    def __init__(self, paths, labels, transform: ImageTransform):
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.array(labels, dtype=np.int64))  # a copy: labels may be read-only
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} images but {len(self.labels)} labels")
        self.transform = transform
        self.epoch, self.seed = None, 0

    def set_epoch(self, epoch: int | None, seed: int = 0):
        self.epoch, self.seed = epoch, seed

    def __len__(self):
        return len(self.paths)

    def __getitems__(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch (images [B, 3, S, S], labels [B]); DataLoader uses it with an identity collate."""
        gens = [None if self.epoch is None else derived_generator(self.seed, self.epoch, 2, i) for i in items]
        x = torch.stack([self.transform(load_image(self.paths[i]), g) for i, g in zip(items, gens)])
        return x, self.labels[list(items)]

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]
