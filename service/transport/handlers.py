"""Method handlers as grpc.aio runs them, for the interceptors that wrap their behaviours.

types-grpcio describes :class:`grpc.RpcMethodHandler` as the sync server uses it: an ABC
whose behaviours take a ``grpc.ServicerContext`` and return a response or an iterator.
Under grpc.aio the same handler objects (the namedtuples that ``grpc.*_rpc_method_handler``
and the generated ``add_*Servicer_to_server`` make) hold coroutine functions and async
generators that take a ``grpc.aio.ServicerContext``. This module is the one place that
tells the type checker so; the interceptors stay fully typed.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar, cast

import grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

AioContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
UnaryBehavior: TypeAlias = "Callable[[Any, AioContext], Awaitable[Any]]"
"""``unary_unary`` and ``stream_unary``: (request or request iterator, context) -> response."""
StreamBehavior: TypeAlias = "Callable[[Any, AioContext], AsyncIterator[Any] | Awaitable[None]]"
"""``unary_stream`` and ``stream_stream``: (request or request iterator, context) -> responses,
as an async iterator, or a coroutine that writes them itself with ``context.write()``
(grpc.aio accepts both; grpcio-health-checking's Watch is the second kind)."""
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]]"
"""What ``grpc.aio.ServerInterceptor.intercept_service`` is handed to reach the next handler."""


@dataclass(frozen=True)
class Behaviors:
    """A handler's behaviours as grpc.aio calls them; exactly one is set."""

    unary_unary: UnaryBehavior | None
    unary_stream: StreamBehavior | None
    stream_unary: UnaryBehavior | None
    stream_stream: StreamBehavior | None


def behaviors(handler: grpc.RpcMethodHandler[Any, Any]) -> Behaviors:
    # The stub types these for the sync server (see the module docstring).
    return Behaviors(
        unary_unary=cast("UnaryBehavior | None", handler.unary_unary),
        unary_stream=cast("StreamBehavior | None", handler.unary_stream),
        stream_unary=cast("UnaryBehavior | None", handler.stream_unary),
        stream_stream=cast("StreamBehavior | None", handler.stream_stream),
    )


def request_deserializer(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[[bytes], Any] | None:
    """How ``handler`` parses a request's bytes; None when its behaviour takes the bytes."""
    deserializer: Callable[[bytes], Any] | None = handler.request_deserializer
    return deserializer


def replace(
    handler: grpc.RpcMethodHandler[Req, Resp],
    *,
    unary_unary: UnaryBehavior | None = None,
    unary_stream: StreamBehavior | None = None,
    stream_unary: UnaryBehavior | None = None,
    stream_stream: StreamBehavior | None = None,
    drop_request_deserializer: bool = False,
) -> grpc.RpcMethodHandler[Req, Resp]:
    """``handler`` with the behaviours given here in place of its own (the others kept).

    ``drop_request_deserializer``: the behaviour is handed the request's bytes, unparsed.
    """
    changes: dict[str, object] = {
        field: behavior
        for field, behavior in (
            ("unary_unary", unary_unary),
            ("unary_stream", unary_stream),
            ("stream_unary", stream_unary),
            ("stream_stream", stream_stream),
        )
        if behavior is not None
    }
    if drop_request_deserializer:
        changes["request_deserializer"] = None
    # The stub's ABC lacks the namedtuple's _replace that grpc's handlers have at run time.
    replaced: grpc.RpcMethodHandler[Req, Resp] = handler._replace(**changes)  # type: ignore[attr-defined]
    return replaced


async def responses(behavior: StreamBehavior, request: Any, context: AioContext) -> AsyncIterator[Any]:
    """What streaming ``behavior`` answers, for a wrapper that is itself an async generator.

    Every wrapper of a streaming behaviour iterates through this, so that both shapes grpc.aio
    accepts work under it: an async iterator is iterated; a coroutine that writes with
    ``context.write()`` is awaited (its writes reach the client directly) and yields nothing here.
    """
    result = behavior(request, context)
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


def as_client_streaming(
    handler: grpc.RpcMethodHandler[Req, Resp],
    *,
    stream_unary: UnaryBehavior | None = None,
    stream_stream: StreamBehavior | None = None,
) -> grpc.RpcMethodHandler[Req, Resp]:
    """``handler`` turned into a client-streaming one with the behaviour given, which is handed
    the requests' bytes as they arrive (gRPC reads a unary request whole before any behaviour runs)."""
    converted: grpc.RpcMethodHandler[Req, Resp] = handler._replace(  # type: ignore[attr-defined]
        request_streaming=True,
        request_deserializer=None,
        unary_unary=None,
        unary_stream=None,
        stream_unary=stream_unary,
        stream_stream=stream_stream,
    )
    return converted


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that hands each call's method handler to :meth:`wrap`, which returns it as
    it is or with its behaviour wrapped; calls of methods nobody serves pass through."""

    async def intercept_service(
        self,
        continuation: Continuation[Req, Resp],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrap(handler, handler_call_details)

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        raise NotImplementedError
