"""Admission before work: limits, queue room and parsing are checked before any image is decoded."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from service.config import BatchingConfig
from service.engine.batching import BatchQueue, WorkItem
from service.errors import InvalidInputError, QueueClosedError, QueueFullError
from service.inference.preprocess import ImageDecoder
from service.transport.codec import parse_infer_request
from service.transport.parsing import (
    FIELDS_BESIDES_IMAGES,
    INFER_REQUEST_SCHEMA,
    ScreenedParser,
    ScreenedParsingInterceptor,
    screen,
)
from tests.conftest import encode
from vision_client.protocol import encode_bytes_elements
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc

PNG = encode(Image.new("RGB", (32, 32), (200, 40, 90)), "PNG")


def image_request(images: list[bytes], *, raw: bool = True, shape: list[int] | None = None, **fields: str):
    request = pb.ModelInferRequest(model_name="alexnet", **fields)
    tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=shape or [len(images)])
    if raw:
        request.raw_input_contents.append(encode_bytes_elements(images))
    else:
        tensor.contents.bytes_contents.extend(images)
    return request


def pixels_request(n: int, side: int = 64) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[n, 3, side, side])
    request.raw_input_contents.append(np.zeros((n, 3, side, side), dtype="<f4").tobytes())
    return request


def refusal(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request, timeout=60)
    return raised.value


# -- the codec: counts first, one pass, stop at the first bad element -----------------------------


def test_declared_count_over_the_limit_is_refused_before_the_elements_are_read() -> None:
    request = image_request([b""] * 200_000)  # 800 KB of empty elements
    with pytest.raises(InvalidInputError, match="200000 images, over the limit of 512 per request"):
        parse_infer_request(request, max_images=512)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "bytes_contents"])
def test_an_empty_element_is_refused_while_parsing(raw: bool) -> None:
    with pytest.raises(InvalidInputError, match="element 1 is empty"):
        parse_infer_request(image_request([PNG, b"", PNG], raw=raw), max_images=8)


def test_more_raw_elements_than_the_shape_declares_stop_the_parse() -> None:
    request = image_request([PNG] * 100_000, shape=[2])
    with pytest.raises(InvalidInputError, match="more than 2 elements"):
        parse_infer_request(request, max_images=8)


def test_pixels_with_a_huge_shape_and_little_data_are_refused() -> None:
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 100_000, 100_000])
    request.raw_input_contents.append(b"\0" * 12)
    with pytest.raises(InvalidInputError, match="needs 120000000000 bytes"):
        parse_infer_request(request, max_images=8)
    request.inputs[0].shape[:] = [10**12, 3, 224, 224]
    with pytest.raises(InvalidInputError, match="over the limit of 8 per request"):
        parse_infer_request(request, max_images=8)


def test_many_inputs_or_outputs_are_refused_by_count() -> None:
    request = image_request([PNG])
    for _ in range(10_000):
        request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    with pytest.raises(InvalidInputError, match="10001 inputs"):
        parse_infer_request(request, max_images=8)
    request = image_request([PNG])
    for _ in range(3):
        request.outputs.add(name="LOGITS")
    with pytest.raises(InvalidInputError, match="3 outputs"):
        parse_infer_request(request, max_images=8)


def test_fp32_contents_read_as_one_array_equal_raw() -> None:
    values = np.random.default_rng(3).standard_normal((2, 3, 8, 8), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="PIXELS", datatype="FP32", shape=list(values.shape)).contents.fp32_contents.extend(
        values.ravel().tolist()
    )
    parsed = parse_infer_request(request, max_images=8).inputs.pixels
    assert parsed is not None and np.array_equal(parsed, values)
    request.inputs[0].contents.int_contents.append(1)  # a second field in contents
    with pytest.raises(InvalidInputError, match="fp32_contents only"):
        parse_infer_request(request, max_images=8)


def test_raw_pixels_are_used_in_place_and_unaligned_ones_copied() -> None:
    from service.engine.dataplane import _pixels_copy, _pixels_view

    values = np.random.default_rng(4).standard_normal((2, 3, 8, 8), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="alexnet", raw_input_contents=[values.tobytes()])
    request.inputs.add(name="PIXELS", datatype="FP32", shape=list(values.shape))
    parsed = parse_infer_request(request, max_images=8).inputs.pixels
    assert parsed is not None
    view = _pixels_view(parsed)
    assert view is not None and view.data_ptr() == parsed.ctypes.data  # no copy
    assert torch.equal(view, torch.from_numpy(values))

    unaligned = np.frombuffer(b"\0" + values.tobytes(), dtype="<f4", offset=1).reshape(values.shape)
    assert _pixels_view(unaligned) is None
    assert torch.equal(_pixels_copy(unaligned), torch.from_numpy(values))


# -- the queue: room is reserved before decoding, exactly ----------------------------------------


def item(n: int) -> WorkItem:
    return WorkItem(pixels=torch.zeros((n, 3, 2, 2)), on_result=lambda value: None)


def test_reservations_count_against_the_queue_capacity() -> None:
    queue = BatchQueue(capacity_images=16)
    first = queue.reserve(10)
    with pytest.raises(QueueFullError, match="10 being decoded"):
        queue.reserve(7)
    second = queue.reserve(6)
    first.release()
    first.release()  # idempotent
    assert queue.reserved_images == 6
    second.put([item(4)])  # a request may spend less than it reserved (never more)
    assert (queue.pending_images, queue.reserved_images) == (4, 0)
    too_small = queue.reserve(5)
    with pytest.raises(ValueError):
        too_small.put([item(6)])
    too_small.release()
    assert queue.reserved_images == 0
    queue.close()
    with pytest.raises(QueueClosedError):
        queue.reserve(1)


def test_a_reservation_is_given_back_when_the_request_fails() -> None:
    queue = BatchQueue(capacity_images=4)
    with pytest.raises(RuntimeError), queue.reserve(4):
        raise RuntimeError("decoding failed")
    assert queue.reserved_images == 0
    queue.reserve(4)


# -- a real server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, weights_dir):  # -> InProcessServer
    """One server with the default limits for the tests that change nothing in it."""
    from service.config import ServeConfig
    from tests.inprocess import InProcessServer

    config = ServeConfig(models=("alexnet",), weights=str(weights_dir), model_store=None, drain_seconds=5.0)
    server = InProcessServer(config).start()
    yield server
    server.stop()


@pytest.fixture
def stub_for():
    channels: list[grpc.Channel] = []

    def connect(server) -> pb_grpc.GRPCInferenceServiceStub:
        channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)])
        channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    yield connect
    for channel in channels:
        channel.close()


class CountingDecoder(ImageDecoder):
    """The model's own decoder, counting the images it was asked to decode."""

    def __init__(self, decoder: ImageDecoder) -> None:
        self.__dict__.update(decoder.__dict__)
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, data: bytes, index: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        with self._lock:
            self.calls += 1
        return super().__call__(data, index, out)


