"""Every file the server reads or writes, through one bounded mechanism.

Files the server reads may hold anything: a store that other processes share, a runtime
cache, a token file or TLS files from a mounted Secret, a weights directory. So:

- :func:`open_regular` opens without blocking (a FIFO or a device answers at once), checks
  with ``fstat`` that it is a regular file no larger than a cap, and hands out the open file;
  :func:`read_bounded` reads such a file whole, at most its cap (one byte more tells a file
  that grew while read). Symlinks are refused unless the caller follows them on purpose
  (Kubernetes mounts Secrets and ConfigMaps as symlinks; a store entry is never one).
- :func:`atomic_write` writes a temporary file and renames it into place, so that a
  reader sees the old file or the new one, never half of one.
- :func:`in_daemon_thread` and :func:`call_with_timeout` run blocking file work in a daemon
  thread and stop waiting after a timeout: a hung network file system or an object store that
  does not answer can hold that thread, but never the caller, the event loop, start-up or shutdown.

The caps are named here, one per kind of file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# Caps by kind of file: far above any sound file of the kind, far below what would hurt.
MAX_TOKEN_FILE_BYTES = 64 * KIB  # --auth-token-file: tokens, one a line
MAX_TLS_FILE_BYTES = 1 * MIB  # a PEM certificate chain, key or CA bundle
MAX_CACHE_ENTRY_BYTES = 64 * KIB  # a runtime cache entry's entry.json
MAX_NETWORK_FILE_BYTES = 4 * GIB  # an exported network or its weights; a <model>.pth state dict

# Time limits for small files read while serving (tokens, TLS): a healthy disk answers in ms.
SMALL_FILE_TIMEOUT_S = 5.0


class FileRefused(Exception):
    """A file that is not read: ``reason`` is a short metric label, ``str()`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def open_regular(path: Path, max_bytes: int, *, follow_symlinks: bool = False) -> Iterator[BinaryIO]:
    """``path`` open for reading, once it is known to be a regular file of at most ``max_bytes``.

    Raises FileNotFoundError when it does not exist, :class:`FileRefused` when it is not read
    (a symlink not followed, a FIFO, device, socket or directory, too large, unreadable).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
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
        os.set_blocking(fd, True)
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        yield file


def read_bounded(path: Path, max_bytes: int, *, follow_symlinks: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` (see :func:`open_regular`)."""
    with open_regular(path, max_bytes, follow_symlinks=follow_symlinks) as file:
        try:
            data = file.read(max_bytes + 1)  # one byte more tells a file that grew past the limit
        except OSError as exc:
            raise FileRefused("unreadable", f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise FileRefused("too_large", f"{path} grew past the limit of {max_bytes} bytes while being read")
    return data


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (atomic on POSIX)."""
    rename_into_place(write_temporary(path.parent, path.name, data), path)


def rename_into_place(temporary: Path, path: Path) -> None:
    """Rename a written ``temporary`` file (see :func:`write_temporary`) to ``path``, durably; on
    failure the temporary file is removed."""
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
    """The work did not finish in time (a hung file system, an object store that does not answer);
    it may still be running. The message says only how long was waited: the caller names what it
    waited for (a directory or a bucket), which this module does not know."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no answer within {timeout_s:g}s")
        self.timeout_s = timeout_s


def in_daemon_thread(function: Callable[[], T], name: str) -> asyncio.Future[T]:
    """``function()`` started in a daemon thread; its outcome, whenever it comes.

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

    # Whoever gave up waiting (a timeout) no longer reads the outcome: mark it retrieved, so that
    # asyncio does not log "exception was never retrieved" when it comes.
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    threading.Thread(target=run, name=name, daemon=True).start()
    return future


async def call_with_timeout(function: Callable[[], T], timeout: float, name: str = "store-io") -> T:
    """Run ``function`` in a daemon thread; raise :class:`TimedOut` if it takes longer than ``timeout``."""
    future = in_daemon_thread(function, name)
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except asyncio.TimeoutError:
        raise TimedOut(timeout) from None
