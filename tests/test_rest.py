"""The HTTP/REST port: KServe v2 REST and Triton's extensions, with ``tritonclient.http`` (the real
client, unchanged) beside ``tritonclient.grpc`` on one server, and raw HTTP for what clients do
not send: malformed bodies, oversized and slow ones, too many connections."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from service.transport.auth import AccessPolicy
from service.transport.rest.routes import Route
from service.transport.rest.server import RestServer
from tests.client_util import inprocess_server
from tests.inprocess import InProcessServer

MODEL = "alexnet"
BASE64 = {"content_type": "base64"}


@pytest.fixture(scope="module")
def rest_server(tmp_path_factory, weights_dir: Path) -> Iterator[InProcessServer]:
    with inprocess_server(tmp_path_factory.mktemp("rest"), weights_dir) as server:
        yield server


def http_client(server: InProcessServer) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}", network_timeout=120)


def raw(server: InProcessServer, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def image_input(photo: bytes) -> tuple[triton_http.InferInput, triton_grpc.InferInput]:
    """The IMAGE input for each client (tritonclient.http sends encoded images as binary data only)."""
    data = np.array([photo], dtype=np.object_)
    rest = triton_http.InferInput("IMAGE", [1], "BYTES")
    rest.set_data_from_numpy(data, binary_data=True)
    grpc_input = triton_grpc.InferInput("IMAGE", [1], "BYTES")
    grpc_input.set_data_from_numpy(data)
    return rest, grpc_input


# -- the protocol, with the real client -------------------------------------------------------------


def test_health_metadata_config_and_statistics(rest_server) -> None:
    client = http_client(rest_server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1") and not client.is_model_ready("nothing")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "vision-serving"
    assert {"classification", "model_configuration", "statistics", "model_repository"} <= set(metadata["extensions"])
    with triton_grpc.InferenceServerClient(rest_server.target) as grpc_client:
        grpc_model = grpc_client.get_model_metadata(MODEL, as_json=True)
        grpc_config = grpc_client.get_model_config(MODEL, as_json=True)["config"]
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in model["inputs"]} == {"IMAGE": "BYTES", "PIXELS": "FP32"}
    assert [i["shape"] for i in model["inputs"]] == [[int(d) for d in i["shape"]] for i in grpc_model["inputs"]]
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == int(grpc_config["max_batch_size"])
    before = client.get_inference_statistics(MODEL)["model_stats"][0]
    photo_input, _ = image_input(_photo())
    client.infer(MODEL, [photo_input])
    after = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert after["inference_count"] == before.get("inference_count", 0) + 1
    assert isinstance(after["inference_stats"]["success"]["count"], int)
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} == {MODEL}


def test_logits_over_rest_equal_grpcs_for_images_and_pixels(rest_server) -> None:
    client = http_client(rest_server)
    photo = _photo()
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    with triton_grpc.InferenceServerClient(rest_server.target) as grpc_client:
        rest_input, grpc_input = image_input(photo)
        grpc_logits = grpc_client.infer(MODEL, [grpc_input]).as_numpy("LOGITS")
        np.testing.assert_array_equal(client.infer(MODEL, [rest_input]).as_numpy("LOGITS"), grpc_logits)
        # tritonclient refuses non-UTF-8 bytes in JSON: the documented base64 form instead.
        np.testing.assert_array_equal(_json_infer(rest_server, photo), grpc_logits)
        for binary in (True, False):
            rest_pixels = triton_http.InferInput("PIXELS", list(pixels.shape), "FP32")
            rest_pixels.set_data_from_numpy(pixels, binary_data=binary)
            output = triton_http.InferRequestedOutput("LOGITS", binary_data=binary)
            rest_logits = client.infer(MODEL, [rest_pixels], outputs=[output]).as_numpy("LOGITS")
            grpc_pixels = triton_grpc.InferInput("PIXELS", list(pixels.shape), "FP32")
            grpc_pixels.set_data_from_numpy(pixels)
            np.testing.assert_allclose(
                rest_logits, grpc_client.infer(MODEL, [grpc_pixels]).as_numpy("LOGITS"), rtol=1e-6, atol=1e-6
            )


def test_requests_are_counted_by_the_port_they_came_in_by(rest_server) -> None:
    from tests.metrics_util import sample_value, scrape

    def counts() -> tuple[float, float]:
        text = scrape(rest_server.metrics_url)
        return tuple(  # type: ignore[return-value]
            sample_value(text, "vision_requests_total", model=MODEL, status="OK", protocol=p) for p in ("grpc", "http")
        )

    before = counts()
    rest_input, grpc_input = image_input(_photo())
    http_client(rest_server).infer(MODEL, [rest_input])
    http_client(rest_server).infer(MODEL, [rest_input])
    with triton_grpc.InferenceServerClient(rest_server.target) as grpc_client:
        grpc_client.infer(MODEL, [grpc_input])
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)


def test_classification_strings_equal_grpcs(rest_server) -> None:
    client = http_client(rest_server)
    rest_input, grpc_input = image_input(_photo())
    for binary in (True, False):
        rest = client.infer(
            MODEL, [rest_input], outputs=[triton_http.InferRequestedOutput("LOGITS", binary_data=binary, class_count=3)]
        ).as_numpy("LOGITS")
        with triton_grpc.InferenceServerClient(rest_server.target) as grpc_client:
            grpc = grpc_client.infer(
                MODEL, [grpc_input], outputs=[triton_grpc.InferRequestedOutput("LOGITS", class_count=3)]
            ).as_numpy("LOGITS")
        assert [_text(v) for v in rest.reshape(-1)] == [_text(v) for v in grpc.reshape(-1)]


def test_repository_index_unload_and_load(rest_server) -> None:
    client = http_client(rest_server)
    index = client.get_model_repository_index()
    assert [(m["name"], m["state"]) for m in index] == [(MODEL, "READY")]
    client.unload_model(MODEL)
    assert not client.is_model_ready(MODEL)
    assert [m["state"] for m in client.get_model_repository_index()] == ["UNAVAILABLE"]
    client.load_model(MODEL)
    assert client.is_model_ready(MODEL)
    with pytest.raises(InferenceServerException, match="not served here") as missing:
        client.load_model("nothing")
    assert missing.value.status() == "404"


def test_callers_mistakes_get_json_errors_with_the_specs_statuses(rest_server, caplog) -> None:
    infer = f"/v2/models/{MODEL}/infer"
    cases = {
        "unknown model": ("GET", "/v2/models/nothing", b"", 404, "not served here"),
        "unknown version": ("GET", f"/v2/models/{MODEL}/versions/9", b"", 404, "version"),
        "not JSON": ("POST", infer, b"{", 400, "not valid JSON"),
        "not UTF-8": ("POST", infer, b'{"inputs": "\xff"}', 400, "not valid JSON"),
        "deep JSON": ("POST", infer, b"[" * 200_000, 400, "nests JSON too deeply"),
        "no inputs": ("POST", infer, b"{}", 400, "'inputs'"),
        "wrong datatype": (
            "POST",
            infer,
            _body({"name": "PIXELS", "shape": [1], "datatype": "INT8", "data": [1]}),
            400,
            "datatype",
        ),
        "short binary": (
            "POST",
            infer,
            _body({"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}),
            400,
            "binary_data_size",
        ),
        "not an image": (
            "POST",
            infer,
            _body({"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["hello"]}),
            400,
            "not a decodable image",
        ),
        "bad base64": (
            "POST",
            infer,
            _body({"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["%%"], "parameters": BASE64}),
            400,
            "not base64",
        ),
        # Half a surrogate pair is valid JSON but no text: in the id, a parameter, a key, a name.
        "lone surrogate id": ("POST", infer, b'{"id": "\\ud800", "inputs": []}', 400, "surrogate"),
        "lone surrogate parameter": (
            "POST", infer, b'{"parameters": {"p": "a\\udfffb"}, "inputs": []}', 400, "surrogate"
        ),
        "lone surrogate key": ("POST", infer, b'{"\\uDBFF": 1, "inputs": []}', 400, "surrogate"),
        "lone surrogate name": (
            "POST", infer, b'{"inputs": [{"name": "\\ud800", "shape": [1], "datatype": "BYTES"}]}', 400, "surrogate"
        ),
        "load parameter": (
            "POST", f"/v2/repository/models/{MODEL}/load", b'{"parameters": {"x": "\\ud800"}}', 400, "surrogate"
        ),
    }  # fmt: skip
    for name, (method, path, body, status, message) in cases.items():
        got, answer = raw(rest_server, method, path, body, {"Content-Type": "application/json"})
        assert got == status, (name, got, answer[:300])
        assert message in json.loads(answer)["error"], (name, answer[:300])
    assert raw(rest_server, "GET", "/v2/health/live")[0] == 200  # and the server is fine
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback for a caller's mistake


def test_a_body_over_the_limit_is_refused_before_it_is_read(rest_server) -> None:
    limit = rest_server.config.max_message_bytes
    with socket.create_connection(("127.0.0.1", rest_server.server.http_port), timeout=30) as sock:
        sock.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {limit + 1}\r\n\r\n".encode()
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and b"over this server's limit" in answer


def test_the_token_and_scopes_of_the_grpc_port_apply(tmp_path, weights_dir) -> None:
    from tests.client_util import TOKEN, token_server

    with token_server(tmp_path, weights_dir) as server:
        unload = f"/v2/repository/models/{MODEL}/unload"
        status, answer = raw(server, "POST", unload)
        assert status == 401 and "Bearer" in json.loads(answer)["error"]
        status, answer = raw(server, "POST", unload, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and "not valid" in json.loads(answer)["error"]
        assert raw(server, "GET", f"/v2/models/{MODEL}")[0] == 200  # inference stays open (--auth-scope management)
        client = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}", network_timeout=120)
        client.unload_model(MODEL, headers={"Authorization": f"Bearer {TOKEN}"})
        assert not client.is_model_ready(MODEL)


def test_the_curl_examples_of_the_docs_run(rest_server, tmp_path) -> None:
    import re
    import subprocess

    from tests.conftest import ROOT

    section = (ROOT / "docs" / "protocol.md").read_text().split("## HTTP/REST", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S)[0]  # the inference examples
    (tmp_path / "cat.jpg").write_bytes(_photo())
    script = script.replace("localhost:8000", f"127.0.0.1:{rest_server.server.http_port}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ready, rest = done.stdout.split("\n", 1)
    metadata, end = json.JSONDecoder().raw_decode(rest)  # two JSON answers, one after the other
    answer = json.loads(rest[end:])
    assert ready == "200" and metadata["name"] == MODEL
    (output,) = answer["outputs"]
    assert output["shape"] == [1, 3] and all(re.fullmatch(r"[0-9.]+:[0-9]+:.+", entry) for entry in output["data"])


def test_the_docs_give_each_code_its_http_status() -> None:
    import re

    import grpc

    from service.transport.errors import HTTP_STATUS
    from tests.conftest import ROOT

    table = (ROOT / "docs" / "protocol.md").read_text().split("## Errors and their codes", 1)[1]
    documented = {code: int(status) for code, status in re.findall(r"^\| `([A-Z_]+)` \(([0-9]+)\)", table, re.M)}
    assert documented and all(HTTP_STATUS.get(grpc.StatusCode[code], 500) == s for code, s in documented.items())


# -- the port's own bounds, on a server of one route ----------------------------------------------


async def _live(request, body):
    from aiohttp import web

    return web.Response(text="ok")


async def _echo(request, body):
    from aiohttp import web

    return web.Response(text=str(len(body)))


def _bounded_server(**options) -> tuple[RestServer, asyncio.AbstractEventLoop, int]:
    routes = [
        Route("GET", ("/v2/health/live",), "/inference.GRPCInferenceService/ServerLive", _live),
        Route("POST", ("/echo",), "/inference.GRPCInferenceService/ModelInfer", _echo, has_body=True),
    ]
    loop = asyncio.new_event_loop()
    server = RestServer(routes, AccessPolicy(None), **options)
    port = loop.run_until_complete(server.start("127.0.0.1", 0))
    import threading

    threading.Thread(target=loop.run_forever, daemon=True).start()
    return server, loop, port


def _stop(server: RestServer, loop: asyncio.AbstractEventLoop) -> None:
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)


def test_malformed_requests_get_400_and_no_traceback(caplog) -> None:
    server, loop, port = _bounded_server(max_body_bytes=1000, body_timeout_s=5.0)
    malformed = {
        "not HTTP": b"GARBAGE\r\n\r\n",
        "binary": b"\xff\xfe GET / HTTP/1.1\r\n\r\n",
        "header too long": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
        "too many headers": b"GET /v2/health/live HTTP/1.1\r\n"
        + b"".join(b"H%d: v\r\n" % i for i in range(300))
        + b"\r\n",
        "bad length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "length and chunked": b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    }
    try:
        for name, request in malformed.items():
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request)
                assert sock.recv(100).split(b"\r\n")[0].endswith(b"400 Bad Request"), name
        assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []
    finally:
        _stop(server, loop)


def test_slow_headers_slow_bodies_chunked_bodies_and_too_many_connections() -> None:
    server, loop, port = _bounded_server(
        max_body_bytes=1000, body_timeout_s=1.0, header_timeout_s=1.0, max_connections=4
    )
    try:
        # Headers that never end: closed once the header time is up.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert sock.recv(100) == b"" and time.monotonic() - started < 10
        # A body that never arrives: 408.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\nabc")
            assert sock.recv(1000).startswith(b"HTTP/1.1 408")
        # A chunked body is counted as it comes: 413 once past the limit.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                sock.sendall(b"258\r\n" + b"x" * 600 + b"\r\n")
            assert sock.recv(1000).startswith(b"HTTP/1.1 413")
        # Over the connection cap: closed at once; the port still answers once they go.
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            assert extra.recv(100) == b""
        for sock in held:
            sock.close()
        time.sleep(0.2)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/v2/health/live")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        _stop(server, loop)


# -- helpers ---------------------------------------------------------------------------------------


def _photo() -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _json_infer(server: InProcessServer, photo: bytes) -> np.ndarray:
    body = {
        "inputs": [
            {
                "name": "IMAGE",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(photo).decode()],
            }
        ]
    }
    status, answer = raw(server, "POST", f"/v2/models/{MODEL}/infer", json.dumps(body).encode())
    assert status == 200, answer[:300]
    (output,) = json.loads(answer)["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def _body(tensor: dict) -> bytes:
    return json.dumps({"inputs": [tensor]}).encode()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- fine-tuning and model listing over HTTP ----------------------------------------------------------


@pytest.fixture
def tiny_rest_server(serve_inprocess, tmp_path):
    from service.config import RuntimeConfig
    from tests.conftest import session_runtime_cache
    from tests.tiny import TINY

    return serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        model_store=tmp_path / "store",
    )


def _shade(value: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_job_created_with_curl_is_watched_as_events_and_its_model_classifies(tiny_rest_server, tmp_path) -> None:
    import subprocess

    from tests.tiny import TINY

    base = f"http://127.0.0.1:{tiny_rest_server.server.http_port}"
    (tmp_path / "config.json").write_text(json.dumps({"baseModel": TINY, "outputModel": "shades", "epochs": 3}))
    form = ["-F", "config=@config.json"]
    for i in range(12):
        label = "dark" if i % 2 else "light"
        (tmp_path / f"{i}.png").write_bytes(_shade(30 + i if label == "dark" else 220 - i))
        form += ["-F", f"{label}=@{i}.png"]

    def curl(*args: str) -> str:
        done = subprocess.run(["curl", "-sS", "--fail-with-body", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    job = json.loads(curl(*form, f"{base}/v1/jobs"))
    assert job["state"] == "QUEUED" and job["config"]["outputModel"] == "shades" and job["examples"] == 12
    stream = curl("-N", f"{base}/v1/jobs/{job['id']}/events")
    events = [json.loads(line[len("data: ") :]) for line in stream.splitlines() if line.startswith("data: ")]
    kinds = [line[len("event: ") :] for line in stream.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and kinds.count("epoch") >= 3
    assert events[-1]["state"] == "SUCCEEDED"
    finished = json.loads(curl(f"{base}/v1/jobs/{job['id']}"))
    assert finished["state"] == "SUCCEEDED"
    epochs = [event for kind, event in zip(kinds, events, strict=True) if kind == "epoch"]
    assert [point["epoch"] for point in finished["epochMetrics"]] == [event["epoch"] for event in epochs]
    assert [point["trainLoss"] for point in finished["epochMetrics"]] == [event["trainLoss"] for event in epochs]

    body = {
        "inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": BASE64,
                    "data": [base64.b64encode(_shade(20)).decode()]}],
        "outputs": [{"name": "LOGITS", "parameters": {"classification": 2}}],
    }  # fmt: skip
    answer = json.loads(
        curl("-H", "Content-Type: application/json", "-d", json.dumps(body), f"{base}/v2/models/shades/infer")
    )
    assert {entry.split(":", 2)[2] for entry in answer["outputs"][0]["data"]} == {"dark", "light"}

    model = json.loads(curl(f"{base}/v1/models/shades"))
    assert model["baseModel"] == TINY and model["labels"] == ["dark", "light"]
    assert model["version"] == answer["model_version"] and model["devices"] == ["cpu"]
    assert "shades" in {m["name"] for m in json.loads(curl(f"{base}/v1/models"))["models"]}
    assert json.loads(curl("-X", "DELETE", f"{base}/v1/models/shades"))["deleted"] is True
    status, _ = raw(tiny_rest_server, "GET", "/v1/models/shades")
    assert status == 404


def test_throughput_counts_the_images_each_device_ran_and_each_queue_holds(rest_server) -> None:
    """GET /v1/throughput: running totals of vision_inference_images_total per model and device
    (a client takes their rate) and each model's queue depth, as gRPC's GetThroughput answers."""
    from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

    def totals() -> dict[tuple[str, str], int]:
        status, body = raw(rest_server, "GET", "/v1/throughput")
        assert status == 200
        answer = json.loads(body)
        assert answer["time"] == pytest.approx(time.time(), abs=60)
        assert {queue["model"] for queue in answer["queues"]} == {MODEL}
        return {(row["model"], row["device"]): int(row["images"]) for row in answer.get("images", [])}

    before = totals().get((MODEL, "cpu"), 0)
    client = http_client(rest_server)
    rest, _ = image_input(_shade(100))
    client.infer(MODEL, [rest])
    assert totals()[(MODEL, "cpu")] == before + 1
    with grpc.insecure_channel(rest_server.target) as channel:
        reply = models_pb2_grpc.ModelsStub(channel).GetThroughput(models_pb2.GetThroughputRequest())
    assert {(row.model, row.device): row.images for row in reply.images}[(MODEL, "cpu")] == before + 1
    _, body = raw(rest_server, "GET", f"/v1/models/{MODEL}")
    info = json.loads(body)
    assert info["version"] == "1" and info["devices"] == ["cpu"] and info.get("pendingImages", "0") == "0"


def test_job_requests_that_are_wrong_are_refused_clearly(tiny_rest_server) -> None:
    cases = {
        "not multipart": ("POST", "/v1/jobs", b"{}", {"Content-Type": "application/json"}, 400, "multipart/form-data"),
        "no config": (
            "POST", "/v1/jobs", b"--b\r\nContent-Disposition: form-data; name=\"cat\"\r\n\r\nxx\r\n--b--\r\n",
            {"Content-Type": "multipart/form-data; boundary=b"}, 400, "'config'",
        ),
        "bad config": (
            "POST", "/v1/jobs",
            b"--b\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n{\"epochs\": \"x\"}\r\n--b--\r\n",
            {"Content-Type": "multipart/form-data; boundary=b"}, 400, "FineTuneConfig",
        ),
        "unknown job": ("GET", "/v1/jobs/0123456789ab/events", b"", {}, 404, "job"),
        "unknown model": ("DELETE", "/v1/models/nothing", b"", {}, 404, "nothing"),
    }  # fmt: skip
    for name, (method, path, body, headers, status, message) in cases.items():
        got, answer = raw(tiny_rest_server, method, path, body, headers)
        assert got == status, (name, got, answer[:300])
        assert message in json.loads(answer)["error"], (name, answer[:300])
