"""grpc.health.v1 Watch: on the gRPC port and on --health-port, many watchers, through loading,
unloading and draining; and every streaming-handler shape under the server's interceptors."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator, Sequence

import grpc
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as LibraryHealthServicer

from service.config import RuntimeConfig
from service.transport.auth import AuthorizationInterceptor, policy_from
from service.transport.errors import ErrorMappingInterceptor
from tests.conftest import session_runtime_cache
from tests.tiny import TINY

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
WAIT_S = 120.0  # an engine's restart through front ends included
ENDED = -1  # what Watch.next gives once the server has ended the stream (status OK)


class Watch:
    """One Watch call on its own channel (``options``: the channel's, such as a connection of its
    own); statuses arrive in ``statuses`` as they are sent."""

    def __init__(self, target: str, service: str, options: Sequence[tuple[str, object]] = ()) -> None:
        self.channel = grpc.insecure_channel(target, options=options)
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self.statuses: queue.Queue[int | grpc.RpcError] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.statuses.put(response.status)
            self.statuses.put(ENDED)
        except grpc.RpcError as exc:
            self.statuses.put(exc)

    def next(self) -> int | grpc.RpcError:
        return self.statuses.get(timeout=WAIT_S)

    def wait_for(self, *wanted: int) -> int:
        """Statuses until one of ``wanted`` (a watcher may skip intermediate ones, never the last)."""
        while True:
            got = self.next()
            assert not isinstance(got, grpc.RpcError), f"watch ended: {got.code()} {got.details()}"
            assert got != ENDED, f"watch ended by the server before any of {wanted}"
            if got in wanted:
                return got

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(WAIT_S)
        self.channel.close()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for watch in opened:
        watch.close()


def tiny_server(serve_inprocess, **overrides: object):
    return serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        health_port=0,
        **overrides,
    )


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_many_watchers_on_both_ports_through_unload_load_and_drain(serve_inprocess, watches, caplog) -> None:
    caplog.set_level(logging.INFO)
    server = tiny_server(serve_inprocess)
    targets = [server.target, f"127.0.0.1:{server.server.health_port}"]
    for target in targets:
        for service in (TINY, TINY, TINY, ""):
            watches.append(Watch(target, service))
    for watch in watches:
        assert watch.next() == SERVING
    # One watcher per port leaves: the others keep hearing.
    for leaving in (watches[0], watches[4]):
        leaving.close()
    staying = [w for w in watches if w not in (watches[0], watches[4])]
    model_watches = [w for w in staying if w is not staying[2] and w is not staying[5]]

    client = triton.InferenceServerClient(server.target)
    client.unload_model(TINY)
    for watch in model_watches:
        watch.wait_for(NOT_SERVING)
    client.load_model(TINY)
    for watch in model_watches:
        watch.wait_for(SERVING)

    # A new watcher after others left hears the current status at once.
    late = Watch(targets[1], TINY)
    watches.append(late)
    assert late.next() == SERVING

    server.stop()  # drains: the server and its models stop serving before the ports close
    for watch in [*staying, late]:
        # NOT_SERVING, then the stream ends (OK): the server ends it before gRPC stops, not cancelled
        assert watch.next() == NOT_SERVING
        assert watch.next() == ENDED
    no_tracebacks(caplog)


def test_unknown_service_is_watched_as_service_unknown_and_check_says_not_found(serve_inprocess, watches, caplog):
    server = tiny_server(serve_inprocess)
    for target in (server.target, f"127.0.0.1:{server.server.health_port}"):
        watch = Watch(target, "no-such-model")
        watches.append(watch)
        assert watch.next() == SERVICE_UNKNOWN
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no-such-model"))
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    no_tracebacks(caplog)


def test_write_style_streaming_handlers_work_under_the_interceptors(caplog) -> None:
    """grpc.aio accepts a streaming handler that writes with context.write() and returns None
    (grpcio-health-checking's own Watch is one): every interceptor that wraps behaviours must
    pass its responses through."""
    asyncio.run(_watch_through_interceptors())
    no_tracebacks(caplog)


async def _watch_through_interceptors() -> None:
    servicer = LibraryHealthServicer()
    await servicer.set("model", SERVING)
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), AuthorizationInterceptor(policy_from(None, "management"))]
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="model"))
            first = await call.read()
            assert first.status == SERVING
            await servicer.set("model", NOT_SERVING)
            second = await call.read()
            assert second.status == NOT_SERVING
            call.cancel()
    finally:
        await server.stop(5)  # a grace: the cancelled Watch ends by itself rather than being cut
