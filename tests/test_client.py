"""The Python SDK (``vision_client``) against real servers.

The servers run in the test process (``tests.client_util.inprocess_server``): the SDK
reaches them over loopback gRPC as it would any other. The command line and the
README's examples run as processes. Every behaviour is checked for both twins,
``Client`` and ``AsyncClient``, with one test body (``tests.client_util``). Retries,
tokens, deadlines and balancing are shown against real servers too: one that starts
after the client's first attempts, one with a token file, one whose batches wait
longer than the client's deadline, and two behind one target.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from service.config import BatchingConfig
from tests import client_util
from tests.client_util import collect, connect, inprocess_server, readme_examples, result, run, vision_client
from tests.conftest import STARTUP_TIMEOUT_S, TOKEN, cosine, encode, free_port, load_reference, session_runtime_cache
from tests.dns_util import DnsServer
from tests.inprocess import InProcessServer
from tests.metrics_util import sample_value as metric
from tests.metrics_util import scrape
from tests.tiny import TINY
from vision_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ClientClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    FineTuneConfig,
    InvalidInputError,
    ModelNotFoundError,
    Retry,
    UnavailableError,
    VisionClientError,
)
from vision_client._retry import Attempts

MODEL = "alexnet"


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[InProcessServer]:
    """An AlexNet server whose batches wait up to 50 ms for up to 16 images."""
    batching = BatchingConfig(max_batch_size=16, max_queue_delay_ms=50)
    with inprocess_server(tmp_path_factory.mktemp("server"), weights_dir, batching=batching) as started:
        yield started


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[InProcessServer]:
    with client_util.token_server(tmp_path_factory.mktemp("token-server"), weights_dir) as started:
        yield started


@dataclass
class Inputs:
    """One image of each accepted kind, and the PIL image the reference model sees for each."""

    images: list[Any]
    seen: list[Image.Image]


@pytest.fixture(scope="module")
def inputs(photos: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    path = tmp_path_factory.mktemp("images") / "china.jpg"
    path.write_bytes(photos["china"])
    pil = Image.open(io.BytesIO(photos["china-crop"]))
    array = np.asarray(Image.open(io.BytesIO(photos["flower-crop"])).convert("RGB"))
    return Inputs(
        images=[path, photos["flower"], pil, array],
        seen=[
            Image.open(path),
            Image.open(io.BytesIO(photos["flower"])),
            Image.open(io.BytesIO(photos["china-crop"])),
            Image.fromarray(array),
        ],
    )


@pytest.fixture(scope="module")
def reference(weights_dir: Path):
    """Logits [N, C] of the torchvision model with the server's weights, for PIL images."""
    import torch
    from torchvision.models import AlexNet_Weights

    model = load_reference(weights_dir, MODEL)
    transforms = AlexNet_Weights.DEFAULT.transforms()

    def logits(images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.stack([transforms(image.convert("RGB")) for image in images])).numpy()

    return logits


@pytest.fixture(scope="module")
def expected(inputs: Inputs, reference) -> np.ndarray:
    return reference(inputs.seen)


@pytest.fixture(scope="module")
def categories() -> list[str]:
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.DEFAULT.meta["categories"]


