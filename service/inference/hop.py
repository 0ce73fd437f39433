"""The hop between a protocol front end and the engine: descriptors on a Unix socket, bytes in
shared memory.

A front end owns one :class:`Arena`, an anonymous shared-memory file (``memfd``, so nothing is left
in ``/dev/shm`` when a process dies and a container's small ``/dev/shm`` does not bound it) that it
hands to the engine once, with the first message of its connection (``SCM_RIGHTS``). An inference
request's serialized ``ModelInferRequest`` goes into a slot of the arena; the descriptor that
crosses the socket names the slot (offset, length, capacity) with what the engine needs besides the
message: the time left, whether the caller is on this host, the binding, the caller's trace
context. The engine answers with the slot it wrote the serialized ``ModelInferResponse`` into (the
same slot: the request's bytes are parsed before the response exists), or with the response inline
when it does not fit, or with an error's gRPC code name and message. The slot stays the front end's
to reuse only once that answer came (or the engine's connection died): until then the engine may
read it.

The descriptors are fixed ``struct`` layouts with length-prefixed strings: a few microseconds to
encode or decode, and no dependency.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import functools
import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

from service.errors import SlotsFullError
from service.inference.preprocess import Preprocessing

ENGINE_SOCKET = "engine.sock"  # in the run directory: the engine's gRPC services, for front ends
HOP_SOCKET = "hop.sock"  # in the run directory: the engine's end of the hop
PAGE = mmap.PAGESIZE
_FRAME = struct.Struct(">I")  # the length of what follows
_KIND = struct.Struct(">B")
MAX_FRAME_BYTES = 16 * 1024 * 1024  # a reply's inline response is bounded by the slot it did not fit


class Kind:
    HELLO = 1
    INFER = 2
    CANCEL = 3
    REPLY = 4
    DESCRIBE = 5


STALE = "STALE"  # a reply's code (never a client's): the images were decoded for another preprocessing


class StalePreprocessing(Exception):
    """The engine's model preprocesses differently from what the front end decoded with (it was
    replaced meanwhile): answered :data:`STALE`, and the front end sends the encoded images instead."""


@dataclass(frozen=True)
class Hello:
    """A front end's first message, sent with its arena's file descriptor."""

    frontend: int
    pid: int
    arena_bytes: int

    _LAYOUT = struct.Struct(">IIQ")

    def encode(self) -> bytes:
        return _KIND.pack(Kind.HELLO) + self._LAYOUT.pack(self.frontend, self.pid, self.arena_bytes)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Hello:
        (kind,) = _KIND.unpack_from(data, 0)
        if kind != Kind.HELLO:
            raise ValueError(f"expected a hello, got message kind {kind}")
        return cls(*cls._LAYOUT.unpack_from(data, 1))


@dataclass(frozen=True)
class Infer:
    """One inference: its request in the slot at ``offset`` (``length`` bytes of ``capacity``)."""

    id: int
    offset: int
    length: int
    capacity: int
    timeout: float | None  # seconds left of the caller's deadline
    local: bool  # the caller is on this host (may name system shared memory)
    protocol: str  # grpc or http
    method: str  # ModelInfer or ModelStreamInfer
    traceparent: str = ""
    tracestate: str = ""
    # The preprocessing (:func:`preprocessing_key`) the front end decoded the request's images with,
    # into PIXELS; empty if it did not. The engine answers STALE if the model's differs now.
    preprocessing: str = ""
    # The front end's clock (time.time_ns): when the request arrived, and when decoding its images
    # began and ended (0: not decoded there), for the request's trace.
    received_ns: int = 0
    decode_start_ns: int = 0
    decode_end_ns: int = 0

    _LAYOUT = struct.Struct(">QQQQd?QQQ")

    def encode(self) -> bytes:
        timeout = math.nan if self.timeout is None else self.timeout
        head = self._LAYOUT.pack(
            self.id,
            self.offset,
            self.length,
            self.capacity,
            timeout,
            self.local,
            self.received_ns,
            self.decode_start_ns,
            self.decode_end_ns,
        )
        strings = _strings(self.protocol, self.method, self.traceparent, self.tracestate, self.preprocessing)
        return _KIND.pack(Kind.INFER) + head + strings

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Infer:
        id_, offset, length, capacity, timeout, local, received, decode_start, decode_end = cls._LAYOUT.unpack_from(
            data, 1
        )
        strings, _ = _read_strings(data, 1 + cls._LAYOUT.size, 5)
        protocol, method, traceparent, tracestate, preprocessing = strings
        return cls(
            id_,
            offset,
            length,
            capacity,
            None if math.isnan(timeout) else timeout,
            local,
            protocol,
            method,
            traceparent,
            tracestate,
            preprocessing,
            received,
            decode_start,
            decode_end,
        )

    @property
    def carrier(self) -> dict[str, str] | None:
        """The caller's W3C trace context, as the tracing module reads it from metadata."""
        if not self.traceparent:
            return None
        carrier = {"traceparent": self.traceparent}
        if self.tracestate:
            carrier["tracestate"] = self.tracestate
        return carrier


@dataclass(frozen=True)
class Describe:
    """What a front end needs to decode a model's IMAGE inputs itself: answered by a reply whose
    inline bytes are the JSON of :class:`~service.inference.preprocess.Preprocessing` (``to_dict``), or an error."""

    id: int
    model: str

    _LAYOUT = struct.Struct(">Q")

    def encode(self) -> bytes:
        return _KIND.pack(Kind.DESCRIBE) + self._LAYOUT.pack(self.id) + _strings(self.model)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Describe:
        (id_,) = cls._LAYOUT.unpack_from(data, 1)
        (model,), _ = _read_strings(data, 1 + cls._LAYOUT.size, 1)
        return cls(id_, model)


