"""Decoding encoded images and applying a model's exact preprocessing.

Runs in a thread pool (Pillow and torch release the GIL while they work).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInputError

# The formats we promise; others Pillow might read are refused so that the
# decoder surface stays small (no EPS/PDF/plugin formats from strangers).
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF"})


class ImageDecoder:
    """Turns one encoded image into the model's input tensor (3xHxW float32)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], *, max_pixels: int) -> None:
        self._transform = transform
        self._max_pixels = max_pixels

    def __call__(self, data: bytes, index: int = 0) -> torch.Tensor:
        return self._transform(self.decode(data, index))

    def check(self, data: bytes, index: int = 0, size: int = 64) -> None:
        """Refuse ``data`` exactly as :meth:`decode` would, decoding JPEG at reduced size
        (at least ``size`` on each side): what is checked only costs a fraction of a decode."""
        self.decode(data, index, reduce_to=size).close()

    def decode(self, data: bytes, index: int = 0, *, reduce_to: int | None = None) -> Image.Image:
        """Decode to an RGB PIL image, refusing what is not an image we accept.

        ``reduce_to``: let JPEG decode at a reduced scale, no smaller than that on each side.
        """
        where = f"IMAGE element {index}"
        if not data:
            raise InvalidInputError(f"{where} is empty: send the bytes of an encoded JPEG, PNG, WebP, BMP or GIF")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                if image.format not in ACCEPTED_FORMATS:
                    raise InvalidInputError(
                        f"{where} is a {image.format} image; accepted formats are JPEG, PNG, WebP, BMP and GIF"
                    )
                width, height = image.size
                if width * height > self._max_pixels:
                    raise InvalidInputError(
                        f"{where} is {width}x{height} = {width * height} pixels, over the limit of "
                        f"{self._max_pixels}; downscale it before sending"
                    )
                if reduce_to is not None and image.format in ("JPEG", "MPO"):
                    image.draft("RGB", (reduce_to, reduce_to))
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)  # animated GIF/WebP: the first frame
                if image.mode in ("P", "LA", "PA", "RGBA") or "transparency" in image.info:
                    image = image.convert("RGBA")
                return image.convert("RGB")
        except InvalidInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidInputError(
                f"{where} declares more pixels than allowed, over the limit of {self._max_pixels} "
                f"(decompression bomb guard: {exc}); downscale it before sending"
            ) from exc
        except UnidentifiedImageError as exc:
            raise InvalidInputError(
                f"{where} ({len(data)} bytes) is not a decodable image: {exc}. "
                "Send the raw bytes of a JPEG, PNG, WebP, BMP or GIF file"
            ) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidInputError(
                f"{where} ({len(data)} bytes) is truncated or corrupt: {exc}. Send the complete file"
            ) from exc
