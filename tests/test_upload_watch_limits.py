"""What one client may hold of fine-tuning, on both ports: uploads must keep making progress (an
idle time between pieces, a total deadline) and one client address holds at most so many upload
slots; a job has at most so many watchers, and the server at most so many in all.

A job is kept QUEUED, however fast the tiny model trains, by holding the server's only device
(the token ``JobManager`` hands the next job); it is given back at the end of each test.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from PIL import Image

from service.config import FineTuneLimits
from tests.inprocess import InProcessServer, tiny_config
from tests.tiny import TINY
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

WAIT_S = 120.0  # a bound on waiting for the server, never a figure the test checks


def _server(tmp_path_factory, **limits: object) -> InProcessServer:
    limits_config = FineTuneLimits(**limits)  # type: ignore[arg-type]
    return InProcessServer(tiny_config(tmp_path_factory.mktemp("store"), fine_tuning=limits_config))


@pytest.fixture(scope="module")
def patient(tmp_path_factory) -> Iterator[InProcessServer]:
    """Uploads may idle long; two upload slots per client of four; two watchers a job, three in all."""
    with _server(
        tmp_path_factory, max_uploads=4, max_uploads_per_peer=2, max_watchers_per_job=2, max_watchers=3
    ) as server:
        yield server


@pytest.fixture(scope="module")
def hasty(tmp_path_factory) -> Iterator[InProcessServer]:
    """An upload must send something every second, and be done within three."""
    with _server(tmp_path_factory, upload_idle_s=1.0, max_upload_s=3.0) as server:
        yield server


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


def config(name: str) -> pb.CreateJobRequest:
    return pb.CreateJobRequest(config=pb.FineTuneConfig(base_model=TINY, output_model=name, epochs=1))


def examples(count: int = 4) -> pb.CreateJobRequest:
    batch = [pb.Example(image=png(20 + 200 * (i % 2)), label="dark" if i % 2 == 0 else "light") for i in range(count)]
    return pb.CreateJobRequest(examples=pb.ExampleBatch(examples=batch))


def stalled(first: list[pb.CreateJobRequest], release: threading.Event) -> Iterator[pb.CreateJobRequest]:
    """``first``, then nothing until ``release`` (the client's side stays open meanwhile)."""
    yield from first
    release.wait(WAIT_S)


@contextmanager
def device_held(server: InProcessServer) -> Iterator[None]:
    """Jobs stay QUEUED while the test holds the only device."""
    jobs = server.server.jobs  # type: ignore[union-attr]
    device = server.call(jobs._devices.get())
    try:
        yield
    finally:
        jobs._devices.put_nowait(device)


# -- uploads --------------------------------------------------------------------------------------


def test_a_grpc_upload_that_stops_sending_is_ended_and_frees_its_slot(hasty, caplog) -> None:
    release = threading.Event()
    with grpc.insecure_channel(hasty.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as raised:
                stub.CreateJob(stalled([config("idle-grpc")], release), timeout=WAIT_S)
        finally:
            release.set()
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--upload-idle-seconds" in raised.value.details()
        # The slot is free: a whole upload goes through.
        job = stub.CreateJob(iter([config("idle-after"), examples()]), timeout=WAIT_S)
        assert job.examples == 4
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_a_grpc_upload_that_keeps_dribbling_meets_the_total_deadline(hasty) -> None:
    stop = threading.Event()

    def dribble() -> Iterator[pb.CreateJobRequest]:
        yield config("dribble")
        while not stop.wait(0.2):
            yield examples(1)

    with grpc.insecure_channel(hasty.target) as channel:
        try:
            with pytest.raises(grpc.RpcError) as raised:
                pb_grpc.FineTuningStub(channel).CreateJob(dribble(), timeout=WAIT_S)
        finally:
            stop.set()
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--max-upload-seconds" in raised.value.details()


def _multipart_head(boundary: str, length: int) -> bytes:
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_rest_upload_that_sends_only_its_config_is_ended(hasty) -> None:
    boundary = "xyz"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="config"\r\n\r\n'
        + json.dumps({"baseModel": TINY, "outputModel": "idle-rest", "epochs": 1})
        + f"\r\n--{boundary}\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", hasty.server.http_port), timeout=WAIT_S) as sock:
        sock.sendall(_multipart_head(boundary, len(part) + 10_000) + part)  # promises far more than it sends
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504"), answer[:300]
    assert "--upload-idle-seconds" in json.loads(body)["error"]


