"""What one client may hold of the gRPC server: connections, streams, idle time.

grpc core sets no limit on these by default: thousands of streams that never send a message,
connections that never finish their handshake or sit idle forever, all cost the server memory
and event-loop time that every other client needs. The values are generous for any real
client (a tritonclient or perf_analyzer process multiplexes its calls over one connection) and
small enough that an attacker's share is bounded.
"""

from __future__ import annotations

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


def server_options() -> list[tuple[str, int]]:
    """The grpc.aio server options for the limits above."""
    return [
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.max_allowed_incoming_connections", MAX_INCOMING_CONNECTIONS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.so_reuseport", 0),
    ]
