"""Data sets in the store: a job's images named (``FineTuneConfig.dataset``) instead of uploaded.

A dataset is ``s3://bucket/prefix/`` or a directory on the server, in torchvision's ImageFolder
layout (:func:`vision_client.protocol.fine_tuning.image_folder_class`): a class is a folder (or
prefix) at the top, named after it; its images lie at any depth below it; hidden entries, files at
the top and files of other suffixes are left out; the classes are sorted as ImageFolder sorts
them. The operator says where datasets may be (``--dataset-roots``: directories and ``s3://``
prefixes; none by default, and then every dataset is refused). S3 is read with the model store's
credentials: the standard AWS chain and ``AWS_ENDPOINT_URL``.

A job's dataset goes through three steps, each before the next:

1. its name against the roots (:func:`check_name`), with no I/O, when the config arrives: a URL
   that is not ``s3://``, a relative path, or one outside every root once ``..`` is resolved is
   refused before anything is read (PERMISSION_DENIED where only the roots refuse it);
2. its listing (:func:`list_dataset`), in a thread with a time limit: a directory is resolved
   first (symbolic links and ``..``; it, and every link inside it, must lead to a place under a
   root), then each image's size and class go through the job's
   :class:`~service.finetune.examples.ExampleCollector`, so that the upload's limits (examples,
   classes, class names, bytes in all) apply with the upload's words, each error naming the file;
   an image over the size one message may carry (``--max-message-bytes``), an empty dataset, an
   empty class and a class of one image (when some are held out for validation) are refused too;
3. its images, when the job runs (:class:`DatasetImages`, the job's
   :class:`~service.finetune.examples.ImageSource`): a chunk at a time (at most the extraction's
   chunk of images, and :data:`CHUNK_BYTES`), read by a few threads while the backbone runs on the
   chunk before, so that a job holds two chunks of encoded images, never the set. A chunk that
   the decoder refuses is checked an image at a time to name the bad one; the job then fails with
   the file's name and the decoder's words.
"""

from __future__ import annotations

import asyncio
import math
import os
import stat
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import replace
from functools import partial
from pathlib import Path

from service.config import FineTuneLimits
from service.errors import (
    FailedPreconditionError,
    InvalidInputError,
    PermissionDeniedError,
    UnavailableError,
)
from service.finetune.examples import CHECK_SIZE, ExampleCollector, TrainingExamples
from service.host.files import FileRefused, TimedOut, call_with_timeout, in_daemon_thread, read_bounded
from service.inference.preprocess import ImageDecoder
from service.storage.location import S3Location, StoreLocation, parse_store_location
from service.storage.objects import StoreUnreachable
from vision_client.protocol import FineTuneConfig
from vision_client.protocol.fine_tuning import IMAGE_SUFFIXES, image_folder_class

LIST_TIMEOUT_S = 120.0  # a dataset's whole listing
READ_TIMEOUT_S = 60.0  # one chunk of its images
CHUNK_BYTES = 32 * 1024 * 1024  # encoded bytes of one chunk read (an image larger than this is a chunk alone)
READERS = 8  # threads reading one chunk's images at once (S3: requests in flight)
MAX_DEPTH = 32  # folders below a dataset's top
MAX_OTHER_ENTRIES = 100_000  # entries of a listing that are not images (folders, other files) before it stops
_SHOWN_CHARS = 160  # of a file's name in a message: its end, where the file is named
_DENIED_CODES = ("AccessDenied", "403", "AllAccessDisabled")
_SUFFIXES = ", ".join(IMAGE_SUFFIXES)


def check_name(dataset: str, roots: tuple[StoreLocation, ...]) -> StoreLocation:
    """Where ``dataset`` is, if it names a place under one of ``roots``, without reading anything:
    :class:`PermissionDeniedError` where the roots refuse it, :class:`InvalidInputError` where the
    name is not one of a dataset. A directory is checked again, resolved, before it is listed."""
    if not roots:
        raise PermissionDeniedError(
            f"this server reads no datasets, so the dataset {_shown(dataset)} is refused: its operator allows "
            "them under chosen directories and s3:// prefixes with --dataset-roots (VISION_SERVE_DATASET_ROOTS); "
            "or upload the images with the job"
        )
    location: StoreLocation
    if "://" in dataset:
        try:
            location = parse_store_location(dataset)
        except ValueError as exc:
            raise InvalidInputError(f"dataset: {str(exc).replace('the model store', 'a dataset')}") from None
    else:
        location = Path(dataset)
    if isinstance(location, Path):
        if not location.is_absolute():
            raise InvalidInputError(
                f"dataset {_shown(dataset)} is not an absolute path; name a directory on the server, e.g. /data/pets"
            )
        location = Path(os.path.normpath(location))  # '..' resolved by name; links once it is listed
    if not any(_under(location, root) for root in roots):
        raise PermissionDeniedError(
            f"the dataset {_shown(dataset)} is outside the places this server reads datasets from "
            f"({_roots(roots)}); name one under them, or ask the operator to add its place to --dataset-roots"
        )
    return location


