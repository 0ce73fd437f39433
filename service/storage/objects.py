"""What the model store needs of the place it keeps its files: a few object operations.

The model store (:mod:`service.finetune.store`) and the job history keep everything as objects
under '/'-separated keys (``<model>/manifest.json``, ``<model>/head-<version>.safetensors``,
``.jobs/<record>.json``). Two implementations give these operations the same guarantees:

- :class:`~service.storage.directory.DirectoryObjects`, a directory (a volume replicas share);
- :class:`~service.storage.s3.S3Objects`, a bucket and prefix of S3-compatible object storage.

The guarantees the store relies on:

- :meth:`ObjectStore.write` is atomic: a reader sees the old object or the new one, never part of one;
- :meth:`ObjectStore.create` makes an object only if none exists under the key, whoever else tries
  at the same moment (S3: ``If-None-Match: *``; a directory: ``link(2)``);
- :meth:`ObjectStore.replace` replaces an object only if it is still the version read (S3:
  ``If-Match`` on its ETag; a directory: a lock and a fingerprint check);
- :meth:`ObjectStore.read` never reads more than a cap, and refuses from the size it is told
  before reading (a listing, ``fstat`` or ``Content-Length``);
- a listing gives each object's size, ETag (a fingerprint that changes whenever the object is
  replaced) and modification time, and costs the same whatever the objects hold.

A store that cannot be reached raises :class:`StoreUnreachable`, an ``OSError`` like a failing
disk, so the callers' one rule for I/O errors covers both.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root, '/'-separated
    size: int
    etag: str  # changes whenever the object is written again
    modified: float  # seconds since the epoch
    error: str = ""  # a directory store's folder that could not be listed (key ends in '/'): why


class ObjectExists(Exception):
    """A create-only write found an object under the key."""


class ObjectChanged(Exception):
    """A conditional replace found another version than the one it was given (or none)."""


class StoreUnreachable(OSError):
    """The store did not answer, or answered with an error that is not about one object."""

    code = ""  # the object store's error code where it gave one (S3: NoSuchBucket, AccessDenied...)


def store_kind(objects: ObjectStore) -> str:
    """What kind of store ``objects`` is, for traces and logs: ``directory``, or the scheme of an
    object store's location (``s3``)."""
    location = objects.location
    return location.split("://", 1)[0] if "://" in location else "directory"


class ObjectStore(Protocol):
    """Blocking object operations; callers run them in threads with time limits."""

    @property
    def location(self) -> str:
        """Where the store is, for messages and logs (never a credential)."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    def head(self, key: str) -> ObjectInfo | None:
        """The object's description, or None if there is none."""

    def read(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes; FileNotFoundError if missing; ``FileRefused`` if larger than ``max_bytes``
        or not a plain object (a directory store's FIFO, device or symlink)."""

    def write(self, key: str, data: bytes) -> ObjectInfo:
        """Put ``data`` under ``key``, atomically, whatever was there."""

    def create(self, key: str, data: bytes) -> ObjectInfo:
        """Put ``data`` under ``key`` only if no object is there; :class:`ObjectExists` if one is."""

    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        """Put ``data`` under ``key`` only if the object there has ``etag``; :class:`ObjectChanged` if not."""

    def delete(self, key: str) -> None:
        """Remove the object (no error if it is gone already)."""


def check_key(key: str) -> str:
    """``key`` if it is a relative '/'-separated key of plain segments (no '..', no empty segment)."""
    segments = key.split("/")
    if not all(_SEGMENT.fullmatch(segment) and segment not in (".", "..") for segment in segments):
        raise ValueError(f"not a store key: {key!r}")
    return key
