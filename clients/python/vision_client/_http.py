"""The HTTP binding: a channel that sends the plans' gRPC calls to the server's REST routes.

:class:`HttpChannel` and :class:`AsyncHttpChannel` have the three methods of a gRPC channel
that the clients use (``unary_unary``, ``unary_stream``, ``stream_unary``), each returning a
callable that behaves as gRPC's does: it takes the request message, ``timeout`` and
``metadata``, and answers the response message, or an iterator of them, or raises a
``grpc.RpcError`` (:class:`~vision_client.errors.HttpStatusError`). The route and the bodies
are :mod:`vision_client.protocol.rest`'s, so a plan cannot tell the bindings apart and its
results are equal by construction; the drivers, the retry policy and the error mapping are
the gRPC binding's.

httpx sends: ``httpx.Client`` for :class:`~vision_client.Client`, ``httpx.AsyncClient`` for
:class:`~vision_client.AsyncClient`, each with a pool of keep-alive connections. A call's
timeout bounds each step of the exchange (connecting, each read and write) and travels
to the server with an inference request (its ``timeout`` parameter), as a gRPC deadline does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from typing import Any

import grpc
import httpx
from google.protobuf.message import Message

from vision_client._version import __version__
from vision_client.errors import HttpStatusError, http_error
from vision_client.protocol import rest

Metadata = Sequence[tuple[str, str]]


def _timeout(seconds: float | None) -> httpx.Timeout:
    return httpx.Timeout(seconds)


def _expired(seconds: float | None) -> bool:
    return seconds is not None and seconds <= 0


def _deadline_error(method: str) -> HttpStatusError:
    return HttpStatusError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: the call's deadline passed")


@contextlib.contextmanager
def _transport_errors(method: str, url: str) -> Iterator[None]:
    """httpx's failures as the gRPC status they stand for: a timeout is DEADLINE_EXCEEDED, a
    connection that cannot be made or breaks is UNAVAILABLE (retried, as gRPC's is)."""
    try:
        yield
    except httpx.TimeoutException as error:
        raise HttpStatusError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: no answer from {url} within the call's timeout"
        ) from error
    except httpx.TransportError as error:  # connect, read, write, protocol errors; proxies
        reason = str(error) or type(error).__name__
        raise HttpStatusError(grpc.StatusCode.UNAVAILABLE, f"{method}: cannot reach {url}: {reason}") from error


def _headers(metadata: Metadata | None) -> dict[str, str]:
    return dict(metadata or ())


def _answer(method: str, response: httpx.Response, url: str) -> Message:
    body = response.content
    if not rest.is_answer(method, response.status_code, body):
        raise http_error(response.status_code, body, url)
    try:
        return rest.response_for(method, body, response.headers)
    except ValueError as error:
        raise HttpStatusError(
            grpc.StatusCode.INTERNAL,
            f"the answer of {url} is not a {method.rsplit('/', 1)[-1]} response ({error}); "
            "is this the HTTP port of vision-serving?",
            response.status_code,
        ) from None


def _upload_body(request: Iterable[Message]) -> tuple[Iterator[bytes], str]:
    """A CreateJob call's multipart body and its Content-Type.

    The request stream (``_protocol.RequestStream``) keeps an error of making a message (an
    image that cannot be read) and ends; the body then raises it rather than end as if it were
    whole, so the request is aborted and the server never takes a half-sent job for a whole one.
    """
    started = getattr(request, "started", None)
    if callable(started):
        started(lambda: None)  # nothing to cancel: the body stops itself (below)

    def checked() -> Iterator[Message]:
        yield from request
        error = getattr(request, "error", None)
        if isinstance(error, BaseException):
            raise error

    boundary = rest.new_boundary()
    return rest.job_parts(checked(), boundary), f"multipart/form-data; boundary={boundary}"