@dataclass(frozen=True)
class Cancel:
    """The caller of request ``id`` went away: drop it before compute if it has not run."""

    id: int

    _LAYOUT = struct.Struct(">Q")

    def encode(self) -> bytes:
        return _KIND.pack(Kind.CANCEL) + self._LAYOUT.pack(self.id)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Cancel:
        return cls(*cls._LAYOUT.unpack_from(data, 1))


@dataclass(frozen=True)
class Reply:
    """The engine's answer to request ``id``: the response in its slot (``length`` bytes), inline,
    or, with ``code`` (a gRPC status code's name), an error's message."""

    id: int
    code: str = ""  # empty: OK
    message: str = ""
    length: int = 0  # of the response in the request's slot
    inline: bytes = b""  # the response, where it did not fit the slot

    _LAYOUT = struct.Struct(">QQ")

    def encode(self) -> bytes:
        return (
            _KIND.pack(Kind.REPLY)
            + self._LAYOUT.pack(self.id, self.length)
            + _strings(self.code, self.message)
            + self.inline
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Reply:
        id_, length = cls._LAYOUT.unpack_from(data, 1)
        (code, message), end = _read_strings(data, 1 + cls._LAYOUT.size, 2)
        return cls(id_, code, message, length, bytes(data[end:]))


Message = Infer | Describe | Cancel | Reply


def decode(data: bytes | memoryview) -> Message:
    """The descriptor in one frame's payload."""
    if not data:
        raise ValueError("an empty frame")
    kind = data[0]
    if kind == Kind.INFER:
        return Infer.decode(data)
    if kind == Kind.CANCEL:
        return Cancel.decode(data)
    if kind == Kind.DESCRIBE:
        return Describe.decode(data)
    if kind == Kind.REPLY:
        return Reply.decode(data)
    raise ValueError(f"unknown message kind {kind}")


@functools.lru_cache(maxsize=256)  # a few presets: each is named once, not once per request
def preprocessing_key(preprocessing: Preprocessing) -> str:
    """A short name for one preprocessing: equal for equal ones, in every process."""
    canonical = json.dumps(preprocessing.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload)) + payload


class FrameWriter:
    """The frames one side of the hop sends, written together: every frame queued while the event
    loop runs one round of callbacks goes out in one write when that round ends (a batch's answers,
    the requests of a burst), not one system call each."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._parts: list[bytes] = []
        self._queued = 0

    @property
    def unsent(self) -> int:
        """Bytes queued here or waiting in the transport's buffer."""
        return self._queued + self.transport.get_write_buffer_size()

    def write(self, payload: bytes) -> None:
        if not self._parts:
            asyncio.get_running_loop().call_soon(self.flush)
        self._parts.append(_FRAME.pack(len(payload)))
        self._parts.append(payload)
        self._queued += _FRAME.size + len(payload)

    def flush(self) -> None:
        parts, self._parts, self._queued = self._parts, [], 0
        if parts and not self.transport.is_closing():
            self.transport.write(b"".join(parts))


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; None at the end of the stream."""
    try:
        head = await reader.readexactly(_FRAME.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _FRAME.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {size} bytes, over {MAX_FRAME_BYTES}")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None


def _strings(*values: str) -> bytes:
    out = bytearray()
    for value in values:
        data = value.encode()
        out += struct.pack(">H", len(data)) + data
    return bytes(out)


def _read_strings(data: bytes | memoryview, start: int, count: int) -> tuple[list[str], int]:
    """``count`` strings from ``start``, and where the next field begins."""
    values = []
    for _ in range(count):
        (size,) = struct.unpack_from(">H", data, start)
        start += 2
        values.append(bytes(data[start : start + size]).decode())
        start += size
    return values, start


class Arena:
    """A front end's shared memory: slots handed out first-fit, page-aligned, coalesced on release.

    Used from the front end's event loop only (no lock). Pages are backed on first touch, so an
    arena costs what its busiest moment used, not its size.
    """

    def __init__(self, size: int) -> None:
        self.size = size - size % PAGE
        self.fd = os.memfd_create("vision-serve-hop", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        # Its size is fixed for good: the engine maps it, and refuses an arena that could shrink under it.
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.memory = mmap.mmap(self.fd, self.size)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), sorted by offset
        self.in_use = 0

    def allocate(self, size: int) -> tuple[int, int]:
        """A slot of at least ``size`` bytes: (offset, capacity); SlotsFullError when none is free."""
        need = max(PAGE, -(-size // PAGE) * PAGE)
        for index, (offset, free) in enumerate(self._free):
            if free >= need:
                if free == need:
                    del self._free[index]
                else:
                    self._free[index] = (offset + need, free - need)
                self.in_use += need
                return offset, need
        raise SlotsFullError(
            f"the server's transfer memory is full ({self.in_use} of {self.size} bytes held by requests in "
            "flight); retry with backoff, or send fewer or smaller requests at once"
        )

    def release(self, offset: int, capacity: int) -> None:
        self.in_use -= capacity
        free = self._free
        index = bisect.bisect_left(free, (offset,))
        free.insert(index, (offset, capacity))
        # Join with the neighbours it touches.
        if index + 1 < len(free) and offset + capacity == free[index + 1][0]:
            free[index] = (offset, capacity + free[index + 1][1])
            del free[index + 1]
        if index > 0 and free[index - 1][0] + free[index - 1][1] == offset:
            free[index - 1] = (free[index - 1][0], free[index - 1][1] + free[index][1])
            del free[index]

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)
