"""What one client may hold of the server: connections, streams, idle time, uploads.

grpc core sets no limit on these by default: thousands of streams that never send a message,
connections that never finish their handshake or sit idle forever, all cost the server memory
and event-loop time that every other client needs. The values are generous for any real
client (a tritonclient or perf_analyzer process multiplexes its calls over one connection) and
small enough that an attacker's share is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

from service.errors import DeadlineExceededError, QueueFullError
from service.transport.auth import peer_ip

T = TypeVar("T")

MAX_CONCURRENT_STREAMS = 1_000
"""Streams (calls) open at once on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS): a
client queues calls beyond it, but calls it starts before the server's settings reach it are
refused (UNAVAILABLE), so the limit stays well above any client's concurrency."""

MAX_INCOMING_CONNECTIONS = 2_048
"""Connections accepted at once on a port; beyond that new ones are refused until one closes."""

MAX_CONNECTION_IDLE_MS = 5 * 60 * 1000
"""A connection with no call for this long is closed with GOAWAY (clients reconnect when they
next call): idle connections do not accumulate."""

HANDSHAKE_TIMEOUT_MS = 10_000
"""A connection must finish its TLS handshake and HTTP/2 preface within this (grpc's default: 120 s)."""

KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
"""The server pings a connection silent for a minute and closes it when the ping is not answered
within 20 s: the calls of a peer that vanished (a pulled cable, a killed node) are ended."""


def server_options(*, share_port: bool = False) -> list[tuple[str, int]]:
    """The grpc.aio server options for the limits above. ``share_port``: the port is shared with this
    server's other protocol processes (``SO_REUSEPORT``; the kernel spreads connections over them).
    A port another program holds is still refused: ``service.host.ports`` checks each without sharing."""
    return [
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.max_allowed_incoming_connections", MAX_INCOMING_CONNECTIONS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.so_reuseport", 1 if share_port else 0),
    ]


# -- uploads (CreateJob, on both ports) -----------------------------------------------------------


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string (``ipv4:10.0.0.7:53412``, ``ipv6:%5B::1%5D:5``),
    port dropped (:func:`~service.transport.auth.peer_ip`); Unix sockets and the like: the whole string."""
    ip = peer_ip(peer)
    return peer if ip is None else str(ip)


class UploadPeers:
    """Upload slots held per client address: one client cannot take every slot of ``--max-job-uploads``."""

    def __init__(self, per_peer: int) -> None:
        self._per_peer = per_peer
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, peer: str) -> Iterator[None]:
        address = peer_address(peer)
        if self._held.get(address, 0) >= self._per_peer:
            raise QueueFullError(
                f"this client ({address or 'unknown address'}) is uploading {self._per_peer} fine-tuning jobs "
                "already, the most one client may at once (--max-job-uploads-per-peer); finish one first"
            )
        self._held[address] = self._held.get(address, 0) + 1
        try:
            yield
        finally:
            self._held[address] -= 1
            if not self._held[address]:
                del self._held[address]


class UploadPace:
    """An upload must keep coming: each piece (a message, a part, a chunk) within ``idle_s`` of the
    last, and the whole within ``total_s`` of the start. Otherwise DEADLINE_EXCEEDED, and the slot
    it held is free again: an upload that sends its config and then nothing, or dribbles a byte
    now and then, cannot keep a slot from the uploads that make progress."""

    def __init__(self, idle_s: float, total_s: float) -> None:
        self.idle_s = idle_s
        self.total_s = total_s
        self._deadline = time.monotonic() + total_s

    async def next(self, piece: Awaitable[T], what: str) -> T:
        """``piece`` (the read of the upload's next piece) within the idle time and the total deadline."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_long()
        try:
            return await asyncio.wait_for(piece, min(self.idle_s, remaining))
        except asyncio.TimeoutError:  # the builtin only from Python 3.11 on
            if self.idle_s < remaining:
                raise DeadlineExceededError(
                    f"{what} did not arrive within {self.idle_s:g} s (--upload-idle-seconds): an upload must keep "
                    "sending; the job was not created"
                ) from None
            raise self._too_long() from None

    def _too_long(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"the upload took longer than {self.total_s:g} s (--max-upload-seconds); the job was not created: "
            "send fewer or smaller images, or from closer"
        )


async def paced(messages: AsyncIterator[T], pace: UploadPace, what: str) -> AsyncIterator[T]:
    """``messages``, each read within ``pace``."""
    while True:
        try:
            message = await pace.next(anext(messages), what)
        except StopAsyncIteration:
            return
        yield message
