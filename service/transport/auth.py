"""Bearer-token authentication for the services that change the server (FineTuning)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from service.errors import AuthenticationError, FailedPreconditionError

PROTECTED_PREFIXES = (
    "/vision.v1.FineTuning/",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to protected services without ``authorization: Bearer <token>``.

    The refusal is an :class:`AuthenticationError` raised by the method's
    handler, so the error-mapping interceptor (outside this one) answers it.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        error = AuthenticationError(
            "this call needs 'authorization: Bearer <token>' metadata"
            if not given
            else "the bearer token is not valid for this server"
        )
        return _refusing(handler, error)


def _refusing(handler: grpc.RpcMethodHandler, error: AuthenticationError) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour replaced by one that raises ``error``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        raise error
        yield  # an async generator, like the behaviour it stands in for

    if handler.unary_stream:
        return handler._replace(unary_stream=refuse_stream)
    if handler.stream_stream:
        return handler._replace(stream_stream=refuse_stream)
    if handler.stream_unary:
        return handler._replace(stream_unary=refuse)
    return handler._replace(unary_unary=refuse)


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise FailedPreconditionError(f"cannot read --auth-token-file {path}: {exc}") from exc
    if not token:
        raise FailedPreconditionError(f"--auth-token-file {path} is empty; put the bearer token in it")
    return token
