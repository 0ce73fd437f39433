"""The one call information (``service.transport.call.Call``) each binding builds: the gRPC adapter
from a real grpc.aio call, the REST binding from a real aiohttp request. A service sees the same
fields whichever binding brought the call, and nothing of gRPC's or HTTP's own objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.transport.call import Call, GrpcAdapter
from service.transport.rest.routes import call_of

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Recorder:
    """A service of grpc.health.v1's shape, written against Call: it records what it was handed."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def Check(self, request: health_pb2.HealthCheckRequest, call: Call) -> health_pb2.HealthCheckResponse:
        self.calls.append(call)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, call: Call
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        self.calls.append(call)
        for status in (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING):
            yield health_pb2.HealthCheckResponse(status=status)


def test_the_grpc_adapter_hands_each_method_a_call_built_from_the_grpc_context() -> None:
    async def run() -> list[Call]:
        recorder = Recorder()
        server = grpc.aio.server()
        adapter = GrpcAdapter(recorder, health_pb2.DESCRIPTOR.services_by_name["Health"])
        health_pb2_grpc.add_HealthServicer_to_server(adapter, server)  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="")
                reply = await stub.Check(request, timeout=600, metadata=[("traceparent", TRACEPARENT)])
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                statuses = [response.status async for response in stub.Watch(request)]  # no deadline, no trace
                assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
        finally:
            await server.stop(None)
        return recorder.calls

    check, watch = asyncio.run(run())
    assert check.protocol == "grpc" and check.local and check.peer.startswith("ipv4:127.0.0.1:")
    assert check.carrier == {"traceparent": TRACEPARENT}
    remaining = check.time_remaining()  # the client's 600 s, as the wire carries it (rounded to its units)
    assert remaining is not None and 300 < remaining < 601
    assert watch.protocol == "grpc" and watch.local
    assert watch.deadline is None and watch.time_remaining() is None and watch.carrier is None


def test_a_rest_request_gives_the_same_fields() -> None:
    async def run() -> dict[str, object]:
        seen: dict[str, object] = {}

        async def handler(request: web.Request) -> web.Response:
            call = call_of(request, timeout=20.0)
            seen.update(
                protocol=call.protocol,
                peer=call.peer,
                local=call.local,
                remaining=call.time_remaining(),
                carrier=call.carrier,
                bare=call_of(request),
            )
            return web.json_response({})

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            headers = {"traceparent": TRACEPARENT}
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/", headers=headers) as reply,
            ):
                assert reply.status == 200
        finally:
            await runner.cleanup()
        return seen

    seen = asyncio.run(run())
    assert seen["protocol"] == "http" and seen["peer"] == "ipv4:127.0.0.1:0"
    # Only the REST port's own check (a loopback peer whose Host names this host) makes a caller local.
    assert seen["local"] is False
    assert seen["carrier"] == {"traceparent": TRACEPARENT}
    remaining = seen["remaining"]
    assert isinstance(remaining, float) and 0 < remaining <= 20
    bare = seen["bare"]
    assert isinstance(bare, Call) and bare.deadline is None
