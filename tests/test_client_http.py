"""The SDK on either port: every method over gRPC and over HTTP, with equal results and errors.

One in-process server answers both ports; each test body runs once with a client of its gRPC
address and once with a client of its HTTP URL (``http://127.0.0.1:<port>``), for both twins
(``Client`` and ``AsyncClient``), and the two outcomes are compared: equal results, equal
exception types and codes. Then what only the HTTP binding has to get right on its own: the
multipart upload that must never end as if whole, retries and deadlines from HTTP failures,
tokens, ``traceparent``, and ``vision-client --url``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.config import BatchingConfig
from tests import client_util
from tests.client_util import collect, connect, inprocess_server, result, run, vision_client
from tests.conftest import TOKEN, free_port
from tests.inprocess import InProcessServer
from tests.support.finetune_data import digits
from vision_client import (
    AuthenticationError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    FineTuneConfig,
    InvalidInputError,
    ModelNotFoundError,
    Retry,
    UnavailableError,
    VisionClientError,
)
from vision_client.errors import HttpStatusError

MODEL = "alexnet"
FAST_RETRY = Retry(attempts=3, backoff=0.001, max_backoff=0.01)
Body = Callable[[Any], Coroutine[Any, Any, Any]]


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def both_ports(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[InProcessServer]:
    """An AlexNet server with a model store, on a gRPC port and an HTTP port."""
    batching = BatchingConfig(max_batch_size=16, max_queue_delay_ms=5)
    with inprocess_server(tmp_path_factory.mktemp("both-ports"), weights_dir, batching=batching) as started:
        yield started


def targets(server: InProcessServer) -> dict[str, str]:
    return {"grpc": server.target, "http": server.http_url}


def outcome(kind: str, target: str, body: Body, **options: Any) -> Any:
    """What ``body(client)`` returns, or the exception it raises."""

    async def main() -> Any:
        async with connect(kind, target, **options) as client:
            return await body(client)

    try:
        return run(main())
    except Exception as error:
        return error


def on_both(server: InProcessServer, kind: str, body: Body, **options: Any) -> tuple[Any, Any]:
    """``body``'s outcome over gRPC and over HTTP."""
    found = {binding: outcome(kind, target, body, **options) for binding, target in targets(server).items()}
    return found["grpc"], found["http"]


def assert_same_error(over_grpc: Any, over_http: Any, expected: type[VisionClientError]) -> None:
    assert isinstance(over_grpc, expected), over_grpc
    assert type(over_http) is type(over_grpc), (over_grpc, over_http)
    assert over_http.code == over_grpc.code
    assert over_http.message == over_grpc.message
    assert isinstance(over_http.__cause__, HttpStatusError) and isinstance(over_http.__cause__, grpc.RpcError)


# -- every method, equal on both bindings ------------------------------------------------------


def test_health_and_models_are_equal(both_ports, kind):
    async def body(client: Any) -> Any:
        return (
            await result(client.live()),
            await result(client.ready()),
            await result(client.ready(MODEL)),
            await result(client.models()),
            await result(client.models(labels=False)),
            await result(client.model(MODEL)),
        )

    over_grpc, over_http = on_both(both_ports, kind, body)
    assert not isinstance(over_http, BaseException), over_http
    assert over_grpc == over_http
    live, ready, model_ready, models, bare, one = over_http
    assert live and ready and model_ready
    assert [m.name for m in models] == [MODEL] and len(models[0].labels) == 1000 and bare[0].labels == ()
    assert one == models[0]


def test_classify_and_logits_are_equal(both_ports, kind, photos):
    images = [photos["china"], photos["flower"], photos["china-crop"]]

    async def body(client: Any) -> Any:
        return (
            await result(client.logits(images, model=MODEL)),
            await result(client.classify(images, model=MODEL, top_k=5)),
            await result(client.classify(photos["flower"], model=MODEL, top_k=1)),
        )

    over_grpc, over_http = on_both(both_ports, kind, body)
    assert not isinstance(over_http, BaseException), over_http
    logits_grpc, top_grpc, one_grpc = over_grpc
    logits_http, top_http, one_http = over_http
    assert logits_http.dtype == np.float32 and logits_http.shape == (3, 1000)
    # The same server computes both; only the batch each request shared may differ.
    assert np.allclose(logits_http, logits_grpc, rtol=1e-5, atol=1e-5)
    for row_grpc, row_http in zip(top_grpc + one_grpc, top_http + one_http, strict=True):
        assert [(p.label, p.index) for p in row_http] == [(p.label, p.index) for p in row_grpc]
        assert [p.score for p in row_http] == pytest.approx([p.score for p in row_grpc], abs=1e-5)