def noise_png(seed: int, side: int = 180) -> bytes:
    """A PNG of random pixels: incompressible, so about side*side*3 bytes (~97 KB at 180)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


# -- inference ----------------------------------------------------------------------------


def test_classify_each_kind_of_image_matches_torchvision(sdk_server, kind, inputs, expected, categories):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            many = await result(client.classify(inputs.images, model=MODEL, top_k=5))
            one = await result(client.classify(inputs.images[0], model=MODEL, top_k=3))
            return many, one

    many, one = run(body())
    assert len(many) == len(inputs.images)  # path, bytes, PIL image, numpy array
    for predictions, logits in zip(many, expected, strict=True):
        assert len(predictions) == 5
        assert predictions[0].index == int(logits.argmax())
        assert [p.index for p in predictions] == [int(i) for i in np.argsort(-logits, kind="stable")[:5]]
        assert all(p.label == categories[p.index] for p in predictions)
        scores = [p.score for p in predictions]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 < s <= 1.0 for s in scores)
    # One image (not in a list) gives a list of one list.
    assert len(one) == 1 and len(one[0]) == 3
    assert one[0][0].index == many[0][0].index


def test_logits_equal_torchvision(sdk_server, kind, inputs, expected):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            return await result(client.logits(inputs.images, model=MODEL))

    logits = run(body())
    assert logits.shape == (len(inputs.images), 1000) and logits.dtype == np.float32
    for row, reference_row in zip(logits, expected, strict=True):
        assert cosine(row, reference_row) > 0.999


def test_scores_are_softmax_probabilities(sdk_server, kind, photos):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            every = await result(client.classify(photos["flower"], model=MODEL, top_k=1000))
            top = await result(client.classify(photos["flower"], model=MODEL, top_k=5))
            logits = await result(client.logits(photos["flower"], model=MODEL))
            return every[0], top[0], logits[0]

    every, top, logits = run(body())
    scores = np.array([p.score for p in every])
    assert sorted(p.index for p in every) == list(range(1000))
    assert scores.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(scores) <= 0)  # best first
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    probabilities = shifted / shifted.sum()
    assert np.allclose(scores, probabilities[[p.index for p in every]], atol=1e-5)
    assert [p.index for p in top] == [p.index for p in every[:5]]


def test_unknown_model_raises_model_not_found(sdk_server, kind, photos):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            await result(client.classify(photos["flower"], model="no-such-model"))

    with pytest.raises(ModelNotFoundError) as caught:
        run(body())
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in str(caught.value) and str(caught.value) == caught.value.message
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_garbage_bytes_raise_invalid_input(sdk_server, kind):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            await result(client.classify(b"this is not an image", model=MODEL))

    with pytest.raises(VisionClientError) as caught:
        run(body())
    assert isinstance(caught.value, InvalidInputError)
    assert not isinstance(caught.value, ModelNotFoundError)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_bad_arguments_fail_before_sending(kind):
    # Nothing listens on the target: these must fail on the client, without a call.
    async def body(images: Any, top_k: int = 5):
        async with connect(kind, f"127.0.0.1:{free_port()}", retries=0) as client:
            await result(client.classify(images, model=MODEL, top_k=top_k))

    with pytest.raises(TypeError, match="cannot send a int"):
        run(body(12))
    with pytest.raises(InvalidInputError, match="uint8"):
        run(body(np.zeros((8, 8, 3), dtype=np.float32)))
    with pytest.raises(InvalidInputError, match="top_k"):
        run(body(b"\x89PNG", top_k=0))


def test_concurrent_async_calls_are_batched_by_the_server(sdk_server, photos):
    images = [photos[name] for name in ("china", "flower", "china-crop", "flower-crop")] * 6

    async def body():
        async with AsyncClient(sdk_server.target) as client:
            await client.model(MODEL)  # labels cached, so that the calls below are all ModelInfer
            return await asyncio.gather(*(client.classify(image, model=MODEL, top_k=1) for image in images))

    before = scrape(sdk_server.metrics_url)
    results = run(body())
    after = scrape(sdk_server.metrics_url)
    assert len(results) == 24 and all(len(r) == 1 and len(r[0]) == 1 for r in results)
    images_run = metric(after, "vision_inference_images_total", model=MODEL) - metric(
        before, "vision_inference_images_total", model=MODEL
    )
    batches = metric(after, "vision_batches_total", model=MODEL) - metric(before, "vision_batches_total", model=MODEL)
    assert images_run == 24
    assert 1 <= batches < images_run


def test_large_calls_are_split_into_requests_that_fit(sdk_server, kind):
    images = [noise_png(seed) for seed in range(5)]
    assert all(90_000 < len(image) < 110_000 for image in images)
    limit = 200_000  # two images per request at most, so at least three requests

    async def body():
        async with connect(kind, sdk_server.target) as whole:
            unsplit = await result(whole.logits(images, model=MODEL))
        before = scrape(sdk_server.metrics_url)
        async with connect(kind, sdk_server.target, max_message_bytes=limit) as small:
            split = await result(small.logits(images, model=MODEL))
            top = await result(small.classify(images, model=MODEL, top_k=1))
        return unsplit, split, top, before, scrape(sdk_server.metrics_url)

    unsplit, split, top, before, after = run(body())
    requests = metric(after, "vision_requests_total", model=MODEL, status="OK") - metric(
        before, "vision_requests_total", model=MODEL, status="OK"
    )
    assert requests >= 2 * 3  # logits and classify, each split in at least three
    assert split.shape == (5, 1000)
    # In order: each row is its own image's, and the images' rows differ from each other.
    assert np.allclose(split, unsplit, rtol=1e-3, atol=1e-4)
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.allclose(unsplit[i], unsplit[j], rtol=1e-3, atol=1e-4)
    assert [r[0].index for r in top] == [int(row.argmax()) for row in split]


def test_an_image_larger_than_a_message_is_refused_on_the_client(sdk_server, kind):
    async def body():
        async with connect(kind, sdk_server.target, max_message_bytes=50_000) as client:
            await result(client.logits(noise_png(0), model=MODEL))

    with pytest.raises(InvalidInputError, match="max_message_bytes"):
        run(body())


# -- health and models ----------------------------------------------------------------------


def test_health_and_models(sdk_server, kind, categories):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            return (
                await result(client.live()),
                await result(client.ready()),
                await result(client.ready(MODEL)),
                await result(client.models()),
                await result(client.models(labels=False)),
                await result(client.model(MODEL)),
            )

    live, ready, model_ready, models, bare, one = run(body())
    assert live and ready and model_ready
    assert [m.name for m in models] == [MODEL] == [m.name for m in bare]
    info = models[0]
    assert info.ready and info.state == "READY" and info.reason == ""
    assert info.num_classes == 1000 and list(info.labels) == categories
    assert info.input_size == 224 and info.base_model is None and info.platform == "pytorch_torchvision"
    assert bare[0].labels == () and bare[0].num_classes == 1000
    assert info.runtime == "onnxruntime"  # --runtime auto on a CPU
    assert one == info


def test_ready_of_an_unknown_model_raises(sdk_server, kind):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            await result(client.ready("no-such-model"))

    with pytest.raises(ModelNotFoundError):
        run(body())


def tiny_config(directory: Path):  # -> ServeConfig
    from service.config import RuntimeConfig, ServeConfig

    return ServeConfig(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        model_store=directory / "store",
        drain_seconds=5.0,
    )


def test_dns_target_with_round_robin(sdk_server, kind, tmp_path):
    async def body():
        async with connect(kind, f"dns:///localhost:{sdk_server.grpc_port}") as client:
            return await result(client.ready(MODEL))

    assert run(body()) is True

    # A name with two addresses, a server on each (the same port): requests reach both.
    first = InProcessServer(tiny_config(tmp_path / "first")).start()
    second = InProcessServer(tiny_config(tmp_path / "second"))
    second.config = replace(second.config, host="127.0.0.2", grpc_port=first.grpc_port)
    try:
        second.start()
        with DnsServer(["127.0.0.1", "127.0.0.2"]) as dns:

            async def classify_many():
                async with connect(kind, dns.target("vision.test", first.grpc_port)) as client:
                    for _ in range(12):
                        await result(client.classify(encode(Image.new("RGB", (32, 32)), "PNG"), model=TINY, top_k=1))

            run(classify_many())
        for started in (first, second):
            assert started.server is not None
            url = f"http://{started.config.host}:{started.server.metrics_port}/metrics"
            requests = metric(scrape(url), "vision_requests_total", model=TINY)
            assert requests >= 2, f"a server got {requests} of the 12 requests"
    finally:
        second.stop()
        first.stop()


# -- lifecycle ------------------------------------------------------------------------------


def test_use_after_close_raises(sdk_server, kind, photos):
    async def body():
        async with connect(kind, sdk_server.target) as client:
            assert await result(client.live())
        assert client.is_closed
        with pytest.raises(ClientClosedError, match="closed"):
            await result(client.classify(photos["flower"], model=MODEL))
        with pytest.raises(ClientClosedError):
            await result(client.live())
        await result(client.close())  # closing twice is fine
        if kind == "sync":
            with pytest.raises(ClientClosedError), client:
                pass
        else:
            with pytest.raises(ClientClosedError):
                async with client:
                    pass

    run(body())


def test_closed_error_is_a_runtime_error():
    client = Client("localhost:1")
    client.close()
    with pytest.raises(RuntimeError):
        client.live()
    with pytest.raises(FailedPreconditionError):  # its status code's class
        client.jobs()


# -- retries, deadlines, tokens, balancing (against real servers) -----------------------------


FAST_RETRY = Retry(attempts=3, backoff=0.001, max_backoff=0.01)


def retry_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vision_client" and r.getMessage().startswith("retry")]


def test_unavailable_is_retried_then_raised(kind, caplog):
    # Nothing listens on the target: every attempt fails with UNAVAILABLE.
    caplog.set_level(logging.INFO, logger="vision_client")

    async def body():
        async with connect(kind, f"127.0.0.1:{free_port()}", retries=FAST_RETRY) as client:
            await result(client.live())

    with pytest.raises(UnavailableError) as caught:
        run(body())
    assert [m.split(" of ")[0] for m in retry_messages(caplog)] == ["retry 1", "retry 2", "retry 3"]
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert isinstance(caught.value.__cause__, grpc.RpcError)

    # No retries when asked for none.
    caplog.clear()

    async def once():
        async with connect(kind, f"127.0.0.1:{free_port()}", retries=0) as client:
            await result(client.live())

    with pytest.raises(UnavailableError):
        run(once())
    assert not retry_messages(caplog)


def test_only_idempotent_calls_are_retried(kind, caplog, photos):
    """Listing jobs may be repeated; creating one may not: a lost answer must not create two."""
    caplog.set_level(logging.INFO, logger="vision_client")
    target = f"127.0.0.1:{free_port()}"  # nothing listens

    async def listing():
        async with connect(kind, target, retries=FAST_RETRY) as client:
            await result(client.jobs())

    async def creating():
        async with connect(kind, target, retries=FAST_RETRY) as client:
            examples = [(photos["china"], "china"), (photos["flower"], "flower")]
            await result(client.create_job(FineTuneConfig(MODEL, "never"), examples))

    with pytest.raises(UnavailableError):
        run(listing())
    assert len(retry_messages(caplog)) == 3
    caplog.clear()
    with pytest.raises(UnavailableError):
        run(creating())
    assert retry_messages(caplog) == []
    # The same decision, as the retry policy makes it for a real call's error.
    with Client(target, retries=0) as client, pytest.raises(UnavailableError) as caught:
        client.jobs()
    error = caught.value.__cause__
    assert Attempts(FAST_RETRY, "ListJobs", idempotent=True, timeout=None).backoff(error) <= 0.01
    with pytest.raises(UnavailableError):
        Attempts(FAST_RETRY, "CreateJob", idempotent=False, timeout=None).backoff(error)


def test_a_call_recovers_once_the_server_comes_up(kind, tmp_path, weights_dir, photos, caplog):
    """The call starts before any server listens on its port, and retries until one answers.

    The server is started only after the client has logged its first retry, so the
    call has certainly failed with UNAVAILABLE (connection refused, then models still
    loading) before it succeeds.
    """
    caplog.set_level(logging.INFO, logger="vision_client")
    port = free_port()
    retried = threading.Event()

    class FirstRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("retry"):
                retried.set()

    watcher = FirstRetry()
    logging.getLogger("vision_client").addHandler(watcher)
    patient = Retry(attempts=10_000, backoff=0.05, max_backoff=0.5)
    outcome: dict[str, Any] = {}

    async def body():
        async with connect(kind, f"127.0.0.1:{port}", retries=patient, timeout=STARTUP_TIMEOUT_S) as client:
            return await result(client.classify(photos["flower"], model=MODEL, top_k=1))

    def call() -> None:
        try:
            outcome["predictions"] = run(body())
        except BaseException as error:  # handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    try:
        assert retried.wait(60), "the client never retried"
        with inprocess_server(tmp_path, weights_dir, grpc_port=port):
            thread.join(STARTUP_TIMEOUT_S + 30)
            assert not thread.is_alive()
    finally:
        logging.getLogger("vision_client").removeHandler(watcher)
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    ((prediction,),) = outcome["predictions"]
    assert 0 <= prediction.index < 1000
    assert any("UNAVAILABLE" in message for message in retry_messages(caplog))


def test_the_token_goes_with_every_call(token_server, kind, photos):
    """Fine-tuning calls need ``Bearer TOKEN``; inference takes it too, and ignores it."""

    async def listing(token: str | None):
        async with connect(kind, token_server.target, token=token) as client:
            return await result(client.jobs())

    with pytest.raises(AuthenticationError) as missing:
        run(listing(None))
    assert missing.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in str(missing.value)
    assert isinstance(missing.value.__cause__, grpc.RpcError)
    with pytest.raises(AuthenticationError, match="not valid"):
        run(listing("wrong-token"))
    assert isinstance(run(listing(TOKEN)), list)

    async def streaming(token: str | None):
        async with connect(kind, token_server.target, token=token) as client:
            return await collect(client.watch_job("no-such-job"))

    with pytest.raises(AuthenticationError):  # the server-streaming call carries it as well
        run(streaming(None))
    with pytest.raises(ModelNotFoundError, match="no-such-job"):
        run(streaming(TOKEN))

    async def classifying():
        async with connect(kind, token_server.target, token=TOKEN) as client:
            return await result(client.classify(photos["flower"], model=MODEL, top_k=1))

    assert len(run(classifying())[0]) == 1


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, weights_dir) -> Iterator[InProcessServer]:
    """A server whose batches wait 3 s for company: a lone request outlives a 0.5 s deadline."""
    batching = BatchingConfig(max_batch_size=64, max_queue_delay_ms=3000)
    with inprocess_server(tmp_path_factory.mktemp("slow"), weights_dir, batching=batching) as started:
        yield started


def test_deadline_exceeded(slow_server, kind, photos, caplog):
    caplog.set_level(logging.INFO, logger="vision_client")

    def failed(text: str) -> float:
        return metric(text, "vision_requests_total", model=MODEL) - metric(
            text, "vision_requests_total", model=MODEL, status="OK"
        )

    before = failed(scrape(slow_server.metrics_url))

    async def body():
        async with connect(kind, slow_server.target, retries=FAST_RETRY) as client:
            await result(client.model(MODEL))  # labels cached: the call below is one ModelInfer
            await result(client.logits(photos["flower"], model=MODEL, timeout=0.5))

    with pytest.raises(DeadlineExceededError) as caught:
        run(body())
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert retry_messages(caplog) == []  # DEADLINE_EXCEEDED is not retried
    # The server gave up on the request too: it is counted, but not as answered.
    for _ in range(100):
        if failed(scrape(slow_server.metrics_url)) > before:
            break
        time.sleep(0.1)
    assert failed(scrape(slow_server.metrics_url)) == before + 1


@pytest.fixture(scope="module")
def second_server(tmp_path_factory, weights_dir) -> Iterator[InProcessServer]:
    with inprocess_server(tmp_path_factory.mktemp("second"), weights_dir) as started:
        yield started


def test_round_robin_spreads_calls_over_every_address(sdk_server, second_server, kind, photos):
    servers = (sdk_server, second_server)
    target = f"ipv4:127.0.0.1:{sdk_server.grpc_port},127.0.0.1:{second_server.grpc_port}"

    def answered() -> list[float]:
        return [metric(scrape(s.metrics_url), "vision_requests_total", model=MODEL, status="OK") for s in servers]

    before = answered()

    async def body():
        async with connect(kind, target) as client:
            await result(client.model(MODEL))  # labels cached: each call below is one ModelInfer
            for _ in range(20):
                await result(client.classify(photos["flower"], model=MODEL, top_k=1))

    run(body())
    grew = [now - then for now, then in zip(answered(), before, strict=True)]
    assert sum(grew) == 20
    assert all(count > 0 for count in grew), grew


# -- the command line ------------------------------------------------------------------------


LINE = re.compile(r"^(?P<image>\S+)\s+(?P<rank>\d+)\s+(?P<score>\d\.\d{4})\s+(?P<label>.+) \((?P<index>\d+)\)$")


@pytest.fixture(scope="module")
def photo_files(photos, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("cli")
    files = {}
    for name in ("china", "flower"):
        files[name] = directory / f"{name}.jpg"
        files[name].write_bytes(photos[name])
    return files


def test_cli_classify_prints_top_labels(sdk_server, photo_files, reference, categories):
    files = [photo_files["china"], photo_files["flower"]]
    done = vision_client("--target", sdk_server.target, "classify", *map(str, files), "--model", MODEL, "--top-k", "3")
    assert done.returncode == 0, done.stderr
    lines = [LINE.match(line) for line in done.stdout.splitlines()]
    assert len(lines) == 6 and all(lines), done.stdout
    expected = reference([Image.open(f) for f in files])
    for file, rows, logits in zip(files, (lines[:3], lines[3:]), expected, strict=True):
        assert [m["image"] for m in rows] == [str(file)] * 3
        assert [int(m["rank"]) for m in rows] == [1, 2, 3]
        assert int(rows[0]["index"]) == int(logits.argmax())
        assert rows[0]["label"] == categories[int(logits.argmax())]


def test_cli_classify_json(sdk_server, photo_files):
    # Options after the command work too; the target comes from the environment.
    command = ["classify", str(photo_files["flower"]), "-m", MODEL, "-k", "2", "--json"]
    done = vision_client(*command, env={"VISION_CLIENT_TARGET": sdk_server.target})
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)
    assert entry["image"] == str(photo_files["flower"])
    assert [p["rank"] for p in entry["predictions"]] == [1, 2]
    assert entry["predictions"][0]["score"] >= entry["predictions"][1]["score"]
    assert set(entry["predictions"][0]) == {"rank", "label", "index", "score"}


def test_cli_models_and_health(sdk_server):
    table = vision_client("--target", sdk_server.target, "models")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "STATE", "CLASSES", "INPUT"]
    assert row.split()[:4] == [MODEL, "READY", "1000", "224x224"]

    listed = vision_client("models", "--json", "--target", sdk_server.target)
    assert listed.returncode == 0, listed.stderr
    (model,) = json.loads(listed.stdout)
    assert model["name"] == MODEL and model["ready"] is True and model["num_classes"] == 1000

    health = vision_client("--target", sdk_server.target, "health")
    assert health.returncode == 0, health.stderr
    assert re.search(r"^server\s+live\s+ready", health.stdout, re.M)
    assert re.search(rf"^{MODEL}\s+ready\s+READY", health.stdout, re.M)

    health_json = vision_client("--target", sdk_server.target, "health", "--json")
    assert health_json.returncode == 0
    assert json.loads(health_json.stdout)["models"][MODEL]["ready"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify", "{photo}", "--model", "no-such-model"], "no-such-model"),
        (["classify", "{missing}", "--model", MODEL], "No such file"),
        (["classify", "{garbage}", "--model", MODEL], "image"),
    ],
    ids=["unknown-model", "missing-file", "not-an-image"],
)
def test_cli_errors_are_one_clean_line(sdk_server, photo_files, tmp_path, args, message):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    paths = {"photo": photo_files["flower"], "missing": tmp_path / "missing.jpg", "garbage": garbage}
    done = vision_client("--target", sdk_server.target, *(a.format(**paths) for a in args))
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("vision-client: error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_cli_health_of_an_unreachable_server_fails():
    done = vision_client("--target", f"127.0.0.1:{free_port()}", "--timeout", "5", "health")
    assert done.returncode == 1
    assert done.stderr.startswith("vision-client: error: ") and "Traceback" not in done.stderr


# -- the README ------------------------------------------------------------------------------


def test_readme_has_examples():
    assert len(readme_examples(fine_tuning=False)) >= 5


@pytest.mark.parametrize("index", range(len(readme_examples(fine_tuning=False))))
def test_readme_example_runs(sdk_server, photos, tmp_path, index):
    """Each python block of the README (but fine-tuning's), run as written against the test server.

    The only substitutions: the test server's addresses for ``localhost:8001`` and
    ``http://localhost:8000``, and ``alexnet`` (the model it serves) for ``resnet101``.
    """
    code = readme_examples(fine_tuning=False)[index]
    code = code.replace("localhost:8001", sdk_server.target).replace("http://localhost:8000", sdk_server.http_url)
    code = code.replace("resnet101", MODEL)
    (tmp_path / "cat.jpg").write_bytes(photos["china"])
    (tmp_path / "dog.jpg").write_bytes(photos["flower"])
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"README example {index} failed:\n{code}\n{done.stderr}"