class _Send:
    """One HTTP request, ready for either httpx client: where it goes and ``request``'s arguments."""

    def __init__(self, method: str, url: str, content: Any, headers: dict[str, str], timeout: float | None) -> None:
        self.url = url
        self.arguments: dict[str, Any] = {
            "method": method,
            "url": url,
            "content": content,
            "headers": headers,
            "timeout": _timeout(timeout),
        }


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        verify: ssl.SSLContext | bool,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._verify = verify
        self._headers = {"User-Agent": f"vision-client/{__version__}", **dict(headers)}

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _limits(self) -> httpx.Limits:
        return httpx.Limits(max_connections=100, max_keepalive_connections=20)

    def _unary_request(self, method: str, request: Message, timeout: float | None, metadata: Metadata | None) -> _Send:
        """A unary call's request (the twins differ only in how they send it)."""
        if _expired(timeout):
            raise _deadline_error(method)
        built = rest.request_for(method, request, timeout=timeout)
        headers = {**built.headers, **_headers(metadata)}
        return _Send(built.method, self._url(built.path), built.body, headers, timeout)

    def _upload_request(
        self, method: str, content: Any, content_type: str, timeout: float | None, metadata: Metadata | None
    ) -> _Send:
        """A CreateJob upload's request, its multipart ``content`` made by the caller."""
        headers = {"Content-Type": content_type, **_headers(metadata)}
        return _Send("POST", self._url(rest.route_of(method).path(None)), content, headers, timeout)


class HttpChannel(_Base):
    """The blocking client's channel: one ``httpx.Client``, opened on first use."""

    def __init__(self, base_url: str, *, verify: ssl.SSLContext | bool, headers: Sequence[tuple[str, str]] = ()):
        super().__init__(base_url, verify=verify, headers=headers)
        self._client = httpx.Client(
            verify=verify, headers=self._headers, limits=self._limits(), follow_redirects=False, trust_env=False
        )

    def close(self) -> None:
        self._client.close()

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Any]:
        def call(request: Message, *, timeout: float | None = None, metadata: Metadata | None = None) -> Message:
            send = self._unary_request(method, request, timeout, metadata)
            with _transport_errors(method, send.url):
                response = self._client.request(**send.arguments)
            return _answer(method, response, send.url)

        return call

    def stream_unary(self, method: str, **_: Any) -> _UploadCallable:
        return _UploadCallable(self, method)

    def unary_stream(self, method: str, **_: Any) -> Callable[..., _Events]:
        def call(request: Message, *, timeout: float | None = None, metadata: Metadata | None = None) -> _Events:
            return _Events(self, method, request, timeout, _headers(metadata))

        return call

    def upload(self, method: str, request: Iterable[Message], timeout: float | None, metadata: Metadata | None) -> Any:
        if _expired(timeout):
            raise _deadline_error(method)
        body, content_type = _upload_body(request)
        send = self._upload_request(method, body, content_type, timeout, metadata)
        with _transport_errors(method, send.url):
            response = self._client.request(**send.arguments)
        return _answer(method, response, send.url)

    def stream(
        self, method: str, request: Message, timeout: float | None, headers: dict[str, str]
    ) -> Generator[Message, None, None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if _expired(timeout):
            raise _deadline_error(method)
        built = rest.request_for(method, request)
        url = self._url(built.path)
        with (
            _transport_errors(method, url),
            self._client.stream(
                built.method, url, headers={"Accept": "text/event-stream", **headers}, timeout=_timeout(timeout)
            ) as response,
        ):
            if response.status_code != 200:
                raise http_error(response.status_code, response.read(), url)
            events = rest.EventStream()
            for line in response.iter_lines():
                if deadline is not None and time.monotonic() > deadline:
                    raise _deadline_error(method)
                event = _feed(events, line, url)
                if event is not None:
                    yield event


class _UploadCallable:
    """``stream_unary``'s callable: called, or ``.future()`` as the blocking client calls it."""

    def __init__(self, channel: HttpChannel, method: str) -> None:
        self._channel = channel
        self._method = method

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None) -> Any:
        return self._channel.upload(self._method, request, timeout, metadata)

    def future(self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None) -> _Upload:
        return _Upload(lambda: self._channel.upload(self._method, request, timeout, metadata))


class _Upload:
    """A blocking upload as gRPC's future: it runs in ``result()``, in the caller's thread."""

    def __init__(self, send: Callable[[], Any]) -> None:
        self._send = send

    def result(self) -> Any:
        return self._send()

    def cancel(self) -> bool:
        return False  # the body aborts itself when its messages fail