def test_split_calls_are_equal(both_ports, kind, photos):
    """Calls cut into several requests (max_message_bytes) send each over HTTP as over gRPC."""
    images = [photos["china"], photos["flower"], photos["china-crop"], photos["flower-crop"]]
    limit = max(len(image) for image in images) + 4096

    async def body(client: Any) -> Any:
        return await result(client.logits(images, model=MODEL))

    over_grpc, over_http = on_both(both_ports, kind, body, max_message_bytes=limit)
    assert over_http.shape == (4, 1000)
    assert np.allclose(over_http, over_grpc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda c, p: c.classify(p["flower"], model="no-such-model"), ModelNotFoundError),
        (lambda c, p: c.logits(b"this is not an image", model=MODEL), InvalidInputError),
        (lambda c, p: c.ready("no-such-model"), ModelNotFoundError),
        (lambda c, p: c.model("no-such-model"), ModelNotFoundError),
        (lambda c, p: c.job("no-such-job"), ModelNotFoundError),
        (lambda c, p: c.cancel_job("no-such-job"), ModelNotFoundError),
        (lambda c, p: c.delete_model("no-such-model"), ModelNotFoundError),
        (lambda c, p: c.delete_model(MODEL), InvalidInputError),
        (lambda c, p: collect(c.watch_job("no-such-job")), ModelNotFoundError),
        (lambda c, p: c.create_job(FineTuneConfig("no-such-model", "x"), [(p["flower"], "a")]), ModelNotFoundError),
        (lambda c, p: c.create_job(FineTuneConfig(MODEL, MODEL), [(p["flower"], "a")]), InvalidInputError),
        (lambda c, p: c.create_job(FineTuneConfig(MODEL, "one"), [(p["flower"], "a")]), InvalidInputError),
        (lambda c, p: c.create_job(FineTuneConfig(MODEL, "bad"), [(b"not an image", "a")] * 4), InvalidInputError),
    ],
    ids=[
        "classify-unknown-model",
        "logits-of-garbage",
        "ready-unknown-model",
        "model-unknown",
        "job-unknown",
        "cancel-unknown",
        "delete-unknown",
        "delete-builtin",
        "watch-unknown",
        "job-unknown-base",
        "job-builtin-name",
        "job-one-example",
        "job-undecodable",
    ],
)
def test_errors_are_equal(both_ports, kind, photos, call, expected):
    async def body(client: Any) -> Any:
        return await result(call(client, photos))

    over_grpc, over_http = on_both(both_ports, kind, body, retries=0)
    assert_same_error(over_grpc, over_http, expected)


def test_a_deadline_is_the_same_error(both_ports, kind, photos):
    async def body(client: Any) -> Any:
        await result(client.model(MODEL))  # labels cached: the call below is one ModelInfer
        return await result(client.logits([photos["china"]] * 8, model=MODEL, timeout=0.001))

    over_grpc, over_http = on_both(both_ports, kind, body, retries=FAST_RETRY)
    assert isinstance(over_grpc, DeadlineExceededError), over_grpc
    assert isinstance(over_http, DeadlineExceededError), over_http
    assert over_http.code is over_grpc.code is grpc.StatusCode.DEADLINE_EXCEEDED


# -- fine-tuning -------------------------------------------------------------------------------


def training_set(count: int = 60) -> list[tuple[bytes, str]]:
    images, labels = digits()
    return [(image, str(label)) for image, label in zip(images[:count], labels[:count], strict=True)]


