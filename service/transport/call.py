"""What the services read of a call, whichever binding brought it: one typed :class:`Call`.

The services (``inference.py``, ``models.py``, ``fine_tuning.py`` and a front end's forwarding
twins in ``service.frontend.remote``) take ``(request, call)``. Each binding builds the call from
what it has: the gRPC adapter here (:class:`GrpcAdapter`) from the ``grpc.aio`` context, the REST
binding from the aiohttp request (``rest.routes.call_of``), the engine from a hop descriptor. No
binding stands in for another's context.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf.descriptor import ServiceDescriptor

from service.telemetry.tracing import trace_carrier
from service.transport.auth import caller_peer, is_loopback_peer
from service.transport.handlers import AioContext

Binding = Literal["grpc", "http"]  # which port brought the call


@dataclass(frozen=True)
class Call:
    """One call's information: who sent it, by which binding, until when it is awaited, and the
    caller's trace context."""

    protocol: Binding
    peer: str = ""  # the caller as a gRPC peer string ("ipv4:10.0.0.7:5000"); "" where unknown
    local: bool = False  # the caller is on this host: the only callers that may name system shared memory
    deadline: float | None = None  # time.monotonic() when the caller stops waiting; None: never
    carrier: Mapping[str, str] | None = None  # the caller's W3C traceparent and tracestate, if it sent them

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (never below 0); None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    @staticmethod
    def deadline_in(seconds: float | None) -> float | None:
        return None if seconds is None else time.monotonic() + seconds


def grpc_call(context: AioContext) -> Call:
    """A gRPC call's information, from its ``grpc.aio`` context."""
    metadata = context.invocation_metadata() or ()
    return Call(
        "grpc",
        peer=caller_peer(context),
        local=is_loopback_peer(context.peer()),
        deadline=Call.deadline_in(context.time_remaining()),
        carrier=trace_carrier(metadata) or None,
    )


class GrpcAdapter:
    """A service's methods as gRPC calls them: each ``(request, context)`` becomes the service's
    ``(request, Call)``. One attribute per method of ``descriptor``, for the generated
    ``add_*Servicer_to_server``; a server-streaming method stays an async generator."""

    def __init__(self, service: Any, descriptor: ServiceDescriptor) -> None:
        for method in descriptor.methods:
            implementation = getattr(service, method.name)
            adapted = _streaming(implementation) if method.server_streaming else _unary(implementation)
            setattr(self, method.name, adapted)


def _unary(implementation: Callable[[Any, Call], Awaitable[Any]]) -> Callable[[Any, AioContext], Awaitable[Any]]:
    async def method(request: Any, context: AioContext) -> Any:
        return await implementation(request, grpc_call(context))

    return method


def _streaming(
    implementation: Callable[[Any, Call], AsyncIterator[Any]],
) -> Callable[[Any, AioContext], AsyncIterator[Any]]:
    async def method(request: Any, context: AioContext) -> AsyncIterator[Any]:
        async for response in implementation(request, grpc_call(context)):
            yield response

    return method