async def list_dataset(
    config: FineTuneConfig, collector: ExampleCollector, limits: FineTuneLimits, max_image_bytes: int
) -> tuple[TrainingExamples, list[str]]:
    """The examples of ``config.dataset`` (its listing; its images are read when the job runs) and
    their classes, as :meth:`ExampleCollector.finish` gives them for an upload."""
    location = check_name(config.dataset, limits.dataset_roots)
    work = partial(_list, config, location, collector, limits, max_image_bytes)
    try:
        return await call_with_timeout(work, LIST_TIMEOUT_S, "dataset-list")
    except TimedOut:
        raise UnavailableError(
            f"the dataset {_shown(config.dataset)} was not listed within {LIST_TIMEOUT_S:g}s; retry, or name a "
            "smaller one"
        ) from None


def _list(
    config: FineTuneConfig,
    location: StoreLocation,
    collector: ExampleCollector,
    limits: FineTuneLimits,
    max_image_bytes: int,
) -> tuple[TrainingExamples, list[str]]:
    """Blocking: open the dataset, list it into ``collector``, and check what only the whole listing shows."""
    dataset: _Dataset = (
        _S3Dataset(location, max_image_bytes)
        if isinstance(location, S3Location)
        else _DirectoryDataset(config.dataset, location, limits.dataset_roots, max_image_bytes)
    )
    keys: list[str] = []
    counts: dict[str, int] = {}  # images by class, classes without any included
    names: dict[str, str] = {}  # each class's name, one string for all its examples
    others = 0
    for key, size in dataset.entries():
        label = image_folder_class(key) if size >= 0 and not key.endswith("/") else None
        if label is None:
            others += 1
            if others > MAX_OTHER_ENTRIES:
                raise InvalidInputError(
                    f"the dataset {dataset.name} holds more than {MAX_OTHER_ENTRIES:,} entries that are not "
                    f"images ({_SUFFIXES}) in a class folder; name a folder or prefix that holds the images alone"
                )
            first, slash, _ = key.partition("/")
            if slash and first and not first.startswith("."):  # a class folder: it must come to hold images
                counts.setdefault(first, 0)
            continue
        if size > max_image_bytes:
            raise InvalidInputError(
                f"{dataset.where(key)} is {size:,} bytes, over the {max_image_bytes:,} bytes one image may have "
                "(--max-message-bytes, as for an uploaded image); make it smaller or leave it out"
            )
        label = names.setdefault(label, label)
        collector.add_listed(dataset.where(key), size, label)
        counts[label] = counts.get(label, 0) + 1
        keys.append(key)
    if not keys:
        raise InvalidInputError(
            f"no images in the dataset {dataset.name}: put each class's images in a folder (or prefix) named after "
            f"it, e.g. {dataset.where('cat/1.jpg')} ({_SUFFIXES})"
            + (f"; {others:,} other entries were left out" if others else "")
        )
    empty = sorted(name for name, count in counts.items() if count == 0)
    if empty:
        raise InvalidInputError(
            f"the class folder{'s' if len(empty) > 1 else ''} {_listed(empty)} of the dataset {dataset.name} "
            f"hold{'' if len(empty) > 1 else 's'} no images ({_SUFFIXES}); put images in "
            f"{'them' if len(empty) > 1 else 'it'} or remove {'them' if len(empty) > 1 else 'it'}"
        )
    single = sorted(name for name, count in counts.items() if count == 1)
    if single and config.validation_fraction > 0:
        raise InvalidInputError(
            f"the class{'es' if len(single) > 1 else ''} {_listed(single)} of the dataset {dataset.name} "
            f"{'have' if len(single) > 1 else 'has'} one image; with validation_fraction > 0 a class needs 2 or "
            "more (one to train on, one to hold out): add images, or leave the folder out"
        )
    examples, labels = collector.finish()
    return replace(examples, dataset=DatasetImages(dataset, keys)), labels


