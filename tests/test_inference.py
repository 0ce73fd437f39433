"""End to end: the real tritonclient against a real vision-serve process."""

from __future__ import annotations

import io
import re
import struct

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from torchvision.models import AlexNet_Weights

from tests.conftest import cosine, encode, load_reference
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc

WEIGHTS = AlexNet_Weights.DEFAULT


@pytest.fixture(scope="module")
def reference(weights_dir):
    return load_reference(weights_dir, "alexnet")


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def reference_logits(reference, images: list[bytes]) -> np.ndarray:
    batch = torch.stack([WEIGHTS.transforms()(Image.open(io.BytesIO(d)).convert("RGB")) for d in images])
    with torch.inference_mode():
        return reference(batch).numpy()


def image_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def test_server_metadata_and_readiness(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("alexnet")
    assert "classification" in client.get_server_metadata().extensions
    metadata = client.get_model_metadata("alexnet")
    assert {t.name for t in metadata.inputs} == {"IMAGE", "PIXELS"}
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("LOGITS", "FP32", [-1, 1000])]


def test_image_logits_match_torchvision(client, reference, photos) -> None:
    images = list(photos.values())
    result = client.infer("alexnet", [image_input(images)])
    logits = result.as_numpy("LOGITS")
    expected = reference_logits(reference, images)
    assert logits.shape == (len(images), 1000)
    for got, want in zip(logits, expected, strict=True):
        assert cosine(got, want) > 0.999


def test_pixels_logits_match_torchvision(client, reference) -> None:
    pixels = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
    tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    logits = client.infer("alexnet", [tensor]).as_numpy("LOGITS")
    with torch.inference_mode():
        expected = reference(torch.from_numpy(pixels)).numpy()
    relative = np.abs(logits - expected).max() / np.abs(expected).max()
    assert relative < 1e-3


def test_pixels_in_contents_instead_of_raw(stub, reference) -> None:
    pixels = np.random.default_rng(1).standard_normal((1, 3, 64, 64), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="PIXELS", datatype="FP32", shape=pixels.shape).contents.fp32_contents.extend(
        pixels.ravel().tolist()
    )
    response = stub.ModelInfer(request, timeout=60)
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 1000)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(pixels)).numpy()
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-3


def test_images_in_bytes_contents(stub, reference, photos) -> None:
    images = [photos["china-crop"], photos["flower-crop"]]
    request = pb.ModelInferRequest(model_name="alexnet", id="contents-1")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend(images)
    response = stub.ModelInfer(request, timeout=60)
    assert response.id == "contents-1"
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 1000)
    for got, want in zip(logits, reference_logits(reference, images), strict=True):
        assert cosine(got, want) > 0.999


def test_classification_extension_matches_reference(client, reference, photos) -> None:
    images = [photos["china"], photos["flower"]]
    k = 5
    output = triton.InferRequestedOutput("LOGITS", class_count=k)
    result = client.infer("alexnet", [image_input(images)], outputs=[output]).as_numpy("LOGITS")
    assert result.shape == (2, k)
    expected = reference_logits(reference, images)
    labels = WEIGHTS.meta["categories"]
    for row, logits in zip(result, expected, strict=True):
        entries = [entry.decode().split(":", 2) for entry in row]
        indices = [int(index) for _, index, _ in entries]
        assert indices[0] == int(np.argmax(logits))
        assert [label for _, _, label in entries] == [labels[i] for i in indices]
        scores = [float(score) for score, _, _ in entries]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, logits[indices], rtol=1e-3, atol=1e-5)


def test_stream_infer_answers_every_request_with_its_id(server, photos) -> None:
    import queue

    results: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(server.target) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(4):
            client.async_stream_infer("alexnet", [image_input([photos["china-crop"]])], request_id=f"req-{i}")
        client.async_stream_infer("alexnet", [image_input([b"garbage"])], request_id="bad")
        answers = [results.get(timeout=120) for _ in range(5)]
        client.stop_stream()
    ids = {result.get_response().id for result, error in answers if error is None}
    assert ids == {f"req-{i}" for i in range(4)}
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "not a decodable image" in errors[0].message()


def test_health_per_model_and_reflection(server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "alexnet", "liveness"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == 1
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="vgg16"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = {s.name for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", "vision.v1.Models"} <= services
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        reply = next(reflect.ServerReflectionInfo(iter([request])))
        assert reply.file_descriptor_response.file_descriptor_proto


# -- malformed requests ---------------------------------------------------------


def _raw_bytes(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _request(name="IMAGE", datatype="BYTES", shape=(1,), raw: bytes | None = None, **kwargs) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=kwargs.pop("model", "alexnet"))
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def _both_inputs() -> pb.ModelInferRequest:
    request = _request(raw=None)
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 64, 64])
    return request


def _no_inputs() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="alexnet")


def _unknown_output() -> pb.ModelInferRequest:
    request = _request(raw=_raw_bytes(encode(Image.new("RGB", (8, 8)), "PNG")))
    request.outputs.add(name="PROBABILITIES")
    return request


