"""A full queue answers RESOURCE_EXHAUSTED; expired work is dropped before compute; SIGTERM drains."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from tests.conftest import start_server
from tests.metrics_util import sample_value, scrape
from tests.tiny import TINY
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc


def pixels_request(n: int, side: int = 64) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=TINY)
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[n, 3, side, side])
    request.raw_input_contents.append(np.zeros((n, 3, side, side), dtype="<f4").tobytes())
    return request


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """Batches wait up to 1.5 s to fill, and the queue holds 16 images."""
    proc = start_server(
        tmp_path_factory.mktemp("slow"),
        "--models", TINY, "--weights", "random",
        "--max-batch-size", "16", "--max-queue-delay-ms", "1500", "--max-queue-size", "16",
    )  # fmt: skip
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def test_full_queue_is_resource_exhausted(slow_server) -> None:
    async def scenario() -> tuple[pb.ModelInferResponse, grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(slow_server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            waiting = asyncio.ensure_future(stub.ModelInfer(pixels_request(8), timeout=60))
            await asyncio.sleep(0.3)  # the 8 images now wait for their batch to fill
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(pixels_request(9), timeout=60)
            return await waiting, raised.value

    answered, refused = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in refused.details()
    assert len(answered.raw_output_contents[0]) == 8 * 1000 * 4
    assert slow_server.alive()


def test_expired_requests_are_dropped_before_compute(slow_server) -> None:
    before = scrape(slow_server.metrics_url)
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(pixels_request(2), timeout=0.2)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(2.0)  # past the batching window: the worker has looked at the queue
        after = scrape(slow_server.metrics_url)
        computed = sample_value(after, "vision_inference_images_total") - sample_value(
            before, "vision_inference_images_total"
        )
        assert computed == 0
        assert sample_value(after, "vision_pending_images") == 0
        # And the server still serves.
        assert len(stub.ModelInfer(pixels_request(16), timeout=60).raw_output_contents[0]) == 16 * 4000


def test_sigterm_answers_everything_in_flight_then_exits_zero(tmp_path) -> None:
    proc = start_server(
        tmp_path,
        "--models", TINY, "--weights", "random",
        "--max-batch-size", "64", "--max-queue-delay-ms", "3000",
    )  # fmt: skip
    proc.wait_serving()

    async def scenario() -> tuple[list, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [asyncio.ensure_future(stub.ModelInfer(pixels_request(1), timeout=60)) for _ in range(24)]
            for _ in range(100):  # wait until all 24 wait in the queue (bounded)
                if sample_value(scrape(proc.metrics_url), "vision_pending_images") == 24:
                    break
                await asyncio.sleep(0.05)
            proc.process.terminate()  # SIGTERM
            await asyncio.sleep(0.3)
            try:
                await stub.ModelInfer(pixels_request(1), timeout=10)
                late = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                late = error.code()
            return await asyncio.gather(*calls, return_exceptions=True), late

    results, late = asyncio.run(scenario())
    assert all(isinstance(r, pb.ModelInferResponse) for r in results), [
        r for r in results if not isinstance(r, pb.ModelInferResponse)
    ]
    assert late == grpc.StatusCode.UNAVAILABLE
    assert proc.process.wait(60) == 0, proc.log()
