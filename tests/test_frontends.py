"""``--frontends 2``: two protocol processes sharing the gRPC and HTTP ports in front of one engine
process, seen by real clients as one server.

Every client here opens connections of its own, enough of them that the kernel spreads them over
both front ends (``vision_frontend_requests_total`` says each served); each coherence case makes
its change through one connection and checks it through all of them. The fault cases kill a
front end and the engine with SIGKILL under load.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess, start_server
from tests.metrics_util import sample_value, scrape
from tests.support.finetune_data import digits, large_noise_examples
from tests.test_health_watch import Watch
from tests.tiny import TINY
from vision_client import AsyncClient, Client, FineTuneConfig, VisionClientError
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

pytestmark = pytest.mark.e2e

MODEL = "alexnet"  # where the model matters; TINY for what does not (faults, tokens, traces)
CONNECTIONS = 12  # each its own channel: with two front ends, all on one has odds of 1 in 2**11
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels to one address share no connection


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("frontends"),
        "--frontends",
        "2",
        "--models",
        MODEL,
        "--weights",
        str(weights_dir),
        "--max-batch-size",
        "8",
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        assert proc.stop() == 0
        proc.assert_no_traceback()


def clients(server: ServerProcess) -> list[triton.InferenceServerClient]:
    return [triton.InferenceServerClient(server.target, channel_args=OWN_CONNECTION) for _ in range(CONNECTIONS)]


def http_clients(server: ServerProcess) -> list[triton_http.InferenceServerClient]:
    return [triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}") for _ in range(CONNECTIONS)]


def jpeg(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def image_input(data: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    return tensor


def pixels_input(values: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    return tensor


def frontend_counts(server: ServerProcess, decoded: str = "") -> dict[str, float]:
    """Requests the engine took from each front end (those whose images it decoded: ``decoded="true"``)."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(scrape(server.metrics_url)):
        for sample in family.samples:
            if sample.name == "vision_frontend_requests_total" and decoded in ("", sample.labels["decoded"]):
                frontend = sample.labels["frontend"]
                counts[frontend] = counts.get(frontend, 0.0) + sample.value
    return counts


def children(server: ServerProcess) -> dict[str, int]:
    """The supervisor's children: ``engine`` and ``frontend <i>`` -> pid."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != server.process.pid:
            continue
        if b"service.engine" in cmdline:
            found["engine"] = int(entry.name)
        elif b"service.frontend" in cmdline:
            found[f"frontend {cmdline[cmdline.index(b'service.frontend') + 2].decode()}"] = int(entry.name)
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


# -- one server ----------------------------------------------------------------------------------


def test_every_frontend_serves_both_bindings(server):
    before = frontend_counts(server)
    expected = None
    for client in clients(server):
        logits = client.infer(MODEL, [image_input(jpeg())]).as_numpy("LOGITS")
        expected = logits if expected is None else expected
        np.testing.assert_allclose(logits, expected, rtol=1e-5)  # the one engine's answer, whichever front end
    values = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    for client in http_clients(server):
        assert client.infer(MODEL, [_http_pixels(values)]).as_numpy("LOGITS").shape == (2, 1000)
    after = frontend_counts(server)
    served = {frontend: after[frontend] - before.get(frontend, 0.0) for frontend in after}
    assert sorted(served) == ["0", "1"] and all(count > 0 for count in served.values()), served
    assert sum(served.values()) == 2 * CONNECTIONS


def _http_pixels(values: np.ndarray) -> triton_http.InferInput:
    tensor = triton_http.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values, binary_data=True)
    return tensor


def test_images_are_decoded_by_the_frontends_exactly(server):
    """IMAGE requests reach the engine as PIXELS decoded by a front end, with the engine's own
    answer: the same logits as the same image decoded by the server's preprocessing and sent as PIXELS."""
    from service.inference.preprocess import ImageDecoder, Preprocessing

    weights_preprocessing = Preprocessing(
        resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    data = [jpeg(seed) for seed in range(3)]
    expected_pixels = np.stack([ImageDecoder(weights_preprocessing, max_pixels=10**8)(d) for d in data])
    before = sum(frontend_counts(server, decoded="true").values())
    for client in clients(server)[:4]:
        tensor = triton.InferInput("IMAGE", [3], "BYTES")
        tensor.set_data_from_numpy(np.array(data, dtype=object))
        decoded = client.infer(MODEL, [tensor]).as_numpy("LOGITS")
        reference = client.infer(MODEL, [pixels_input(expected_pixels)]).as_numpy("LOGITS")
        np.testing.assert_allclose(decoded, reference, rtol=1e-5, atol=1e-5)
        top = triton.InferRequestedOutput("LOGITS", class_count=3)  # the request's outputs travel too
        classified = client.infer(MODEL, [tensor], outputs=[top], request_id="ids-travel")
        assert classified.get_response().id == "ids-travel"
        assert classified.as_numpy("LOGITS").shape == (3, 3)
    assert sum(frontend_counts(server, decoded="true").values()) - before == 8


def _put(results: Any, result: Any, error: Any) -> None:
    results.put((result, error))


def test_streamed_requests_through_every_frontend(server):
    """Triton's ModelStreamInfer through the front ends: each answer under its request's id, a bad
    image's error in the stream, the stream going on after it."""
    import queue

    for client in clients(server)[:4]:
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=partial(_put, results))
        try:
            for index in range(3):
                client.async_stream_infer(MODEL, [image_input(jpeg(index))], request_id=f"req-{index}")
            client.async_stream_infer(MODEL, [image_input(b"garbage")], request_id="bad")
            answers = [results.get(timeout=60) for _ in range(4)]
        finally:
            client.stop_stream()
        good = {result.get_response().id for result, error in answers if error is None}
        assert good == {"req-0", "req-1", "req-2"}
        errors = [str(error) for _, error in answers if error is not None]
        assert len(errors) == 1 and "not a decodable image" in errors[0]


