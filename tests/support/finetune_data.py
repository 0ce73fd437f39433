"""Real labelled images for fine-tuning tests: scikit-learn's handwritten digits (shipped in its wheel)."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def digits() -> tuple[list[bytes], np.ndarray]:
    """1797 scanned 8x8 digits, upscaled to 64x64 RGB PNGs, and their classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = []
    for pixels in data.images:
        image = Image.fromarray((pixels * 16).clip(0, 255).astype(np.uint8)).resize((64, 64), Image.BILINEAR)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images, data.target.copy()


def shuffled_digits(seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """:func:`digits` in a seeded order: the benches' split (the first ones trained on, the rest held out)."""
    images, targets = digits()
    order = np.random.default_rng(seed).permutation(len(images))
    return [images[i] for i in order], targets[order]
