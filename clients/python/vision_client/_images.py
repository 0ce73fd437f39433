"""Images in, encoded image files out: what the server's ``IMAGE`` input takes.

Accepted, for each image:

- a path (``str`` or ``os.PathLike``) to an image file, sent as it is;
- ``bytes`` (or ``bytearray``, ``memoryview``) holding an encoded image file;
- a binary file object (anything with ``read()``), read to its end;
- a ``PIL.Image.Image``, encoded losslessly as PNG (Pillow is never imported
  here: an image object means the caller has it already);
- a ``numpy.ndarray`` of ``uint8``, ``HxWx3`` (RGB), ``HxWx4`` (RGBA) or ``HxW``
  (grayscale), encoded losslessly as PNG without Pillow.

A call takes one image or a sequence (list, tuple, any iterable, or a 4-D
``NxHxWxC`` array) of them.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeGuard, Union, cast

import numpy as np

from vision_client.errors import InvalidInputError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO, np.ndarray, "PILImage"]
"""One image: a path, encoded bytes, a binary file, a PIL image or an HxWx3 uint8 array."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)
_PIL_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_PNG_COMPRESSION = 6


def as_image_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """``images`` as a list: one image is a list of one."""
    if isinstance(images, np.ndarray):  # NxHxWxC is a batch; any other shape is one image
        return list(images) if images.ndim == 4 else [images]
    if _is_single(images):
        return [images]
    if isinstance(images, Iterable):  # not one image, so a sequence of them
        return list(cast("Iterable[ImageInput]", images))
    raise TypeError(_unsupported(images))


def encode_images(images: ImageInput | Iterable[ImageInput]) -> list[bytes]:
    """Every image of ``images`` as the bytes of an image file, in order."""
    return [encode_image(image, i) for i, image in enumerate(as_image_list(images))]


def encode_image(image: ImageInput, position: int = 0) -> bytes:
    """One image as the bytes of an image file (PNG for pixels)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif isinstance(image, np.ndarray):
        data = encode_png(image, position)
    elif _is_pil_image(image):
        data = _encode_pil(image)
    elif callable(read := getattr(image, "read", None)):
        data = read()
        if not isinstance(data, bytes):
            raise TypeError(f"image {position}: the file object must be opened in binary mode ('rb')")
    else:
        raise TypeError(f"image {position}: {_unsupported(image)}")
    if not data:
        raise InvalidInputError(f"image {position} is empty (0 bytes); send an encoded image file")
    return data


def encode_png(pixels: np.ndarray, position: int = 0) -> bytes:
    """A lossless 8-bit PNG of an ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` uint8 array."""
    if pixels.dtype != np.uint8:
        raise InvalidInputError(
            f"image {position}: arrays must be uint8 (0-255), got {pixels.dtype}; "
            "convert with np.clip(a, 0, 255).astype(np.uint8), or send PIXELS yourself"
        )
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _PNG_COLOR_TYPES or 0 in pixels.shape:
        raise InvalidInputError(
            f"image {position}: arrays must be HxWx3 (RGB), HxWx4 (RGBA) or HxW (grey), got shape {pixels.shape}"
        )
    height, width, channels = pixels.shape
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = 0  # filter type "None" for every scanline
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), _PNG_COMPRESSION)),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encode_pil(image: Any) -> bytes:
    if image.mode not in _PIL_PNG_MODES:
        image = image.convert("RGB")  # CMYK, YCbCr, F, ...: what the server would see anyway
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESSION)
    return buffer.getvalue()


def _is_pil_image(value: object) -> TypeGuard[PILImage]:
    module = sys.modules.get("PIL.Image")  # loaded if the caller made a PIL image
    return module is not None and isinstance(value, module.Image)


def _is_single(value: object) -> TypeGuard[ImageInput]:
    return (
        isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview))
        or _is_pil_image(value)
        or callable(getattr(value, "read", None))
    )


def _unsupported(value: object) -> str:
    return (
        f"cannot send a {type(value).__name__} as an image; pass a path, the bytes of an image file, "
        "a binary file object, a PIL image or an HxWx3 uint8 numpy array (or a list of them)"
    )