def test_one_client_holds_at_most_its_share_of_the_upload_slots(patient) -> None:
    release = threading.Event()
    with grpc.insecure_channel(patient.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        holders = [stub.CreateJob.future(stalled([config(f"hold-{i}")], release), timeout=WAIT_S) for i in range(2)]
        try:
            # Once both holders are in (the server counts their slots), a third upload from this
            # address is refused at once.
            jobs = patient.server.jobs  # type: ignore[union-attr]
            for _ in range(2400):  # at most WAIT_S
                if jobs._uploads == 2 or any(holder.done() for holder in holders):
                    break
                threading.Event().wait(0.05)
            assert not any(holder.done() for holder in holders) and jobs._uploads == 2
            with pytest.raises(grpc.RpcError) as raised:
                stub.CreateJob(iter([config("third")]), timeout=WAIT_S)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-job-uploads-per-peer" in raised.value.details()
        finally:
            release.set()
            for holder in holders:
                holder.cancel()
            for _ in range(2400):  # the server lets the slots go as it sees the cancellations
                if patient.server.jobs._uploads == 0:  # type: ignore[union-attr]
                    break
                threading.Event().wait(0.05)


def test_upload_slots_are_counted_per_client_address() -> None:
    from service.errors import QueueFullError
    from service.transport.limits import UploadPeers, peer_address

    assert peer_address("ipv4:10.0.0.7:53412") == "10.0.0.7"
    assert peer_address("ipv6:[::1]:5") == "::1"
    # gRPC percent-encodes an IPv6 peer's brackets: two connections of one client are one address.
    assert peer_address("ipv6:%5B2001:db8::7%5D:53412") == peer_address("ipv6:%5B2001:db8::7%5D:1") == "2001:db8::7"
    assert peer_address("unix:/run/vision.sock") == "unix:/run/vision.sock"
    peers = UploadPeers(1)
    with (
        peers.hold("ipv4:10.0.0.7:1"),
        peers.hold("ipv4:10.0.0.8:1"),
        pytest.raises(QueueFullError, match=r"10\.0\.0\.7"),
        peers.hold("ipv4:10.0.0.7:2"),
    ):
        pass
    with peers.hold("ipv4:10.0.0.7:3"):  # given back
        pass


# -- watchers -------------------------------------------------------------------------------------


def _sse_first_event(server: InProcessServer, job_id: str) -> tuple[socket.socket, bytes]:
    """An open Server-Sent Events stream of the job, once its first event has come."""
    sock = socket.create_connection(("127.0.0.1", server.server.http_port), timeout=WAIT_S)
    # Connection: close: a refusal ends the connection, so its whole answer is read.
    sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while b"}\n\n" not in answer:  # the first event, whole (chunked: framing follows it)
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return sock, answer


def _http_get(server: InProcessServer, path: str) -> tuple[int, str]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=WAIT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_watchers_are_capped_per_job_and_in_all_on_both_ports(patient, caplog) -> None:
    with grpc.insecure_channel(patient.target) as channel, device_held(patient):
        stub = pb_grpc.FineTuningStub(channel)
        first = stub.CreateJob(iter([config("watched-1"), examples()]), timeout=WAIT_S)
        second = stub.CreateJob(iter([config("watched-2"), examples()]), timeout=WAIT_S)
        grpc_watch = stub.WatchJob(pb.WatchJobRequest(job_id=first.id), timeout=WAIT_S)
        assert next(grpc_watch).kind == "queued"
        sse, opening = _sse_first_event(patient, first.id)
        try:
            assert b" 200 " in opening.split(b"\r\n")[0] and b"event: queued" in opening
            # The job's third watcher, on either port.
            with pytest.raises(grpc.RpcError) as raised:
                next(stub.WatchJob(pb.WatchJobRequest(job_id=first.id), timeout=WAIT_S))
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-job-watchers" in raised.value.details()
            status, body = _http_get(patient, f"/v1/jobs/{first.id}/events")
            assert status == 429 and "--max-job-watchers" in json.loads(body)["error"]
            # The server's fourth watcher, on either port.
            other = stub.WatchJob(pb.WatchJobRequest(job_id=second.id), timeout=WAIT_S)
            assert next(other).kind == "queued"
            with pytest.raises(grpc.RpcError) as raised:
                next(stub.WatchJob(pb.WatchJobRequest(job_id=second.id), timeout=WAIT_S))
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-watchers" in raised.value.details()
            status, body = _http_get(patient, f"/v1/jobs/{second.id}/events")
            assert status == 429 and "--max-watchers" in json.loads(body)["error"]
            # A watcher that goes away gives its place back.
            other.cancel()
            for _ in range(400):
                try:
                    again = stub.WatchJob(pb.WatchJobRequest(job_id=second.id), timeout=WAIT_S)
                    assert next(again).kind == "queued"
                    again.cancel()
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    threading.Event().wait(0.05)
            else:
                raise AssertionError("the cancelled watcher's place never came back")
        finally:
            sse.close()
            stub.CancelJob(pb.CancelJobRequest(job_id=first.id), timeout=WAIT_S)
            stub.CancelJob(pb.CancelJobRequest(job_id=second.id), timeout=WAIT_S)
        assert [event.kind for event in grpc_watch][-1] == "cancelled"
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_a_server_sent_events_watcher_whose_client_left_frees_its_place(patient, monkeypatch) -> None:
    """Between events the stream sends keep-alive comments; the first one after the client has gone
    fails, and the watcher's place is given back without waiting for the job's next event."""
    from service.transport.rest import vision_routes

    monkeypatch.setattr(vision_routes, "KEEPALIVE_S", 0.05)
    with grpc.insecure_channel(patient.target) as channel, device_held(patient):
        stub = pb_grpc.FineTuningStub(channel)
        job = stub.CreateJob(iter([config("left"), examples()]), timeout=WAIT_S)
        try:
            watchers = [_sse_first_event(patient, job.id) for _ in range(2)]
            for _, opening in watchers:
                assert b"event: queued" in opening
            status, body = _http_get(patient, f"/v1/jobs/{job.id}/events")
            assert status == 429 and "--max-job-watchers" in json.loads(body)["error"]
            between = b""
            while b": keep-alive" not in between:  # the stream stays open, with comments between events
                between += watchers[0][0].recv(65536)
            watchers[0][0].close()
            for _ in range(2400):  # at most WAIT_S
                sock, opening = _sse_first_event(patient, job.id)
                sock.close()
                if b"event: queued" in opening:
                    break
                assert b" 429 " in opening.split(b"\r\n")[0]
                threading.Event().wait(0.05)
            else:
                raise AssertionError("the departed watcher's place never came back")
        finally:
            watchers[1][0].close()
            stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=WAIT_S)
