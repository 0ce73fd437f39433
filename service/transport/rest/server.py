"""The HTTP port: aiohttp on the server's own event loop, with the bounds the gRPC port has.

- **Connections**: at most :data:`MAX_CONNECTIONS` at once; beyond that a new one is closed as
  soon as it is accepted.
- **Headers**: a connection must send a whole request's headers within ``header_timeout_s`` of
  opening (and of its previous response): aiohttp's keep-alive timer, which also closes idle
  connections. A request line or header over 8 KB, or more than 128 headers, is answered 400 by
  aiohttp before any handler runs.
- **Bodies**: refused with 413 from ``Content-Length`` before a byte is read when over
  ``max_body_bytes`` (the gRPC port's message limit); a chunked body is counted as it arrives and
  refused as soon as it passes the limit; the whole body must arrive within ``body_timeout_s``
  (408 otherwise).
- **TLS**: with the gRPC port's certificate files, the port speaks HTTPS only; each new connection
  takes the files of the moment (rotation as for gRPC, mutual TLS with the client CA) and has 10 s
  for its handshake, counted against the connection cap meanwhile.
- **Authorization**: each route's gRPC method decides its scope, and the same policy (token file,
  scopes, the loopback rule for management without a token) is applied before the body is read,
  and with ``Expect: 100-continue`` before the ``100 Continue`` (a refused or oversized request
  gets its answer instead, and its body is never asked for).
- **Browsers** (``auth.py``): a state-changing request that a page of another site sent
  (``Origin``, ``Sec-Fetch-Site``) is refused 403 on every route, whatever its token or peer. A
  loopback peer counts as this host only when its ``Host`` names this host (DNS rebinding); on a
  port bound to loopback only, every request must name it, reads included.
- **Headers**: every answer says ``X-Content-Type-Options: nosniff``.
- **Pages**: the web console's static files (``console.py``) need no authorization: they hold
  no data, and everything the console fetches meets its route's own checks.
- **Errors**: ``{"error": message, "code": grpc_code_name}`` with the status of
  ``transport/errors.py``'s one mapping; no traceback for a caller's mistake, a generic message
  (and one logged traceback) for a bug.
  Requests aiohttp refuses itself (malformed, headers too long) get its 400 and one debug line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import HttpVersion11, web

from service.errors import PermissionDeniedError, quote
from service.transport.auth import (
    AccessPolicy,
    Scope,
    cross_site,
    cross_site_message,
    foreign_host_message,
    is_loopback_address,
    scope_of,
)
from service.transport.errors import http_error_for
from service.transport.rest.routes import LOCAL_CALLER, Route, peer
from service.transport.tls import CertificateFiles

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024
HEADER_TIMEOUT_S = 15.0
HANDSHAKE_TIMEOUT_S = 10.0
_ADMITTED = web.RequestKey("admitted", bool)  # the request passed its checks in the Expect handler


class _BodyProblem(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ConnectionLog:
    """What aiohttp says about a connection (a malformed request line, a header too long, a
    client gone): the client's doing, so one debug line with the reason, never a traceback."""

    def __init__(self) -> None:
        self._log = logging.getLogger(__name__ + ".connections")

    def _line(self, message: str, *args: object, exc_info: object = None, **kwargs: object) -> None:
        if self._log.isEnabledFor(logging.DEBUG):
            reason = f": {type(exc_info).__name__}" if isinstance(exc_info, BaseException) else ""
            self._log.debug(message + reason, *args)

    debug = info = warning = error = exception = _line

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name
        return self._log.isEnabledFor(level)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _TlsHandoff(asyncio.Protocol):
    """Runs a connection's TLS handshake with the context of the moment (certificates rotate),
    then hands the connection to aiohttp's protocol. The handshake has ``HANDSHAKE_TIMEOUT_S``."""

    def __init__(self, context: ssl.SSLContext, inner: Callable[[], asyncio.Protocol], handshakes: set[object]) -> None:
        self._context = context
        self._inner = inner
        self._handshakes = handshakes
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []  # request bytes that came with the end of the handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._handshakes.add(self)
        self._task = asyncio.get_running_loop().create_task(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                transport, self, self._context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", type(exc).__name__)
            transport.close()
            return
        finally:
            self._handshakes.discard(self)
        if secure is None:
            return
        protocol = self._inner()
        secure.set_protocol(protocol)
        protocol.connection_made(secure)
        for data in self._early:
            protocol.data_received(data)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._handshakes.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()


class RestServer:
    def __init__(
        self,
        routes: list[Route],
        policy: AccessPolicy,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        tls: CertificateFiles | None = None,
        pages: Sequence[web.RouteDef] = (),
    ) -> None:
        """``tls``: serve HTTPS with these files (rotated as for gRPC), else plain HTTP.
        ``pages``: routes that stand for no RPC and hold no data (the console's files): open to all."""
        self._policy = policy
        self._tls = tls
        self._handshakes: set[object] = set()
        self._max_body_bytes = max_body_bytes
        self._body_timeout_s = body_timeout_s
        self._max_connections = max_connections
        app = web.Application(client_max_size=max_body_bytes)
        for route in routes:
            for path in route.paths:
                app.router.add_route(route.method, path, self._endpoint(route), expect_handler=self._expect(route))
        app.add_routes(pages)
        app.on_response_prepare.append(_nosniff)
        self._host_only = False  # bound to loopback only: every request must name this host
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=header_timeout_s, handle_signals=False, logger=_ConnectionLog()
        )
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, share_port: bool = False) -> int:
        """Listen on ``host:port``; ``share_port``: with this server's other protocol processes
        (``SO_REUSEPORT``, as the gRPC port's ``server_options``)."""
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(handlers.connections) + len(self._handshakes) >= self._max_connections:
                return _Refused()
            if self._tls is not None:
                return _TlsHandoff(self._tls.ssl_context(), handlers, self._handshakes)
            return handlers()

        self._host_only = is_loopback_address(host)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, host or None, port, reuse_address=True, reuse_port=share_port or None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner.server is not None:
            # Idle keep-alive connections close now; a connection with a request in flight closes
            # once it is answered. Without this, shutdown waits the whole grace for each idle one.
            self._runner.server.pre_shutdown()
            with contextlib.suppress(Exception):
                await self._runner.server.shutdown(grace_s)
        await self._runner.cleanup()

    def _endpoint(self, route: Route) -> Any:
        scope = scope_of(route.rpc)

        async def endpoint(request: web.Request) -> web.StreamResponse:
            try:
                if not request.get(_ADMITTED):
                    await self._admit(request, scope)
                body = await self._read_body(request) if route.has_body else b""  # streams_body: read by the handler
                return await route.handler(request, body)
            except _BodyProblem as problem:
                return web.json_response({"error": problem.message}, status=problem.status)
            except (ConnectionError, asyncio.IncompleteReadError):
                return web.Response(status=400)  # the client went away: nothing to tell it, nothing to log
            except Exception as exc:  # a VisionServeError, or a bug (logged with its traceback)
                status, error = http_error_for(exc)
                return web.json_response(error, status=status)

        return endpoint

    def _expect(self, route: Route) -> Any:
        """aiohttp's Expect handler, with the request's checks first: ``100 Continue`` only for a
        request that may send its body, so a refused or oversized one is answered at once."""
        scope = scope_of(route.rpc)

        async def expect(request: web.Request) -> web.StreamResponse | None:
            if request.version != HttpVersion11:
                return None  # HTTP/1.0 has no 100 Continue: the endpoint checks as usual
            expectation = request.headers.get("Expect", "")
            if expectation.lower() != "100-continue":
                return web.json_response({"error": f"unknown Expect: {quote(expectation)}"}, status=417)
            try:
                await self._admit(request, scope)
                if route.has_body:
                    self._check_length(request)
            except _BodyProblem as problem:
                return web.json_response({"error": problem.message}, status=problem.status)
            except Exception as exc:  # a refusal, or a bug (logged with its traceback)
                status, error = http_error_for(exc)
                return web.json_response(error, status=status)
            request[_ADMITTED] = True
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own handler: the answer has not begun
            return None

        return expect

    async def _admit(self, request: web.Request, scope: Scope) -> None:
        """The checks that come before the body: a page of another site, a foreign ``Host`` where the
        port is this host's alone, then the scope's policy. Marks whether the caller is this host."""
        host = request.headers.get("Host", "")
        evidence = cross_site(
            request.method, request.headers.getall("Origin", []), request.headers.get("Sec-Fetch-Site"), host
        )
        if evidence is not None:
            log.debug("refused a cross-site %s %s: %s", request.method, quote(request.path), evidence)
            raise PermissionDeniedError(cross_site_message(request.method, request.path, evidence))
        if self._host_only and not self._policy.names_this_host(host):
            raise PermissionDeniedError(foreign_host_message(host))
        caller = peer(request)
        if self._policy.needs_check(scope):
            if self._policy.tokens is not None:
                await self._policy.tokens.refresh()  # off the event loop
            self._policy.check(scope, request.headers.getall("Authorization", []), caller, host)
        request[LOCAL_CALLER] = self._policy.is_local(caller, host)

    def _check_length(self, request: web.Request) -> None:
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            raise _BodyProblem(
                413,
                f"the body is {length} bytes, over this server's limit of {self._max_body_bytes} (--max-message-bytes)",
            )

    async def _read_body(self, request: web.Request) -> bytes:
        self._check_length(request)
        length = request.content_length
        try:
            return await asyncio.wait_for(self._receive(request, length), self._body_timeout_s)
        except asyncio.TimeoutError:  # the builtin only from Python 3.11 on
            raise _BodyProblem(408, f"the body did not arrive within {self._body_timeout_s:g} s") from None

    async def _receive(self, request: web.Request, length: int | None) -> bytes:
        if length == 0 or (length is None and not request.body_exists):
            return b""
        if length is not None:
            return await request.content.readexactly(length)
        chunks: list[bytes] = []
        total = 0
        while chunk := await request.content.readany():
            total += len(chunk)
            if total > self._max_body_bytes:
                raise _BodyProblem(
                    413, f"the body passed this server's limit of {self._max_body_bytes} bytes (--max-message-bytes)"
                )
            chunks.append(chunk)
        return b"".join(chunks)


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors included: a browser never guesses a type (JSON taken for HTML or script)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
