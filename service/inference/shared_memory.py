"""Triton's system shared memory: the one owner of the registered regions.

A region is a named window ``[offset, offset + byte_size)`` of a POSIX shared memory object, a
file of ``/dev/shm`` that a client on this host created (``shm_open``). A request names a region,
an offset in it and a byte count (:class:`SharedTensor`) to read an input from or write an
output into. The transports only convert; every check is here:

- **Keys are POSIX shared memory names only**: ``/name`` (or ``name``), one path component of
  portable characters, opened relative to ``/dev/shm`` with ``O_NOFOLLOW``, and it must be a
  regular file. ``../etc/passwd``, ``/a/b``, symlinks, FIFOs and devices are refused.
- **Sizes are checked against the file when it is registered** (the region must lie within the
  file) **and against the region on every request** (a tensor must lie within its region).
- **The file is never mapped.** A mapping of a file its owner truncates later kills the process
  with SIGBUS at the first access past the new end, and Python cannot catch that. The server reads
  and writes through the open descriptor instead (``preadv``/``pwrite``): after a ``fstat`` that
  checks the file still holds the whole region, an input is read straight into the array that
  becomes the request's tensor (one copy, no intermediate bytes), and a truncation that races the
  check gives a short read, refused, never a signal. Writes never extend the file.
- **Caps**: at most ``max_regions`` regions and ``max_bytes`` bytes of them at once.
- **Leases**: a request holds the regions it uses (:meth:`SharedMemoryRegions.leases`);
  unregistering a region in use takes its name away at once, and its descriptor is closed when
  the last request using it ends, so in-flight requests finish. Until then it still counts
  against the caps.

Who may register is the transport's rule (``transport/auth.py``: host-local management calls);
docs/security.md has the threat model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    RegionNotFoundError,
    SharedMemoryFullError,
    VisionServeError,
    quote,
)
from service.host.files import atomic_write, read_bounded

log = logging.getLogger(__name__)

SHM_DIRECTORY = Path("/dev/shm")
# A POSIX shared memory name: an optional leading slash, then one component of the portable
# filename characters (no slash, no NUL), at most NAME_MAX bytes, not "." or "..".
_KEY = re.compile(r"/?([A-Za-z0-9_.-]{1,255})")
MAX_REGION_NAME_CHARS = 256
MAX_JOURNAL_BYTES = 16 * 1024 * 1024  # the registrations' journal (a few hundred bytes a region)
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_MAX_OFFSET = 2**62  # well within off_t: anything larger is no region of a real file


@dataclass(frozen=True)
class RegionStatus:
    """A registered region, as ``SystemSharedMemoryStatus`` reports it."""

    name: str
    key: str
    offset: int  # where the region starts in its file
    byte_size: int


@dataclass(frozen=True)
class SharedTensor:
    """Where a request's tensor lies: ``byte_size`` bytes at ``offset`` in region ``region``."""

    region: str
    offset: int
    byte_size: int


def shm_file_name(key: str) -> str:
    """The file name in ``/dev/shm`` of a POSIX shared memory ``key``; INVALID_ARGUMENT for
    anything else (a path, a name with a slash inside, ``.`` or ``..``, odd characters)."""
    match = _KEY.fullmatch(key)
    if match is None or match.group(1) in (".", ".."):
        raise InvalidInputError(
            f"shared memory key {quote(key)} is not a POSIX shared memory name: use '/name' with letters, "
            "digits, '.', '_' or '-' only (no other '/'), the name given to shm_open"
        )
    return match.group(1)