def test_fine_tuning_is_equal(both_ports, kind):
    """A job over each binding: the same events (live, over SSE on HTTP), the same result, a
    model served and deleted alike."""
    examples = training_set()

    def body_for(binding: str) -> Body:
        async def body(client: Any) -> Any:
            name = f"digits-{kind}-{binding}"
            config = FineTuneConfig(MODEL, name, epochs=3, seed=7, replace=True)
            seen: list[Any] = []
            done = await result(client.fine_tune(config, examples, on_event=seen.append, timeout=None))
            predictions = await result(client.classify([image for image, _ in examples[:4]], model=name, top_k=2))
            listed = [job.id for job in await result(client.jobs())]
            job = await result(client.job(done.job_id))
            await result(client.delete_model(name))
            try:
                await result(client.model(name))
            except ModelNotFoundError:
                gone = True
            else:
                gone = False
            return done, seen, predictions, done.job_id in listed, job, gone

        return body

    over_grpc = outcome(kind, both_ports.target, body_for("grpc"))
    over_http = outcome(kind, both_ports.http_url, body_for("http"))
    assert not isinstance(over_http, BaseException), over_http
    assert not isinstance(over_grpc, BaseException), over_grpc
    for done, seen, _, listed, job, gone in (over_grpc, over_http):
        assert done.succeeded and listed and gone
        assert list(done.events) == seen and seen[-1].terminal
        assert job.state == "succeeded" and job.id == done.job_id
    done_grpc, seen_grpc, top_grpc = over_grpc[:3]
    done_http, seen_http, top_http = over_http[:3]
    assert [(e.kind, e.epoch, e.state) for e in seen_http] == [(e.kind, e.epoch, e.state) for e in seen_grpc]
    assert done_http.labels == done_grpc.labels and done_http.job.examples == done_grpc.job.examples
    assert replace(done_http.job.config, output_model="x") == replace(done_grpc.job.config, output_model="x")
    assert done_http.metrics.epochs_run == done_grpc.metrics.epochs_run
    assert done_http.metrics.train_loss == pytest.approx(done_grpc.metrics.train_loss, rel=1e-3)
    assert [[p.label for p in row] for row in top_http] == [[p.label for p in row] for row in top_grpc]


def test_create_watch_and_cancel_are_equal(both_ports, kind):
    examples = training_set(40)

    def body_for(binding: str) -> Body:
        async def body(client: Any) -> Any:
            config = FineTuneConfig(MODEL, f"cancelled-{kind}-{binding}", epochs=200, replace=True)
            job = await result(client.create_job(config, examples))
            events = []
            iterator = client.watch_job(job.id)
            if hasattr(iterator, "__aiter__"):
                async for event in iterator:
                    events.append(event)
                    if event.kind == "epoch":
                        await client.cancel_job(job.id)
            else:
                for event in iterator:
                    events.append(event)
                    if event.kind == "epoch":
                        client.cancel_job(job.id)
            final = await result(client.job(job.id))
            again = await result(client.cancel_job(job.id))  # a finished job is left as it is
            replay = await collect(client.watch_job(job.id))  # every event again, from the start
            return (
                job.state,
                events[-1].state,
                final.state,
                again.state,
                [e.kind for e in replay] == [e.kind for e in events],
            )

        return body

    over_grpc = outcome(kind, both_ports.target, body_for("grpc"))
    over_http = outcome(kind, both_ports.http_url, body_for("http"))
    assert over_grpc == over_http == ("queued", "cancelled", "cancelled", "cancelled", True)


def test_an_upload_that_fails_creates_no_job(both_ports, kind, photos, tmp_path):
    """An example that cannot be read stops the upload: over HTTP the body is cut short (never
    ended as if whole), so the server makes no job, as over gRPC."""
    examples = [(photos["flower"], "a"), (photos["china"], "b")] * 3 + [(tmp_path / "missing.jpg", "a")]

    async def body(client: Any) -> Any:
        before = len(await result(client.jobs()))
        try:
            await result(client.create_job(FineTuneConfig(MODEL, "never-made", replace=True), examples))
        except Exception as error:
            failure = error
        else:
            failure = None
        return failure, len(await result(client.jobs())) - before

    over_grpc, over_http = on_both(both_ports, kind, body)
    assert type(over_http[0]) is type(over_grpc[0]) and over_grpc[0] is not None
    assert isinstance(over_http[0], (OSError, VisionClientError))
    assert over_grpc[1] == over_http[1] == 0