class DatasetImages:
    """A dataset's images, read a chunk at a time while the job runs (the job's ImageSource)."""

    def __init__(self, dataset: _Dataset, keys: list[str]) -> None:
        self._dataset = dataset
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def name(self) -> str:
        return self._dataset.name

    async def chunks(self, size: int) -> AsyncIterator[list[bytes]]:
        """The images, at most ``size`` (and about :data:`CHUNK_BYTES`) at a time, in the listing's
        order; the next chunk is read while the caller works on this one."""
        spans = self._spans(size)
        if not spans:
            return
        upcoming: asyncio.Future[list[bytes]] | None = asyncio.ensure_future(self._read(*spans[0]))
        try:
            for index in range(len(spans)):
                assert upcoming is not None
                chunk = await upcoming
                following = index + 1 < len(spans)
                upcoming = asyncio.ensure_future(self._read(*spans[index + 1])) if following else None
                yield chunk
                del chunk
        finally:
            if upcoming is not None:
                if not upcoming.done():
                    upcoming.cancel()
                elif not upcoming.cancelled():
                    upcoming.exception()  # read: a failure of a chunk never used is not logged as unretrieved

    async def refused(
        self, first: int, chunk: list[bytes], error: InvalidInputError, decoder: ImageDecoder, pool: Executor
    ) -> InvalidInputError:
        """The model refused ``chunk`` (images ``first``...): find the image, by the decoder's own check."""
        loop = asyncio.get_running_loop()
        for offset, data in enumerate(chunk):
            try:
                await loop.run_in_executor(pool, decoder.check, data, first + offset, CHECK_SIZE)
            except InvalidInputError as exc:
                return InvalidInputError(f"{self._dataset.where(self._keys[first + offset])}: {exc.message}")
        last = self._keys[first + len(chunk) - 1]
        return InvalidInputError(
            f"{self._dataset.where(self._keys[first])} to {self._dataset.where(last)}: {error.message}"
        )

    def _spans(self, size: int) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        start, held = 0, 0
        sizes = self._dataset.sizes
        for index, key in enumerate(self._keys):
            grown = held + sizes.get(key, 0)
            if index > start and (index - start >= size or grown > CHUNK_BYTES):
                spans.append((start, index))
                start, grown = index, sizes.get(key, 0)
            held = grown
        if start < len(self._keys):
            spans.append((start, len(self._keys)))
        return spans

    async def _read(self, start: int, end: int) -> list[bytes]:
        keys = self._keys[start:end]
        step = math.ceil(len(keys) / READERS)
        parts = [
            in_daemon_thread(partial(self._dataset.read_all, keys[at : at + step]), "dataset-read")
            for at in range(0, len(keys), step)
        ]
        try:
            read = await asyncio.wait_for(asyncio.gather(*parts), READ_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise UnavailableError(
                f"the dataset {self._dataset.name} did not answer: {len(keys)} images from "
                f"{self._dataset.where(keys[0])} were not read within {READ_TIMEOUT_S:g}s; retry the job"
            ) from None
        return [data for part in read for data in part]


class _Dataset:
    """Where a dataset's files are: listed once, then read by key (blocking; a thread's work)."""

    name: str  # as the job named it, for messages
    max_image_bytes: int

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}  # of the images listed, for reading in chunks of bounded bytes

    def entries(self) -> Iterator[tuple[str, int]]:
        """(key, size) of every entry, '/'-separated from the dataset's top, in a stable order; a
        folder's key ends in '/', an entry that is no file has size -1."""
        raise NotImplementedError

    def where(self, key: str) -> str:
        """The file at ``key`` as a person names it, quoted for a message (its end, if long)."""
        return _shown(f"{self.name.rstrip('/')}/{key}")

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def read_all(self, keys: list[str]) -> list[bytes]:
        return [self._read_one(key) for key in keys]

    def _read_one(self, key: str) -> bytes:
        try:
            return self.read(key)
        except FileNotFoundError:
            raise InvalidInputError(
                f"{self.where(key)} is gone: it was moved or deleted after the job listed its dataset; run the job "
                "again"
            ) from None
        except FileRefused as exc:
            if exc.reason == "too_large":
                raise InvalidInputError(
                    f"{self.where(key)} grew past the {self.max_image_bytes:,} bytes one image may have "
                    "(--max-message-bytes) after the job listed its dataset"
                ) from None
            raise InvalidInputError(f"{self.where(key)} cannot be read: {exc}") from None
        except StoreUnreachable as exc:
            raise UnavailableError(f"cannot read {self.where(key)}: {exc}; retry the job") from None
        except OSError as exc:
            raise UnavailableError(f"cannot read {self.where(key)}: {exc.strerror or exc}; retry the job") from None

    def _note(self, key: str, size: int) -> tuple[str, int]:
        if size > 0 and not key.endswith("/"):
            self.sizes[key] = size
        return key, size


