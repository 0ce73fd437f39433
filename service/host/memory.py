"""The C allocator the server runs on: its settings, chosen once at start, and giving freed memory back.

glibc's malloc serves a request of ``M_MMAP_THRESHOLD`` bytes or more with a mapping of its own,
which ``free`` hands straight back to the kernel; smaller ones come from heaps (arenas) that give
memory back only from their top. By default the threshold is dynamic: whenever a mapped block is
freed, the threshold rises to that block's size, up to 32 MiB. A server of images frees such blocks
all the time (a batch's pixels, a layer's output), so after its first batches nearly every tensor
comes from the heaps, and any small block that outlives its batch (a response being sent, a row of
features) pins the freed space around it. Freed space is then reused only where the next batch's
tensors fit in it: a fine-tuning job's feature extraction, 20,000 small images, grew the server by
15 GB and kept it after the job had ended (bench/README.md, "A fine-tuning job's memory").

So the server fixes the threshold at start (:func:`configure_allocator`, called by ``vision-serve``
before anything is loaded) at 1 MiB: a batch's tensors and a layer's outputs are mapped and unmapped,
and only blocks below 1 MiB share the heaps, where a pinned block can strand little. Measured on
AlexNet (bench/README.md): glibc's own starting value, 128 KiB, also maps each image's pixels and
decode buffers and cost 12-19% more CPU per image on the IMAGE path; 1 MiB costs about 2%, and
the 20,000-image job stays within a few hundred MB either way. ``MALLOC_MMAP_THRESHOLD_`` in the
environment, glibc's own variable, is honoured: then the server leaves the threshold to it. On a
C library other than glibc nothing is changed.

:func:`release_memory` gives the heaps' free pages back to the kernel (``malloc_trim``); a
fine-tuning job calls it when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1024 * 1024  # fixed: see the module's docstring
THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"


@dataclass(frozen=True)
class AllocatorSettings:
    """What :func:`configure_allocator` did: the threshold it set, or why it set none."""

    mmap_threshold: int | None
    reason: str


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """glibc, or None on another C library (musl, macOS), where these calls do not exist."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def configure_allocator(environ: Mapping[str, str] = os.environ) -> AllocatorSettings:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES`, unless the environment sets it."""
    if THRESHOLD_VARIABLE in environ:
        settings = AllocatorSettings(None, f"left to {THRESHOLD_VARIABLE}={environ[THRESHOLD_VARIABLE]}")
    else:
        libc = _libc()
        if libc is None:
            settings = AllocatorSettings(None, "not glibc: the C library's defaults")
        elif libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
            settings = AllocatorSettings(None, "mallopt refused the threshold: glibc's defaults")
        else:
            settings = AllocatorSettings(MMAP_THRESHOLD_BYTES, "blocks of this size or more are mapped")
    log.debug("allocator: mmap threshold %s (%s)", settings.mmap_threshold, settings.reason)
    return settings


def trim() -> bool:
    """Hand the heaps' free pages back to the kernel; True if any memory was released."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


async def release_memory() -> None:
    """Collect unreachable Python objects (a cancelled job's frames hold tensors in cycles), then
    give the freed pages back, off the event loop (a trim walks every heap)."""
    gc.collect()
    await asyncio.to_thread(trim)
