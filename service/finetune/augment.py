"""Augmented views of a job's images: random resized crops and horizontal flips, from the seed.

A view is made from the decoded image (the serving decoder's own :meth:`ImageDecoder.decode`,
so that it refuses exactly what serving refuses) into the model's input: a random resized crop
as torchvision's ``RandomResizedCrop`` takes it (area share within ``crop_scale``, aspect ratio
3/4 to 4/3, bilinear with antialiasing, to the model's input side), or without crop the model's
own preprocessing; then, with ``horizontal_flip``, mirrored with probability 1/2. A crop's 8-bit
pixels become the model's normalised floats through a table of the 256 values per channel
(``(v / 255 - mean) / std`` in float32, as torchvision computes them), written straight into the
view's row of the request: no float image is made on the way.

Each view draws from a generator of its own, seeded by (job seed, example, view): a view is
the same whichever chunk, thread or order makes it, and the same on every run of the job.
Pure image work (Pillow, torchvision's functional transforms); runs in the decode pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from service.inference.preprocess import ImageDecoder
from vision_client.protocol import AugmentationConfig

RATIO = (3 / 4, 4 / 3)  # aspect ratios of a crop, RandomResizedCrop's default
ATTEMPTS = 10  # tries at a crop within the image before the central fallback, as RandomResizedCrop


@dataclass(frozen=True)
class ViewMaker:
    """Makes the augmented views of a job's examples for one base model."""

    augmentation: AugmentationConfig
    seed: int
    side: int  # the model's input side
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preprocess: Callable[[Any], torch.Tensor]  # the model's own preprocessing (PIL image -> [3, S, S])

    @classmethod
    def of(cls, augmentation: AugmentationConfig, seed: int, transforms: Any) -> ViewMaker:
        """For a model whose preprocessing is ``transforms`` (torchvision's ImageClassification)."""
        crop = transforms.crop_size
        side = int(crop[0] if isinstance(crop, Sequence) else crop)
        return cls(augmentation, seed, side, tuple(transforms.mean), tuple(transforms.std), transforms)

    def generator(self, example: int, view: int) -> np.random.Generator:
        """The random source of view ``view`` (1-based; 0 is the image itself) of example ``example``."""
        return np.random.default_rng([self.seed, example, view])

    @cached_property
    def table(self) -> np.ndarray:
        """[3, 256] float32: each channel's normalised value of each 8-bit value."""
        values = torch.arange(256, dtype=torch.float32).div_(255).expand(3, 256)
        table: np.ndarray = (
            F.normalize(values.reshape(3, 1, 256), list(self.mean), list(self.std)).reshape(3, 256).numpy()
        )
        return table

    def view_into(self, image: Image.Image, example: int, view: int, out: np.ndarray) -> None:
        """View ``view`` of ``image`` (example ``example``) as the model's input, into ``out`` [3, S, S] float32."""
        rng = self.generator(example, view)
        augmentation = self.augmentation
        if augmentation.crop:
            top, left, height, width = crop_box(image.width, image.height, augmentation.crop_scale, rng)
            cropped = F.resized_crop(
                image, top, left, height, width, [self.side, self.side], InterpolationMode.BILINEAR, antialias=True
            )
            pixels = np.asarray(cropped)  # [S, S, 3] uint8
            flip = augmentation.horizontal_flip and rng.random() < 0.5
            if flip:
                pixels = pixels[:, ::-1]
            table = self.table
            for channel in range(3):
                np.take(table[channel], pixels[:, :, channel], out=out[channel])
            return
        served = self.preprocess(image)
        if augmentation.horizontal_flip and rng.random() < 0.5:
            served = served.flip(-1)
        out[...] = served.numpy()

    def views_into(self, decoder: ImageDecoder, images: Sequence[bytes], first: int, output: np.ndarray) -> None:
        """Views 1..V of ``images`` (examples ``first``, ``first + 1``, ...) into ``output`` [V * n, 3, S, S],
        view-major: row ``(v - 1) * n + k`` is view ``v`` of image ``k``. Each image is decoded once."""
        count, views = len(images), self.augmentation.views
        for k, data in enumerate(images):
            image = decoder.decode(data, first + k)
            try:
                for v in range(1, views + 1):
                    self.view_into(image, first + k, v, output[(v - 1) * count + k])
            finally:
                image.close()


def crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: ``RandomResizedCrop.get_params``, drawing from ``rng``."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    ratio = width / height  # the central crop within the ratios, as RandomResizedCrop falls back to
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
