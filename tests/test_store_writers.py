"""Two writers of one name (two replicas sharing a store) never leave a model that cannot
be loaded, and ``replace=False`` holds across processes. The interleavings are forced
with the two steps of a save: ``stage`` (weights) and ``commit`` (manifest). Every test runs
on both stores: a directory, and a bucket of a real S3-compatible server (tests.support.servers.MotoServer)."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest
import torch

from service.config import FineTuneLimits
from service.errors import AlreadyExistsError, ConflictError
from service.finetune.heads import build_standardized_head
from service.finetune.store import ModelStore, version_manifest_file
from service.finetune.trainer import TrainMetrics
from service.storage import StoreLocation
from tests.store_util import aws_environment, race_to_create
from vision_client.protocol import HeadConfig


@pytest.fixture(params=["directory", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> StoreLocation:
    return tmp_path / "store" if request.param == "directory" else request.getfixturevalue("s3_store")


def _exists(store: ModelStore, name: str, file: str) -> bool:
    return store.objects.head(f"{name}/{file}") is not None


def _stage(store: ModelStore, name: str, seed: int):
    torch.manual_seed(seed)
    head = build_standardized_head(HeadConfig(), 8, 2)
    return store.stage(
        name=name, base_model="alexnet", head_spec=HeadConfig(), head=head, labels=["a", "b"],
        loss="cross_entropy", metrics=TrainMetrics(), job_id=f"job-{seed}",
    )  # fmt: skip


def test_interleaved_replacements_leave_a_loadable_model(location: StoreLocation) -> None:
    one = FineTuneLimits(keep_versions=1)  # a replaced version is not kept (tests/test_model_versions.py keeps them)
    first, second = ModelStore(location, one), ModelStore(location, one)  # two replicas on one store
    a = _stage(first, "pets", 1)
    b = _stage(second, "pets", 2)
    second.commit(b, replace=True)  # B lands first and collects garbage...
    assert second.load("pets")[0].version == b.version
    first.commit(a, replace=True)  # ...then A's manifest lands: A's weights must still be there
    manifest, _ = second.load("pets")
    assert manifest.version == a.version
    # B's weights, no longer named, survive the grace period (a reader may hold B's manifest).
    assert _exists(first, "pets", b.weights_file)
    assert sorted(first.collect_garbage("pets", grace_s=0)) == [b.weights_file, version_manifest_file(b.version)]
    assert first.load("pets")[0].version == a.version


def test_a_commit_racing_a_delete_keeps_the_new_version(location: StoreLocation) -> None:
    writer, deleter = ModelStore(location), ModelStore(location)
    writer.commit(_stage(writer, "pets", 1), replace=True)
    staged = _stage(writer, "pets", 2)
    deleter.delete("pets")  # the folder still holds the staged weights: it is not removed
    writer.commit(staged, replace=True)
    assert deleter.load("pets")[0].version == staged.version


def test_create_only_commit_refuses_a_name_another_writer_took(location: StoreLocation) -> None:
    first, second = ModelStore(location), ModelStore(location)
    a = _stage(first, "pets", 1)
    b = _stage(second, "pets", 2)
    first.commit(a, replace=False)
    with pytest.raises(AlreadyExistsError, match="another replica"):
        second.commit(b, replace=False)
    assert first.load("pets")[0].version == a.version
    assert not _exists(first, "pets", b.weights_file)  # the loser's weights, named by nobody


def test_create_only_holds_across_processes(location: StoreLocation) -> None:
    context = multiprocessing.get_context("forkserver")  # torch imported once, by the fork server
    context.set_forkserver_preload(["tests.store_util"])
    start, results = context.Event(), context.Queue()
    env = aws_environment()
    processes = [
        context.Process(target=race_to_create, args=(location, seed, start, results, env)) for seed in range(4)
    ]
    for process in processes:
        process.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(60)
    winners = [version for outcome, version in outcomes if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert ModelStore(location).load("contested")[0].version == winners[0]


def test_of_two_replacing_one_version_at_once_exactly_one_wins(location: StoreLocation) -> None:
    """Both read the same manifest, then write conditionally on it: one lands, the other is ABORTED
    and its weights go; the winner's model loads."""
    first, second = ModelStore(location), ModelStore(location)
    first.commit(_stage(first, "pets", 1), replace=True)
    a, b = _stage(first, "pets", 2), _stage(second, "pets", 3)
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def commit(store: ModelStore, staged, who: str) -> None:
        barrier.wait()
        try:
            store.commit(staged, replace=True)
            outcomes[who] = "won"
        except ConflictError:
            outcomes[who] = "aborted"

    threads = [threading.Thread(target=commit, args=(s, m, w)) for s, m, w in ((first, a, "a"), (second, b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Both may win one after the other (each read the other's manifest); never both on one version.
    versions = {"a": a.version, "b": b.version}
    current = first.load("pets")[0].version
    assert current in (a.version, b.version)
    winner = next(w for w, v in versions.items() if v == current)
    assert outcomes[winner] == "won", outcomes
    for who, outcome in outcomes.items():
        staged = a if who == "a" else b
        assert _exists(first, "pets", staged.weights_file) == (outcome == "won"), (who, outcomes)


def test_a_replace_whose_version_changed_since_it_was_read_is_aborted(location: StoreLocation) -> None:
    store = ModelStore(location)
    store.commit(_stage(store, "pets", 1), replace=True)
    key = "pets/manifest.json"
    read = store.objects.head(key)
    assert read is not None
    store.commit(_stage(store, "pets", 2), replace=True)  # another writer, in between
    from service.storage import ObjectChanged

    with pytest.raises(ObjectChanged):
        store.objects.replace(key, b"{}", read.etag)
    assert store.load("pets")[0].job_id == "job-2"