def test_errors_keep_their_codes_through_the_hop(server):
    for client in clients(server)[:4]:
        with pytest.raises(InferenceServerException) as missing:
            client.infer("no-such-model", [image_input(jpeg())])
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as bad:
            client.infer(MODEL, [image_input(b"not an image")])
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT" and "not a decodable image" in bad.value.message()


def test_a_refused_upload_keeps_the_engines_status_through_every_frontend(server):
    """The engine refuses a job at its first message while the caller and the front end still
    stream large images: each refusal comes back as the engine's NOT_FOUND, never as an INTERNAL
    from a write that failed once the call had ended."""
    noise = large_noise_examples(64, seed=3)

    async def refusals() -> list[str]:
        raised = []
        for n in range(CONNECTIONS):  # a connection each: both front ends relay some
            async with AsyncClient(server.target, options=OWN_CONNECTION) as client:
                try:
                    await client.fine_tune(FineTuneConfig("inception", f"refused-{n}"), noise)
                except VisionClientError as error:
                    raised.append(f"{error.code.name}: {error.message}")
        return raised

    raised = asyncio.run(refusals())
    assert len(raised) == CONNECTIONS and all(r.startswith("NOT_FOUND") and "inception" in r for r in raised), raised


def test_unload_and_load_are_seen_by_every_frontend_before_the_call_returns(server):
    connections = clients(server)
    try:
        connections[0].unload_model(MODEL)
        assert not any(client.is_model_ready(MODEL) for client in connections)
        for client in connections:
            with pytest.raises(InferenceServerException) as unloaded:
                client.infer(MODEL, [image_input(jpeg())])
            assert unloaded.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        connections[1].load_model(MODEL)
    assert all(client.is_model_ready(MODEL) for client in connections)
    assert all(client.is_server_ready() for client in connections)


def test_statistics_and_metrics_count_each_request_once(server):
    connections = clients(server)
    count = lambda: connections[0].get_inference_statistics(MODEL).model_stats[0].inference_count  # noqa: E731
    requests = lambda: sample_value(  # noqa: E731
        scrape(server.metrics_url), "vision_requests_total", model=MODEL, protocol="grpc", status="OK"
    )
    before_stats, before_metric = count(), requests()
    for client in connections:
        client.infer(MODEL, [image_input(jpeg())])
    assert count() - before_stats == CONNECTIONS
    assert requests() - before_metric == CONNECTIONS
    for client in connections:  # every front end tells the same numbers
        assert client.get_inference_statistics(MODEL).model_stats[0].inference_count == count()


