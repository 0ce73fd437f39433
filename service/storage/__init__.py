"""Where the model store keeps its objects: a directory or S3-compatible object storage."""

from __future__ import annotations

from pathlib import Path

from service.storage.directory import DirectoryObjects
from service.storage.location import S3Location, StoreLocation, parse_store_location
from service.storage.objects import ObjectChanged, ObjectExists, ObjectInfo, ObjectStore, StoreUnreachable, store_kind

__all__ = [
    "DirectoryObjects",
    "ObjectChanged",
    "ObjectExists",
    "ObjectInfo",
    "ObjectStore",
    "S3Location",
    "StoreLocation",
    "StoreUnreachable",
    "open_objects",
    "parse_store_location",
    "store_kind",
]


def open_objects(location: StoreLocation | ObjectStore) -> ObjectStore:
    """The object store at ``location`` (boto3 is imported only for an ``s3://`` store)."""
    if isinstance(location, Path):
        return DirectoryObjects(location)
    if isinstance(location, S3Location):
        from service.storage.s3 import S3Objects

        return S3Objects(location)
    return location
