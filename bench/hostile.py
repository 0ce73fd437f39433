#!/usr/bin/env python3
"""Hostile and careless requests against a ``vision-serve`` process: what each one costs.

For every input class, against a real server subprocess on 127.0.0.1 (AlexNet, random
weights, default limits), it measures:

- the time until the client has its answer (or all answers, for the stream);
- the peak RSS growth of the server process while it ran (the kernel's high-water mark,
  reset before each probe through ``/proc/PID/clear_refs``);
- the worst ``ServerLive`` latency seen by another client polling meanwhile.

Each ``--code DIR`` is a checkout of the server whose code runs (``service`` and
``vision_client`` imported from there), so one command compares two versions:

    .venv/bin/python -m bench.hostile --code before=/path/to/old/checkout --code after=.

It prints a table and writes JSON to ``--output`` (default ``bench/results/hostile-<time>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

MESSAGE_BYTES = 64 << 20
CALL_TIMEOUT_S = 600.0


def _raw_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _image_request(elements: list[bytes], shape: list[int] | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=shape or [len(elements)])
    request.raw_input_contents.append(_raw_elements(elements))
    return request


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` greyscale pixels, with one row of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def _jpeg_photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    noise = Image.fromarray(rng.integers(0, 60, (480, 640, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.blend(base, noise, 0.3).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@dataclass
class Probe:
    name: str
    description: str
    run: Callable[[grpc.Channel, Server], str]  # returns the outcome (status code names)
    # Options of a server of its own (given the server's working directory), or None: the shared one.
    server_args: Callable[[Path], list[str]] | None = None
    # With server_args: share one such server with the other probes of the same server_args, in order.
    shared: bool = False


def _unary(request: pb.ModelInferRequest) -> Callable[[grpc.Channel], str]:
    data = request.SerializeToString()  # sent as bytes: the client's own serialization is not timed

    def run(channel: grpc.Channel, server: Server) -> str:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            call(data, timeout=CALL_TIMEOUT_S)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    return run


def _stream(count: int) -> Callable[[grpc.Channel], str]:
    pixels = np.zeros((1, 3, 64, 64), dtype="<f4").tobytes()

    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(count):
            request = pb.ModelInferRequest(model_name="alexnet", id=str(i))
            request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 64, 64])
            request.raw_input_contents.append(pixels)
            yield request

    def run(channel: grpc.Channel, server: Server) -> str:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answered = failed = 0
        try:
            for response in stub.ModelStreamInfer(requests(), timeout=CALL_TIMEOUT_S):
                answered += 1
                failed += bool(response.error_message)
        except grpc.RpcError as error:
            return f"{error.code().name} after {answered}"
        return f"{answered - failed} OK, {failed} errors"

    return run


# -- second round: pending calls, slow clients, files, codes ---------------------------------------


def _codes(codes: list[str]) -> str:
    counts = Counter(codes)
    return ", ".join(f"{count} {code}" for code, count in counts.most_common())


def _pending_calls(count: int, per_channel: int = 500) -> Callable[[grpc.Channel, Server], str]:
    """``count`` calls (ModelInfer, ModelStreamInfer, ModelMetadata) that send headers and never
    a message, over as many connections as the server's streams-per-connection limit needs."""
    methods = (
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
        "/inference.GRPCInferenceService/ModelMetadata",
    )

    async def stalled(target: str) -> list[str]:
        never = asyncio.Event()

        async def no_messages() -> AsyncIterator[bytes]:
            await never.wait()
            yield b""

        async def one(channel: grpc.aio.Channel, method: str) -> str:
            try:
                async for _ in channel.stream_stream(method)(no_messages(), timeout=CALL_TIMEOUT_S):
                    pass
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        # A connection each (not grpc's shared subchannel), within the server's streams per connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(target, options=options) for _ in range((count + per_channel - 1) // per_channel)
        ]
        try:
            return await asyncio.gather(
                *(one(channels[i // per_channel], methods[i % len(methods)]) for i in range(count))
            )
        finally:
            for channel in channels:
                await channel.close()

    def run(channel: grpc.Channel, server: Server) -> str:
        return _codes(asyncio.run(stalled(server.target)))

    return run


def _metrics_connections(count: int) -> Callable[[grpc.Channel, Server], str]:
    """``count`` connections to the metrics port that never finish their request headers."""

    def run(channel: grpc.Channel, server: Server) -> str:
        sockets = []
        outcomes = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=CALL_TIMEOUT_S)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: probe\r\n")
                sockets.append(sock)
            for sock in sockets:
                try:
                    data = sock.recv(64)
                except ConnectionResetError:
                    data = b""
                outcomes.append("closed" if not data else data.split(b"\r\n", 1)[0].decode())
        finally:
            for sock in sockets:
                sock.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=60) as reply:
            outcomes.append(f"then scrape {reply.status}")
        return _codes(outcomes)

    return run


def _health_watchers(count: int) -> Callable[[grpc.Channel, Server], str]:
    """``count`` Health/Watch calls of the model on the gRPC port; each one's first status."""

    def run(channel: grpc.Channel, server: Server) -> str:
        calls = [
            health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="alexnet"), timeout=CALL_TIMEOUT_S
            )
            for _ in range(count)
        ]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(health_pb2.HealthCheckResponse.ServingStatus.Name(next(call).status))
            except grpc.RpcError as error:
                outcomes.append(error.code().name)
            call.cancel()
        return _codes(outcomes)

    return run


def _raw_call(method: str, data: bytes) -> Callable[[grpc.Channel, Server], str]:
    def run(channel: grpc.Channel, server: Server) -> str:
        try:
            channel.unary_unary(method)(data, timeout=CALL_TIMEOUT_S)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    return run


def _classification(value: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 224, 224])
    request.raw_input_contents.append(np.zeros((1, 3, 224, 224), "<f4").tobytes())
    request.outputs.add(name="LOGITS").parameters["classification"].string_param = value
    return request


TOKEN = "probe-token-0123456789abcdef0123456789"


def _token_server_args(workdir: Path) -> list[str]:
    tokens = workdir / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    return ["--auth-token-file", str(tokens), "--auth-scope", "all"]


def _token_fifo(channel: grpc.Channel, server: Server) -> str:
    """The token file replaced by a FIFO while protected calls (every call: --auth-scope all) arrive."""
    tokens = server.workdir / "tokens"
    tokens.unlink()
    os.mkfifo(tokens)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    outcomes = []
    for _ in range(20):
        try:
            stub.ServerLive(pb.ServerLiveRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60)
            outcomes.append("OK")
        except grpc.RpcError as error:
            outcomes.append(error.code().name)
    tokens.unlink()
    tokens.write_text(f"{TOKEN}\n")
    return _codes(outcomes)


def _tampered_cache(kind: str) -> Callable[[grpc.Channel, Server], str]:
    """A restart of the server whose runtime cache entry.json became a FIFO or a /dev/zero symlink:
    the time until the restarted server is ready (the entry is exported again)."""

    def run(channel: grpc.Channel, server: Server) -> str:
        entries = list((server.workdir / "cache").glob("alexnet/*/entry.json"))
        if not entries:
            return "no cache entry (the server does not run ONNX Runtime)"
        for entry in entries:
            entry.unlink()
            if kind == "fifo":
                os.mkfifo(entry)
            else:
                entry.symlink_to("/dev/zero")
        server.restart()
        try:
            server.wait_ready()
        except (RuntimeError, TimeoutError) as error:
            return f"not ready: {error}"[:200]
        return "ready (exported again)"

    return run


def _cache_server_args(workdir: Path) -> list[str]:
    return ["--runtime", "onnxruntime", "--runtime-cache", str(workdir / "cache")]


# -- the HTTP port ---------------------------------------------------------------------------------


def _http_args(workdir: Path) -> list[str]:
    return ["--http-port", str(_free_port())]


def _http_answer(sock: socket.socket) -> str:
    """The status line's code of what the server answered, or how the connection ended."""
    try:
        data = sock.recv(256)
    except (ConnectionResetError, TimeoutError):
        return "reset"
    if not data:
        return "closed"
    line = data.split(b"\r\n", 1)[0].split()
    return line[1].decode() if len(line) > 1 else "garbled"


def _http_connections(count: int, opening: bytes) -> Callable[[grpc.Channel, Server], str]:
    """``count`` connections to the HTTP port that each send ``opening`` and then nothing."""

    def run(channel: grpc.Channel, server: Server) -> str:
        sockets, outcomes = [], []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=CALL_TIMEOUT_S)
                if opening:
                    sock.sendall(opening)
                sockets.append(sock)
            outcomes = [_http_answer(sock) for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=60) as reply:
            outcomes.append(f"then live {reply.status}")
        return _codes(outcomes)

    return run


def _http_request(head: bytes, body: Iterator[bytes] | bytes = b"") -> Callable[[grpc.Channel, Server], str]:
    """One request: ``head`` (request line and headers), then ``body`` (bytes, or chunks sent in turn)."""

    def run(channel: grpc.Channel, server: Server) -> str:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=CALL_TIMEOUT_S) as sock:
            sock.sendall(head)
            try:
                for chunk in [body] if isinstance(body, bytes) else body:
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before the whole body was sent
            return _http_answer(sock)

    return run


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + b"x" * size + b"\r\n"


def _post(
    length: int | None,
    content_type: str = "application/json",
    extra: str = "",
    *,
    path: str = "/v2/models/alexnet/infer",
    host: str = "127.0.0.1",
) -> bytes:
    sized = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n{sized}{extra}\r\n".encode()


def probes() -> list[Probe]:
    tiny_png = _png(Image.new("RGB", (1, 1), (10, 20, 30)))
    photos = [_jpeg_photo(i) for i in range(63)]
    contents = pb.ModelInferRequest(model_name="alexnet")
    contents.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([b""] * 30_000_000)
    pixels = pb.ModelInferRequest(model_name="alexnet")
    pixels.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 100_000, 100_000])
    pixels.raw_input_contents.append(b"\0" * 12)
    return [
        Probe("empty-200k", "200,000 empty IMAGE elements (800 KB raw)", _unary(_image_request([b""] * 200_000))),
        Probe("tiny-png-1000", "1,000 tiny PNGs (73 KB)", _unary(_image_request([tiny_png] * 1000))),
        Probe("contents-30M", "30,000,000 empty bytes_contents (60 MB message)", _unary(contents)),
        Probe(
            "bomb-header",
            "PNG header of 100,000 x 100,000 pixels",
            _unary(_image_request([_bomb_header(100_000, 100_000)])),
        ),
        Probe(
            "corrupt-among-good",
            "1 corrupt + 63 JPEGs of 640x480",
            _unary(_image_request([b"\xff\xd8 corrupt", *photos])),
        ),
        Probe("pixels-huge-shape", "PIXELS [1,3,100000,100000] with 12 bytes", _unary(pixels)),
        Probe("stream-1000", "1,000 PIXELS requests on one ModelStreamInfer", _stream(1000)),
        # Second round.
        Probe("pending-5000", "5,000 calls that never send their request", _pending_calls(5000)),
        Probe("metrics-idle-1000", "1,000 metrics connections that never finish their headers",
              _metrics_connections(1000)),
        Probe("watch-1000", "1,000 Health/Watch calls on the gRPC port", _health_watchers(1000)),
        Probe("classification-superscript", 'classification "²"', _unary(_classification("²"))),
        Probe("classification-5000-digits", "classification of 5,000 digits", _unary(_classification("9" * 5000))),
        Probe("not-protobuf-metadata", "bytes that are not protobuf to ModelMetadata",
              _raw_call("/inference.GRPCInferenceService/ModelMetadata", b"\xff" * 10)),
        Probe("name-10kb", "ModelMetadata of a 10 KB model name",
              _raw_call("/inference.GRPCInferenceService/ModelMetadata",
                        pb.ModelMetadataRequest(name="m" * 10_000).SerializeToString())),
        Probe("token-fifo", "the token file replaced by a FIFO (--auth-scope all), 20 calls", _token_fifo,
              server_args=_token_server_args),
        Probe("cache-fifo", "restart with the runtime cache's entry.json a FIFO", _tampered_cache("fifo"),
              server_args=_cache_server_args),
        *_http_probes(),
        *_third_round_probes(),
        Probe("cache-dev-zero", "restart with the runtime cache's entry.json -> /dev/zero",
              _tampered_cache("dev-zero"), server_args=_cache_server_args),
    ]  # fmt: skip


def _http_probes() -> list[Probe]:
    deep = b"[" * 1_000_000
    garbage = b'{"inputs": "\xff\xfe"}'
    return [
        Probe("http-slow-headers-1000", "1,000 HTTP connections that never finish their headers",
              _http_connections(1000, b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"), _http_args),
        Probe("http-idle-2000", "2,000 idle HTTP connections (over the cap of 1,024)",
              _http_connections(2000, b""), _http_args),
        Probe("http-declared-1GB", "an infer body declared 1 GB, none sent", _http_request(_post(1 << 30)), _http_args),
        Probe("http-slow-body", "an infer body declared 1,000 bytes, 10 sent",
              _http_request(_post(1000), b"0123456789"), _http_args),
        Probe("http-chunked-100MB", "a chunked infer body of 100 MB",
              _http_request(_post(None), _chunks(100 << 20)), _http_args),
        Probe("http-json-deep", "JSON nested 1,000,000 deep", _http_request(_post(len(deep)), deep), _http_args),
        Probe("http-not-utf8", "JSON that is not UTF-8", _http_request(_post(len(garbage)), garbage), _http_args),
        Probe("http-header-20KB", "a 20 KB header",
              _http_request(_post(0, extra="X-Probe: " + "a" * 20_000 + "\r\n")), _http_args),
    ]  # fmt: skip


def _third_round_probes() -> list[Probe]:
    """Callers' values no field holds, leaks and fan-out, cross-site requests: one server with an
    HTTP port for all of them, in this order."""
    pixels = "[" + ",".join(["0.5"] * (3 * 64 * 64 - 1)) + ",{}]"

    def tensor(last: str, datatype: str = "FP32", parameters: str = "{}") -> bytes:
        return (
            f'{{"inputs": [{{"name": "PIXELS", "datatype": "{datatype}", "shape": [1, 3, 64, 64], '
            f'"data": {pixels.format(last)}}}], "parameters": {parameters}}}'
        ).encode()

    def post(body: bytes) -> Callable[[grpc.Channel, Server], str]:
        return _http_request(_post(len(body)) + body)

    timeout_nan = tensor("0.5", parameters='{"timeout": NaN}')
    multipart = b'--b\r\nContent-Disposition: form-data; name="config"\r\n\r\n{}\r\n--b--\r\n'
    load = b'{"parameters": {"config": 18446744073709551616}}'

    def probe(name: str, description: str, run: Callable[[grpc.Channel, Server], str]) -> Probe:
        return Probe(name, description, run, _round3_args, shared=True)

    return [
        probe("http-tensor-1e39", "PIXELS (FP32) with 1e39 in JSON", post(tensor("1e39"))),
        probe("http-tensor-1e999", "PIXELS with 1e999 (parses to infinity)", post(tensor("1e999"))),
        probe("http-tensor-5000-digits", "PIXELS with an integer of 5,000 digits", post(tensor("9" * 5000))),
        probe("http-int8-300", "an INT8 tensor holding 300", post(tensor("300", "INT8"))),
        probe("http-timeout-nan", "timeout NaN over REST", post(timeout_nan)),
        probe("grpc-timeout-nan", "timeout parameter NaN over gRPC", _unary(_timeout_request(float("nan")))),
        probe("grpc-timeout-inf", "timeout parameter infinity over gRPC", _unary(_timeout_request(float("inf")))),
        probe("http-multipart-no-boundary", "a job as multipart/form-data without a boundary",
              _http_request(_post(len(multipart), "multipart/form-data", path="/v1/jobs"), multipart)),
        probe("http-load-uint64", "a load request with a parameter of 2**64",
              _http_request(_post(len(load), path="/v2/repository/models/alexnet/load"), load)),
        probe("undecodable-64", "64 undecodable images (the message must not carry a heap address)",
              _undecodable(64)),
        probe("job-watchers-500", "500 WatchJob calls on one running job", _job_watchers(500)),
        probe("sse-watchers-100", "100 Server-Sent Events watchers of one running job", _sse_watchers(100)),
        probe("upload-config-only-4", "4 CreateJob streams that send only their config, then a real upload",
              _config_only_uploads(4)),
        probe("http-cross-origin-unload", "an unload POSTed as text/plain with Origin: http://evil.example",
              _cross_site(b"POST /v2/repository/models/alexnet/unload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Origin: http://evil.example\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}")),
        probe("http-foreign-host", "an infer with Host: evil.example (DNS rebinding)",
              _cross_site(_post(len(tensor("0.5")), host="evil.example") + tensor("0.5"))),
        probe("http-infer-ok", "the same infer with Host: 127.0.0.1 (the control)", post(tensor("0.5"))),
    ]  # fmt: skip


def _round3_args(workdir: Path) -> list[str]:
    return ["--http-port", str(_free_port())]


def _timeout_request(value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="alexnet")
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 64, 64])
    request.raw_input_contents.append(np.zeros((1, 3, 64, 64), "<f4").tobytes())
    request.parameters["timeout"].double_param = value
    return request


def _undecodable(count: int) -> Callable[[grpc.Channel, Server], str]:
    request = _image_request([b"not an image %d" % i for i in range(count)])

    def run(channel: grpc.Channel, server: Server) -> str:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=CALL_TIMEOUT_S)
            return "OK"
        except grpc.RpcError as error:
            details = error.details() or ""
            leak = "0x" in details or "object at" in details
            return f"{error.code().name}, {'an address in the message' if leak else 'no address in the message'}"

    return run


def _start_job(channel: grpc.Channel, name: str) -> str:
    """A job on AlexNet that runs for a while (1,000 epochs of 64 shades, one at a time); its id."""
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

    examples = [
        ft.Example(image=_png(Image.new("RGB", (32, 32), (v, v, v))), label="dark" if v < 128 else "light")
        for v in [*range(10, 74, 2), *range(180, 244, 2)]
    ]
    config = ft.FineTuneConfig(base_model="alexnet", output_model=name, epochs=1000, batch_size=1, replace=True)
    requests = [ft.CreateJobRequest(config=config), ft.CreateJobRequest(examples=ft.ExampleBatch(examples=examples))]
    return str(ft_grpc.FineTuningStub(channel).CreateJob(iter(requests), timeout=CALL_TIMEOUT_S).id)


def _cancel_job(channel: grpc.Channel, job_id: str) -> None:
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

    ft_grpc.FineTuningStub(channel).CancelJob(ft.CancelJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)


def _job_watchers(count: int) -> Callable[[grpc.Channel, Server], str]:
    """``count`` WatchJob calls on one job, each reading its first event; then the job is cancelled."""
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

    def run(channel: grpc.Channel, server: Server) -> str:
        job_id = _start_job(channel, "probe-watched")
        stub = ft_grpc.FineTuningStub(channel)
        calls, outcomes = [], []
        try:
            for _ in range(count):
                call = stub.WatchJob(ft.WatchJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)
                calls.append(call)
                try:
                    next(call)
                    outcomes.append("watching")
                except grpc.RpcError as error:
                    outcomes.append(error.code().name)
        finally:
            _cancel_job(channel, job_id)
            for call in calls:
                call.cancel()
        return _codes(outcomes)

    return run


def _sse_watchers(count: int) -> Callable[[grpc.Channel, Server], str]:
    def run(channel: grpc.Channel, server: Server) -> str:
        job_id = _start_job(channel, "probe-sse")
        sockets, outcomes = [], []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=CALL_TIMEOUT_S)
                sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                sockets.append(sock)
                outcomes.append(_http_answer(sock))
        finally:
            _cancel_job(channel, job_id)
            for sock in sockets:
                sock.close()
        return _codes(outcomes)

    return run


def _config_only_uploads(count: int) -> Callable[[grpc.Channel, Server], str]:
    """``count`` CreateJob streams that send their config and then nothing (their side stays open),
    then one whole upload once they have ended: the outcomes, and what the whole upload got."""
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

    def run(channel: grpc.Channel, server: Server) -> str:
        stub = ft_grpc.FineTuningStub(channel)
        release = threading.Event()

        def idle(i: int) -> Iterator[ft.CreateJobRequest]:
            yield ft.CreateJobRequest(config=ft.FineTuneConfig(base_model="alexnet", output_model=f"idle-{i}"))
            release.wait(CALL_TIMEOUT_S)

        futures = [stub.CreateJob.future(idle(i), timeout=CALL_TIMEOUT_S) for i in range(count)]
        outcomes = []
        for future in futures:
            try:
                future.result()
                outcomes.append("OK")
            except grpc.RpcError as error:
                outcomes.append(error.code().name)
        release.set()
        try:
            job_id = _start_job(channel, "probe-after-idle")
            _cancel_job(channel, job_id)
            outcomes.append("then a whole upload OK")
        except grpc.RpcError as error:
            outcomes.append(f"then a whole upload {error.code().name}")
        return _codes(outcomes)

    return run


