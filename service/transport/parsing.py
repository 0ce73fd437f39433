"""Parsing large request messages off the event loop.

gRPC parses a request on the thread that runs the servicer, here the event
loop: a 64 MB ``ModelInferRequest`` made of millions of tiny BYTES elements
takes seconds to parse, and health checks and ``ServerLive`` would wait that
long. The protobuf parser leaves the GIL to other threads while it works, so
for the methods named here the message arrives as bytes and is parsed in a
worker thread; small messages, the usual case, are parsed at once (a thread
hop would cost more than the parse).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.errors import InvalidInputError

Parser = Callable[[bytes], Any]

INLINE_PARSE_BYTES = 32 * 1024  # messages up to this size are parsed on the event loop


class OffLoopParsingInterceptor(grpc.aio.ServerInterceptor):
    """Parses the requests of ``methods`` (full method name -> parser) in a worker thread."""

    def __init__(self, methods: Mapping[str, Parser], *, inline_bytes: int = INLINE_PARSE_BYTES) -> None:
        self._methods = dict(methods)
        self._inline_bytes = inline_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        parser = self._methods.get(handler_call_details.method)
        if handler is None or parser is None:
            return handler
        parse = _Parse(parser, self._inline_bytes)
        if handler.unary_unary:
            return handler._replace(request_deserializer=None, unary_unary=_unary(handler.unary_unary, parse))
        if handler.stream_stream:
            return handler._replace(request_deserializer=None, stream_stream=_streaming(handler.stream_stream, parse))
        return handler


class _Parse:
    def __init__(self, parser: Parser, inline_bytes: int) -> None:
        self._parser = parser
        self._inline_bytes = inline_bytes

    async def __call__(self, data: bytes) -> Any:
        if len(data) <= self._inline_bytes:
            return self._checked(data)
        return await asyncio.get_running_loop().run_in_executor(None, self._checked, data)

    def _checked(self, data: bytes) -> Any:
        try:
            return self._parser(data)
        except DecodeError as exc:
            raise InvalidInputError(
                f"the request ({len(data)} bytes) is not a valid protobuf message of this method: {exc}"
            ) from exc


def _unary(behavior: Callable[..., Awaitable[Any]], parse: _Parse) -> Callable[..., Awaitable[Any]]:
    async def wrapper(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await parse(data), context)

    return wrapper


def _streaming(behavior: Callable[..., AsyncIterator[Any]], parse: _Parse) -> Callable[..., AsyncIterator[Any]]:
    async def parsed(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for data in requests:
            yield await parse(data)

    async def wrapper(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in behavior(parsed(requests), context):
            yield response

    return wrapper
