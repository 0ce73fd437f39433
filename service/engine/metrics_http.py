"""The metrics port: Prometheus exposition over a small HTTP/1.1 server on the event loop.

prometheus_client's own server starts a thread per connection and waits for a request's
headers as long as the client likes: a thousand connections that never finish their headers
are a thousand threads, and the process slows for everyone. This server holds a bounded number
of connections (beyond that, new ones are closed at once), gives each a few seconds to send its
request headers (at most a few KB), answers one request per connection, and renders the
exposition in a worker thread so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # scrapers at once; Prometheus uses one connection per target
HEADER_TIMEOUT_S = 5.0  # to send the request line and headers
MAX_HEADER_BYTES = 16 * 1024
METRICS_PATHS = ("/metrics", "/")


class MetricsHttpServer:
    """Serves ``registry`` on ``GET /metrics``; start with :meth:`start`, end with :meth:`stop`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host or None, port, limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()  # over the cap: refused at once, costs nothing more
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away, stalled or sent garbage: nothing more to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT_S)
        except asyncio.TimeoutError:
            await _respond(writer, 408, b"request headers took too long\n")
            return
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"not an HTTP/1.x request\n")
            return
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            await _respond(writer, 405, b"only GET\n", extra=(("Allow", "GET, HEAD"),))
            return
        if target.split("?", 1)[0] not in METRICS_PATHS:
            await _respond(writer, 404, b"metrics are at /metrics\n")
            return
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = await asyncio.to_thread(encoder, self._registry)
        extra: tuple[tuple[str, str], ...] = ()
        if "gzip" in headers.get("accept-encoding", ""):
            body = await asyncio.to_thread(gzip.compress, body)
            extra = (("Content-Encoding", "gzip"),)
        await _respond(writer, 200, body, content_type=content_type, extra=extra, head=method == "HEAD")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout"}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: tuple[tuple[str, str], ...] = (),
    head: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await asyncio.wait_for(writer.drain(), HEADER_TIMEOUT_S)
