"""The one place where exceptions become gRPC status codes.

:class:`VisionServeError` subclasses carry the code's name in ``status`` and a
message for people; anything else is a bug: it is logged with its traceback
and the client gets INTERNAL with a generic message.

Requests that are not protobuf messages of their method are the caller's fault too: the
interceptor takes over parsing from gRPC (which would answer UNKNOWN and log a traceback) and
answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import grpc

from service.errors import InvalidInputError, VisionServeError
from service.transport.handlers import (
    AioContext,
    Continuation,
    Req,
    Resp,
    StreamBehavior,
    UnaryBehavior,
    behaviors,
    replace,
    request_deserializer,
    responses,
)

log = logging.getLogger(__name__)


MAX_STATUS_MESSAGE_CHARS = 2_000
"""A status message travels in a trailer that clients cap (8 KB by default in grpc): a longer one
turns the real error into RESOURCE_EXHAUSTED. Messages quote callers' input cut short
(``service.errors.quote``); this is the second line of defence."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, VisionServeError):
        message = exc.message
        if len(message) > MAX_STATUS_MESSAGE_CHARS:
            message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
        return grpc.StatusCode[exc.status], message
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error; the server log has the details"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping any servicer method into a status and message."""

    async def intercept_service(
        self,
        continuation: Continuation[Req, Resp],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        behavior = behaviors(handler)
        parse = request_deserializer(handler)
        takes_bytes = parse is not None
        if behavior.unary_unary:
            unary = behavior.unary_unary if parse is None else _parsing_unary(behavior.unary_unary, parse)
            return replace(handler, unary_unary=_wrap_unary(unary), drop_request_deserializer=takes_bytes)
        if behavior.stream_unary:
            unary = behavior.stream_unary if parse is None else _parsing_stream(behavior.stream_unary, parse)
            return replace(handler, stream_unary=_wrap_unary(unary), drop_request_deserializer=takes_bytes)
        if behavior.unary_stream:
            stream = behavior.unary_stream if parse is None else _parsing_unary(behavior.unary_stream, parse)
            return replace(handler, unary_stream=_wrap_stream(stream), drop_request_deserializer=takes_bytes)
        if behavior.stream_stream:
            stream = behavior.stream_stream if parse is None else _parsing_stream(behavior.stream_stream, parse)
            return replace(handler, stream_stream=_wrap_stream(stream), drop_request_deserializer=takes_bytes)
        return handler


B = TypeVar("B", UnaryBehavior, StreamBehavior)


def _parse(parse: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return parse(data)
    except Exception as exc:  # protobuf's DecodeError, or any parser's refusal
        raise InvalidInputError(
            "the request is not a valid protobuf message of this method; send the method's request message"
        ) from exc


def _parsing_unary(behavior: B, parse: Callable[[bytes], Any]) -> B:
    """``behavior`` taking the request's bytes (one request) and parsing them itself."""

    def wrapper(data: bytes, context: AioContext) -> Any:
        return behavior(_parse(parse, data), context)

    return cast(B, wrapper)


def _parsing_stream(behavior: B, parse: Callable[[bytes], Any]) -> B:
    """``behavior`` taking the requests' bytes (a request stream) and parsing each itself."""

    async def parsed(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for data in requests:
            yield _parse(parse, data)

    def wrapper(requests: AsyncIterator[bytes], context: AioContext) -> Any:
        return behavior(parsed(requests), context)

    return cast(B, wrapper)


def _wrap_unary(behavior: UnaryBehavior) -> UnaryBehavior:
    async def wrapper(request: Any, context: AioContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*status_for(exc))

    return wrapper


def _wrap_stream(behavior: StreamBehavior) -> StreamBehavior:
    async def wrapper(request: Any, context: AioContext) -> AsyncIterator[Any]:
        try:
            async for response in responses(behavior, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*status_for(exc))

    return wrapper
