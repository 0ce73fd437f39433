"""File access for a store that other processes share and that may hold anything.

- :func:`read_bounded` opens without following a symlink and without blocking (a FIFO
  or a device answers at once), checks with ``fstat`` that it is a regular file no
  larger than a cap, and reads at most that much.
- :func:`atomic_write` writes a temporary file and renames it into place, so that a
  reader sees the old file or the new one, never half of one.
- :func:`call_with_timeout` runs blocking file work in a daemon thread and stops
  waiting after a timeout: a hung network file system can hold that thread, but never
  the caller, start-up or shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class FileRefused(Exception):
    """A file that is not read: ``reason`` is a short metric label, ``str()`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (no symlink, FIFO or device), at most ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink; EACCES; ENXIO: a socket
        raise FileRefused("unreadable", f"{path}: cannot open: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused("not_regular_file", f"{path} is not a regular file (a FIFO, device or directory)")
        if info.st_size > max_bytes:
            raise FileRefused("too_large", f"{path} is {info.st_size} bytes, over the limit of {max_bytes}")
        chunks: list[bytes] = []
        left = max_bytes + 1  # one byte more tells a file that grew past the limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise FileRefused("too_large", f"{path} grew past the limit of {max_bytes} bytes while being read")
        return data
    except OSError as exc:
        raise FileRefused("unreadable", f"{path}: cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (atomic on POSIX)."""
    temporary = write_temporary(path.parent, path.name, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def write_temporary(folder: Path, name: str, data: bytes) -> Path:
    """A new file ``.<name>.*.tmp`` in ``folder`` holding ``data``, flushed to disk."""
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # readable by replicas running as other users
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def sync_directory(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class TimedOut(Exception):
    """The file work did not finish in time (a hung file system); it may still be running."""


async def call_with_timeout(function: Callable[[], T], timeout: float, name: str = "store-io") -> T:
    """Run ``function`` in a daemon thread; raise :class:`TimedOut` if it takes longer than ``timeout``.

    A daemon thread rather than the default executor: a call stuck in the kernel must not
    keep the process from exiting, nor take a worker that other work needs.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = function()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except asyncio.TimeoutError:
        raise TimedOut(f"no answer from the file system within {timeout:g}s") from None