def count_decodes(server) -> CountingDecoder:
    model = server.server.repository.get("alexnet")
    model.decoder = CountingDecoder(model.decoder)
    return model.decoder


def test_over_the_request_limit_is_refused_before_decoding(serve_inprocess, stub_for) -> None:
    server = serve_inprocess(max_request_images=4)
    decoder = count_decodes(server)
    stub = stub_for(server)
    error = refusal(stub, image_request([b"garbage"] * 5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5 images, over the limit of 4 per request (--max-request-images)" in error.details()
    error = refusal(stub, pixels_request(5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 4" in error.details()
    assert decoder.calls == 0
    assert len(stub.ModelInfer(image_request([PNG] * 4), timeout=60).raw_output_contents[0]) == 4 * 1000 * 4


def test_a_full_queue_is_found_before_decoding(serve_inprocess, stub_for) -> None:
    """The default per-request limit is the queue size; queue room is checked before decoding."""
    server = serve_inprocess(batching=_batching(max_batch_size=16, max_queue_delay_ms=3000, max_queue_size=16))
    decoder = count_decodes(server)
    stub = stub_for(server)
    waiting = stub.ModelInfer.future(pixels_request(8), timeout=60)
    queue = server.server.repository.get("alexnet").queue
    _wait_until(lambda: queue.pending_images == 8)
    error = refusal(stub, image_request([PNG] * 9))  # within the limit (16), not within the free room (8)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "8 images waiting" in error.details() and "this request has 9" in error.details()
    error = refusal(stub, image_request([PNG] * 17))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 16" in error.details()
    assert decoder.calls == 0
    assert len(waiting.result(60).raw_output_contents[0]) == 8 * 1000 * 4
    assert queue.reserved_images == 0


def test_one_bad_image_cancels_the_requests_other_decodes(serve_inprocess, stub_for) -> None:
    server = serve_inprocess(decode_threads=2)
    decoder = count_decodes(server)
    stub = stub_for(server)
    large = encode(Image.effect_noise((768, 768), 60).convert("RGB"), "JPEG", quality=90)
    error = refusal(stub, image_request([b"not an image", *[large] * 63]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IMAGE element 0" in error.details()
    # Decodes are handed out two at a time (one per thread): after the bad one fails, the
    # rest never start. (Handing out all 64 at once would decode every one of them.)
    time.sleep(1.0)
    assert decoder.calls < 32, decoder.calls
    model = server.server.repository.get("alexnet")
    assert model.queue.reserved_images == 0 and model.queue.pending_images == 0


def test_empty_elements_are_invalid_argument(default_server, stub_for) -> None:
    stub = stub_for(default_server)
    error = refusal(stub, image_request([PNG, b""], raw=False))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "element 1 is empty" in error.details()
    error = refusal(stub, image_request([b""] * 200_000, shape=[2]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "element 0 is empty" in error.details()


def test_requests_that_are_not_protobuf_are_invalid_argument(default_server) -> None:
    """ModelInfer is screened and parsed by our parser, which says what is wrong."""
    server = default_server
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for garbage in (b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 100_000):
            with pytest.raises(grpc.RpcError) as raised:
                call(garbage, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
            assert "not a valid protobuf message" in raised.value.details()
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        assert pb.ServerLiveResponse.FromString(live(b"", timeout=10)).live


def test_a_huge_message_of_tiny_elements_is_refused_before_parsing(default_server, stub_for) -> None:
    """8 million elements would take seconds to parse, holding the GIL; they are counted up to the limit."""
    server = default_server  # messages up to 64 MB
    stub = stub_for(server)
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([b""] * 8_000_000)
    data = request.SerializeToString()
    with (
        grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(data, timeout=120)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 768 protobuf fields" in raised.value.details()  # 512 images + 256 other fields
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live


def test_stream_reads_no_further_than_its_in_flight_bound(serve_inprocess) -> None:
    server = serve_inprocess(
        max_stream_in_flight=2, batching=_batching(max_batch_size=16, max_queue_delay_ms=300, max_queue_size=64)
    )
    queue = server.server.repository.get("alexnet").queue
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, queue.pending_images + queue.reserved_images)
            time.sleep(0.002)

    def requests():
        for i in range(10):
            request = pixels_request(1)
            request.id = f"r{i}"
            yield request

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=120))
    finally:
        done.set()
        watcher.join()
    assert sorted(a.infer_response.id for a in answers) == [f"r{i}" for i in range(10)]
    assert all(not a.error_message for a in answers)
    assert 1 <= most <= 2, most


def test_stream_requests_meet_the_same_admission_rules(serve_inprocess) -> None:
    server = serve_inprocess(max_request_images=2, max_stream_in_flight=4)
    requests = [image_request([PNG], id="ok"), image_request([PNG] * 3, id="big"), image_request([PNG, b""], id="e")]
    with grpc.insecure_channel(server.target) as channel:
        answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=120))
    by_id = {a.infer_response.id: a.error_message for a in answers}
    assert by_id["ok"] == ""
    assert "over the limit of 2 per request" in by_id["big"]
    assert "element 1 is empty" in by_id["e"]


def _batching(**fields: float) -> BatchingConfig:
    return BatchingConfig(**fields)  # type: ignore[arg-type]


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_decoding_never_runs_on_the_event_loop(default_server, stub_for) -> None:
    model = default_server.server.repository.get("alexnet")
    decoder = model.decoder
    threads: set[str] = set()

    def recording(data: bytes, index: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        threads.add(threading.current_thread().name)
        return decoder(data, index, out)

    model.decoder = recording  # type: ignore[assignment]
    try:
        stub_for(default_server).ModelInfer(image_request([PNG] * 6), timeout=60)
    finally:
        model.decoder = decoder
    assert threads and all(name.startswith("decode") for name in threads), threads


def big_request(elements: int) -> bytes:
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([b"x"] * elements)
    return request.SerializeToString()


def test_screening_counts_fields_without_parsing() -> None:
    parse = ScreenedParser(pb.ModelInferRequest.FromString, INFER_REQUEST_SCHEMA, 8 + FIELDS_BESIDES_IMAGES)
    assert len(parse(big_request(8)).inputs[0].contents.bytes_contents) == 8
    with pytest.raises(InvalidInputError, match="more than 264 protobuf fields"):
        parse(big_request(1_000_000))
    with pytest.raises(InvalidInputError, match="more than 264 protobuf fields"):
        parse(
            pb.ModelInferRequest(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor()] * 300).SerializeToString()
        )
    # Large tensors are skipped by their length: 64 MB of raw data is a handful of fields.
    raw = pb.ModelInferRequest(model_name="alexnet", raw_input_contents=[b"\0" * (64 << 20)]).SerializeToString()
    screen(raw, INFER_REQUEST_SCHEMA, max_fields=2)
    with pytest.raises(InvalidInputError, match="not a valid protobuf message"):
        parse(raw[:1000])  # the raw tensor's length runs past the end
    with pytest.raises(InvalidInputError, match="not a valid protobuf message"):
        parse(b"\x0b\x0c")  # a group: no field of ours uses that wire type


def test_screening_and_interceptor_hand_parsed_requests_to_the_servicer() -> None:
    async def behavior(request: pb.ModelInferRequest, context: object) -> str:
        return request.model_name

    async def scenario() -> tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler, str]:
        interceptor = ScreenedParsingInterceptor(
            {"/s/M": pb.ModelInferRequest.FromString}, schema=INFER_REQUEST_SCHEMA, max_fields=16
        )

        async def continuation(details: object) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=pb.ModelInferRequest.FromString)

        handler = await interceptor.intercept_service(continuation, _Details("/s/M"))
        other = await interceptor.intercept_service(continuation, _Details("/s/Other"))
        answer = await handler.unary_unary(pb.ModelInferRequest(model_name="m").SerializeToString(), None)
        return handler, other, answer

    handler, other, answer = asyncio.run(scenario())
    assert handler.request_deserializer is None  # gRPC hands over the bytes, screened before parsing
    assert other.request_deserializer == pb.ModelInferRequest.FromString  # methods not named are untouched
    assert answer == "m"


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_limits_are_flags_and_environment_variables() -> None:
    from service.cli import build_serve_parser, config_from_args

    def config(argv: list[str], environ: dict[str, str] | None = None):
        return config_from_args(build_serve_parser(environ or {}).parse_args(argv))

    assert config([]).request_images_limit == 512  # the queue size
    assert config(["--max-queue-size", "64"]).request_images_limit == 64
    assert config(["--max-request-images", "8"]).request_images_limit == 8
    assert config([], {"VISION_SERVE_MAX_REQUEST_IMAGES": "4"}).request_images_limit == 4
    assert config([], {"VISION_SERVE_MAX_STREAM_IN_FLIGHT": "3"}).max_stream_in_flight == 3
    with pytest.raises(SystemExit, match="must not exceed --max-queue-size"):
        config(["--max-queue-size", "64", "--max-request-images", "65"])
    with pytest.raises(SystemExit):
        config(["--max-stream-in-flight", "0"])


def test_a_stream_whose_client_stops_reading_keeps_its_bound(serve_inprocess) -> None:
    """A client that sends and never reads: the server works on at most the bound at a time, and
    reads the stream only as fast as it answers (the answers wait in gRPC's flow-control windows,
    which in the end stop the server from writing and so from reading)."""
    server = serve_inprocess(max_stream_in_flight=2)
    queue = server.server.repository.get("alexnet").queue
    pixels = np.zeros((1, 3, 224, 224), dtype="<f4").tobytes()

    def requests():
        for i in range(200):
            request = pb.ModelInferRequest(model_name="alexnet", id=str(i))
            request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 224, 224])
            request.raw_input_contents.append(pixels)
            yield request

    with grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=120)
        assert not next(call).error_message  # the stream runs; from now on the client reads nothing
        most = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            most = max(most, queue.pending_images + queue.reserved_images)
            time.sleep(0.002)
        call.cancel()
    assert 1 <= most <= 2, most
