"""The model store on S3-compatible object storage, with replicas: in-process servers of the tiny
model (tests/tiny.py) sharing one bucket of a real S3-compatible server (moto, tests.support.servers.MotoServer).

Polls are run by the tests (``store_poll_seconds`` is an hour) wherever "within one poll" is
what a test shows, so nothing waits on the wall clock but the outage test, whose point is time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton

from service.config import RuntimeConfig
from service.finetune.store import MANIFEST, ModelStore
from service.storage import S3Location
from tests.conftest import session_runtime_cache
from tests.metrics_util import sample_value, scrape
from tests.store_util import aws_environment, publish_forever, save_head
from tests.test_orphans import examples, no_tracebacks, poll, ready
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client import Client, FineTuneConfig, VisionClientError

pytestmark = pytest.mark.e2e


@pytest.fixture
def tiny_replica(serve_inprocess, s3_store: S3Location):
    """Factory of in-process tiny servers on the test's bucket."""

    def start(**overrides: object):
        settings: dict[str, object] = {
            "models": (TINY,),
            "weights": "random",
            "runtime": RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
            "model_store": s3_store,
            "store_poll_seconds": 3600,  # the tests run the polls
        }
        settings.update(overrides)
        return serve_inprocess(**settings)

    return start


def _pixels(count: int = 2) -> triton.InferInput:
    tensor = triton.InferInput("PIXELS", [count, 3, 64, 64], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(0).random((count, 3, 64, 64), dtype=np.float32))
    return tensor


def _logits(server, model: str) -> np.ndarray:
    with triton.InferenceServerClient(server.target) as client:
        return client.infer(model, [_pixels()], client_timeout=60).as_numpy("LOGITS")


def _served_version(server, model: str) -> str:
    with triton.InferenceServerClient(server.target) as client:
        return str(client.infer(model, [_pixels()], client_timeout=60).get_response().model_version)


def test_a_head_trained_on_one_replica_is_served_by_the_other_after_one_poll(tiny_replica, s3_store) -> None:
    first, second = tiny_replica(), tiny_replica()
    config = FineTuneConfig(base_model=TINY, output_model="shared", epochs=2, seed=1)
    with Client(first.target) as sdk:
        job = sdk.fine_tune(config, examples(), timeout=120)
        assert job.state == "succeeded", job.error
        first_weights = f"shared/{ModelStore(s3_store).read_manifest('shared').weights_file}"
        assert not ready(second, "shared")
        poll(second)  # the next poll after the job's end
        assert ready(second, "shared")
        np.testing.assert_allclose(_logits(second, "shared"), _logits(first, "shared"), rtol=1e-5, atol=1e-6)

        # The job's record is in the bucket: the other replica knows it.
        with Client(second.target) as other:
            assert other.job(job.job_id).state == "succeeded"
            assert job.job_id in [j.id for j in other.jobs()]

        # A replacement and a deletion are seen by one poll each.
        again = FineTuneConfig(base_model=TINY, output_model="shared", epochs=2, seed=2, replace=True)
        replaced = sdk.fine_tune(again, examples(), timeout=120)
        assert replaced.state == "succeeded", replaced.error
        poll(second)
        assert _served_version(second, "shared") == _served_version(first, "shared")
        sdk.delete_model("shared")
    poll(second)
    assert not ready(second, "shared")
    store = ModelStore(s3_store)
    assert "shared" not in store.entries()[0]
    # Every version the model kept (the replaced one too: tests/test_model_versions.py) goes with it.
    assert first_weights.startswith("shared/head-")
    assert list(store.objects.list("shared/")) == []
    assert store.collect_orphans(store.listing()[0], grace_s=0) == []


def test_two_replicas_creating_one_name_at_once_one_wins_whole(tiny_replica, s3_store) -> None:
    first, second = tiny_replica(), tiny_replica()
    barrier = threading.Barrier(2)

    def train(server, seed: int):
        with Client(server.target) as sdk:
            barrier.wait()
            config = FineTuneConfig(base_model=TINY, output_model="contested", epochs=3, seed=seed)
            try:
                return sdk.fine_tune(config, examples(), timeout=120)
            except VisionClientError as exc:
                return exc

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(train, (first, second), (1, 2)))
    winners = [o for o in outcomes if not isinstance(o, Exception) and o.state == "succeeded"]
    losers = [o for o in outcomes if o not in winners]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    loser = losers[0]
    # Refused at submission (the name was taken) or at the end (its create-only write lost).
    message = str(loser) if isinstance(loser, Exception) else loser.error
    assert "ALREADY_EXISTS" in message or "appeared in the store" in message or "already holds" in message, message
    poll(first)
    poll(second)
    manifest, _ = ModelStore(s3_store).load("contested")  # whole: its weights are there and match
    assert manifest.job_id == winners[0].job_id
    assert _served_version(first, "contested") == _served_version(second, "contested") == str(manifest.number) == "1"
    weights = [i.key for i in ModelStore(s3_store).objects.list("contested/") if i.key.endswith(".safetensors")]
    assert weights == [f"contested/{manifest.weights_file}"]  # the loser's weights went


def test_planted_bad_objects_are_skipped_counted_and_the_rest_served(
    tiny_replica, s3_store: S3Location, moto_server, caplog
) -> None:
    caplog.set_level(logging.INFO)
    save_head(s3_store, "good", features=TINY_FEATURE_DIM, base=TINY)
    save_head(s3_store, "template", features=TINY_FEATURE_DIM, base=TINY)
    s3 = moto_server.client()
    template = json.loads(s3.get_object(Bucket=s3_store.bucket, Key=f"models/template/{MANIFEST}")["Body"].read())

    def plant(name: str, body: bytes) -> None:
        s3.put_object(Bucket=s3_store.bucket, Key=f"models/{name}/{MANIFEST}", Body=body)

    unknown = dict(template, name="unknown-head", head=dict(template["head"], kind="transformer"))
    plant("unknown-head", json.dumps(unknown).encode())
    missing = dict(template, name="missing-weights", weights=dict(template["weights"]))
    plant("missing-weights", json.dumps(missing).encode())  # names weights of another folder: not in its own
    plant("huge-manifest", b" " * (5 * 1024 * 1024) + json.dumps(dict(template, name="huge-manifest")).encode())
    plant("bad-json", b"{" * 100_000)
    plant("Bad Name", json.dumps(template).encode())
    # A key that looks like a path out of a model's folder is no object of the store's layout.
    s3.put_object(Bucket=s3_store.bucket, Key="models/template/../../escape/manifest.json", Body=b"{}")
    expected = {
        "unknown_head": 1, "missing_weights": 1, "too_large": 1, "bad_json": 1, "bad_name": 1,
    }  # fmt: skip

    server = tiny_replica()
    assert ready(server, "good") and ready(server, "template")
    for name in ("unknown-head", "missing-weights", "huge-manifest", "bad-json", "escape"):
        assert not ready(server, name)
    metrics = scrape(server.metrics_url)
    for reason, count in expected.items():
        assert sample_value(metrics, "vision_store_errors_total", reason=reason) == count, reason
    poll(server)  # counted once, not on every poll
    metrics = scrape(server.metrics_url)
    assert sample_value(metrics, "vision_store_errors_total", reason="unknown_head") == 1
    no_tracebacks(caplog)


