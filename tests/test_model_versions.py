"""Versions of fine-tuned models: each publish of a name makes version 1, 2, 3..., the store keeps the
last ``--keep-versions``, a request may name a kept version (gRPC, REST and the SDK), a rollback serves
an older one and every replica follows it on its next poll, with the same conditional writes that
make publishing safe (a directory, and a bucket of a real S3-compatible server: moto).

The store's rules are shown on the store itself (fast); the rest on in-process servers of the tiny
model (tests/tiny.py) whose polls the tests run (``store_poll_seconds`` is an hour).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from service.config import FineTuneLimits, RuntimeConfig
from service.errors import ConflictError, ModelNotFoundError
from service.finetune.heads import build_standardized_head
from service.finetune.store import MANIFEST, Manifest, ModelStore, version_manifest_file
from service.finetune.trainer import TrainMetrics
from service.storage import StoreLocation
from tests.conftest import session_runtime_cache
from tests.test_orphans import examples, no_tracebacks, poll
from tests.tiny import TINY
from vision_client import AsyncClient, Client, FineTuneConfig, HeadConfig
from vision_client.errors import ModelNotFoundError as ClientNotFound
from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

NAME = "pets"


@pytest.fixture(params=["directory", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> StoreLocation:
    return tmp_path / "store" if request.param == "directory" else request.getfixturevalue("s3_store")


def _save(store: ModelStore, seed: int, name: str = NAME) -> Manifest:
    return store.commit(_stage(store, seed, name), replace=True)


def _stage(store: ModelStore, seed: int, name: str = NAME) -> Manifest:
    torch.manual_seed(seed)
    head = build_standardized_head(HeadConfig(), 8, 2)
    return store.stage(
        name=name, base_model="alexnet", head_spec=HeadConfig(), head=head, labels=["a", "b"],
        loss="cross_entropy", metrics=TrainMetrics(), job_id=f"job-{seed}",
    )  # fmt: skip


def _objects(store: ModelStore, name: str = NAME) -> set[str]:
    return {info.key.rsplit("/", 1)[-1] for info in store.objects.list(f"{name}/") if not info.key.endswith(".lock")}


def _files(manifest: Manifest) -> set[str]:
    return {manifest.weights_file, version_manifest_file(manifest.version)}


# -- the store ------------------------------------------------------------------------------


def test_publishes_are_numbered_and_the_oldest_beyond_k_are_collected(location: StoreLocation) -> None:
    store = ModelStore(location, FineTuneLimits(keep_versions=2))
    first, second, third = (_save(store, seed) for seed in (1, 2, 3))
    assert [m.number for m in (first, second, third)] == [1, 2, 3]
    current = store.read_manifest(NAME)
    assert (current.number, [ref.number for ref in current.kept]) == (3, [2, 3])
    # Version 1 is no longer kept: nobody may ask for it, and its objects go after the grace.
    with pytest.raises(ModelNotFoundError, match="keeps versions 2, 3"):
        store.load_version(current, 1)
    assert _files(first) <= _objects(store)  # within the grace (a reader may hold the last manifest)
    assert set(store.collect_garbage(NAME, grace_s=0)) == _files(first)
    assert _objects(store) == {MANIFEST} | _files(second) | _files(third)
    # A kept older version loads whole, with its own head.
    manifest, head = store.load_version(current, 2)
    assert (manifest.number, manifest.job_id, manifest.version) == (2, "job-2", second.version)
    served = store.load(NAME)[1].state_dict()
    assert any(not torch.equal(value, served[key]) for key, value in head.state_dict().items())


def test_rollback_points_the_manifest_at_a_kept_version(location: StoreLocation) -> None:
    store = ModelStore(location)
    versions = [_save(store, seed) for seed in (1, 2, 3)]
    etag, current = store.current(NAME)
    target, _ = store.load_version(current, 1)
    store.roll_back(NAME, etag, target)
    after = store.read_manifest(NAME)
    assert (after.number, after.version, after.job_id) == (1, versions[0].version, "job-1")
    assert [ref.number for ref in after.kept] == [1, 2, 3]  # a rollback keeps every version
    assert store.collect_garbage(NAME, grace_s=0) == []
    # The next publish is numbered after the newest, and keeps the last three.
    fourth = _save(store, 4)
    assert (fourth.number, [ref.number for ref in fourth.kept]) == (4, [2, 3, 4])


def test_a_rollback_and_a_publish_at_once_one_wins(location: StoreLocation) -> None:
    """Both conditional on the manifest they read: the rollback that read before the publish landed
    is ABORTED, and the publish stands whole."""
    first, second = ModelStore(location), ModelStore(location)  # two replicas
    for seed in (1, 2):
        _save(first, seed)
    etag, current = first.current(NAME)
    target, _ = first.load_version(current, 1)
    published = _save(second, 3)  # lands between the rollback's read and its write
    with pytest.raises(ConflictError, match="another writer"):
        first.roll_back(NAME, etag, target)
    assert first.read_manifest(NAME).version == published.version
    assert first.read_manifest(NAME).number == 3


def test_replacing_on_two_replicas_at_once_one_wins_and_nothing_is_orphaned(location: StoreLocation) -> None:
    first, second = ModelStore(location), ModelStore(location)
    _save(first, 1)
    a, b = _stage(first, 2), _stage(second, 3)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def commit(store: ModelStore, staged: Manifest, who: str) -> None:
        barrier.wait()
        try:
            outcomes[who] = store.commit(staged, replace=True).number
        except ConflictError:
            outcomes[who] = "aborted"

    threads = [threading.Thread(target=commit, args=(s, m, w)) for s, m, w in ((first, a, "a"), (second, b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    current = first.read_manifest(NAME)
    won = {who for who, outcome in outcomes.items() if outcome != "aborted"}
    # Both may land one after the other (each read the other's manifest): then they are 2 and 3.
    assert won and sorted(outcomes[w] for w in won) == list(range(2, 2 + len(won))), outcomes  # type: ignore[type-var]
    kept = {ref.version for ref in current.kept}
    for who, staged in (("a", a), ("b", b)):
        assert (staged.version in kept) == (who in won), outcomes
        # The loser's objects went at once; the winner's are whole.
        assert (_files(staged) <= _objects(first)) == (who in won), outcomes
    for ref in current.kept:
        first.load_version(current, ref.number)
    assert first.collect_garbage(NAME, grace_s=0) == []  # nothing orphaned


def test_a_store_written_before_versions_loads_as_version_1_and_keeps_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    old = _save(store, 1)
    # What the server wrote before versions: the manifest of the one version, no numbers, no own manifest.
    legacy = old.to_json()
    (tmp_path / NAME / MANIFEST).write_text(json.dumps(legacy))
    (tmp_path / NAME / version_manifest_file(old.version)).unlink()
    current = store.read_manifest(NAME)
    assert (current.number, [ref.number for ref in current.kept]) == (1, [1])
    new = _save(store, 2)
    assert (new.number, [ref.number for ref in new.kept]) == (2, [1, 2])
    manifest, _ = store.load_version(store.read_manifest(NAME), 1)  # its own manifest was written for it
    assert manifest.version == old.version and store.collect_garbage(NAME, grace_s=0) == []


@pytest.mark.parametrize(
    "versions",
    [
        [{"number": 2, "version": "1700000000000-00000000"}],  # does not list the served version
        [{"number": 1, "version": "x"}],
        "not a list",
        [{"number": 0, "version": "1700000000000-00000000"}],
    ],
)
def test_a_manifest_with_bad_versions_is_a_bad_entry(tmp_path: Path, versions: object) -> None:
    from service.errors import StoreEntryError

    store = ModelStore(tmp_path)
    data = _save(store, 1).current_json()
    data["versions"] = versions
    (tmp_path / NAME / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(StoreEntryError) as raised:
        store.read_manifest(NAME)
    assert raised.value.reason == "bad_manifest"


# -- servers --------------------------------------------------------------------------------


@pytest.fixture
def replicas(serve_inprocess, request: pytest.FixtureRequest, tmp_path: Path):
    """Factory of in-process tiny servers sharing one store: ``replicas("directory" | "s3", count)``."""

    def start(kind: str, count: int = 2, **overrides: object):
        store = tmp_path / "shared" if kind == "directory" else request.getfixturevalue("s3_store")
        settings: dict[str, object] = {
            "models": (TINY,),
            "weights": "random",
            "runtime": RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
            "model_store": store,
            "store_poll_seconds": 3600,  # the tests run the polls
        }
        settings.update(overrides)
        return [serve_inprocess(**settings) for _ in range(count)], ModelStore(store)

    return start


def _pixels(count: int = 2) -> triton.InferInput:
    tensor = triton.InferInput("PIXELS", [count, 3, 64, 64], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(0).random((count, 3, 64, 64), dtype=np.float32))
    return tensor


def _http_pixels(count: int = 2) -> triton_http.InferInput:
    tensor = triton_http.InferInput("PIXELS", [count, 3, 64, 64], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(0).random((count, 3, 64, 64), dtype=np.float32))
    return tensor


def _grpc(server, version: str = "") -> tuple[str, np.ndarray]:
    with triton.InferenceServerClient(server.target) as client:
        result = client.infer(NAME, [_pixels()], model_version=version, client_timeout=60)
        return str(result.get_response().model_version), result.as_numpy("LOGITS")


def _rest(server, version: str = "") -> tuple[str, np.ndarray]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}", network_timeout=60)
    try:
        result = client.infer(NAME, [_http_pixels()], model_version=version)
        return str(result.get_response()["model_version"]), result.as_numpy("LOGITS")
    finally:
        client.close()


def _publish(server, seed: int) -> None:
    config = FineTuneConfig(base_model=TINY, output_model=NAME, epochs=2, seed=seed, replace=True)
    with Client(server.target) as sdk:
        job = sdk.fine_tune(config, examples(), timeout=120)
    assert job.state == "succeeded", job.error


def _post(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_three_versions_served_by_number_rolled_back_and_followed_by_a_replica(replicas, kind: str, caplog) -> None:
    (first, second), store = replicas(kind)
    for seed in (1, 2, 3):
        _publish(first, seed)
    poll(second)
    images = [png for png, _ in examples(2)]

    # Each version by number, over gRPC, REST and the SDK (both twins): the same logits, and the
    # answer names the version that ran. Version 3, the newest, answers requests without a version.
    by_version = {}
    for version in ("1", "2", "3"):
        ran, logits = _grpc(first, version)
        assert ran == version
        assert _rest(first, version)[0] == version
        np.testing.assert_allclose(_rest(first, version)[1], logits, rtol=1e-6)
        np.testing.assert_allclose(_grpc(second, version)[1], logits, rtol=1e-6)
        by_version[version] = logits
    assert not np.allclose(by_version["1"], by_version["3"])
    assert _grpc(first)[0] == "3"
    with Client(first.target) as sdk, Client(first.http_url) as rest_sdk:
        assert sdk.model(TINY).versions == ("1",)
        for version in ("1", "2", "3"):
            via_grpc = sdk.logits(images, NAME, version=version)
            np.testing.assert_allclose(rest_sdk.logits(images, NAME, version=int(version)), via_grpc, rtol=1e-6)
            assert sdk.classify(images, NAME, top_k=1, version=version)[0][0].label in ("dark", "light")
        info = sdk.model(NAME)
        assert (info.version, info.versions) == ("3", ("1", "2", "3"))
        assert sdk.model(NAME, version=1).version == "1"
    with triton.InferenceServerClient(first.target) as client:
        assert client.get_model_metadata(NAME).versions == ["1", "2", "3"]
        policy = client.get_model_config(NAME).config.version_policy
        assert list(policy.specific.versions) == [1, 2, 3]
        assert client.get_model_config(TINY).config.version_policy.latest.num_versions == 1
        assert client.get_model_metadata(TINY).versions == ["1"]
        assert client.get_model_metadata(NAME, model_version="1").versions == ["1", "2", "3"]
        # An unknown version is NOT_FOUND, saying which versions there are.
        with pytest.raises(InferenceServerException) as raised:
            client.infer(NAME, [_pixels()], model_version="7", client_timeout=60)
        assert raised.value.status() == "StatusCode.NOT_FOUND"
        assert "its versions are 1, 2, 3" in raised.value.message()
    with pytest.raises(InferenceServerException) as http_raised:
        _rest(first, "7")
    assert "its versions are 1, 2, 3" in str(http_raised.value)

    # Roll back to 2 with the SDK: version 2 answers requests without a version, here at once and
    # on the other replica after its next poll.
    with Client(first.target) as sdk:
        rolled = sdk.rollback_model(NAME, 2)
    assert (rolled.version, rolled.versions) == ("2", ("1", "2", "3"))
    assert _grpc(first)[0] == "2"
    np.testing.assert_allclose(_grpc(first)[1], by_version["2"], rtol=1e-6)
    assert _grpc(second)[0] == "3"
    poll(second)
    assert _grpc(second)[0] == "2"
    np.testing.assert_allclose(_grpc(second)[1], by_version["2"], rtol=1e-6)
    assert store.read_manifest(NAME).number == 2

    # Over REST (the route the console uses), then over gRPC, from the other replica.
    status, answer = _post(f"{first.http_url}/v1/models/{NAME}/versions/1/rollback")
    assert (status, answer["version"]) == (200, "1")
    status, answer = _post(f"{first.http_url}/v1/models/{NAME}/versions/9/rollback")
    assert status == 404 and "keeps versions 1, 2, 3" in answer["error"]
    poll(second)
    with grpc.insecure_channel(second.target) as channel:
        stub = models_pb2_grpc.ModelsStub(channel)
        assert stub.GetModel(models_pb2.GetModelRequest(name=NAME), timeout=30).version == "1"
        answer = stub.RollbackModel(models_pb2.RollbackModelRequest(name=NAME, version="3"), timeout=60)
        assert answer.version == "3"
        with pytest.raises(grpc.RpcError) as rpc_error:
            stub.RollbackModel(models_pb2.RollbackModelRequest(name=TINY, version="1"), timeout=60)
        assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as rpc_error:
            stub.RollbackModel(models_pb2.RollbackModelRequest(name=NAME, version="two"), timeout=60)
        assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    poll(first)
    assert _grpc(first)[0] == _grpc(second)[0] == "3"

    # A fourth publish keeps the last three: version 1 is gone, for requests and from the store.
    _publish(second, 4)
    poll(first)
    for server in (first, second):
        assert _grpc(server)[0] == "4"
        with pytest.raises(InferenceServerException, match="its versions are 2, 3, 4"):
            _grpc(server, "1")
    with Client(first.target) as sdk, pytest.raises(ClientNotFound):
        sdk.logits(images, NAME, version=1)
    kept = {ref.version for ref in store.read_manifest(NAME).kept}
    collected = store.collect_garbage(NAME, grace_s=0)
    assert len(collected) == 2 and not any(version in name for version in kept for name in collected)
    no_tracebacks(caplog)


def test_the_async_client_rolls_back_and_names_versions(replicas) -> None:
    import asyncio

    (server,), _ = replicas("directory", count=1)
    for seed in (1, 2):
        _publish(server, seed)
    images = [png for png, _ in examples(2)]

    async def scenario() -> None:
        async with AsyncClient(server.target) as client:
            before = await client.logits(images, NAME, version=1)
            info = await client.rollback_model(NAME, "1")
            assert (info.version, info.versions) == ("1", ("1", "2"))
            np.testing.assert_allclose(await client.logits(images, NAME), before, rtol=1e-6)

    asyncio.run(scenario())


def test_replacing_on_two_replicas_at_once_over_the_api(replicas) -> None:
    """Two jobs replacing one name at once on two replicas: each publish that lands is a version of
    its own (or the later one is ABORTED), and no object is left that no kept version names."""
    (first, second), store = replicas("s3")
    _publish(first, 1)
    poll(second)
    barrier = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def train(server, seed: int) -> None:
        barrier.wait()
        config = FineTuneConfig(base_model=TINY, output_model=NAME, epochs=2, seed=seed, replace=True)
        with Client(server.target) as sdk:
            job = sdk.fine_tune(config, examples(), timeout=120)
        outcomes[seed] = job.state if job.state == "succeeded" else job.error

    threads = [threading.Thread(target=train, args=(s, seed)) for s, seed in ((first, 2), (second, 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    won = [seed for seed, outcome in outcomes.items() if outcome == "succeeded"]
    assert won and all(o == "succeeded" or "another writer" in o for o in outcomes.values()), outcomes
    current = store.read_manifest(NAME)
    assert [ref.number for ref in current.kept] == list(range(1, 2 + len(won)))
    poll(first)
    poll(second)
    assert _grpc(first)[0] == _grpc(second)[0] == str(current.number)
    for ref in current.kept:
        np.testing.assert_allclose(_grpc(first, str(ref.number))[1], _grpc(second, str(ref.number))[1], rtol=1e-6)
    assert store.collect_garbage(NAME, grace_s=0) == []  # the loser's objects went with its write


def test_one_other_version_is_resident_and_requests_for_it_share_one_load(tmp_path: Path) -> None:
    """The served version and at most one other are in memory: the one asked for last; requests
    for a version at once get one model (one read and warm-up); a rollback to the resident version
    serves that very model."""
    import asyncio

    from tests.core_util import Core, run_with_core
    from tests.store_util import save_head
    from tests.tiny import TINY_FEATURE_DIM

    for seed in (1, 2, 3):
        save_head(tmp_path, NAME, seed=seed, features=TINY_FEATURE_DIM, base=TINY)

    async def scenario(core: Core) -> None:
        await core.sync_once()
        repository = core.repository
        served = repository.get_ready(NAME)
        assert (served.version, served.available_versions) == ("3", ["1", "2", "3"])
        assert await repository.get_version_ready(NAME, "") is served
        assert await repository.get_version_ready(NAME, "3") is served
        ones = await asyncio.gather(*(repository.get_version_ready(NAME, "1") for _ in range(4)))
        assert all(model is ones[0] for model in ones) and ones[0].version == "1"
        assert repository.resident(NAME) is ones[0] and repository.check_version(NAME, "1") is ones[0]
        two = await repository.get_version_ready(NAME, "2")
        assert repository.resident(NAME) is two
        for worker in ones[0].workers:  # version 1's model stopped taking work: its workers end
            await asyncio.wait_for(asyncio.to_thread(worker.join), 60)
        with pytest.raises(ModelNotFoundError, match="its versions are 1, 2, 3"):
            await repository.get_version_ready(NAME, "9")
        assert await core.catalog.rollback(NAME, "2") is two  # the resident one, not a second copy
        assert repository.get_ready(NAME) is two and repository.resident(NAME) is None
        assert core.store is not None and core.store.read_manifest(NAME).number == 2
        await core.sync_once()  # the poll finds the store as this server left it: nothing changes
        assert repository.get_ready(NAME) is two

    run_with_core(tmp_path, scenario)


def test_versions_and_a_rollback_through_the_frontends(tmp_path: Path) -> None:
    """``--frontends 2``: a version named in a request crosses the hop, RollbackModel and GetModel
    with a version are forwarded to the engine, and every front end sees the rollback at once."""
    from tests.conftest import start_server
    from tests.store_util import save_head
    from tests.tiny import TINY_FEATURE_DIM

    store = tmp_path / "store"
    for seed in (1, 2):
        save_head(store, NAME, seed=seed, features=TINY_FEATURE_DIM, base=TINY)
    images = [png for png, _ in examples(2)]
    proc = start_server(
        tmp_path, "--frontends", "2", "--models", TINY, "--weights", "random", "--model-store", str(store)
    )
    try:
        proc.wait_serving()
        with Client(proc.target) as sdk:
            assert sdk.model(NAME).versions == ("1", "2") and sdk.model(NAME, version=1).version == "1"
            first = sdk.logits(images, NAME, version=1)
            assert not np.allclose(first, sdk.logits(images, NAME))
            assert sdk.rollback_model(NAME, 1).version == "1"
        for _ in range(4):  # new connections: the kernel spreads them over the front ends
            with triton.InferenceServerClient(proc.target) as client:
                assert client.get_model_metadata(NAME).versions == ["1", "2"]
                result = client.infer(NAME, [_pixels()], client_timeout=60)
                assert result.get_response().model_version == "1"
            with Client(proc.target) as sdk:
                np.testing.assert_allclose(sdk.logits(images, NAME), first, rtol=1e-6)
    finally:
        assert proc.stop() == 0
    proc.assert_no_traceback()


def test_a_kept_version_that_cannot_be_read_is_unavailable_and_nothing_else_changes(tmp_path: Path, caplog) -> None:
    """Its weights gone from the store (a damaged store): a request for it, and a rollback to it, are
    UNAVAILABLE saying why; the served version and the store stay as they were."""
    from service.errors import UnavailableError
    from tests.core_util import Core, run_with_core
    from tests.store_util import save_head
    from tests.tiny import TINY_FEATURE_DIM

    first = save_head(tmp_path, NAME, seed=1, features=TINY_FEATURE_DIM, base=TINY)
    save_head(tmp_path, NAME, seed=2, features=TINY_FEATURE_DIM, base=TINY)
    (tmp_path / NAME / first.weights_file).unlink()

    async def scenario(core: Core) -> None:
        await core.sync_once()
        served = core.repository.get_ready(NAME)
        for attempt in (core.repository.get_version_ready(NAME, "1"), core.catalog.rollback(NAME, "1")):
            with pytest.raises(UnavailableError, match=f"{first.weights_file} is missing"):
                await attempt
        assert core.repository.get_ready(NAME) is served and core.repository.resident(NAME) is None
        assert core.store is not None and core.store.read_manifest(NAME).number == 2

    run_with_core(tmp_path, scenario)
    no_tracebacks(caplog)