class Region:
    """One registration: an open descriptor of the file, and the window of it that is the region."""

    def __init__(self, status: RegionStatus, fd: int) -> None:
        self.status = status
        self._fd = fd
        self.leases = 0  # requests holding it (guarded by the owner's lock)
        self.retired = False  # unregistered: closed once the last lease is released

    @property
    def name(self) -> str:
        return self.status.name

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def check(self, tensor: SharedTensor, what: str) -> None:
        """Refuse a tensor that does not lie within this region."""
        size = self.status.byte_size
        if tensor.offset > size or tensor.byte_size > size - tensor.offset:
            raise InvalidInputError(
                f"{what}: {tensor.byte_size} bytes at offset {tensor.offset} of shared memory region "
                f"{quote(self.name)} run past its end ({size} bytes); fit the tensor within the region"
            )

    def read(self, tensor: SharedTensor, what: str) -> np.ndarray:
        """The tensor's bytes, read into a new uint8 array (aligned: float32 can view it)."""
        self.check(tensor, what)
        start = self.status.offset + tensor.offset
        self._check_file(what)
        data = np.empty(tensor.byte_size, dtype=np.uint8)
        view = data.data
        done = 0
        while done < tensor.byte_size:
            count = os.preadv(self._fd, [view[done:]], start + done)
            if count <= 0:
                raise self._truncated(what)
            done += count
        return data

    def write(self, tensor: SharedTensor, data: bytes, what: str) -> None:
        """Write ``data`` (at most the tensor's ``byte_size``) at the tensor's place; never past the file's end."""
        if len(data) > tensor.byte_size:
            raise InvalidInputError(
                f"{what} needs {len(data)} bytes but its shared_memory_byte_size is {tensor.byte_size}; "
                f"give it at least {len(data)} bytes"
            )
        self.check(tensor, what)
        self._check_file(what)
        view = memoryview(data)
        start = self.status.offset + tensor.offset
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, view[done:], start + done)

    def _check_file(self, what: str) -> None:
        """Refuse to touch a file that no longer holds the whole region (its owner truncated it)."""
        if os.fstat(self._fd).st_size < self.status.offset + self.status.byte_size:
            raise self._truncated(what)

    def _truncated(self, what: str) -> FailedPreconditionError:
        return FailedPreconditionError(
            f"{what}: the file of shared memory region {quote(self.name)} ({quote(self.status.key)}) is now "
            f"smaller than the region ({self.status.offset + self.status.byte_size} bytes from its start); "
            "its owner truncated it: unregister the region and register it again"
        )


