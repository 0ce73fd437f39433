"""The Open Inference Protocol tensors this service speaks, and the BYTES framing.

Inputs: ``IMAGE`` (BYTES ``[N]``, encoded images) or ``PIXELS`` (FP32 ``[N, 3, H, W]``,
preprocessed); output: ``LOGITS`` (FP32 ``[N, C]``, or BYTES ``[N, k]`` "score:index:label"
strings when the ``classification`` parameter asks for the top k).

A BYTES tensor's raw contents are its elements, each prefixed by its length as a 4-byte
little-endian unsigned integer (Triton's and KServe's framing, on gRPC and in the HTTP
binary extension alike).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

IMAGE = "IMAGE"
PIXELS = "PIXELS"
LOGITS = "LOGITS"
CLASSIFICATION = "classification"  # the output parameter of Triton's classification extension

_LENGTH = struct.Struct("<I")
LENGTH_PREFIX_BYTES = _LENGTH.size


class FramingError(ValueError):
    """Raw BYTES contents whose length prefixes do not frame them; the message says where."""


def encode_bytes_elements(elements: Iterable[bytes]) -> bytes:
    """Raw BYTES contents: each element prefixed by its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def decode_bytes_elements(raw: bytes, *, max_elements: int | None = None, allow_empty: bool = True) -> list[bytes]:
    """Split raw BYTES contents into elements, checking every length prefix.

    One pass, linear in ``len(raw)``; it stops at element ``max_elements + 1`` and, unless
    ``allow_empty``, at the first empty element, so that hostile contents cost little.
    """
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + LENGTH_PREFIX_BYTES > len(raw):
            raise FramingError(
                f"element {len(elements)} has a truncated length prefix ({len(raw) - offset} of 4 bytes); "
                "each BYTES element must be a 4-byte little-endian length followed by that many bytes"
            )
        if max_elements is not None and len(elements) >= max_elements:
            raise FramingError(
                f"holds more than {max_elements} elements, the number its shape declares; "
                "make the shape and the elements agree"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += LENGTH_PREFIX_BYTES
        if offset + length > len(raw):
            raise FramingError(
                f"element {len(elements)}'s length prefix says {length} bytes but only "
                f"{len(raw) - offset} remain; fix the length prefixes of the raw BYTES tensor"
            )
        if length == 0 and not allow_empty:
            raise FramingError(f"element {len(elements)} is empty; every element must hold data")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements
