"""Traces: real servers export OTLP to receivers that decode opentelemetry-proto, over HTTP (an
aiohttp server) and over gRPC (the TraceService servicer of opentelemetry-proto's stubs).

Absence of spans is shown without waiting for time to pass: requests are sent one after another,
a request's spans all end before it is answered, and spans are exported in the order they ended,
so once a later request's spans arrive, an earlier one's would have arrived too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from tritonclient.utils import InferenceServerException

from service.errors import FailedPreconditionError, InvalidInputError
from service.telemetry.logs import JsonFormatter, RequestIds, RequestIdsFilter, TextFormatter, request_ids
from service.telemetry.tracing import ExportConfig, ItemTrace, Tracing
from tests.client_util import inprocess_server
from tests.inprocess import InProcessServer
from tests.metrics_util import sample_value, scrape

MODEL = "alexnet"
WAIT_S = 60.0  # the most any wait below may take before the test fails (it never passes by waiting)


# -- receivers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    start: int
    end: int
    service: str


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Receiver:
    """Spans as a collector received them, and a way to wait for some."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._changed = threading.Condition()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        Span(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            attributes={kv.key: _value(kv.value) for kv in span.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            start=span.start_time_unix_nano,
                            end=span.end_time_unix_nano,
                            service=str(resource.get("service.name")),
                        )
                    )
        with self._changed:
            self.spans.extend(received)
            self._changed.notify_all()

    def of_trace(self, trace_id: str) -> list[Span]:
        with self._changed:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, done: Callable[[list[Span]], bool]) -> list[Span]:
        with self._changed:
            assert self._changed.wait_for(lambda: done(list(self.spans)), WAIT_S), "the spans never arrived"
            return list(self.spans)

    def wait_trace(self, trace_id: str, names: set[str]) -> list[Span]:
        spans = self.wait_for(lambda spans: names <= {s.name for s in spans if s.trace_id == trace_id})
        return [span for span in spans if span.trace_id == trace_id]


@contextlib.contextmanager
def http_receiver() -> Iterator[tuple[Receiver, str]]:
    """An OTLP/HTTP endpoint (``/v1/traces``, protobuf bodies) on aiohttp in a thread of its own."""
    receiver = Receiver()

    async def traces(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        receiver.add(message)
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def grpc_receiver() -> Iterator[tuple[Receiver, str]]:
    """An OTLP/gRPC endpoint: opentelemetry-proto's TraceService on a grpc server."""
    receiver = Receiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        server.stop(None)


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A collector that takes connections and never answers (the kernel accepts them into the backlog)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def traced_server(directory: Path, weights_dir: Path, environ: dict[str, str], **overrides: Any) -> Iterator[Any]:
    """An in-process server with ``--trace``, reading ``environ``'s OTEL_* variables at start."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ.items():
            patch.setenv(name, value)
        # The server reads its variables when it is built; they are put back once it runs.
        server_cm = inprocess_server(directory, weights_dir, trace=True, **overrides)
        server = server_cm.__enter__()
    try:
        yield server
    finally:
        server_cm.__exit__(None, None, None)


FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "20", "OTEL_SERVICE_NAME": "vision-test"}


@pytest.fixture(scope="module")
def grpc_export(tmp_path_factory, weights_dir: Path) -> Iterator[tuple[InProcessServer, Receiver]]:
    """A server exporting over OTLP/gRPC, with JSON logs and the access log on."""
    with grpc_receiver() as (receiver, endpoint):
        environ = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        with traced_server(
            tmp_path_factory.mktemp("trace-grpc"), weights_dir, environ, log_format="json", access_log=True
        ) as server:
            yield server, receiver


@pytest.fixture(scope="module")
def http_export(tmp_path_factory, weights_dir: Path) -> Iterator[tuple[InProcessServer, Receiver]]:
    """A server exporting over OTLP/HTTP (the default protocol) to the general endpoint."""
    with http_receiver() as (receiver, endpoint):
        environ = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        with traced_server(tmp_path_factory.mktemp("trace-http"), weights_dir, environ) as server:
            yield server, receiver


# -- clients ------------------------------------------------------------------------------------


def traceparent(trace_id: str, span_id: str = "00f067aa0ba902b7", sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def new_trace_id() -> str:
    return os.urandom(16).hex()


def infer_grpc(server: InProcessServer, photo: bytes, headers: dict[str, str] | None = None) -> Any:
    client = triton_grpc.InferenceServerClient(server.target)
    try:
        image = triton_grpc.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([photo], dtype=np.object_))
        return client.infer(MODEL, [image], headers=headers, client_timeout=120)
    finally:
        client.close()


def infer_http(server: InProcessServer, photo: bytes, headers: dict[str, str] | None = None) -> Any:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}", network_timeout=120)
    try:
        image = triton_http.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([photo], dtype=np.object_), binary_data=True)
        return client.infer(MODEL, [image], headers=headers)
    finally:
        client.close()


INFER = {"grpc": infer_grpc, "http": infer_http}
REQUEST_SPANS = {"ModelInfer", "decode", "queue", "compute", "compute_input", "infer", "compute_output"}


def check_request_spans(spans: list[Span], trace_id: str, parent: str, receiver: Receiver, protocol: str) -> None:
    by_name = {span.name: span for span in spans}
    request = by_name["ModelInfer"]
    assert request.parent_id == parent  # the caller's span
    assert request.attributes["vision.model"] == MODEL
    assert request.attributes["vision.protocol"] == protocol
    assert request.attributes["rpc.grpc.status"] == "OK"
    assert request.service == "vision-test"
    for name in ("decode", "queue", "compute"):
        assert by_name[name].parent_id == request.span_id, name
    for name in ("compute_input", "infer", "compute_output"):
        assert by_name[name].parent_id == by_name["compute"].span_id, name
        assert by_name["compute"].start <= by_name[name].start <= by_name[name].end <= by_name["compute"].end
    assert by_name["decode"].end <= by_name["queue"].end <= by_name["compute"].start + 1_000  # ns rounding
    # The batch: a span of its own, in a trace of its own, with its size, linked from the request's compute.
    (link,) = by_name["compute"].links
    assert link[0] != trace_id
    batch = [s for s in receiver.wait_for(lambda all_: any(s.span_id == link[1] for s in all_)) if s.span_id == link[1]]
    assert batch[0].name == "batch" and batch[0].parent_id == ""
    assert batch[0].attributes["vision.batch.size"] >= 1
    assert batch[0].attributes["vision.model"] == MODEL


@pytest.mark.parametrize("port", ["grpc", "http"])
def test_an_image_request_continues_the_callers_trace(grpc_export, http_export, photos, port) -> None:
    """Each port's request, exported over each OTLP protocol, under the caller's span."""
    for server, receiver in (grpc_export, http_export):
        trace_id = new_trace_id()
        caller = os.urandom(8).hex()
        result = INFER[port](server, photos["china"], {"traceparent": traceparent(trace_id, caller)})
        assert result.as_numpy("LOGITS").shape == (1, 1000)
        spans = receiver.wait_trace(trace_id, REQUEST_SPANS)
        check_request_spans(spans, trace_id, caller, receiver, port)


def test_each_request_of_a_stream_is_traced_under_the_streams_parent(grpc_export, photos) -> None:
    server, receiver = grpc_export
    trace_id, caller = new_trace_id(), os.urandom(8).hex()
    answers: list[Any] = []
    answered = threading.Condition()

    def callback(result: Any, error: Any) -> None:
        with answered:
            answers.append(error or result)
            answered.notify_all()

    client = triton_grpc.InferenceServerClient(server.target)
    try:
        client.start_stream(callback, headers={"traceparent": traceparent(trace_id, caller)})
        image = triton_grpc.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([photos["china"]], dtype=np.object_))
        for index in range(2):
            client.async_stream_infer(MODEL, [image], request_id=str(index))
        with answered:
            assert answered.wait_for(lambda: len(answers) == 2, WAIT_S)
        client.stop_stream()
    finally:
        client.close()
    assert all(not isinstance(answer, Exception) for answer in answers)
    spans = receiver.wait_for(
        lambda all_: (
            sum(s.name == "ModelStreamInfer" and s.trace_id == trace_id for s in all_) == 2
            and sum(s.name == "compute" and s.trace_id == trace_id for s in all_) == 2
        )
    )
    requests = [s for s in spans if s.trace_id == trace_id and s.name == "ModelStreamInfer"]
    assert {s.parent_id for s in requests} == {caller}
    assert {s.attributes["vision.request_id"] for s in requests} == {"0", "1"}  # the requests' own ids


@pytest.mark.parametrize("port", ["grpc", "http"])
def test_a_parent_that_is_not_sampled_gets_no_spans(http_export, photos, port) -> None:
    server, receiver = http_export
    unsampled = new_trace_id()
    INFER[port](server, photos["china"], {"traceparent": traceparent(unsampled, sampled=False)})
    marker = new_trace_id()
    INFER[port](server, photos["china"], {"traceparent": traceparent(marker)})
    receiver.wait_trace(marker, REQUEST_SPANS)
    assert receiver.of_trace(unsampled) == []


def test_without_a_parent_the_sampler_starts_a_trace(http_export, photos) -> None:
    server, receiver = http_export
    before = {span.trace_id for span in receiver.spans}
    infer_grpc(server, photos["china"])
    spans = receiver.wait_for(
        lambda all_: any(s.name == "ModelInfer" and s.trace_id not in before and s.parent_id == "" for s in all_)
    )
    roots = [s for s in spans if s.name == "ModelInfer" and s.trace_id not in before]
    assert roots and roots[0].parent_id == ""


def test_a_malformed_traceparent_is_ignored_not_refused(http_export, photos) -> None:
    server, _ = http_export
    result = infer_http(server, photos["china"], {"traceparent": "00-not-a-trace-01", "tracestate": "x" * 600})
    assert result.as_numpy("LOGITS").shape == (1, 1000)


def test_trace_settings_change_at_run_time_over_both_ports(http_export, photos) -> None:
    server, receiver = http_export
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    try:
        settings = grpc_client.get_trace_settings(as_json=True)["settings"]
        assert settings["trace_level"]["value"] == ["TIMESTAMPS"]
        assert http_client.get_trace_settings() == {
            "trace_level": ["TIMESTAMPS"],
            "trace_rate": "1",
            "trace_count": "-1",
            "trace_mode": "opentelemetry",
        }
        # Off for the model: a sampled caller gets no spans.
        changed = http_client.update_trace_settings(MODEL, {"trace_level": ["OFF"]})
        assert changed["trace_level"] == ["OFF"]
        assert http_client.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]  # the server's are unchanged
        off = new_trace_id()
        infer_grpc(server, photos["china"], {"traceparent": traceparent(off)})
        # Cleared (None): the model follows the server's again.
        grpc_client.update_trace_settings(MODEL, {"trace_level": None})
        assert grpc_client.get_trace_settings(MODEL, as_json=True)["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
        marker = new_trace_id()
        infer_grpc(server, photos["china"], {"traceparent": traceparent(marker)})
        receiver.wait_trace(marker, REQUEST_SPANS)
        assert receiver.of_trace(off) == []
        # trace_rate 2: one request in two without a parent is traced.
        grpc_client.update_trace_settings(settings={"trace_rate": "2"})
        before = {s.trace_id for s in receiver.spans if s.name == "ModelInfer"}
        for _ in range(4):
            infer_http(server, photos["china"])
        marker = new_trace_id()
        infer_http(server, photos["china"], {"traceparent": traceparent(marker)})
        receiver.wait_trace(marker, REQUEST_SPANS)
        new_roots = {s.trace_id for s in receiver.spans if s.name == "ModelInfer" and s.parent_id == ""} - before
        assert len(new_roots) == 2
        assert http_client.update_trace_settings(settings={"trace_rate": None})["trace_rate"] == "1"
    finally:
        grpc_client.close()
        http_client.close()


def test_bad_trace_settings_are_refused_with_what_to_send(http_export) -> None:
    server, _ = http_export
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    try:
        cases = [
            ({"trace_level": ["TENSORS"]}, "TIMESTAMPS only"),
            ({"trace_rate": "0"}, "at least 1"),
            ({"trace_rate": "often"}, "must be an integer"),
            ({"trace_file": "/tmp/x"}, "not supported"),
        ]
        for settings, words in cases:
            with pytest.raises(InferenceServerException, match=words) as grpc_error:
                grpc_client.update_trace_settings(settings=settings)
            assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT"
            with pytest.raises(InferenceServerException, match=words):
                http_client.update_trace_settings(settings=settings)
        with pytest.raises(InferenceServerException, match="not served here") as missing:
            grpc_client.get_trace_settings("nonexistent")
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException, match="string"):
            http_client.update_trace_settings(settings={"trace_rate": {"a": 1}})
        assert http_client.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]  # nothing changed
    finally:
        grpc_client.close()
        http_client.close()


def test_trace_settings_are_management_calls(tmp_path, weights_dir) -> None:
    from tests.client_util import TOKEN, token_server

    with token_server(tmp_path, weights_dir) as server:
        client = triton_grpc.InferenceServerClient(server.target)
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.update_trace_settings(settings={"trace_rate": "5"})
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            headers = {"authorization": f"Bearer {TOKEN}"}
            # Tracing is off here: the settings say so, and turning it on says how.
            assert client.get_trace_settings(headers=headers, as_json=True)["settings"]["trace_level"]["value"] == [
                "OFF"
            ]
            with pytest.raises(InferenceServerException, match="--trace") as off:
                client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}, headers=headers)
            assert off.value.status() == "StatusCode.FAILED_PRECONDITION"
        finally:
            client.close()


def test_latency_exemplars_carry_the_trace_id_for_openmetrics_scrapes(http_export, photos) -> None:
    server, _ = http_export
    trace_id = new_trace_id()
    infer_grpc(server, photos["china"], {"traceparent": traceparent(trace_id)})
    request = urllib.request.Request(server.metrics_url, headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    exemplars = [
        line for line in text.splitlines() if line.startswith("vision_request_seconds_bucket") and " # " in line
    ]
    assert any(f'trace_id="{trace_id}"' in line for line in exemplars), exemplars[:5]
    assert " # " not in scrape(server.metrics_url)  # the classic text format has no exemplars


def test_json_logs_and_the_access_log_carry_the_request_and_trace_ids(grpc_export, photos) -> None:
    server, _ = grpc_export
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdsFilter())
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("vision.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        trace_id = new_trace_id()
        infer_grpc(server, photos["china"], {"traceparent": traceparent(trace_id)})
        with pytest.raises(InferenceServerException):
            infer_http(server, b"not an image")
    finally:
        access.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ok = next(line for line in lines if line.get("trace_id") == trace_id)
    assert ok["method"] == "ModelInfer" and ok["protocol"] == "grpc" and ok["status"] == "OK"
    assert ok["model"] == MODEL and ok["version"] == "1"
    assert ok["bytes_in"] > len(photos["china"]) and ok["bytes_out"] > 4000
    assert ok["duration_ms"] > 0 and len(ok["request_id"]) == 16 and len(ok["span_id"]) == 16
    bad = next(line for line in lines if line["protocol"] == "http")
    assert bad["status"] == "INVALID_ARGUMENT" and bad["bytes_out"] == 0 and bad["request_id"]
    assert "not an image" not in stream.getvalue()  # never a payload


def test_a_collector_that_black_holes_drops_and_counts_spans(tmp_path, weights_dir, photos) -> None:
    """Requests answer as usual; the queue stays within its bound; what is lost is counted."""
    with black_hole() as endpoint:
        environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "20",
            "OTEL_BSP_MAX_QUEUE_SIZE": "4",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "300",
        }
        with traced_server(tmp_path, weights_dir, environ) as server:
            for index in range(6):
                result = INFER["grpc" if index % 2 else "http"](server, photos["china"])
                assert result.as_numpy("LOGITS").shape == (1, 1000)
                assert server.server.tracing.queued_spans <= 4

            def dropped(reason: str) -> float:
                return sample_value(scrape(server.metrics_url), "vision_trace_spans_dropped_total", reason=reason)

            # 6 requests made 6 x 8 spans; at most 4 wait at a time while an export hangs.
            assert dropped("queue_full") > 0
            wait_until(lambda: dropped("export_failed") > 0)
            assert sample_value(scrape(server.metrics_url), "vision_trace_spans_exported_total") == 0


def test_a_collector_that_is_down_drops_and_counts_spans(tmp_path, weights_dir, photos) -> None:
    port = free_port()
    environ = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "300",
    }
    with traced_server(tmp_path, weights_dir, environ) as server:
        result = infer_grpc(server, photos["china"])
        assert result.as_numpy("LOGITS").shape == (1, 1000)
        wait_until(
            lambda: (
                sample_value(scrape(server.metrics_url), "vision_trace_spans_dropped_total", reason="export_failed") > 0
            )
        )


def free_port() -> int:
    from tests.support.servers import free_port as pick

    return pick()


def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition``, checking it each time the receiver-less server may have moved on."""
    done = threading.Event()
    for _ in range(int(WAIT_S * 20)):
        if condition():
            return
        done.wait(0.05)
    raise AssertionError("the condition never held")


# -- units ----------------------------------------------------------------------------------------


class Keeping(SpanExporter):
    """An exporter that keeps the SDK's span objects it is given (any exporter but OTLP's gets those)."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_the_otel_variables_configure_the_export() -> None:
    assert ExportConfig.from_environ({}) == ExportConfig()
    config = ExportConfig.from_environ(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_SERVICE_NAME": "edge",
        }
    )
    assert config.endpoint == "http://collector:4318/v1/traces"
    assert (config.sampler, config.sampler_arg, config.service_name) == ("parentbased_traceidratio", 0.25, "edge")
    traces = ExportConfig.from_environ(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    )
    assert traces.endpoint == "http://t:1/x"  # the signal's own endpoint is taken as it is
    grpc_config = ExportConfig.from_environ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert grpc_config.endpoint == "http://localhost:4317"
    for environ, words in [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/protobuf, grpc"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "parentbased_always_on"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "from 0 to 1"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, "a number"),
    ]:
        with pytest.raises(FailedPreconditionError, match=words):
            ExportConfig.from_environ(environ)


def test_tracing_off_builds_nothing_and_says_how_to_turn_it_on() -> None:
    tracing = Tracing.off()
    assert not tracing.enabled
    assert (
        tracing.start_request("ModelInfer", MODEL, {"traceparent": traceparent(new_trace_id())}, protocol="grpc")
        is None
    )
    assert tracing.settings()["trace_level"] == ["OFF"]
    with pytest.raises(FailedPreconditionError, match="--trace"):
        tracing.update("", {"trace_level": ["TIMESTAMPS"]})
    assert tracing.update("", {"trace_rate": ["3"]})["trace_rate"] == ["3"]
    with pytest.raises(InvalidInputError, match="one of OFF, TIMESTAMPS"):
        tracing.update("", {"trace_level": ["LOUD"]})


def test_a_work_items_trace_context_crosses_as_a_traceparent() -> None:
    """What a process hop would serialise: the W3C strings round-trip the request span's context."""
    tracing = Tracing.create(ExportConfig(schedule_delay_s=3600), on_dropped=lambda reason, n: None, exporter=Keeping())
    trace_id, caller = new_trace_id(), os.urandom(8).hex()
    parent = {"traceparent": traceparent(trace_id, caller), "tracestate": "vendor=1,other=two"}
    request = tracing.start_request("ModelInfer", MODEL, parent, protocol="grpc")
    assert request is not None and request.trace_id == trace_id
    item = request.item()
    assert item.traceparent == f"00-{trace_id}-{request.span_id}-01"  # sampled: only traced requests have one
    again = ItemTrace.from_traceparent(item.recorder, item.traceparent, item.trace_state)
    assert again == item and again.trace_state == "vendor=1,other=two"
    assert ItemTrace.from_traceparent(item.recorder, "garbage") is None
    assert ItemTrace.from_traceparent(item.recorder, traceparent(trace_id, sampled=False)) is None
    request.finish("OK")
    tracing.shutdown()


def test_text_and_json_lines_carry_a_requests_ids_only_within_it() -> None:
    record_stream = io.StringIO()
    logger = logging.getLogger("test.tracing.ids")
    handler = logging.StreamHandler(record_stream)
    handler.addFilter(RequestIdsFilter())
    handler.setFormatter(TextFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        with request_ids(RequestIds("r1", "t" * 32, "s" * 16)):
            logger.warning("inside")
        handler.setFormatter(JsonFormatter())
        with request_ids(RequestIds("r2")):
            logger.warning("json inside")
        logger.warning("json outside")
    finally:
        logger.removeHandler(handler)
    lines = record_stream.getvalue().splitlines()
    assert lines[0].endswith("outside") and "[" not in lines[0]
    assert lines[1].endswith(f"inside [trace={'t' * 32} request=r1]")
    inside, outside = json.loads(lines[2]), json.loads(lines[3])
    assert inside["request_id"] == "r2" and "trace_id" not in inside
    assert "request_id" not in outside and outside["message"] == "json outside"


def test_shutdown_exports_what_is_queued_and_counts_what_a_dead_collector_loses() -> None:
    """What waits in the queue at shutdown gets one export; its failure is counted."""

    class Refusing(SpanExporter):
        calls = 0

        def export(self, spans: Any) -> SpanExportResult:
            Refusing.calls += 1
            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            pass

    dropped: dict[str, int] = {}

    def count(reason: str, spans: int) -> None:
        dropped[reason] = dropped.get(reason, 0) + spans

    config = ExportConfig(schedule_delay_s=3600, max_export_batch_size=4, max_queue_size=64)
    tracing = Tracing.create(config, on_dropped=count, exporter=Refusing())
    for _ in range(3):
        trace = tracing.start_request("ModelInfer", MODEL, None, protocol="grpc")
        assert trace is not None
        trace.finish("OK")
    # The export thread wakes at each batch of 4 but three spans make none; shutdown exports them.
    tracing.shutdown()
    assert Refusing.calls == 1 and dropped == {"export_failed": 3}
    assert tracing.queued_spans == 0


def test_store_operations_are_spans_under_the_current_span_only(tmp_path) -> None:
    """Each operation of the one store interface is a span under the span current where it runs (a
    worker thread's too, as asyncio.to_thread carries the context), an error marks it, the contents
    never appear; with no current span (the sync's polls) none is made, and with tracing off the store
    is not wrapped."""
    from opentelemetry import trace as otel

    from service.storage import DirectoryObjects, ObjectExists

    plain = DirectoryObjects(tmp_path)
    assert Tracing.off().store(plain) is plain
    exporter = Keeping()
    tracing = Tracing.create(ExportConfig(schedule_delay_s=3600), on_dropped=lambda reason, n: None, exporter=exporter)
    objects = tracing.store(plain)
    assert objects.location == plain.location
    objects.write("m/untraced.json", b"{}")  # no current span: no span, no root
    job = tracing.start_job(None, job_id="j", base_model=MODEL, output_model="m", queued_at=0.0)
    assert job is not None

    async def publish() -> None:
        await asyncio.to_thread(objects.write, "m/a.bin", b"secret-bytes")
        await asyncio.to_thread(objects.read, "m/a.bin", 100)
        await asyncio.to_thread(lambda: list(objects.list("m/")))
        assert await asyncio.to_thread(objects.head, "m/none") is None
        with pytest.raises(ObjectExists):
            await asyncio.to_thread(objects.create, "m/a.bin", b"x")
        with pytest.raises(FileNotFoundError):
            await asyncio.to_thread(objects.read, "m/none", 100)
        await asyncio.to_thread(objects.delete, "m/a.bin")

    with job.phase("publish", {}):
        asyncio.run(publish())
    job.end("succeeded")
    tracing.shutdown()
    spans = {
        s.name: s for s in exporter.spans if s.name != "store.read" or s.attributes["vision.store.outcome"] == "ok"
    }
    (missing,) = [s for s in exporter.spans if s.name == "store.read" and s is not spans["store.read"]]
    phase = spans["publish"]
    store = [s for s in exporter.spans if s.name.startswith("store.")]
    assert len(store) == 7 and {s.parent.span_id for s in store} == {phase.context.span_id}
    assert dict(spans["store.write"].attributes) == {
        "vision.store.kind": "directory",
        "vision.store.key": "m/a.bin",
        "vision.store.bytes": 12,
        "vision.store.outcome": "ok",
    }
    assert spans["store.read"].attributes["vision.store.bytes"] == 12
    assert dict(spans["store.list"].attributes) == {
        "vision.store.kind": "directory",
        "vision.store.prefix": "m/",
        "vision.store.objects": 2,
        "vision.store.outcome": "ok",
    }
    assert spans["store.head"].attributes["vision.store.outcome"] == "missing"
    for failed, outcome in ((spans["store.create"], "ObjectExists"), (missing, "FileNotFoundError")):
        assert failed.status.status_code == otel.StatusCode.ERROR
        assert failed.attributes["vision.store.outcome"] == outcome
    assert spans["store.delete"].status.status_code == otel.StatusCode.UNSET
    assert not any("secret" in str(value) for s in store for value in s.attributes.values())


def test_a_fine_tuning_job_continues_the_callers_trace_and_honours_its_sampled_flag(http_export) -> None:
    from tests.support.finetune_data import digits
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

    server, receiver = http_export
    images, classes = digits()
    examples = [
        ft_pb.Example(image=image, label=str(label)) for image, label in zip(images[:40], classes[:40], strict=True)
    ]

    def run_job(output: str, parent: str) -> ft_pb.Job:
        config = ft_pb.FineTuneConfig(
            base_model=MODEL, output_model=output, epochs=3, batch_size=8, validation_fraction=0.25, seed=0
        )
        requests = [
            ft_pb.CreateJobRequest(config=config),
            ft_pb.CreateJobRequest(examples=ft_pb.ExampleBatch(examples=examples)),
        ]
        with grpc.insecure_channel(server.target) as channel:
            stub = ft_grpc.FineTuningStub(channel)
            job = stub.CreateJob(iter(requests), metadata=(("traceparent", parent),), timeout=300)
            for _ in stub.WatchJob(ft_pb.WatchJobRequest(job_id=job.id), timeout=600):
                pass  # to the job's end
            return stub.GetJob(ft_pb.GetJobRequest(job_id=job.id), timeout=60)

    unsampled = new_trace_id()
    assert run_job("traced-not", traceparent(unsampled, sampled=False)).state == ft_pb.SUCCEEDED
    trace_id, caller = new_trace_id(), "1111111111111111"
    job = run_job("traced-job", traceparent(trace_id, caller))
    assert job.state == ft_pb.SUCCEEDED
    # The job's span ends last, once the job has ended: the others of its trace are in by then.
    spans = receiver.wait_trace(trace_id, {"job"})
    (root,) = [s for s in spans if s.name == "job"]
    assert root.parent_id == caller
    assert root.attributes == {
        "vision.job.id": job.id,
        "vision.base_model": MODEL,
        "vision.output_model": "traced-job",
        "vision.job.state": "succeeded",
    }
    children = [s for s in spans if s.parent_id == root.span_id]
    assert sorted(s.name for s in children) == ["epoch", "epoch", "epoch", "features", "publish"]
    (features,) = [s for s in children if s.name == "features"]
    assert features.attributes == {"vision.examples": 40}
    (publish,) = [s for s in children if s.name == "publish"]
    assert publish.attributes == {"vision.store.kind": "directory"}
    epochs = sorted((s for s in children if s.name == "epoch"), key=lambda s: s.attributes["vision.epoch"])
    assert [s.attributes["vision.epoch"] for s in epochs] == [1, 2, 3]
    for span, point in zip(epochs, job.epoch_metrics, strict=True):
        assert span.attributes["vision.train_loss"] == pytest.approx(point.train_loss)
        assert span.attributes["vision.validation_loss"] == pytest.approx(point.validation_loss)
        assert span.attributes["vision.validation_accuracy"] == pytest.approx(point.validation_accuracy)
    assert [a.end for a in epochs[:-1]] == [b.start for b in epochs[1:]]  # each epoch begins where one ended
    assert features.end <= epochs[0].start and epochs[-1].end <= publish.start
    # The store's operations while publishing (a worker thread's): under publish, keys and sizes only.
    store = [s for s in spans if s not in children and s is not root]
    assert store and {s.parent_id for s in store} == {publish.span_id}
    assert all(s.name.startswith("store.") and publish.start <= s.start <= s.end <= publish.end for s in store)
    assert all(s.attributes["vision.store.kind"] == "directory" for s in store)
    keys = [s.attributes.get("vision.store.key", s.attributes.get("vision.store.prefix")) for s in store]
    assert all(key.startswith("traced-job/") for key in keys), keys
    writes = [s for s in store if s.name in ("store.write", "store.create", "store.replace")]
    assert any(s.attributes["vision.store.key"].endswith(".safetensors") for s in writes)
    assert any(s.attributes["vision.store.key"] == "traced-job/manifest.json" for s in writes)
    assert all(s.attributes["vision.store.bytes"] > 0 and s.attributes["vision.store.outcome"] == "ok" for s in writes)
    assert {key for s in store for key in s.attributes} <= {
        "vision.store.prefix",
        "vision.store.objects",
        "vision.store.kind",
        "vision.store.key",
        "vision.store.bytes",
        "vision.store.outcome",
    }
    assert receiver.of_trace(unsampled) == []  # its spans would have ended, and arrived, before these


# -- recorded spans: what the SDK would have made, made cheaply ------------------------------------


def test_the_encoder_writes_what_the_sdks_otlp_encoder_writes() -> None:
    """Field for field, the same ExportTraceServiceRequest as opentelemetry's encoder makes of the same
    spans: ids, the caller's tracestate, remote and local parents' flags, kinds, times, every value
    type, links with attributes, a failed span's status, the resource and the scope."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from service.telemetry.otlp import KIND_INTERNAL, KIND_SERVER, Encoder, LinkRecord, SpanRecord, readable

    resource = Resource.create({"service.name": "edge", "service.version": "1.2", "hosts": ("a", "b")})
    records = [
        SpanRecord(
            (1 << 127) + 5,
            (1 << 63) + 7,
            0x00F067AA0BA902B7,
            True,
            "vendor=1,other=two",
            "ModelInfer",
            KIND_SERVER,
            1_700_000_000_000_000_001,
            1_700_000_000_123_456_789,
            {"long": "v" * 100, "short": "alexnet", "negative": -5, "big": 1 << 40, "yes": True, "ratio": 0.25},
            None,
            "INVALID_ARGUMENT",
        ),
        SpanRecord(3, 4, 0, False, "", "batch", KIND_INTERNAL, 10, 20, {"vision.batch.size": 3}, None, None),
        SpanRecord(
            5,
            6,
            9,
            False,
            "",
            "compute",
            KIND_INTERNAL,
            10,
            20,
            None,
            (LinkRecord(3, 4, {"vision.batch.size": 3}),),
            None,
        ),
    ]
    ours = trace_service_pb2.ExportTraceServiceRequest.FromString(Encoder(resource, "vision-serving").request(records))
    theirs = encode_spans([readable(r, resource, InstrumentationScope("vision-serving")) for r in records])
    for span in theirs.resource_spans[0].scope_spans[0].spans:
        if span.status.code == 0:  # an unset status: the SDK writes the empty message, we leave it out
            span.ClearField("status")
    assert ours == theirs
    assert ours.resource_spans[0].scope_spans[0].spans[2].links[0].attributes[0].value.int_value == 3


def test_request_spans_reach_any_exporter_as_the_sdks_span_objects() -> None:
    """An exporter that is not OTLP's gets ReadableSpans: the request under its caller, its phases,
    a failed phase marked, the batch's queue and compute spans and the link to the batch span."""
    kept = Keeping()
    tracing = Tracing.create(ExportConfig(schedule_delay_s=3600), on_dropped=lambda reason, n: None, exporter=kept)
    from service.telemetry.tracing import TracedItem, record_batch

    trace_id, caller = new_trace_id(), os.urandom(8).hex()
    request = tracing.start_request(
        "ModelInfer", MODEL, {"traceparent": traceparent(trace_id, caller)}, protocol="http"
    )
    assert request is not None
    with request.phase("decode"):
        pass
    with pytest.raises(ValueError), request.phase("decode", {"vision.images": 2}):
        raise ValueError("no")
    record_batch(
        [TracedItem(request.item(), 1.0, 1)],
        started=2.0,
        finished=2.5,
        phases=(0.1, 0.3, 0.1),
        model=MODEL,
        device="cpu",
        images=4,
        requests=3,
    )
    request.set("vision.model_version", "1")
    request.finish("INTERNAL")
    tracing.force_flush()
    spans = {s.name: s for s in kept.spans}
    assert len(kept.spans) == 9
    root = spans["ModelInfer"]
    assert f"{root.context.trace_id:032x}" == trace_id and f"{root.parent.span_id:016x}" == caller
    assert root.parent.is_remote and root.kind.name == "SERVER"
    assert root.attributes["vision.protocol"] == "http" and root.attributes["rpc.grpc.status"] == "INTERNAL"
    assert root.status.description == "INTERNAL" and root.status.status_code.name == "ERROR"
    decodes = [s for s in kept.spans if s.name == "decode"]
    assert [s.status.status_code.name for s in decodes] == ["UNSET", "ERROR"]
    assert decodes[1].status.description == "ValueError" and decodes[1].attributes == {"vision.images": 2}
    for name in ("decode", "queue", "compute"):
        assert spans[name].parent.span_id == root.context.span_id and not spans[name].parent.is_remote
    compute = spans["compute"]
    for name in ("compute_input", "infer", "compute_output"):
        assert spans[name].parent.span_id == compute.context.span_id
    assert spans["compute_input"].end_time == spans["infer"].start_time
    assert spans["queue"].end_time == compute.start_time == spans["batch"].start_time
    (link,) = compute.links
    assert link.context.span_id == spans["batch"].context.span_id and link.attributes == {"vision.batch.size": 4}
    assert spans["batch"].parent is None and spans["batch"].context.trace_id != root.context.trace_id
    assert dict(spans["batch"].attributes) == {
        "vision.batch.size": 4,
        "vision.batch.requests": 3,
        "vision.model": MODEL,
        "vision.device": "cpu",
    }
    tracing.shutdown()


@pytest.mark.parametrize(
    "sampler",
    [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ],
)
def test_requests_are_sampled_by_the_sdks_rules(sampler: str) -> None:
    """The request sampler decides as the SDK's sampler of OTEL_TRACES_SAMPLER would, with and
    without a sampled parent."""
    from opentelemetry import trace as otel
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from service.telemetry.tracing import RequestSampler

    config = ExportConfig(sampler=sampler, sampler_arg=0.3)
    ours, theirs = RequestSampler(config), config.base_sampler()
    rng = np.random.default_rng(0)
    for _ in range(400):
        trace_id = int.from_bytes(rng.bytes(16), "big") or 1
        parent = otel.set_span_in_context(
            NonRecordingSpan(SpanContext(trace_id, 7, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
        )
        for context, has_parent in ((None, False), (parent, True)):
            expected = theirs.should_sample(context, trace_id, "ModelInfer").decision.is_sampled()
            assert ours.sampled(trace_id, has_parent) == expected, (trace_id, has_parent)


def test_a_callers_trace_context_is_read_as_the_w3c_propagator_reads_it() -> None:
    from opentelemetry import trace as otel
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from service.telemetry.tracing import NOT_SAMPLED, _traceparent

    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    headers = [
        f"00-{trace_id}-{span_id}-01",
        f"00-{trace_id}-{span_id}-00",
        f"00-{trace_id}-{span_id}-03",
        f" \t00-{trace_id}-{span_id}-01 ",
        f"00-{trace_id}-{span_id}-01-extra",
        f"01-{trace_id}-{span_id}-01-extra",
        f"ff-{trace_id}-{span_id}-01",
        f"00-{trace_id.upper()}-{span_id}-01",
        f"00-{'0' * 32}-{span_id}-01",
        f"00-{trace_id}-{'0' * 16}-01",
        f"00-{trace_id}-{span_id}-01" + " " * 600,
        "00-not-a-trace-01",
        "",
    ]
    states = [None, "vendor=1,other=two", "not a state", "x" * 9000, "a=1,a=2"]
    for header in headers:
        for state in states:
            carrier = {"traceparent": header} if state is None else {"traceparent": header, "tracestate": state}
            context = otel.get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
            ours = _traceparent(carrier)
            if not context.is_valid:
                assert ours is None, carrier
            elif not context.trace_flags.sampled:
                assert ours is NOT_SAMPLED, carrier
            else:
                assert not isinstance(ours, type(NOT_SAMPLED)) and ours is not None
                expected_state = ",".join(f"{k}={v}" for k, v in (context.trace_state or {}).items())
                assert (ours.trace_id, ours.span_id, ours.trace_state) == (
                    context.trace_id,
                    context.span_id,
                    expected_state,
                ), carrier


def test_spans_that_do_not_fit_the_queue_are_dropped_and_counted() -> None:
    """A group of spans (a batch's) takes the room the queue has, its first spans first; the rest is
    counted, and nothing more enters until an export makes room."""
    from service.telemetry.tracing import TracedItem, record_batch

    dropped: dict[str, int] = {}

    def count(reason: str, spans: int) -> None:
        dropped[reason] = dropped.get(reason, 0) + spans

    kept = Keeping()
    tracing = Tracing.create(
        ExportConfig(schedule_delay_s=3600, max_queue_size=4, max_export_batch_size=4), on_dropped=count, exporter=kept
    )
    request = tracing.start_request("ModelInfer", MODEL, None, protocol="grpc")
    assert request is not None
    with request.phase("decode"):
        pass
    items = [TracedItem(request.item(), 1.0, 1)]
    phases = (0.1, 0.1, 0.1)
    record_batch(items, started=2.0, finished=3.0, phases=phases, model=MODEL, device="cpu", images=1, requests=1)
    # batch, queue, compute and its 3 phases: the first 4 wait, 2 are dropped
    assert dropped == {"queue_full": 2} and tracing.queued_spans == 4
    request.finish("OK")
    assert dropped == {"queue_full": 4} and tracing.queued_spans == 4
    tracing.force_flush()
    assert sorted(s.name for s in kept.spans) == ["batch", "compute", "compute_input", "queue"]
    assert tracing.queued_spans == 0
    tracing.shutdown()


def test_a_string_utf8_cannot_hold_is_written_with_a_replacement_not_a_failed_export() -> None:
    """A lone surrogate (JSON can carry one) in an attribute, a name or a status: "?" in its span,
    and the other spans of its batch still go out."""
    from opentelemetry.sdk.resources import Resource

    from service.telemetry.otlp import KIND_INTERNAL, Encoder, SpanRecord

    odd = "id-\ud800"
    spans = [
        SpanRecord(1, 2, 0, False, "", odd, KIND_INTERNAL, 1, 2, {"vision.request_id": odd}, None, odd),
        SpanRecord(1, 3, 2, False, "", "decode", KIND_INTERNAL, 1, 2, None, None, None),
    ]
    message = trace_service_pb2.ExportTraceServiceRequest.FromString(
        Encoder(Resource.create({}), "vision-serving").request(spans)
    )
    first, second = message.resource_spans[0].scope_spans[0].spans
    assert first.name == first.status.message == first.attributes[0].value.string_value == "id-?"
    assert second.name == "decode"
