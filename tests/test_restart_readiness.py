"""A restarted replica: ready only once it serves every model of its store; until the store
is read, a request for a model that may be in it is UNAVAILABLE (retryable), never NOT_FOUND;
ServerReady, health "" and ModelReady agree. And shutdown answers what it will not run
UNAVAILABLE."""

from __future__ import annotations

import collections
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import BatchingConfig
from tests.conftest import start_server
from tests.store_util import save_head
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def _request(model: str, images: int = 1, side: int = 64) -> pb.ModelInferRequest:
    pixels = np.zeros((images, 3, side, side), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="FP32", shape=list(pixels.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[pixels.tobytes()])


def test_a_restarted_replica_is_ready_only_with_its_stored_models(tmp_path, weights_dir) -> None:
    store = tmp_path / "store"
    for i in range(3):
        save_head(store, f"stored-{i}", seed=i)
    args = ("--models", "alexnet", "--weights", str(weights_dir), "--model-store", str(store))
    codes: collections.Counter[str] = collections.Counter()
    disagreements = []
    for _restart in range(2):
        proc = start_server(tmp_path, *args)
        try:
            deadline = time.monotonic() + 240
            with grpc.insecure_channel(proc.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    assert time.monotonic() < deadline, proc.log()
                    try:
                        # Health first: it follows ServerReady, so health SERVING read before a
                        # ServerReady false is a disagreement, never two reads straddling the flip.
                        healthy = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                        ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
                    except grpc.RpcError:
                        time.sleep(0.05)
                        continue  # not listening yet
                    for name in ("stored-2", "never-stored"):
                        try:
                            stub.ModelInfer(_request(name), timeout=60)
                            codes[f"{name}:OK"] += 1
                        except grpc.RpcError as exc:
                            codes[f"{name}:{exc.code().name}"] += 1
                            if ready and name == "stored-2":
                                disagreements.append(f"ServerReady but {name}: {exc.code().name}")
                    if ready:
                        model_ready = stub.ModelReady(pb.ModelReadyRequest(name="stored-2")).ready
                        healthy = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                        if not (model_ready and healthy == SERVING):
                            disagreements.append(f"ServerReady but ModelReady={model_ready}, health={healthy}")
                        break
                    if healthy == SERVING:
                        disagreements.append("health SERVING but ServerReady false")
                index = {m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
                assert {"stored-0", "stored-1", "stored-2"} <= index
        finally:
            assert proc.stop() == 0, proc.log()
    assert not disagreements, disagreements
    assert codes["stored-2:NOT_FOUND"] == 0, codes
    assert codes["stored-2:OK"] >= 2, codes
    assert codes["never-stored:NOT_FOUND"] >= 2  # once the store is read, an unknown name is NOT_FOUND


def test_requests_left_when_the_drain_time_runs_out_are_answered_unavailable(serve_inprocess) -> None:
    server = serve_inprocess(
        model_store=None, drain_seconds=0.0, batching=BatchingConfig(max_batch_size=1, max_queue_size=512)
    )
    outcome: dict[str, grpc.RpcError | object] = {}
    started = threading.Event()

    def slow_request() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            started.set()
            try:
                outcome["reply"] = stub.ModelInfer(_request("alexnet", images=64, side=224), timeout=300)
            except grpc.RpcError as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    started.wait()
    deadline = time.monotonic() + 120
    while server.server.dataplane._in_flight == 0:  # the request is in the data plane
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.01)
    server.stop()
    thread.join(120)
    error = outcome.get("error")
    if error is None:
        pytest.skip("the machine ran 64 forward passes within the drain time: nothing was left to abandon")
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    assert "drain time" in error.details()
