"""What a caller's mistakes get on the wire: the right status code, a short message, and no
traceback in the server's log (the server is not at fault).

Classes: bytes that are not protobuf, on every method of every service; integer parameters
written in ways ``int()`` accepts but a protocol must not ("²", 5,000 digits); input repeated in
messages (a 10 KB model name must not push the status trailer past the client's limit).
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.utils import InferenceServerException

from service.errors import QUOTE_CHARS, quote
from tests.tiny import TINY
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc
from vision_client.protocol.stubs.vision.v1 import models_pb2

SERVICES = (
    (infer_pb.DESCRIPTOR, "GRPCInferenceService"),
    (models_pb2.DESCRIPTOR, "Models"),
    (ft_pb.DESCRIPTOR, "FineTuning"),
    (health_pb2.DESCRIPTOR, "Health"),
    (reflection_pb2.DESCRIPTOR, "ServerReflection"),
)
NOT_PROTOBUF = (b"\xff" * 10, b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 1000)
LONG_NAME = "m" * 10_000


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from tests.inprocess import InProcessServer, tiny_config

    with InProcessServer(tiny_config(tmp_path_factory.mktemp("store"))) as server:
        yield server


def model_infer(channel: grpc.Channel):
    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=infer_pb.ModelInferRequest.SerializeToString,
        response_deserializer=infer_pb.ModelInferResponse.FromString,
    )


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def methods():
    for file, service in SERVICES:
        described = file.services_by_name[service]
        for method in described.methods:
            yield f"/{described.full_name}/{method.name}", method.client_streaming, method.server_streaming


def send_raw(channel: grpc.Channel, method: str, client_streaming: bool, server_streaming: bool, data: bytes):
    """``data`` as the one request message of ``method``, unparsed; the responses, read to the end."""
    if client_streaming and server_streaming:
        return list(channel.stream_stream(method)(iter([data]), timeout=30))
    if client_streaming:
        return channel.stream_unary(method)(iter([data]), timeout=30)
    if server_streaming:
        return list(channel.unary_stream(method)(data, timeout=30))
    return channel.unary_unary(method)(data, timeout=30)


@pytest.mark.parametrize("method, client_streaming, server_streaming", list(methods()))
def test_bytes_that_are_not_protobuf_are_invalid_argument_on_every_method(
    tiny_server, caplog, method: str, client_streaming: bool, server_streaming: bool
) -> None:
    caplog.set_level(logging.INFO)
    targets = [tiny_server.target]
    if method.startswith("/grpc.health.v1.Health/"):
        targets.append(f"127.0.0.1:{tiny_server.server.health_port}")
    for target in targets:
        with grpc.insecure_channel(target) as channel:
            for garbage in NOT_PROTOBUF:
                with pytest.raises(grpc.RpcError) as raised:
                    send_raw(channel, method, client_streaming, server_streaming, garbage)
                code = raised.value.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    continue  # a method of the protocol this server does not serve (Health/List)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, garbage[:8], raised.value.details())
                assert "protobuf" in raised.value.details()
    no_tracebacks(caplog)


@pytest.mark.parametrize("value", ["²", "٣", "1e3", " 3", "3 ", "-1", "0", "", "9" * 5_000, "9" * 19, "3.0", "０"])
def test_classification_counts_that_are_not_plain_positive_integers_are_invalid_argument(
    tiny_server, caplog, value: str
) -> None:
    request = infer_pb.ModelInferRequest(model_name=TINY)
    tensor = request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 224, 224])
    request.raw_input_contents.append(np.zeros((1, 3, 224, 224), np.float32).tobytes())
    del tensor
    output = request.outputs.add(name="LOGITS")
    output.parameters["classification"].string_param = value
    with grpc.insecure_channel(tiny_server.target) as channel:
        call = model_infer(channel)
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert "positive integer" in raised.value.details()
    assert len(raised.value.details()) < 400
    no_tracebacks(caplog)


def test_a_plain_classification_count_still_works(tiny_server) -> None:
    client = triton.InferenceServerClient(tiny_server.target)
    tensor = triton.InferInput("PIXELS", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    result = client.infer(TINY, [tensor], outputs=[triton.InferRequestedOutput("LOGITS", class_count=3)])
    assert result.as_numpy("LOGITS").shape == (1, 3)


def test_a_huge_name_gets_its_real_error_with_the_name_cut_short(tiny_server, caplog) -> None:
    """Each call names a model, version or job that does not exist, 10 KB long: the client sees
    NOT_FOUND (not RESOURCE_EXHAUSTED from an oversized trailer), and the message quotes it cut."""
    caplog.set_level(logging.INFO)
    client = triton.InferenceServerClient(tiny_server.target)
    tensor = triton.InferInput("PIXELS", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    calls = {
        "ModelReady": lambda: client.is_model_ready(LONG_NAME),
        "ModelMetadata": lambda: client.get_model_metadata(LONG_NAME),
        "ModelConfig": lambda: client.get_model_config(LONG_NAME),
        "ModelInfer": lambda: client.infer(LONG_NAME, [tensor]),
        "ModelInfer version": lambda: client.infer(TINY, [tensor], model_version=LONG_NAME),
        "ModelStatistics": lambda: client.get_inference_statistics(LONG_NAME),
        "RepositoryModelUnload": lambda: client.unload_model(LONG_NAME),
    }
    for what, call in calls.items():
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"), (what, raised.value)
        assert len(raised.value.message()) < 1_000, what
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = ft_grpc.FineTuningStub(channel)
        for call in (
            lambda: stub.GetJob(ft_pb.GetJobRequest(job_id=LONG_NAME), timeout=30),
            lambda: stub.CancelJob(ft_pb.CancelJobRequest(job_id=LONG_NAME), timeout=30),
            lambda: stub.DeleteModel(ft_pb.DeleteModelRequest(name=LONG_NAME), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
            assert len(raised.value.details()) < 1_000
    assert all(len(r.getMessage()) < 2_000 for r in caplog.records)
    no_tracebacks(caplog)


def test_quote_cuts_long_input_and_says_how_long_it_was() -> None:
    assert quote("alexnet") == "'alexnet'"
    cut = quote("x" * 10_000)
    assert cut.startswith("'" + "x" * QUOTE_CHARS + "'") and "10000 characters" in cut
    assert len(cut) < QUOTE_CHARS + 40


def pixels_request(values: np.ndarray, *, raw: bool) -> infer_pb.ModelInferRequest:
    request = infer_pb.ModelInferRequest(model_name=TINY)
    tensor = request.inputs.add(name="PIXELS", datatype="FP32", shape=list(values.shape))
    if raw:
        request.raw_input_contents.append(values.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(values.ravel().tolist())
    return request


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pixels_that_are_not_finite_are_invalid_argument(tiny_server, caplog, raw: bool, bad: float) -> None:
    values = np.zeros((2, 3, 224, 224), np.float32)
    values[1, 2, 100, 7] = bad
    with grpc.insecure_channel(tiny_server.target) as channel:
        call = model_infer(channel)
        with pytest.raises(grpc.RpcError) as raised:
            call(pixels_request(values, raw=raw), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN or infinite" in raised.value.details()
        # Finite values whose sum overflows float32 are still served.
        huge = np.full((1, 3, 224, 224), 3e38, np.float32)
        assert call(pixels_request(huge, raw=raw), timeout=30).model_name == TINY
    no_tracebacks(caplog)


def test_classification_ranks_nan_last() -> None:
    from service.inference.classification import top_k

    rows = top_k(np.array([[np.nan, 1.0, 2.0, -np.inf]], np.float32), 4, ["a", "b", "c", "d"])
    assert [score.label for score in rows[0]] == ["c", "b", "d", "a"]