class _S3Dataset(_Dataset):
    def __init__(self, location: S3Location, max_image_bytes: int) -> None:
        super().__init__()
        from service.storage.s3 import S3Objects  # boto3: only for a server that reads S3

        self.name = f"{location}/"
        self.max_image_bytes = max_image_bytes
        self._objects = S3Objects(location)

    def entries(self) -> Iterator[tuple[str, int]]:
        try:
            for info in self._objects.list():
                yield self._note(info.key, info.size)
        except StoreUnreachable as exc:
            if exc.code == "NoSuchBucket":
                raise InvalidInputError(f"the dataset {self.name} names a bucket that does not exist ({exc})") from None
            if exc.code in _DENIED_CODES:
                raise FailedPreconditionError(
                    f"this server's S3 credentials may not list the dataset {self.name} ({exc.code}): grant them "
                    "s3:ListBucket and s3:GetObject on it, or name another dataset"
                ) from None
            raise UnavailableError(f"cannot list the dataset {self.name}: {exc}; retry") from None

    def read(self, key: str) -> bytes:
        try:
            return self._objects.read_listed(key, self.max_image_bytes)
        except StoreUnreachable as exc:
            if exc.code in _DENIED_CODES:
                raise FailedPreconditionError(
                    f"this server's S3 credentials may not read {self.where(key)} ({exc.code}): grant them "
                    "s3:GetObject on the dataset"
                ) from None
            raise


class _DirectoryDataset(_Dataset):
    def __init__(self, named: str, location: Path, roots: tuple[StoreLocation, ...], max_image_bytes: int) -> None:
        super().__init__()
        self.name = named
        self.max_image_bytes = max_image_bytes
        self._roots = [Path(os.path.realpath(root)) for root in roots if isinstance(root, Path)]
        try:
            real = Path(os.path.realpath(location, strict=True))
        except FileNotFoundError:
            raise InvalidInputError(f"the dataset {_shown(named)} does not exist on this server") from None
        except OSError as exc:
            raise InvalidInputError(f"the dataset {_shown(named)} cannot be resolved: {exc.strerror or exc}") from None
        if not self._inside(real):
            raise PermissionDeniedError(
                f"the dataset {_shown(named)} leads (through a symbolic link) outside the places this server reads "
                f"datasets from ({_roots(roots)}); name one under them"
            )
        if not real.is_dir():
            raise InvalidInputError(f"the dataset {_shown(named)} is not a directory; name the folder of the classes")
        self._real = real

    def entries(self) -> Iterator[tuple[str, int]]:
        yield from self._walk(self._real, "", 0, {self._real})

    def _walk(self, folder: Path, prefix: str, depth: int, visited: set[Path]) -> Iterator[tuple[str, int]]:
        try:
            listed = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            raise FailedPreconditionError(
                f"this server cannot list {self.where(prefix) if prefix else _shown(self.name)}: "
                f"{exc.strerror or exc}; let it read the folder, or name another dataset"
            ) from None
        for entry in listed:
            key = prefix + entry.name
            if entry.name.startswith("."):
                yield key, -1  # hidden: left out, never followed
                continue
            try:
                link = entry.is_symlink()
                target = Path(os.path.realpath(entry.path)) if link else Path(entry.path)
                if link and not self._inside(target):
                    raise PermissionDeniedError(
                        f"{self.where(key)} is a symbolic link that leads outside the places this server reads "
                        "datasets from; copy what it names into the dataset, or remove the link"
                    )
                info = os.stat(target, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while listed, or a link to nothing
            if stat.S_ISDIR(info.st_mode):
                if depth >= MAX_DEPTH:
                    raise InvalidInputError(
                        f"{self.where(key)} lies more than {MAX_DEPTH} folders deep in the dataset; flatten it"
                    )
                if target in visited:
                    continue  # a link back to a folder being walked
                yield key + "/", 0
                yield from self._walk(target, key + "/", depth + 1, visited | {target})
            elif stat.S_ISREG(info.st_mode):
                yield self._note(key, info.st_size)
            else:
                yield key, -1  # a FIFO, socket or device: not an image

    def read(self, key: str) -> bytes:
        path = Path(os.path.realpath(self._real / key))
        if not self._inside(path):
            raise PermissionDeniedError(
                f"{self.where(key)} now leads outside the places this server reads datasets from"
            )
        return read_bounded(path, self.max_image_bytes)  # a regular file, never a link, at most the cap

    def _inside(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self._roots)


def _under(location: StoreLocation, root: StoreLocation) -> bool:
    """Whether ``location`` is ``root`` or below it, by name (no I/O)."""
    if isinstance(location, S3Location) or isinstance(root, S3Location):
        if not (isinstance(location, S3Location) and isinstance(root, S3Location)):
            return False
        return location.bucket == root.bucket and (
            not root.prefix or location.prefix == root.prefix or location.prefix.startswith(root.prefix + "/")
        )
    root = Path(os.path.normpath(root))
    return location == root or root in location.parents


def _roots(roots: tuple[StoreLocation, ...]) -> str:
    return ", ".join(str(root) for root in roots)


def _listed(names: list[str]) -> str:
    shown = ", ".join(_shown(name) for name in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _shown(text: str) -> str:
    """``text`` quoted for a message; a long one cut at its start, so that the file's own name shows."""
    return repr(text) if len(text) <= _SHOWN_CHARS else f"'...{text[-_SHOWN_CHARS:]}'"