def _cross_site(request: bytes) -> Callable[[grpc.Channel, Server], str]:
    """One HTTP request as a page on another site (or a rebound name) makes it; then whether the
    model is still served."""

    def run(channel: grpc.Channel, server: Server) -> str:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=CALL_TIMEOUT_S) as sock:
            sock.sendall(request)
            answer = _http_answer(sock)
        ready = pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name="alexnet"), timeout=60)
        return f"{answer}, then alexnet {'ready' if ready.ready else 'NOT READY'}"

    return run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, code: Path, workdir: Path, extra: list[str]) -> None:
        self.port = _free_port()
        self.metrics_port = _free_port()
        self.workdir = workdir
        self.log_path = workdir / f"server-{self.port}.log"
        self._code = code
        self._command = [
            sys.executable, "-m", "service", "--host", "127.0.0.1", "--grpc-port", str(self.port),
            "--http-port", "none", "--metrics-port", str(self.metrics_port),
            "--models", "alexnet", "--weights", "random",
            "--model-store", str(workdir / f"store-{self.port}"), *extra,
        ]  # fmt: skip
        self._start()
        self.target = f"127.0.0.1:{self.port}"

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{self._code}{os.pathsep}{self._code / 'clients' / 'python'}"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command, cwd=self._code, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def http_port(self) -> int:
        """The HTTP port a probe asked for (``--http-port N`` in its own options; the last one wins)."""
        where = max(i for i, option in enumerate(self._command) if option == "--http-port")
        return int(self._command[where + 1])

    def restart(self) -> None:
        self.stop()
        self._start()

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log_path.read_text()}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service="alexnet"), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError("server not ready")

    def status(self, key: str) -> int:
        """A ``/proc/PID/status`` field in bytes (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LivenessPoller(threading.Thread):
    """Calls ServerLive back to back on its own channel and keeps the worst latency."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._done = threading.Event()
        self.worst = 0.0
        self.calls = 0
        self.failures = 0

    def run(self) -> None:
        while not self._done.is_set():
            started = time.perf_counter()
            try:
                self._stub.ServerLive(pb.ServerLiveRequest(), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError:
                self.failures += 1
            self.worst = max(self.worst, time.perf_counter() - started)
            self.calls += 1
            time.sleep(0.005)

    def finish(self) -> None:
        self._done.set()
        self.join()
        self._channel.close()


@dataclass
class Measurement:
    code: str
    probe: str
    description: str
    outcome: str
    seconds: float
    peak_rss_growth_mb: float
    live_worst_ms: float
    live_calls: int
    server_alive: bool


def measure(label: str, code: Path, selected: list[Probe], server_args: list[str]) -> list[Measurement]:
    """Probes on the shared server first, then each probe that needs a server of its own."""
    shared = [probe for probe in selected if probe.server_args is None]
    results = _measure_on_one_server(label, code, shared, server_args) if shared else []
    done: set[str] = set()
    for probe in selected:
        if probe.server_args is not None and probe.name not in done:
            group = [probe]
            if probe.shared:
                group = [p for p in selected if p.shared and p.server_args is probe.server_args]
            done.update(p.name for p in group)
            results += _measure_on_one_server(label, code, group, server_args, probe.server_args)
    return results


def _measure_on_one_server(
    label: str,
    code: Path,
    selected: list[Probe],
    server_args: list[str],
    own_args: Callable[[Path], list[str]] | None = None,
) -> list[Measurement]:
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory() as workdir:
        extra = own_args(Path(workdir)) if own_args is not None else []
        server = Server(code, Path(workdir), [*server_args, *extra])
        try:
            server.wait_ready()
            options = [
                ("grpc.max_send_message_length", MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MESSAGE_BYTES),
            ]
            for probe in selected:
                if not server.alive():
                    break
                with grpc.insecure_channel(server.target, options=options) as channel:
                    health = health_pb2_grpc.HealthStub(channel)  # open to all, whatever --auth-scope
                    health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                    time.sleep(1.0)
                    baseline = server.status("VmRSS")
                    server.reset_peak()
                    poller = LivenessPoller(server.target)
                    poller.start()
                    started = time.perf_counter()
                    outcome = probe.run(channel, server)
                    seconds = time.perf_counter() - started
                    poller.finish()
                    alive = server.alive()
                    peak = server.status("VmHWM") if alive else baseline
                result = Measurement(
                    label, probe.name, probe.description, outcome, round(seconds, 3),
                    round((peak - baseline) / 2**20, 1), round(poller.worst * 1000, 1), poller.calls, alive,
                )  # fmt: skip
                print(json.dumps(asdict(result)), flush=True)
                results.append(result)
        finally:
            server.stop()
    return results


def table(results: list[Measurement]) -> str:
    labels = list(dict.fromkeys(r.code for r in results))
    names = list(dict.fromkeys(r.probe for r in results))
    by = {(r.code, r.probe): r for r in results}
    header = "| input class | " + " | ".join(labels) + " |"
    lines = [header, "|---|" + "---|" * len(labels)]
    for name in names:
        cells = []
        for label in labels:
            r = by.get((label, name))
            cells.append(
                "—"
                if r is None
                else f"{r.outcome}: {r.seconds:.2f} s, +{r.peak_rss_growth_mb:.0f} MB, live ≤ {r.live_worst_ms:.0f} ms"
                + ("" if r.server_alive else " (server died)")
            )
        description = next(r.description for r in results if r.probe == name)
        lines.append(f"| {description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", required=True, help="LABEL=DIR: a checkout to run (repeatable)")
    parser.add_argument("--probes", default="", help="comma list of probe names (default: all)")
    parser.add_argument("--server-args", default="", help="extra vision-serve options")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    selected = probes()
    if args.probes:
        wanted = set(args.probes.split(","))
        selected = [p for p in selected if p.name in wanted]
    results: list[Measurement] = []
    for spec in args.code:
        label, _, directory = spec.partition("=")
        results += measure(label, Path(directory).resolve(), selected, args.server_args.split())
    print()
    print(table(results))
    output = args.output or ROOT / "bench" / "results" / f"hostile-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"command": sys.argv, "cpus": os.cpu_count(), "results": [asdict(r) for r in results]}, indent=2)
    )
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
