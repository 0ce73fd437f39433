"""Answers come from the model that ran: its logits, labels, name and version, together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import numpy as np
import pytest
import torch

from service.config import BatchingConfig
from service.engine.dataplane import InferenceInput
from service.engine.repository import ModelRepository, ServedModel
from service.engine.server import VisionServer
from service.transport.codec import decode_bytes_elements
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc

T = TypeVar("T")


def request(model: str, *, version: str = "", k: int | None = None, images: int = 1) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name="PIXELS", datatype="FP32", shape=[images, 3, 64, 64])
    message.raw_input_contents.append(np.ones((images, 3, 64, 64), dtype="<f4").tobytes())
    if k is not None:
        message.outputs.add(name="LOGITS").parameters["classification"].int64_param = k
    return message


def labels_of(response: pb.ModelInferResponse) -> list[str]:
    entries = decode_bytes_elements(response.raw_output_contents[0], "LOGITS")
    return [entry.decode().split(":", 2)[2] for entry in entries]


def install(server: VisionServer, labels: list[str], version: str) -> ServedModel:
    """A head built and warmed up on AlexNet's backbone, not served yet."""
    torch.manual_seed(len(labels))
    head = torch.nn.Linear(4096, len(labels))
    return server.factory.start_finetuned("pets", server.repository.get_ready("alexnet"), head, labels, version)


async def activate(repository: ModelRepository, model: ServedModel) -> None:
    repository.activate(model)


async def in_thread(function: Callable[..., T], *args: object) -> T:
    return await asyncio.to_thread(function, *args)


def test_a_model_replaced_while_a_request_waits_answers_with_its_own_labels(serve_inprocess) -> None:
    # No model store: nothing but this test installs or removes models.
    server = serve_inprocess(
        model_store=None, batching=BatchingConfig(max_batch_size=16, max_queue_delay_ms=5000, max_queue_size=64)
    )
    repository = server.server.repository
    first = server.call(in_thread(install, server.server, ["cat", "dog"], "v1"), timeout=300)
    server.call(activate(repository, first))
    second = server.call(in_thread(install, server.server, ["ant", "bee", "cow"], "v2"), timeout=300)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        waiting = stub.ModelInfer.future(request("pets", k=2), timeout=120)
        deadline = time.monotonic() + 60
        while first.queue.pending_images == 0:  # the request waits for its batch on v1
            assert time.monotonic() < deadline and not waiting.done()
            time.sleep(0.01)
        server.call(activate(repository, second))  # v2 (other classes) replaces v1 meanwhile
        answered = waiting.result()
        assert answered.model_name == "pets" and answered.model_version == "v1"
        assert list(answered.outputs[0].shape) == [1, 2]
        assert sorted(labels_of(answered)) == ["cat", "dog"]

        # Full batches from here on: nothing waits for the 5 s window.
        later = stub.ModelInfer(request("pets", k=3, images=16), timeout=120)
        assert later.model_version == "v2" and sorted(labels_of(later)[:3]) == ["ant", "bee", "cow"]
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="pets"), timeout=30)
        assert list(metadata.versions) == ["v2"]
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
        assert {(m.name, m.version) for m in index.models} == {("alexnet", "1"), ("pets", "v2")}
        assert stub.ModelInfer(request("pets", version="v2", images=16), timeout=120).model_version == "v2"
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request("pets", version="v1"), timeout=120)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "version v2 is served" in raised.value.details()


def test_builtin_models_answer_with_their_version(serve_inprocess) -> None:
    server = serve_inprocess()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request("alexnet", version="1"), timeout=120)
        assert (response.model_name, response.model_version) == ("alexnet", "1")
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request("alexnet", version="2"), timeout=120)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_data_plane_returns_one_result_from_the_model_that_ran(serve_inprocess) -> None:
    server = serve_inprocess()
    pixels = np.zeros((2, 3, 64, 64), dtype=np.float32)
    result = server.call(server.server.dataplane.infer("alexnet", InferenceInput(pixels=pixels)), timeout=120)
    assert (result.model_name, result.model_version) == ("alexnet", "1")
    assert result.logits.shape == (2, 1000) and len(result.labels) == 1000
