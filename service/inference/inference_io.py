"""What one inference takes and gives, whatever runs it: the data plane's input and result, and
the one limit on a request's images. Plain numpy, no torch: protocol front ends parse into these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInputError


@dataclass(frozen=True)
class InferenceInput:
    """Exactly one of: encoded images, or preprocessed pixels [N, 3, H, W]."""

    images: Sequence[bytes] | None = None
    pixels: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        if self.images is not None:
            return len(self.images)
        assert self.pixels is not None
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class InferenceResult:
    """What one request got, all from the one model that ran it."""

    model_name: str
    model_version: str
    logits: np.ndarray  # [N, C] float32
    labels: Sequence[str]  # that model's class names, C of them


def too_many_images(count: int, limit: int) -> InvalidInputError:
    """The error for a request carrying more than ``limit`` images."""
    return InvalidInputError(
        f"the request has {count} images, over the limit of {limit} per request "
        "(--max-request-images); split it into smaller requests"
    )
