"""How the server reads request messages: with a deadline for the first one, and parsing that
answers INVALID_ARGUMENT.

gRPC reads a unary call's request before any of our code runs, and waits for it as long as
the client likes: a call that sends headers and no message would hold its stream, its task and
its memory forever. So this interceptor takes reading over. Every method is served as
client-streaming (the wire is the same: HTTP/2 data frames): its behaviour starts at once,
waits for the first message at most ``first_message_timeout_s`` (then DEADLINE_EXCEEDED), and
for a unary method takes that one message. Later messages of a stream have no deadline here:
open streams are bounded per connection by the server's ``grpc.max_concurrent_streams``.

It also parses: bytes that are not a protobuf message of the method are the caller's fault
(INVALID_ARGUMENT), where gRPC's own deserializer would answer UNKNOWN and log a traceback.
Behaviours that parse their requests themselves (ModelInfer's screened parser) get the bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from service.errors import DeadlineExceededError, InvalidInputError
from service.transport.handlers import (
    AioContext,
    HandlerInterceptor,
    Req,
    Resp,
    StreamBehavior,
    UnaryBehavior,
    as_client_streaming,
    behaviors,
    request_deserializer,
    responses,
)

Parse = Callable[[bytes], Any]


class RequestReadingInterceptor(HandlerInterceptor):
    """Reads every method's requests itself: a deadline for the first message, checked parsing."""

    def __init__(self, first_message_timeout_s: float) -> None:
        self._timeout_s = first_message_timeout_s

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        given = behaviors(handler)
        parse = request_deserializer(handler) or _unparsed
        timeout = self._timeout_s
        if given.unary_unary or given.stream_unary:
            if given.unary_unary:
                unary: UnaryBehavior = _one_request_unary(given.unary_unary, parse, timeout)
            else:
                assert given.stream_unary is not None
                unary = _requests_unary(given.stream_unary, parse, timeout)
            return as_client_streaming(handler, stream_unary=unary)
        if given.unary_stream:
            stream: StreamBehavior = _one_request_stream(given.unary_stream, parse, timeout)
        else:
            assert given.stream_stream is not None, "a method handler has one behaviour"
            stream = _requests_stream(given.stream_stream, parse, timeout)
        return as_client_streaming(handler, stream_stream=stream)


def _unparsed(data: bytes) -> bytes:
    return data


def _parse(parse: Parse, data: bytes) -> Any:
    try:
        return parse(data)
    except Exception as exc:  # protobuf's DecodeError, or any parser's refusal
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(
            "the request is not a valid protobuf message of this method; send the method's request message"
        ) from exc


async def _first(requests: AsyncIterator[bytes], timeout_s: float) -> bytes | None:
    """The first message's bytes, None when the client closed its side without one."""
    try:
        return await asyncio.wait_for(anext(requests), timeout_s)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise DeadlineExceededError(
            f"no request message arrived within {timeout_s:g}s of the call's start; send the request "
            "with the call (a slow link may need a smaller message)"
        ) from None


async def _one(requests: AsyncIterator[bytes], parse: Parse, timeout_s: float) -> Any:
    data = await _first(requests, timeout_s)
    if data is None:
        raise InvalidInputError("the call ended without its request message; send one")
    return _parse(parse, data)


async def _parsed(requests: AsyncIterator[bytes], parse: Parse, timeout_s: float) -> AsyncIterator[Any]:
    data = await _first(requests, timeout_s)
    if data is None:
        return
    yield _parse(parse, data)
    async for data in requests:
        yield _parse(parse, data)


def _one_request_unary(behavior: UnaryBehavior, parse: Parse, timeout_s: float) -> UnaryBehavior:
    async def wrapper(requests: AsyncIterator[bytes], context: AioContext) -> Any:
        return await behavior(await _one(requests, parse, timeout_s), context)

    return wrapper


def _requests_unary(behavior: UnaryBehavior, parse: Parse, timeout_s: float) -> UnaryBehavior:
    async def wrapper(requests: AsyncIterator[bytes], context: AioContext) -> Any:
        return await behavior(_parsed(requests, parse, timeout_s), context)

    return wrapper


def _one_request_stream(behavior: StreamBehavior, parse: Parse, timeout_s: float) -> StreamBehavior:
    async def wrapper(requests: AsyncIterator[bytes], context: AioContext) -> AsyncIterator[Any]:
        request = await _one(requests, parse, timeout_s)
        async for response in responses(behavior, request, context):
            yield response

    return wrapper


def _requests_stream(behavior: StreamBehavior, parse: Parse, timeout_s: float) -> StreamBehavior:
    async def wrapper(requests: AsyncIterator[bytes], context: AioContext) -> AsyncIterator[Any]:
        async for response in responses(behavior, _parsed(requests, parse, timeout_s), context):
            yield response

    return wrapper