def test_a_region_registered_through_one_connection_serves_every_other(server):
    values = np.random.default_rng(2).standard_normal((1, 3, 224, 224), dtype=np.float32)
    connections = clients(server)
    name = f"frontends-{os.getpid()}"
    region = shm.create_shared_memory_region(name, f"/{name}", values.nbytes + 4000)
    try:
        shm.set_shared_memory_region(region, [values])
        connections[0].register_system_shared_memory(name, f"/{name}", values.nbytes + 4000)
        expected = connections[0].infer(MODEL, [pixels_input(values)]).as_numpy("LOGITS")
        for client in connections:
            assert name in client.get_system_shared_memory_status(as_json=True)["regions"]
            tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
            tensor.set_shared_memory(name, values.nbytes)
            output = triton.InferRequestedOutput("LOGITS")
            output.set_shared_memory(name, 4000, offset=values.nbytes)
            client.infer(MODEL, [tensor], outputs=[output])  # the engine writes into the client's region
            written = shm.get_contents_as_numpy(region, np.float32, [1, 1000], offset=values.nbytes)
            np.testing.assert_allclose(written, expected, rtol=1e-5)
        connections[-1].unregister_system_shared_memory(name)
        assert all(client.get_system_shared_memory_status(as_json=True) == {} for client in connections)
    finally:
        shm.destroy_shared_memory_region(region)


@pytest.mark.parametrize("binding", ["grpc", "http"])
def test_a_job_started_through_one_frontend_is_watched_and_cancelled_through_others(server, binding):
    """Started over either binding (REST's multipart upload reaches the engine with the caller's
    peer and trace, as gRPC's stream does), watched and cancelled over gRPC through other connections."""
    images, labels = digits()
    examples = [(images[i], str(labels[i])) for i in range(60)]
    name = f"frontends-job-{binding}-{os.getpid()}"
    config = FineTuneConfig(base_model=MODEL, output_model=name, epochs=1000, batch_size=1)
    target = server.target if binding == "grpc" else f"http://127.0.0.1:{server.http_port}"
    with Client(target) as starter:
        job = starter.create_job(config, examples)
    watchers = [Client(server.target) for _ in range(4)]
    try:
        for event in watchers[0].watch_job(job.id):
            if event.kind == "epoch":
                watchers[1].cancel_job(job.id)
                break
        wait_for(lambda: watchers[2].job(job.id).state == "cancelled")
        assert {w.job(job.id).state for w in watchers} == {"cancelled"}
    finally:
        for watcher in watchers:
            watcher.close()


def test_health_and_reflection_are_the_same_everywhere(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(server.target, options=OWN_CONNECTION) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", MODEL, "liveness"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            listing = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {service.name for service in next(listing).list_services_response.service}
            assert {"inference.GRPCInferenceService", "vision.v1.FineTuning", "grpc.health.v1.Health"} <= names
            found = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="vision.v1.Models")])
            )
            assert next(found).file_descriptor_response.file_descriptor_proto


# -- faults --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the fault tests: each leaves it whole again (its dead process restarted)."""
    proc = start_server(
        tmp_path_factory.mktemp("faults"),
        "--frontends", "2", "--models", TINY, "--weights", "random", "--max-batch-size", "8",
    )  # fmt: skip
    try:
        proc.wait_serving()
        yield proc
    finally:
        assert proc.stop() == 0


