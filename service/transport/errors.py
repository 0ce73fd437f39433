"""The one place where exceptions become gRPC status codes and HTTP statuses.

:class:`VisionServeError` subclasses carry the gRPC code's name in ``status`` and a
message for people; anything else is a bug: it is logged with its traceback
and the client gets INTERNAL (HTTP 500) with a generic message. The HTTP port answers
each gRPC code with the HTTP status of :data:`HTTP_STATUS` (Google's mapping of
``google.rpc.Code``, which KServe and Triton follow for their REST errors).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from service.errors import VisionServeError
from service.transport.handlers import (
    AioContext,
    HandlerInterceptor,
    Req,
    Resp,
    StreamBehavior,
    UnaryBehavior,
    behaviors,
    replace,
    responses,
)

log = logging.getLogger(__name__)


MAX_STATUS_MESSAGE_CHARS = 2_000
"""A status message travels in a trailer that clients cap (8 KB by default in grpc): a longer one
turns the real error into RESOURCE_EXHAUSTED. Messages quote callers' input cut short
(``service.errors.quote``); this is the second line of defence."""


HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, VisionServeError):
        message = exc.message
        if len(message) > MAX_STATUS_MESSAGE_CHARS:
            message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
        return grpc.StatusCode[exc.status], message
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error; the server log has the details"


def http_error_for(exc: BaseException) -> tuple[int, dict[str, str]]:
    """The HTTP status and body of ``exc``: :func:`status_for`'s, through :data:`HTTP_STATUS`.

    The body is ``{"error": message, "code": name}``: ``error`` as KServe's and Triton's REST
    APIs answer, ``code`` the gRPC status code's name, because HTTP statuses are coarser (400
    stands for INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE alike) and a client that
    speaks both bindings raises the same error for the same refusal."""
    code, message = status_for(exc)
    return HTTP_STATUS.get(code, 500), {"error": message, "code": code.name}


class ErrorMappingInterceptor(HandlerInterceptor):
    """Turns exceptions escaping any servicer method into a status and message."""

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        behavior = behaviors(handler)
        if behavior.unary_unary:
            return replace(handler, unary_unary=_wrap_unary(behavior.unary_unary))
        if behavior.stream_unary:
            return replace(handler, stream_unary=_wrap_unary(behavior.stream_unary))
        if behavior.unary_stream:
            return replace(handler, unary_stream=_wrap_stream(behavior.unary_stream))
        if behavior.stream_stream:
            return replace(handler, stream_stream=_wrap_stream(behavior.stream_stream))
        return handler


def _wrap_unary(behavior: UnaryBehavior) -> UnaryBehavior:
    async def wrapper(request: Any, context: AioContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def _wrap_stream(behavior: StreamBehavior) -> StreamBehavior:
    async def wrapper(request: Any, context: AioContext) -> AsyncIterator[Any]:
        try:
            async for response in responses(behavior, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


async def _abort(context: AioContext, exc: Exception) -> None:
    """End the call with ``exc``'s status. A call that ended meanwhile (its deadline passed while
    the error was on its way, as when a call forwarded with the same deadline fails at it) cannot
    be answered: grpc refuses to send the status, which is the call's end and not a fault of ours,
    so it ends as a cancelled call does, without a traceback in the log."""
    code, message = status_for(exc)
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except grpc.aio.InternalError as refused:  # grpc core's "execute_batch" failed: the call is over
        raise asyncio.CancelledError(f"the call ended before its {code.name} status could be sent") from refused
