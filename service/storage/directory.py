"""The object operations on a directory: the store as a folder replicas share (a volume).

A key ``a/b`` is the file ``<root>/a/b``. Writes go through a temporary file, flushed, renamed
into place; a create-only write is ``link(2)`` of that temporary file (it fails if any process
made the name first, also on NFS); a conditional replace holds an exclusive ``flock`` on the
folder's ``.lock`` file while it compares the fingerprint and renames. Reads go through
:func:`~service.host.files.read_bounded` (regular files only, never a symlink, at most a cap). A
listing never follows symlinks and reports what ``lstat`` says; the ETag of a file is its inode,
modification time and size, which change whenever it is replaced.

Folders are made when a file is written into them and removed when their last file is deleted,
so a deleted model leaves no empty folder behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from service.host.files import read_bounded, rename_into_place, sync_directory, write_temporary
from service.storage.objects import ObjectChanged, ObjectExists, ObjectInfo, check_key

LOCK_FILE = ".lock"


class DirectoryObjects:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        return str(self.root)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        yield from self._walk(self.root, "", prefix)

    def _walk(self, folder: Path, key_prefix: str, wanted: str) -> Iterator[ObjectInfo]:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            if not key_prefix:
                raise  # the store itself
            yield ObjectInfo(key_prefix, 0, "", 0.0, error=exc.strerror or str(exc))  # one folder: the rest goes on
            return
        for entry in entries:
            key = key_prefix + entry.name
            if not (key.startswith(wanted) or wanted.startswith(key + "/")) or entry.name == LOCK_FILE:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(Path(entry.path), key + "/", wanted)
                    continue
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while listed
            yield ObjectInfo(key, info.st_size, f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}", info.st_mtime)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            info = os.lstat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, info.st_size, f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}", info.st_mtime)

    def read(self, key: str, max_bytes: int) -> bytes:
        try:
            return read_bounded(self._path(key), max_bytes)
        except NotADirectoryError:
            raise FileNotFoundError(key) from None

    def write(self, key: str, data: bytes) -> ObjectInfo:
        path = self._path(key)
        rename_into_place(self._temporary(path, data), path)
        return self._described(key)

    def create(self, key: str, data: bytes) -> ObjectInfo:
        path = self._path(key)
        temporary = self._temporary(path, data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise ObjectExists(key) from None
        finally:
            temporary.unlink(missing_ok=True)
        sync_directory(path.parent)
        return self._described(key)

    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        path = self._path(key)
        temporary = self._temporary(path, data)
        try:
            with self._locked(path.parent):
                current = self.head(key)
                if current is None or current.etag != etag:
                    raise ObjectChanged(key)
                os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        sync_directory(path.parent)
        return self._described(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()
        self._remove_empty(path.parent)

    # -- helpers ------------------------------------------------------------------------

    def _remove_empty(self, folder: Path) -> None:
        """Remove ``folder`` and its parents below the root while they are empty."""
        while folder != self.root:
            if _only_lock(folder):
                with contextlib.suppress(OSError):
                    (folder / LOCK_FILE).unlink()
            try:
                folder.rmdir()  # only when empty: another writer's files keep it
            except OSError:
                return
            folder = folder.parent

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _temporary(self, path: Path, data: bytes) -> Path:
        """A flushed temporary file beside ``path``; the folder is made (again) if a delete removed it."""
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return write_temporary(path.parent, path.name, data)
            except FileNotFoundError:  # a concurrent delete removed the (empty) folder meanwhile
                if attempt == 2:
                    raise
            except BaseException:  # a full disk: leave no folder made for this write
                self._remove_empty(path.parent)
                raise
        raise AssertionError("unreachable")

    def _described(self, key: str) -> ObjectInfo:
        info = self.head(key)
        return info if info is not None else ObjectInfo(key, 0, "", 0.0)

    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)


def _only_lock(folder: Path) -> bool:
    try:
        return os.listdir(folder) == [LOCK_FILE]
    except OSError:
        return False