class Load:
    """Clients on connections of their own sending requests until stopped; every status they met."""

    def __init__(self, server: ServerProcess, threads: int = 6) -> None:
        self.statuses: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(server,)) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, server: ServerProcess) -> None:
        data = jpeg()
        while not self._stop.is_set():
            client = triton.InferenceServerClient(server.target)  # a new connection each time
            try:
                client.infer(TINY, [image_input(data)], client_timeout=30)
                self.statuses.append("OK")
            except InferenceServerException as exc:
                self.statuses.append(str(exc.status()))
            finally:
                client.close()

    def stop(self) -> list[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.statuses


def test_a_killed_frontend_is_restarted_and_its_clients_see_only_unavailable(fault_server):
    before = children(fault_server)
    load = Load(fault_server)
    wait_for(lambda: len(load.statuses) > 20)
    os.kill(before["frontend 0"], signal.SIGKILL)
    wait_for(lambda: children(fault_server).get("frontend 0", before["frontend 0"]) != before["frontend 0"])
    counts = frontend_counts(fault_server)
    wait_for(lambda: len(load.statuses) > 40)
    statuses = load.stop()
    assert set(statuses) <= {"OK", "StatusCode.UNAVAILABLE"}, set(statuses)
    assert statuses.count("OK") > 30
    assert children(fault_server)["engine"] == before["engine"]  # the engine never noticed
    assert counts  # the engine still counts both


def test_a_killed_engine_comes_back_ready_by_itself(fault_server):
    before = children(fault_server)
    load = Load(fault_server, threads=3)
    wait_for(lambda: len(load.statuses) > 10)
    client = triton.InferenceServerClient(fault_server.target)
    values = np.random.default_rng(3).standard_normal((1, 3, 224, 224), dtype=np.float32)
    name = f"engine-restart-{os.getpid()}"
    region = shm.create_shared_memory_region(name, f"/{name}", values.nbytes)
    shm.set_shared_memory_region(region, [values])
    client.register_system_shared_memory(name, f"/{name}", values.nbytes)
    os.kill(before["engine"], signal.SIGKILL)
    wait_for(lambda: not client.is_server_ready(), timeout=30)
    assert client.is_server_live()
    wait_for(lambda: client.is_server_ready() and client.is_model_ready(TINY))
    after = children(fault_server)
    assert after["engine"] != before["engine"]
    assert {key: after[key] for key in after if key != "engine"} == {
        key: before[key] for key in before if key != "engine"
    }  # the front ends lived on
    ok_before = load.statuses.count("OK")
    wait_for(lambda: load.statuses.count("OK") > ok_before + 5)
    statuses = load.stop()
    assert set(statuses) <= {"OK", "StatusCode.UNAVAILABLE"}, set(statuses)
    try:  # the region its client registered before is the new engine's too
        assert name in client.get_system_shared_memory_status(as_json=True)["regions"]
        tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
        tensor.set_shared_memory(name, values.nbytes)
        expected = client.infer(TINY, [pixels_input(values)]).as_numpy("LOGITS")
        np.testing.assert_allclose(client.infer(TINY, [tensor]).as_numpy("LOGITS"), expected, rtol=1e-5)
    finally:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(region)


def test_after_a_long_engine_outage_the_frontends_reach_the_engine_as_soon_as_it_is_back(fault_server):
    """The front ends try the engine again at most a second apart however long it was away (gRPC's
    own backoff, 1 s growing 1.6 times a try, would leave them UNAVAILABLE for up to half a minute
    once the engine was back after this outage). The outage: the engine killed while the
    supervisor is stopped, so that it cannot start another, for 25 s."""
    supervisor = fault_server.process.pid
    engine = children(fault_server)["engine"]
    ready_line = f"model {TINY} ready"
    loaded = fault_server.log().count(ready_line)
    client = triton.InferenceServerClient(fault_server.target)
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: not client.is_server_ready(), timeout=30)
        time.sleep(25)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    wait_for(lambda: fault_server.log().count(ready_line) > loaded)  # the new engine has loaded the model
    back = time.monotonic()
    wait_for(lambda: client.is_server_ready() and client.is_model_ready(TINY), timeout=60)
    late = time.monotonic() - back
    assert late < 4.0, f"the front end saw the engine {late:.1f}s after it was back"