class SharedMemoryRegions:
    """Every registered region, by name, and the leases requests hold on them.

    Thread-safe: registration runs on the event loop, reads and writes in worker threads.
    """

    def __init__(
        self, *, max_regions: int, max_bytes: int, directory: Path = SHM_DIRECTORY, journal: Path | None = None
    ) -> None:
        """``journal``: a file that lists the registrations after each change (the engine's, in its run
        directory), so that an engine started again after a crash serves its clients' regions
        (:meth:`restore`) as if nothing had happened."""
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._directory = directory
        self._journal = journal
        self._lock = threading.Lock()
        self._regions: dict[str, Region] = {}
        self._open: set[Region] = set()  # registered, or unregistered and still leased: what the caps count

    @property
    def enabled(self) -> bool:
        return self.max_regions > 0

    def register(self, name: str, key: str, offset: int, byte_size: int) -> RegionStatus:
        """Open ``key`` and register ``[offset, offset + byte_size)`` of it as region ``name``."""
        if not self.enabled:
            raise FailedPreconditionError(
                "system shared memory is off on this server (--max-shared-memory-regions 0); "
                "send tensors in the request instead"
            )
        if not name or len(name) > MAX_REGION_NAME_CHARS:
            raise InvalidInputError(
                f"a shared memory region needs a name of 1 to {MAX_REGION_NAME_CHARS} characters, got {quote(name)}"
            )
        file_name = shm_file_name(key)
        if byte_size <= 0 or offset < 0 or offset > _MAX_OFFSET or byte_size > _MAX_OFFSET:
            raise InvalidInputError(
                f"shared memory region {quote(name)}: byte_size must be positive and offset not negative "
                f"(got byte_size {byte_size}, offset {offset})"
            )
        with self._lock:
            self._check_room(name, byte_size)
        fd = _open_regular(self._directory, file_name, key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidInputError(
                    f"shared memory region {quote(name)}: {byte_size} bytes at offset {offset} run past the end "
                    f"of {quote(key)} ({size} bytes); register a region within the object"
                )
            status = RegionStatus(name=name, key=key, offset=offset, byte_size=byte_size)
            region = Region(status, fd)
            with self._lock:
                self._check_room(name, byte_size)  # again: another registration may have come meanwhile
                self._regions[name] = region
                self._open.add(region)
        except BaseException:
            os.close(fd)
            raise
        log.info("registered shared memory region %s: %d bytes at %d of %s", quote(name), byte_size, offset, key)
        self._save()
        return status

    def _check_room(self, name: str, byte_size: int) -> None:
        if name in self._regions:
            raise AlreadyExistsError(
                f"shared memory region {quote(name)} is already registered; unregister it first or use another name"
            )
        if len(self._open) >= self.max_regions:
            raise SharedMemoryFullError(
                f"{len(self._open)} shared memory regions are open, the most this server holds "
                f"(--max-shared-memory-regions {self.max_regions}); unregister one first"
            )
        used = sum(region.status.byte_size for region in self._open)
        if used + byte_size > self.max_bytes:
            raise SharedMemoryFullError(
                f"registering {byte_size} bytes would make {used + byte_size} bytes of shared memory regions, "
                f"over this server's limit of {self.max_bytes} (--max-shared-memory-bytes); "
                "unregister regions or register a smaller one"
            )

    def unregister(self, name: str) -> None:
        """Unregister ``name`` (empty: every region). Requests using it finish first: its
        descriptor is closed when the last of them ends."""
        with self._lock:
            if name:
                if name not in self._regions:
                    raise _not_found(name)
                regions = [self._regions.pop(name)]
            else:
                regions = list(self._regions.values())
                self._regions.clear()
            closing = []
            for region in regions:
                region.retired = True
                if region.leases == 0:
                    self._open.discard(region)
                    closing.append(region)
        for region in closing:
            region.close()
        for region in regions:
            log.info("unregistered shared memory region %s", quote(region.name))
        self._save()

    def _save(self) -> None:
        if self._journal is None:
            return
        with self._lock:
            entries = [dataclasses.asdict(region.status) for region in self._regions.values()]
        atomic_write(self._journal, json.dumps(entries).encode())

    def restore(self) -> None:
        """Register again what the journal lists (a region whose file is gone is logged and left out)."""
        if self._journal is None or not self._journal.exists():
            return
        try:
            entries = json.loads(read_bounded(self._journal, MAX_JOURNAL_BYTES))
        except (OSError, ValueError) as exc:
            log.warning("cannot read the shared memory regions of the engine before: %s", exc)
            return
        for entry in entries:
            try:
                self.register(entry["name"], entry["key"], entry["offset"], entry["byte_size"])
            except (VisionServeError, KeyError, TypeError) as exc:
                log.warning("shared memory region %s not registered again: %s", entry, exc)

    def status(self, name: str) -> list[RegionStatus]:
        """The region ``name`` (empty: every region)."""
        with self._lock:
            if not name:
                return [region.status for region in self._regions.values()]
            if name not in self._regions:
                raise _not_found(name)
            return [self._regions[name].status]

    @contextlib.contextmanager
    def leases(self) -> Iterator[RegionLeases]:
        """The regions one request uses, each held from its first use until the request ends."""
        held = RegionLeases(self)
        try:
            yield held
        finally:
            held.release()

    def _acquire(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise _not_found(name)
            region.leases += 1
            return region

    def _release(self, region: Region) -> None:
        with self._lock:
            region.leases -= 1
            closing = region.retired and region.leases == 0
            if closing:
                self._open.discard(region)
        if closing:
            region.close()


class RegionLeases:
    """The regions a request holds (see :meth:`SharedMemoryRegions.leases`)."""

    def __init__(self, owner: SharedMemoryRegions) -> None:
        self._owner = owner
        self._held: dict[str, Region] = {}
        self._lock = threading.Lock()

    def hold(self, tensor: SharedTensor, what: str) -> Region:
        """The tensor's region, held until the request ends; the tensor must lie within it."""
        with self._lock:
            region = self._held.get(tensor.region)
            if region is None:
                region = self._held[tensor.region] = self._owner._acquire(tensor.region)
        region.check(tensor, what)
        return region

    def read(self, tensor: SharedTensor, what: str) -> np.ndarray:
        return self.hold(tensor, what).read(tensor, what)

    def write(self, tensor: SharedTensor, data: bytes, what: str) -> None:
        self.hold(tensor, what).write(tensor, data, what)

    def release(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for region in held:
            self._owner._release(region)


def _open_regular(directory: Path, file_name: str, key: str) -> int:
    """A descriptor of ``directory/file_name``: not following a symlink, a regular file only."""
    try:
        fd = os.open(directory / file_name, _OPEN_FLAGS)
    except FileNotFoundError:
        raise InvalidInputError(
            f"no shared memory object {quote(key)} on this host; create it (shm_open) before registering it"
        ) from None
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise InvalidInputError(f"cannot open shared memory object {quote(key)}: {reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidInputError(f"shared memory object {quote(key)} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_found(name: str) -> RegionNotFoundError:
    return RegionNotFoundError(
        f"no shared memory region {quote(name)} is registered; register it first (SystemSharedMemoryRegister)"
    )