def _bad_class_count() -> pb.ModelInferRequest:
    request = _request(raw=_raw_bytes(encode(Image.new("RGB", (8, 8)), "PNG")))
    request.outputs.add(name="LOGITS").parameters["classification"].int64_param = -3
    return request


def _contents_and_raw() -> pb.ModelInferRequest:
    request = _request(raw=_raw_bytes(b"x"))
    request.inputs[0].contents.bytes_contents.append(b"y")
    return request


JPEG = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")

MALFORMED = {
    "garbage-image": (_request(raw=_raw_bytes(b"\x00garbage\xff" * 10)), "not a decodable image"),
    "truncated-image": (_request(raw=_raw_bytes(JPEG[: len(JPEG) // 2])), "truncated"),
    "empty-image": (_request(raw=_raw_bytes(b"")), "empty"),
    "decompression-bomb": (
        _request(raw=_raw_bytes(encode(Image.new("1", (20000, 20000)), "PNG"))),
        "over the limit",
    ),
    "extreme-aspect-image": (  # 5,000 pixels that the resize would make 256 x 1,280,000
        _request(raw=_raw_bytes(encode(Image.new("L", (1, 5000)), "PNG"))),
        "resizes its shorter side to 256 pixels.*nearer to square",
    ),
    "image-wrong-datatype": (_request(datatype="FP32", raw=_raw_bytes(JPEG)), "datatype BYTES"),
    "image-wrong-rank": (_request(shape=(1, 1, 1), raw=_raw_bytes(JPEG)), r"shape \[N\] or \[N,1\]"),
    "image-count-mismatch": (_request(shape=(3,), raw=_raw_bytes(JPEG)), "3 elements|but 1 elements"),
    "length-prefix-overrun": (_request(raw=struct.pack("<I", 10_000) + JPEG), "length prefix says 10000"),
    "length-prefix-truncated": (_request(raw=_raw_bytes(JPEG) + b"\x01\x00"), "truncated length prefix"),
    "negative-dim": (_request(shape=(-1,), raw=_raw_bytes(JPEG)), "negative dimension"),
    "pixels-wrong-datatype": (_request("PIXELS", "FP64", (1, 3, 64, 64), raw=bytes(8 * 3 * 64 * 64)), "FP32"),
    "pixels-wrong-rank": (_request("PIXELS", "FP32", (3, 64, 64), raw=bytes(4 * 3 * 64 * 64)), "rank 3"),
    "pixels-wrong-channels": (_request("PIXELS", "FP32", (1, 4, 64, 64), raw=bytes(4 * 4 * 64 * 64)), "3 channels"),
    "pixels-byte-count": (_request("PIXELS", "FP32", (1, 3, 64, 64), raw=bytes(100)), "needs 49152 bytes"),
    "pixels-too-small": (_request("PIXELS", "FP32", (1, 3, 8, 8), raw=bytes(4 * 3 * 8 * 8)), "minimum input"),
    "pixels-negative-dim": (_request("PIXELS", "FP32", (1, 3, -64, 64), raw=b""), "negative dimension"),
    "both-inputs": (_both_inputs(), "exactly one"),
    "no-inputs": (_no_inputs(), "exactly one"),
    "unknown-input": (_request(name="INPUT0", raw=_raw_bytes(JPEG)), "unknown input 'INPUT0'"),
    "unknown-output": (_unknown_output(), "unknown output 'PROBABILITIES'"),
    "bad-class-count": (_bad_class_count(), "positive integer"),
    "contents-and-raw": (_contents_and_raw(), "both in contents and in raw_input_contents"),
    "empty-model-name": (_request(raw=_raw_bytes(JPEG), model=""), "model_name is empty"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_invalid_argument_and_server_survives(stub, server, case: str) -> None:
    request, message = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert re.search(message, raised.value.details()), raised.value.details()
    assert server.alive()
    # The next valid request is served.
    ok = stub.ModelInfer(_request(raw=_raw_bytes(JPEG)), timeout=60)
    assert len(ok.raw_output_contents[0]) == 4000


def test_unknown_model_is_not_found(stub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(_request(raw=_raw_bytes(JPEG), model="nope"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "served models: alexnet" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_one_by_one_image_is_served(client) -> None:
    logits = client.infer("alexnet", [image_input([encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG")])])
    assert logits.as_numpy("LOGITS").shape == (1, 1000)


def test_oversized_message_is_resource_exhausted(server) -> None:
    big = pb.ModelInferRequest(model_name="alexnet")
    big.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    big.raw_input_contents.append(b"\x00" * (70 * 1024 * 1024))
    options = [("grpc.max_send_message_length", 100 * 1024 * 1024)]
    with grpc.insecure_channel(server.target, options=options) as channel, pytest.raises(grpc.RpcError) as raised:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(big, timeout=60)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.alive()
