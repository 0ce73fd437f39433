"""Decoding encoded images and applying a model's exact preprocessing.

Runs in a thread pool (Pillow and torch release the GIL while they work).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInputError, quote

# The formats we promise; others Pillow might read are refused so that the
# decoder surface stays small (no EPS/PDF/plugin formats from strangers).
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF"})


# How each Pillow mode the formats above can produce maps to 8-bit RGB. Wide samples are
# scaled, not clipped: Pillow's own conversion clips them, so 50 % grey in a 16-bit PNG
# would come out white.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # 0..65535 ("I": a 16-bit PNG)
FLOAT_MODES = frozenset({"F"})  # 0.0..1.0
PALETTE_OR_ALPHA_MODES = frozenset({"P", "PA", "LA", "RGBA", "RGBa"})  # colours as stored, alpha dropped
EIGHT_BIT_MODES = frozenset({"1", "L", "RGB", "RGBX", "CMYK", "YCbCr"})
ACCEPTED_MODES = SIXTEEN_BIT_MODES | FLOAT_MODES | PALETTE_OR_ALPHA_MODES | EIGHT_BIT_MODES


def to_rgb(image: Image.Image, where: str = "the image") -> Image.Image:
    """``image`` as 8-bit RGB, the way its 8-bit rendering would look.

    Alpha is dropped (colours kept as stored), as ``Image.convert("RGB")`` and so
    torchvision's own image loader do for 8-bit images.
    """
    mode = image.mode
    if mode == "RGB":
        image.load()  # decode here, where decoding errors are caught, not in the transform
        return image
    if mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif mode in FLOAT_MODES:
        unit = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0), 0.0, 1.0)
        image = Image.fromarray(np.rint(unit * 255.0).astype(np.uint8), "L")
    elif mode in PALETTE_OR_ALPHA_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode not in EIGHT_BIT_MODES:
        raise InvalidInputError(
            f"{where} has pixel mode {quote(mode)}, which is not served; send 8- or 16-bit greyscale, "
            "palette, RGB, RGBA or CMYK images"
        )
    return image.convert("RGB")


class ImageDecoder:
    """Turns one encoded image into the model's input tensor (3xHxW float32)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], *, max_pixels: int) -> None:
        self._transform = transform
        self._max_pixels = max_pixels
        # Pillow's own guard (MAX_IMAGE_PIXELS, a process-wide setting; its warning is an error
        # below) must not be stricter than --max-image-pixels, or an image within our limit would
        # be refused by a limit no option names. It is only ever raised; ours is checked after open.
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_pixels
        # Pillow imports its format plugins on the first image it opens; do it now, at start-up,
        # rather than while the event loop waits on the first request's decode job's import lock.
        Image.init()

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
                        f"{self._max_pixels} (--max-image-pixels); downscale it before sending"
                    )
                if reduce_to is not None and image.format in ("JPEG", "MPO"):
                    image.draft("RGB", (reduce_to, reduce_to))
                # Animated GIF/WebP and MPO open at their first frame, the one we serve
                # (counting frames would read the whole file).
                return to_rgb(image, where)
        except InvalidInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidInputError(
                f"{where} declares more pixels than allowed, over the limit of {self._max_pixels} (--max-image-pixels; "
                f"decompression bomb guard: {pil_reason(exc)}); downscale it before sending"
            ) from exc
        except UnidentifiedImageError as exc:
            raise InvalidInputError(
                f"{where} ({len(data)} bytes) is not a decodable image: {pil_reason(exc)}. "
                "Send the raw bytes of a JPEG, PNG, WebP, BMP or GIF file"
            ) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidInputError(
                f"{where} ({len(data)} bytes) is truncated or corrupt: {pil_reason(exc)}. Send the complete file"
            ) from exc


_PYTHON_REPR = re.compile(r"<[^<>]{0,200}? at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def pil_reason(exc: BaseException) -> str:
    """Pillow's message for a decoding error, as a client may read it: Python's reprs of the objects
    Pillow read from (``<_io.BytesIO object at 0x7f...>``, a heap address) become "the image", any
    other address is dropped, and the text is cut short. The one place Pillow's words become ours."""
    text = _PYTHON_REPR.sub("the image", str(exc))
    text = _ADDRESS.sub("(address)", text).strip()
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)