def test_regression_jobs_need_grpc(both_ports, kind, photos):
    async def body(client: Any) -> Any:
        config = FineTuneConfig(MODEL, "regression", loss="mse")
        await result(client.create_job(config, [(photos["flower"], [0.5]), (photos["china"], [1.0])]))

    error = outcome(kind, both_ports.http_url, body)
    assert isinstance(error, InvalidInputError) and "gRPC" in str(error)


# -- what HTTP must get right on its own ----------------------------------------------------------


def retry_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vision_client" and r.getMessage().startswith("retry")]


def test_unreachable_url_is_retried_then_unavailable(kind, caplog, photos):
    caplog.set_level(logging.INFO, logger="vision_client")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens

    async def listing(client: Any) -> Any:
        return await result(client.jobs())

    async def creating(client: Any) -> Any:
        return await result(client.create_job(FineTuneConfig(MODEL, "never"), [(photos["flower"], "a")] * 2))

    error = outcome(kind, url, listing, retries=FAST_RETRY)
    assert isinstance(error, UnavailableError) and error.code is grpc.StatusCode.UNAVAILABLE
    assert isinstance(error.__cause__, HttpStatusError) and error.__cause__.http_status is None
    assert [m.split(" of ")[0] for m in retry_messages(caplog)] == ["retry 1", "retry 2", "retry 3"]
    caplog.clear()
    assert isinstance(outcome(kind, url, creating, retries=FAST_RETRY), UnavailableError)
    assert retry_messages(caplog) == []  # never retried: a lost answer must not create two jobs


def test_urls_and_their_options(both_ports):
    with Client(both_ports.http_url + "/") as client:
        assert client.live()
    with pytest.raises(ValueError, match="https://"):
        Client("http://127.0.0.1:8000", tls=True)
    with pytest.raises(ValueError, match="plain HTTP"):
        Client("https://127.0.0.1:8000", tls=False)
    with pytest.raises(ValueError, match="plaintext"):
        Client("http://vision.example.com:8000", token="secret")
    Client("https://vision.example.com", token="secret").close()  # TLS: the token may go
    Client("http://localhost:8000", token="secret").close()  # loopback
    with pytest.raises(ValueError, match="port"):
        Client("http://127.0.0.1:99999")
    # A URL that is not the server's HTTP port says so.
    with (
        Client(both_ports.http_url + "/not-the-api", retries=0) as client,
        pytest.raises(VisionClientError, match="HTTP port"),
    ):
        client.live()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[InProcessServer]:
    with client_util.token_server(tmp_path_factory.mktemp("token-server"), weights_dir) as started:
        yield started


def test_the_token_goes_with_every_call(token_server, kind):
    async def listing(client: Any) -> Any:
        return await result(client.jobs())

    async def watching(client: Any) -> Any:
        return await collect(client.watch_job("no-such-job"))

    for body in (listing, watching):
        over_grpc, over_http = on_both(token_server, kind, body)
        assert_same_error(over_grpc, over_http, AuthenticationError)
        over_grpc, over_http = on_both(token_server, kind, body, token="wrong-token")
        assert_same_error(over_grpc, over_http, AuthenticationError)
    assert isinstance(outcome(kind, token_server.http_url, listing, token=TOKEN), list)
    assert isinstance(outcome(kind, token_server.http_url, watching, token=TOKEN), ModelNotFoundError)


# -- traceparent ---------------------------------------------------------------------------------


