"""The object operations on S3-compatible object storage: ``s3://bucket/prefix``.

Built on boto3 (botocore) for what the store needs of a client library:

- the whole standard AWS credential chain (environment, shared config and credentials files,
  web identity tokens as Kubernetes projects them for IAM roles for service accounts, container
  and instance metadata) and the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
  variables for S3-compatible servers (MinIO, Ceph RGW, R2); TLS verified for ``https://``
  (``AWS_CA_BUNDLE`` for a private CA);
- conditional writes: ``If-None-Match: *`` (create only) and ``If-Match`` (replace only the
  version read), answered ``412 Precondition Failed`` when they do not hold;
- time limits per request (connect and read) and bounded retries.

The store's calls are few and small (a listing per poll, a manifest and a head's weights per
new model), so boto3's synchronous calls run in the callers' threads with their time limits;
an async or faster client would not change a poll's cost, which is its one listing.

Errors: a missing object is ``FileNotFoundError``; a failed precondition :class:`ObjectExists` or
:class:`ObjectChanged`; anything else (no connection, a timeout, access denied, no such bucket)
:class:`StoreUnreachable` with the S3 error code and the location, never a credential.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from service.host.files import FileRefused
from service.storage.location import S3Location
from service.storage.objects import ObjectChanged, ObjectExists, ObjectInfo, StoreUnreachable, check_key

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0  # per request: the callers' own limits (a read, a poll) stop waiting sooner or later
MAX_ATTEMPTS = 3  # botocore's standard retry mode: throttling and 5xx, with backoff
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_NOT_FOUND = ("NoSuchKey", "404", "NotFound")
_PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class S3Objects:
    def __init__(self, location: S3Location, *, endpoint_url: str | None = None) -> None:
        self._location = location
        custom_endpoint = endpoint_url or next((os.environ[v] for v in _ENDPOINT_VARIABLES if os.environ.get(v)), None)
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            # S3-compatible servers are addressed by path (http://minio:9000/bucket/key): their
            # host names rarely resolve with the bucket in front. AWS itself: virtual hosts.
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
        )
        session = boto3.session.Session()
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)

    @property
    def location(self) -> str:
        return str(self._location)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self._location.prefix}/" if self._location.prefix else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._location.bucket, Prefix=root + prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield ObjectInfo(
                        item["Key"][len(root) :], int(item["Size"]), item["ETag"], item["LastModified"].timestamp()
                    )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._unreachable("list", prefix, exc) from None

    def head(self, key: str) -> ObjectInfo | None:
        try:
            answer = self._client.head_object(Bucket=self._location.bucket, Key=self._full(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise self._unreachable("head", key, exc) from None
        return ObjectInfo(key, int(answer["ContentLength"]), answer["ETag"], answer["LastModified"].timestamp())

    def read(self, key: str, max_bytes: int) -> bytes:
        return self._read(self._full(key), key, max_bytes)

    def read_listed(self, key: str, max_bytes: int) -> bytes:
        """:meth:`read` of a key as :meth:`list` gave it, whatever its characters: a data set's keys
        (service.finetune.datasets) are other programs' names, not store keys."""
        return self._read(f"{self._location.prefix}/{key}" if self._location.prefix else key, key, max_bytes)

    def _read(self, full: str, key: str, max_bytes: int) -> bytes:
        try:
            answer = self._client.get_object(Bucket=self._location.bucket, Key=full)
            body = answer["Body"]
            try:
                size = int(answer["ContentLength"])
                if size > max_bytes:  # told before a byte of the body is read
                    raise FileRefused("too_large", f"{self._name(key)} is {size} bytes, over the limit of {max_bytes}")
                data: bytes = body.read(max_bytes + 1)
            finally:
                body.close()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            if _code(exc) in _NOT_FOUND:
                raise FileNotFoundError(self._name(key)) from None
            raise self._unreachable("read", key, exc) from None
        if len(data) > max_bytes:
            raise FileRefused("too_large", f"{self._name(key)} holds more than its declared {max_bytes} bytes")
        return data

    def write(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, data)

    def create(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        return self._put(key, data, IfMatch=etag)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self._location.bucket, Key=self._full(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            if _code(exc) not in _NOT_FOUND:
                raise self._unreachable("delete", key, exc) from None

    # -- helpers ------------------------------------------------------------------------

    def _put(self, key: str, data: bytes, **condition: str) -> ObjectInfo:
        try:
            answer = self._client.put_object(Bucket=self._location.bucket, Key=self._full(key), Body=data, **condition)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            code = _code(exc)
            if condition and code in _PRECONDITION:
                raise (ObjectExists if "IfNoneMatch" in condition else ObjectChanged)(key) from None
            if "IfMatch" in condition and code in _NOT_FOUND:
                raise ObjectChanged(key) from None  # deleted since it was read
            raise self._unreachable("write", key, exc) from None
        return ObjectInfo(key, len(data), answer.get("ETag", ""), 0.0)

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self._location.prefix}/{key}" if self._location.prefix else key

    def _name(self, key: str) -> str:
        return f"{self._location}/{key}"

    def _unreachable(self, action: str, key: str, exc: Exception) -> StoreUnreachable:
        code = _code(exc)
        detail = f"{code}: {_message(exc)}" if code else str(exc)
        unreachable = StoreUnreachable(f"cannot {action} {self._name(key)}: {detail}"[:500])
        unreachable.code = code
        return unreachable


def _code(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _message(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Message", "")) or "no message"
    return str(exc)
