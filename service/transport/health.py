"""``grpc.health.v1.Health``: Check and Watch, served on the gRPC port and on ``--health-port``.

One servicer holds every service's status; both ports serve it, so they tell the same story.
Each Watch call has a watcher of its own (the latest status and an event), so any number of
clients may watch one service and one leaving never affects the others. The watcher keeps only
the latest status: a slow watcher skips intermediate ones, as the protocol allows (a watcher is
told the current status, then every change it has not seen), and never holds a growing queue.

Watch streams never end by themselves; a stopping server ends them (:meth:`HealthServicer.close`)
before it stops gRPC, after each has told its latest status, so that none is still open when the
gRPC server's grace runs out (grpc.aio cancels the streams left then, and logs each as an error
with a traceback).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from service.transport.handlers import AioContext

Status = int  # health_pb2.HealthCheckResponse.ServingStatus
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _Watcher:
    """One Watch call: the latest status of its service and whether it changed since read."""

    def __init__(self, status: Status, *, closed: bool = False) -> None:
        self.status = status
        self.closed = closed  # the stream ends once its latest status is told
        self.changed = asyncio.Event()
        self.changed.set()  # the first status is sent at once

    def update(self, status: Status) -> None:
        self.status = status
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def next(self) -> Status:
        await self.changed.wait()
        self.changed.clear()
        return self.status


class HealthServicer:
    """Statuses by service name (``""`` the server, one per model), with Check and Watch."""

    def __init__(self) -> None:
        self._statuses: dict[str, Status] = {}
        self._watchers: dict[str, set[_Watcher]] = {}
        self._closed = False

    def status(self, service: str) -> Status:
        return self._statuses.get(service, SERVICE_UNKNOWN)

    def set(self, service: str, status: Status) -> None:
        """Set ``service``'s status and tell everyone watching it."""
        self._statuses[service] = status
        for watcher in self._watchers.get(service, ()):
            watcher.update(status)

    def clear(self, service: str) -> None:
        """Forget ``service`` (a model that is gone): Check answers NOT_FOUND, watchers hear
        SERVICE_UNKNOWN."""
        self._statuses.pop(service, None)
        for watcher in self._watchers.get(service, ()):
            watcher.update(SERVICE_UNKNOWN)

    def close(self) -> None:
        """The server is stopping: every Watch stream ends after telling its latest status, and one
        opened from now on tells the status and ends (its client watches again, elsewhere)."""
        self._closed = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.close()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: AioContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: AioContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        service = request.service
        watcher = _Watcher(self.status(service), closed=self._closed)
        self._watchers.setdefault(service, set()).add(watcher)
        try:
            last: Status | None = None
            while True:
                status = await watcher.next()
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                if watcher.closed:
                    return
        finally:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[service]

    def watcher_count(self) -> int:
        """Watch calls open now (all services)."""
        return sum(len(watchers) for watchers in self._watchers.values())