def test_health_watch_through_every_frontend_follows_models_and_an_engine_restart(tmp_path: Path):
    """Watch through each front end: a model's unload and load, then the engine's death and return
    (SERVING, NOT_SERVING, SERVING), the same stream all along; then the server's drain (NOT_SERVING
    before the front ends go), which closes idle HTTP keep-alive connections at once instead of
    waiting its whole grace (600 s here) for them."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    proc = start_server(tmp_path, "--frontends", "2", "--models", TINY, "--weights", "random", "--drain-seconds", "600")
    watches: list[Watch] = []
    idle: list[socket.socket] = []
    try:
        proc.wait_serving()
        models = [Watch(proc.target, TINY, OWN_CONNECTION) for _ in range(CONNECTIONS)]
        watches += models
        for watch in models:
            assert watch.wait_for(serving, not_serving, unknown) == serving
        client = triton.InferenceServerClient(proc.target)
        client.unload_model(TINY)
        for watch in models:
            watch.wait_for(not_serving, unknown)
        client.load_model(TINY)
        for watch in models:
            watch.wait_for(serving)
        servers = [Watch(proc.target, "", OWN_CONNECTION) for _ in range(CONNECTIONS)]
        watches += servers
        for watch in servers:
            assert watch.wait_for(serving, not_serving, unknown) == serving
        before = children(proc)
        os.kill(before["engine"], signal.SIGKILL)
        for watch in watches:
            watch.wait_for(not_serving)
        for watch in watches:
            watch.wait_for(serving)
        assert children(proc)["engine"] != before["engine"]
        assert client.is_server_ready() and client.is_model_ready(TINY)
        client.close()
        assert proc.http_port is not None
        idle += [keep_alive_connection(proc.http_port) for _ in range(CONNECTIONS)]  # on both front ends
        proc.process.send_signal(signal.SIGTERM)  # the front ends drain first: they say so before they go
        for watch in watches:
            watch.wait_for(not_serving)
        for connection in idle:
            assert connection.recv(1) == b""  # closed by the server, not left to the grace
        assert proc.process.wait(timeout=120) == 0  # far within the 600 s of grace
    finally:
        for watch in watches:
            watch.close()
        for connection in idle:
            connection.close()
        assert proc.stop() == 0
    proc.assert_no_traceback()


def keep_alive_connection(port: int) -> socket.socket:
    """A connection to the HTTP port that has had one request answered and stays open, idle."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("GET", "/v2/health/live")
    answer = connection.getresponse()
    assert answer.status == 200 and not answer.will_close, answer.status
    answer.read()
    assert connection.sock is not None  # kept open for the next request
    return connection.sock


def test_a_second_server_on_the_same_ports_does_not_start(server, tmp_path):
    proc = start_server(
        tmp_path, "--frontends", "2", "--models", MODEL, "--weights", "random", grpc_port=server.grpc_port
    )
    assert proc.process.wait(120) != 0
    assert "--grpc-port" in proc.log()


# -- what every front end reads itself, and traces across the hop -------------------------------


def test_token_rotation_reaches_every_frontend(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    proc = start_server(
        tmp_path, "--frontends", "2", "--models", TINY, "--weights", "random", "--auth-token-file", str(tokens)
    )
    try:
        proc.wait_serving()
        channels = [grpc.insecure_channel(proc.target, options=OWN_CONNECTION) for _ in range(CONNECTIONS)]

        def codes(token: str) -> set[grpc.StatusCode]:
            found = set()
            for channel in channels:
                jobs = ft_grpc.FineTuningStub(channel)
                try:
                    jobs.ListJobs(ft_pb.ListJobsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10)
                    found.add(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    found.add(error.code())
            return found

        assert codes("old-token") == {grpc.StatusCode.OK}
        assert codes("new-token") == {grpc.StatusCode.UNAUTHENTICATED}
        tokens.write_text("new-token\n")
        wait_for(lambda: codes("new-token") == {grpc.StatusCode.OK}, timeout=60)
        assert codes("old-token") == {grpc.StatusCode.UNAUTHENTICATED}
        counts = frontend_counts(proc)  # no inference here: the calls spread as connections do
        assert counts == {} or set(counts) <= {"0", "1"}
        for channel in channels:
            channel.close()
    finally:
        assert proc.stop() == 0


def test_one_trace_covers_a_request_through_a_frontend_and_the_engine(tmp_path: Path):
    from tests.test_tracing import http_receiver, new_trace_id, traceparent

    with http_receiver() as (receiver, endpoint):
        environ = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "20",
        }
        proc = start_server(
            tmp_path, "--frontends", "2", "--models", TINY, "--weights", "random", "--trace", env=environ
        )
        try:
            proc.wait_serving()
            for client in clients(proc)[:4]:
                trace_id = new_trace_id()
                headers = {"traceparent": traceparent(trace_id)}
                client.infer(TINY, [image_input(jpeg())], headers=headers)
                spans = receiver.wait_trace(trace_id, {"ModelInfer", "decode", "queue", "infer"})
                by_name = {span.name: span for span in spans}
                request = by_name["ModelInfer"]
                assert request.parent_id == "00f067aa0ba902b7"  # the caller's span
                decode = by_name["decode"]  # run by the front end, recorded by the engine
                assert decode.parent_id == request.span_id
                assert request.start <= decode.start <= decode.end <= by_name["queue"].start
                assert by_name["queue"].parent_id == request.span_id
        finally:
            assert proc.stop() == 0
