"""Clients that hold the server's resources without using them: calls that never send their
request message, and metrics connections that never finish their headers. Both are bounded;
the server keeps answering everyone else meanwhile."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request

import grpc
import pytest

from service.config import RuntimeConfig
from service.engine.metrics_http import MAX_CONNECTIONS
from tests.conftest import session_runtime_cache
from tests.tiny import TINY
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb

FIRST_MESSAGE_TIMEOUT_S = 1.0
STALLED_CALLS = 300
METHODS = (
    "/inference.GRPCInferenceService/ModelMetadata",  # unary
    "/inference.GRPCInferenceService/ModelInfer",  # unary, screened by its own parser
    "/inference.GRPCInferenceService/ModelStreamInfer",  # bidirectional
    "/vision.v1.FineTuning/CreateJob",  # client streaming
    "/vision.v1.FineTuning/WatchJob",  # server streaming
    "/grpc.health.v1.Health/Watch",  # server streaming, open to all
)


@pytest.fixture
def tiny_server(serve_inprocess):
    return serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        first_message_timeout_s=FIRST_MESSAGE_TIMEOUT_S,
    )


async def _stalled_calls(target: str) -> list[grpc.StatusCode]:
    """Calls of every kind that send headers and never a message; each one's final status."""
    never = asyncio.Event()

    async def no_messages():
        await never.wait()
        yield b""  # never reached

    async with grpc.aio.insecure_channel(target) as channel:
        calls = [
            channel.stream_stream(METHODS[i % len(METHODS)])(no_messages(), timeout=60) for i in range(STALLED_CALLS)
        ]
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=infer_pb.ServerLiveRequest.SerializeToString,
            response_deserializer=infer_pb.ServerLiveResponse.FromString,
        )
        assert (await live(infer_pb.ServerLiveRequest(), timeout=30)).live  # answered among them
        codes = []
        for index, call in enumerate(calls):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for _ in call:
                    pass
            code = ended.value.code()
            if METHODS[index % len(METHODS)].endswith("/CreateJob") and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                continue  # uploads are admitted a few at a time: the others are refused at once
            assert "no request message" in (ended.value.details() or ""), ended.value
            codes.append(code)
        return codes


def test_calls_that_never_send_their_request_are_ended_and_others_keep_answering(tiny_server, caplog) -> None:
    caplog.set_level(logging.INFO)
    codes = asyncio.run(_stalled_calls(tiny_server.target))
    assert len(codes) > STALLED_CALLS * 5 // 6
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_a_call_that_ends_without_its_request_is_invalid_argument(tiny_server) -> None:
    async def run() -> grpc.StatusCode:
        async def nothing():
            return
            yield b""

        async with grpc.aio.insecure_channel(tiny_server.target) as channel:
            call = channel.stream_unary("/inference.GRPCInferenceService/ModelMetadata")(nothing(), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call
            return ended.value.code()

    assert asyncio.run(run()) == grpc.StatusCode.INVALID_ARGUMENT


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.read().decode()


def test_the_metrics_port_answers_while_connections_hang_and_sheds_those_over_its_cap(tiny_server) -> None:
    port = tiny_server.server.metrics_port
    stalled = []
    try:
        for _ in range(MAX_CONNECTIONS * 4):  # many never finish their headers
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            stalled.append(sock)
        # Over the cap, connections are closed at once; the server holds MAX_CONNECTIONS at most.
        metrics = tiny_server.server._metrics_http
        assert metrics.open_connections <= MAX_CONNECTIONS
        # Those held get 408 once their header time is up, and the port answers scrapes again.
        closed = 0
        for sock in stalled:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""  # shed at once, with our request unread
            closed += 1
            assert data == b"" or data.startswith(b"HTTP/1.1 408")
        assert closed == len(stalled)
        assert "vision_inference_images_total" in _scrape(port)
    finally:
        for sock in stalled:
            sock.close()


def test_the_metrics_port_speaks_prometheus_and_openmetrics(tiny_server) -> None:
    port = tiny_server.server.metrics_port
    text = _scrape(port)
    assert "# TYPE vision_inference_images_total counter" in text
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().decode().rstrip().endswith("# EOF")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/elsewhere", timeout=30)
    assert missing.value.code == 404