def test_a_stopped_store_never_stops_inference_and_its_models_are_seen_again(
    tiny_replica, s3_store: S3Location, moto_server, caplog
) -> None:
    """The S3 server is stopped (SIGSTOP: connections hang) under inference load, until the server has
    found the store unreadable (a poll met its time limit) and has answered requests since."""
    caplog.set_level(logging.INFO)
    save_head(s3_store, "before", features=TINY_FEATURE_DIM, base=TINY)
    server = tiny_replica(store_poll_seconds=1.0)
    assert ready(server, "before")
    failures: list[str] = []
    answered = {"count": 0}
    stop = threading.Event()

    def load() -> None:
        with triton.InferenceServerClient(server.target) as client:
            while not stop.is_set():
                for model in (TINY, "before"):
                    try:
                        client.infer(model, [_pixels()], client_timeout=10)
                        answered["count"] += 1
                    except Exception as exc:  # every failure is a finding
                        failures.append(f"{model}: {exc}")
                if not (client.is_server_live(client_timeout=5) and client.is_server_ready(client_timeout=5)):
                    failures.append("the server was not live and ready")

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()

    def unreadable() -> float:
        return sample_value(scrape(server.metrics_url), "vision_store_errors_total", reason="unreadable_store")

    try:
        with moto_server.paused():
            deadline = time.monotonic() + 120
            while unreadable() < 1 and not failures:
                assert time.monotonic() < deadline, "the stopped store was never found unreadable"
                time.sleep(0.5)
            since = answered["count"]
            while answered["count"] < since + 20 and not failures:  # answered with the store still stopped
                assert time.monotonic() < deadline, f"{answered['count'] - since} answers since"
                time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == [] and answered["count"] > 0, failures[:5]

    save_head(s3_store, "after", features=TINY_FEATURE_DIM, base=TINY)  # the store is back
    deadline = time.monotonic() + 120
    while not ready(server, "after"):
        assert time.monotonic() < deadline, "a model written after the outage was never served"
        time.sleep(0.5)
    assert ready(server, "before")
    no_tracebacks(caplog)


def test_writers_killed_during_publish_never_leave_a_half_model_listed_or_served(tiny_replica, s3_store) -> None:
    import multiprocessing
    import random

    context = multiprocessing.get_context("forkserver")  # torch imported once, by the fork server
    context.set_forkserver_preload(["tests.store_util"])
    reader = ModelStore(s3_store)
    replica = tiny_replica()
    rng = random.Random(7)
    staged_without_manifest = 0
    checked: dict[str, str] = {}  # name: manifest ETag whose model loaded whole
    seen: set[str] = set()  # weights keys of earlier writers
    for _ in range(10):
        started = context.Event()
        arguments = (s3_store, TINY, TINY_FEATURE_DIM, started, aws_environment())
        writer = context.Process(target=publish_forever, args=arguments)
        writer.start()
        assert started.wait(120)
        time.sleep(rng.uniform(0.05, 0.6))
        writer.kill()  # SIGKILL: wherever it was
        writer.join(30)
        listing, errors = reader.listing()
        assert errors == {}
        # The killed writer's last version: its newest new weights; killed between its weights and its
        # manifest if no manifest names them.
        named = {
            f"{n}/head-{ref.version}.safetensors"
            for n, s in listing.items()
            if s.manifest
            for ref in reader.read_manifest(n).kept
        }
        keys = {w.key for s in listing.values() for w in s.files if w.key.endswith(".safetensors")}
        new = keys - seen
        if new:
            last = max(new, key=lambda key: key.rsplit("head-", 1)[-1])  # versions start with the time in ms
            staged_without_manifest += last not in named
        seen |= keys
        listed = {name: s.manifest.etag for name, s in listing.items() if s.manifest is not None}
        for name, etag in listed.items():
            if checked.get(name) != etag:
                reader.load(name)  # whole: the weights it names are there and match its sha256
                checked[name] = etag
        poll(replica)
        with triton.InferenceServerClient(replica.target) as client:
            served = {m.name for m in client.get_model_repository_index().models if m.state == "READY"} - {TINY}
        assert served == set(listed)
    # The killed writers' leftovers (objects of no kept version) go once the grace period is over.
    listing, _ = reader.listing()
    reader.collect_orphans(listing, grace_s=0)
    listing, _ = reader.listing()
    for name, stored in listing.items():
        assert stored.manifest is not None
        kept = reader.read_manifest(name).kept
        files = (f"{name}/{file}" for ref in kept for file in (f"head-{ref.version}.safetensors", ref.manifest_file))
        assert sorted(w.key for w in stored.files) == sorted(files)
    print(f"kills between a version's weights and its manifest: {staged_without_manifest} of 10")