class _Recorded:
    """What a recording server saw: each ServerLive call's headers (gRPC metadata or HTTP)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []


@pytest.fixture
def recording_servers() -> Iterator[tuple[dict[str, str], _Recorded]]:
    """A gRPC and an HTTP server on loopback that answer ServerLive and record its headers:
    the SDK's wire output, seen from the other end."""
    from concurrent import futures
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

    recorded = _Recorded()

    def live(request: Any, context: grpc.ServicerContext) -> Any:
        recorded.calls.append(dict(context.invocation_metadata()))
        return pb.ServerLiveResponse(live=True)

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ServerLive": grpc.unary_unary_rpc_method_handler(
                live,
                request_deserializer=pb.ServerLiveRequest.FromString,
                response_serializer=pb.ServerLiveResponse.SerializeToString,
            )
        },
    )
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()

    class Live(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            recorded.calls.append({key.lower(): value for key, value in self.headers.items()})
            body = b'{"live": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http_server = ThreadingHTTPServer(("127.0.0.1", 0), Live)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_server.server_port}"}, recorded
    finally:
        http_server.shutdown()
        http_server.server_close()
        grpc_server.stop(None)


@pytest.mark.parametrize("binding", ["grpc", "http"])
def test_traceparent_goes_with_the_callers_span(recording_servers, kind, binding):
    trace = pytest.importorskip("opentelemetry.trace")
    addresses, recorded = recording_servers
    context = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )

    async def traced(client: Any) -> Any:
        with trace.use_span(trace.NonRecordingSpan(context)):
            return await result(client.live())

    async def untraced(client: Any) -> Any:
        return await result(client.live())

    assert outcome(kind, addresses[binding], traced, token="secret") is True
    assert outcome(kind, addresses[binding], untraced, token="secret") is True
    with_span, without = recorded.calls
    assert with_span["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert with_span["authorization"] == without["authorization"] == "Bearer secret"
    assert "traceparent" not in without


# -- the command line --------------------------------------------------------------------------


def cli_json(*args: str) -> Any:
    done = vision_client(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_commands_with_url(both_ports, photos, tmp_path):
    """Every command of ``vision-client`` with ``--url http://...`` answers as with ``--target``."""
    image = tmp_path / "flower.jpg"
    image.write_bytes(photos["flower"])
    addresses = (("--target", both_ports.target), ("--url", both_ports.http_url))

    classified = [cli_json(*address, "classify", str(image), "-m", MODEL, "-k", "3") for address in addresses]
    (over_grpc,), (over_http,) = classified
    assert [p["index"] for p in over_http["predictions"]] == [p["index"] for p in over_grpc["predictions"]]
    scores = [p["score"] for p in over_grpc["predictions"]]
    assert [p["score"] for p in over_http["predictions"]] == pytest.approx(scores, abs=1e-5)

    for command in ("models", "jobs"):
        over_grpc, over_http = (cli_json(*address, command) for address in addresses)
        assert over_http == over_grpc
    over_grpc, over_http = (cli_json(*address, "health") for address in addresses)
    assert over_http["models"] == over_grpc["models"] and over_http["ready"] is True
    assert over_http["target"] == both_ports.http_url

    # fine-tune (its events arrive over SSE), cancel of the finished job, delete-model
    root = tmp_path / "digits"
    for n, (png, label) in enumerate(training_set(30)):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{n}.png").write_bytes(png)
    trained = {}
    for option, address in addresses:
        name = f"cli-{option.strip('-')}"
        done = vision_client(
            option, address, "fine-tune", str(root), "--base", MODEL, "--output", name, "--epochs", "2"
        )
        assert done.returncode == 0, done.stderr
        assert "epoch 2/2" in done.stderr and f"{name} is served" in done.stdout
        (job,) = [j for j in cli_json(option, address, "jobs") if j["output_model"] == name]
        trained[option] = job
        cancelled = cli_json(option, address, "cancel", job["job_id"])
        assert cancelled["state"] == "succeeded"  # finished: left as it was
        deleted = vision_client(option, address, "delete-model", name)
        assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {name}", deleted.stderr
    assert trained["--url"]["labels"] == trained["--target"]["labels"]
    assert trained["--url"]["examples"] == trained["--target"]["examples"] == 30

    # errors: one clean line, the same message
    failures = [vision_client(*address, "classify", str(image), "-m", "no-such-model") for address in addresses]
    assert [f.returncode for f in failures] == [1, 1]
    assert failures[1].stderr == failures[0].stderr and "no-such-model" in failures[0].stderr
    unreachable = vision_client("--url", f"http://127.0.0.1:{free_port()}", "--timeout", "5", "health")
    assert unreachable.returncode == 1 and unreachable.stderr.startswith("vision-client: error: ")
    assert "Traceback" not in unreachable.stderr


# -- HTTPS, and a server without fine-tuning --------------------------------------------------------


def test_https_with_mutual_tls(serve_inprocess, kind, tmp_path):
    """``https://`` takes the TLS options the gRPC binding takes (paths or PEM bytes), and is
    refused alike without the client certificate the server wants."""
    pytest.importorskip("cryptography", reason="cryptography comes with the [test] extra")
    from tests.certs import CertificateAuthority, write_pair

    ca = CertificateAuthority("https CA")
    server_cert, server_key = write_pair(tmp_path / "server", ca.issue("localhost", server=True), "server")
    pair = ca.issue("sdk", server=False)
    client_cert, client_key = write_pair(tmp_path / "client", pair, "client")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    server = serve_inprocess(tls_cert_file=server_cert, tls_key_file=server_key, tls_client_ca_file=ca_file)
    url = server.http_url.replace("http://", "https://")

    async def body(client: Any) -> Any:
        return await result(client.live()), [m.name for m in await result(client.models(labels=False))]

    mtls = {"root_certificates": ca_file, "client_certificate": client_cert, "client_key": client_key}
    assert outcome(kind, url, body, **mtls) == (True, [MODEL])
    as_bytes = {"root_certificates": ca.pem, "client_certificate": pair.cert, "client_key": pair.key}
    assert outcome(kind, url, body, **as_bytes) == outcome(kind, server.target, body, **as_bytes) == (True, [MODEL])
    over_grpc = outcome(kind, server.target, body, root_certificates=ca_file, retries=0)
    over_http = outcome(kind, url, body, root_certificates=ca_file, retries=0)
    assert isinstance(over_grpc, UnavailableError) and isinstance(over_http, UnavailableError), (over_grpc, over_http)
    untrusted = outcome(kind, url, body, retries=0)  # the system's roots do not know this CA
    assert isinstance(untrusted, UnavailableError) and "certificate" in str(untrusted).lower()

    command = ["--url", url, "--tls-ca", str(ca_file), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]
    health = vision_client(*command, "health", "--json")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["models"][MODEL]["ready"] is True


def test_fine_tuning_switched_off_is_the_same_error(serve_inprocess, kind, photos):
    server = serve_inprocess(model_store=None)

    async def body(client: Any) -> Any:
        return await result(client.create_job(FineTuneConfig(MODEL, "off"), [(photos["flower"], "a")] * 2))

    over_grpc, over_http = on_both(server, kind, body)
    assert_same_error(over_grpc, over_http, FailedPreconditionError)


def test_unload_and_load_are_equal(serve_inprocess, kind, photos):
    """RepositoryModelUnload and RepositoryModelLoad through the SDK, over each binding in turn,
    on a server of the test's own."""
    server = serve_inprocess()

    async def cycle(client: Any) -> Any:
        await result(client.unload_model(MODEL))
        unloaded = (await result(client.ready(MODEL)), (await result(client.model(MODEL))).ready)
        try:
            await result(client.classify(photos["flower"], model=MODEL))
        except VisionClientError as error:
            refused = type(error)
        await result(client.load_model(MODEL, timeout=240))
        loaded = (await result(client.ready(MODEL)), (await result(client.model(MODEL))).ready)
        top = await result(client.classify(photos["flower"], model=MODEL, top_k=1))
        return unloaded, refused, loaded, top[0][0].index

    async def unknown(client: Any) -> Any:
        return await result(client.load_model("no-such-model"))

    over_grpc, over_http = on_both(server, kind, cycle)
    assert over_grpc == over_http, (over_grpc, over_http)
    assert over_http[0] == (False, False) and over_http[2] == (True, True)
    assert issubclass(over_http[1], VisionClientError)
    assert_same_error(*on_both(server, kind, unknown, retries=0), ModelNotFoundError)


# -- the REST encoding against the server's own codec (no server) ------------------------------------


def test_infer_bodies_are_what_the_server_parses_and_writes(photos):
    """The SDK's inference body is parsed by the server's REST codec into the very request the
    gRPC binding sends, and the server's binary answer reads back into its gRPC response."""
    from service.transport.rest import codec
    from vision_client import _protocol as proto
    from vision_client.protocol import rest
    from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

    request = proto.infer_request(MODEL, [photos["flower"], photos["china"]])
    request.parameters["classification"].int64_param = 3
    built = rest.request_for(proto.MODEL_INFER.path, request, timeout=2.5)
    assert built.method == "POST" and built.path == f"/v2/models/{MODEL}/infer"
    parsed = codec.parse_infer_body(built.body, built.headers[rest.HEADER_LENGTH], MODEL, "")
    assert parsed.timeout_s == 2.5
    # What only the REST form says: a gRPC call's deadline, and where the binary data lies.
    del parsed.message.parameters["timeout"]
    del parsed.message.inputs[0].parameters["binary_data_size"]
    del parsed.message.outputs[0].parameters["binary_data"]
    assert parsed.message == request
    assert parsed.binary_outputs == {"LOGITS"}

    logits = np.arange(2 * 5, dtype="<f4").reshape(2, 5)
    response = pb.ModelInferResponse(model_name=MODEL, model_version="1", id="x")
    response.outputs.add(name="LOGITS", datatype="FP32", shape=[2, 5])
    response.raw_output_contents.append(logits.tobytes())
    for wanted in (parsed, codec.RestInferRequest(parsed.message, frozenset(), False, None)):  # binary, then JSON
        body, length = codec.build_infer_body(response, wanted)
        headers = {} if length is None else {rest.HEADER_LENGTH: str(length)}
        assert rest.response_for(proto.MODEL_INFER.path, body, headers) == response
        assert np.array_equal(proto.parse_logits(rest.infer_response(body, headers), 2), logits)


def test_server_sent_events_are_read_as_the_standard_says():
    from google.protobuf import json_format

    from vision_client.protocol import rest
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb

    first = ft_pb.JobEvent(job_id="j", kind="epoch", epoch=2, train_loss=0.5)
    second = ft_pb.JobEvent(job_id="j", kind="succeeded", progress=1.0)
    text = json_format.MessageToJson(first, indent=None)
    stream = (
        ": keep-alive\n\n"
        f"event: epoch\ndata: {text}\n\n"
        ": keep-alive\n\nretry: 10\n\n"
        'event: succeeded\ndata: {"jobId": "j",\n'  # one event's data over two lines
        'data:  "kind": "succeeded", "progress": 1.0, "futureField": 1}\r\n\r\n'
    )
    events = rest.EventStream()
    found = [event for line in stream.splitlines(keepends=True) if (event := events.feed(line)) is not None]
    assert found == [first, second]
    for data in ("{not json", "[1, 2]", '{"epoch": "many"}'):
        broken = rest.EventStream()
        assert broken.feed(f"data: {data}") is None
        with pytest.raises(ValueError, match="not a JobEvent"):
            broken.feed("")


def test_job_uploads_are_multipart_the_server_reads(photos):
    """Class names with quotes and line breaks are escaped as browsers escape them, which the
    server's field_name decodes; names that would read back differently are refused."""
    from vision_client import _protocol as proto
    from vision_client.protocol import rest, to_message

    config = to_message(FineTuneConfig(MODEL, "quoted"))
    labels = ['say "cheese"', "two\nlines", "üñï"]
    messages = proto.create_job_requests(
        config, [(photos["flower"], label) for label in labels], max_message_bytes=2**26
    )
    body = b"".join(rest.job_parts(messages, "b0undary"))
    assert b'name="say %22cheese%22"' in body and b'name="two%0Alines"' in body
    assert 'name="üñï"'.encode() in body and body.endswith(b"--b0undary--\r\n")
    sneaky = proto.create_job_requests(config, [(photos["flower"], "100%22 sure")], max_message_bytes=2**26)
    with pytest.raises(InvalidInputError, match="%22"):
        b"".join(rest.job_parts(sneaky, "b0undary"))
