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


def large_noise_examples(count: int = 64, seed: int = 0) -> list[tuple[bytes, str]]:
    """``count`` PNGs of 256x256 random pixels (about 200 kB each: they do not compress), labelled
    ``a`` and ``b`` in turn: an upload that is still streaming when a server refuses it."""
    rng = np.random.default_rng(seed)
    examples = []
    for index in range(count):
        encoded = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(encoded, "PNG")
        examples.append((encoded.getvalue(), "ab"[index % 2]))
    return examples