class _Events:
    """A blocking WatchJob call: an iterator of JobEvent messages with gRPC's ``cancel()``."""

    def __init__(
        self, channel: HttpChannel, method: str, request: Message, timeout: float | None, headers: dict[str, str]
    ) -> None:
        self._events = channel.stream(method, request, timeout, headers)

    def __iter__(self) -> _Events:
        return self

    def __next__(self) -> Message:
        return next(self._events)

    def cancel(self) -> None:
        self._events.close()  # closes the response; a no-op once it has ended


def _feed(events: rest.EventStream, line: str, url: str) -> Message | None:
    try:
        return events.feed(line)
    except ValueError as error:
        raise HttpStatusError(grpc.StatusCode.INTERNAL, f"the event stream of {url} is malformed: {error}") from None


class AsyncHttpChannel(_Base):
    """The asyncio client's channel: one ``httpx.AsyncClient``, in the loop that opened it."""

    def __init__(self, base_url: str, *, verify: ssl.SSLContext | bool, headers: Sequence[tuple[str, str]] = ()):
        super().__init__(base_url, verify=verify, headers=headers)
        self._client = httpx.AsyncClient(
            verify=verify, headers=self._headers, limits=self._limits(), follow_redirects=False, trust_env=False
        )

    async def close(self) -> None:
        await self._client.aclose()

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Any]:
        async def call(request: Message, *, timeout: float | None = None, metadata: Metadata | None = None) -> Message:
            send = self._unary_request(method, request, timeout, metadata)
            with _transport_errors(method, send.url):
                response = await self._client.request(**send.arguments)
            return _answer(method, response, send.url)

        return call

    def stream_unary(self, method: str, **_: Any) -> Callable[..., asyncio.Task[Any]]:
        def call(request: Any, *, timeout: float | None = None, metadata: Metadata | None = None) -> asyncio.Task[Any]:
            # A task, as gRPC's call object: awaitable, with cancel() (which the request stream calls).
            return asyncio.ensure_future(self._upload(method, request, timeout, metadata))

        return call

    async def _upload(self, method: str, request: Any, timeout: float | None, metadata: Metadata | None) -> Any:
        if _expired(timeout):
            raise _deadline_error(method)
        parts, content_type = _upload_body(request)

        async def body() -> AsyncIterator[bytes]:
            for part in parts:  # made in the loop, as grpc.aio iterates a request iterator
                yield part

        send = self._upload_request(method, body(), content_type, timeout, metadata)
        with _transport_errors(method, send.url):
            response = await self._client.request(**send.arguments)
        return _answer(method, response, send.url)

    def unary_stream(self, method: str, **_: Any) -> Callable[..., _AsyncEvents]:
        def call(request: Message, *, timeout: float | None = None, metadata: Metadata | None = None) -> _AsyncEvents:
            return _AsyncEvents(self._stream(method, request, timeout, _headers(metadata)))

        return call

    async def _stream(
        self, method: str, request: Message, timeout: float | None, headers: dict[str, str]
    ) -> AsyncIterator[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if _expired(timeout):
            raise _deadline_error(method)
        built = rest.request_for(method, request)
        url = self._url(built.path)
        with _transport_errors(method, url):
            async with self._client.stream(
                built.method, url, headers={"Accept": "text/event-stream", **headers}, timeout=_timeout(timeout)
            ) as response:
                if response.status_code != 200:
                    raise http_error(response.status_code, await response.aread(), url)
                events = rest.EventStream()
                async for line in response.aiter_lines():
                    if deadline is not None and time.monotonic() > deadline:
                        raise _deadline_error(method)
                    event = _feed(events, line, url)
                    if event is not None:
                        yield event


class _AsyncEvents:
    """An asyncio WatchJob call: ``await read()`` gives the next JobEvent, or ``grpc.aio.EOF``."""

    def __init__(self, events: AsyncIterator[Message]) -> None:
        self._events = events
        self._closing: asyncio.Task[None] | None = None

    async def read(self) -> Any:
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    def cancel(self) -> None:
        """Close the response (in the loop, soon); a no-op once the stream has ended."""
        close = getattr(self._events, "aclose", None)
        if close is not None and self._closing is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the stream goes with it
                self._closing = asyncio.ensure_future(close())
