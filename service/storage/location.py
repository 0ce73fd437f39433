"""Where the model store is: a directory, or a bucket and prefix of S3-compatible storage.

A value with a scheme (``something://``) is a URL and never a directory: ``s3://`` is the one
object store served; any other scheme (``gs://``, ``http://``...) is refused with a message
rather than taken as the local folder ``./gs:/...``. ``file://`` names a directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

SCHEMES = ("s3",)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# S3's bucket naming rules: 3-63 characters, lowercase letters, digits, '.', '-'; starts and ends alnum.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""  # '/'-separated, no leading or trailing '/'; '' is the bucket's root

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


StoreLocation = Path | S3Location


def parse_store_location(value: str) -> StoreLocation:
    """``s3://bucket[/prefix]`` as an :class:`S3Location`, a path as a ``Path``; ValueError otherwise."""
    if not _URL.match(value):
        return Path(value).expanduser()
    url = urlsplit(value)
    scheme = url.scheme.lower()
    if scheme == "file":
        return Path(unquote(url.path))
    if scheme not in SCHEMES:
        raise ValueError(
            f"{value!r}: the model store takes a directory or s3://bucket/prefix (S3 or an S3-compatible server "
            f"such as MinIO, Ceph RGW or R2: set AWS_ENDPOINT_URL), not a {scheme}:// URL"
        )
    if url.query or url.fragment or url.username or url.password or url.port:
        raise ValueError(
            f"{value!r}: an s3:// URL is s3://bucket/prefix; put credentials in the AWS chain, not in the URL"
        )
    if not _BUCKET.fullmatch(url.hostname or "") or ".." in (url.hostname or ""):
        raise ValueError(f"{value!r}: {url.netloc!r} is not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    prefix = url.path.strip("/")
    if prefix and not all(_PREFIX_SEGMENT.fullmatch(s) and s not in (".", "..") for s in prefix.split("/")):
        raise ValueError(
            f"{value!r}: the prefix {prefix!r} must be '/'-separated segments of A-Z, a-z, 0-9, '.', '_', '-'"
        )
    return S3Location(url.hostname or "", prefix)
