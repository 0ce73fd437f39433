"""The kept-jobs quota (``--max-kept-job-bytes``, service/finetune/durable.py) holds across replicas
sharing a store: a job's images or features are admitted by a reservation written before the store
is listed, so of replicas admitting at once the last to list sees the others' reservations, and
together they never pass the quota. A directory store and an S3 one (moto); the replicas are
``JobKeeper``s of their own on one store, as servers' are.
"""

from __future__ import annotations

import threading

import pytest
import torch

from service.finetune.durable import LIVE_FOLDER, RESERVED, InputsGone, JobKeeper
from service.finetune.job import Job
from service.storage import ObjectStore, open_objects
from vision_client.protocol import FineTuneConfig

QUOTA = 100_000
EXAMPLES = 2_000  # features of 2,000 x 7 float32 and their int64 targets: 64,000 bytes, over half the quota


@pytest.fixture(params=["directory", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path) -> ObjectStore:
    return open_objects(tmp_path / "store" if request.param == "directory" else request.getfixturevalue("s3_store"))


def replica(objects: ObjectStore, name: str) -> JobKeeper:
    return JobKeeper(objects, quota_bytes=QUOTA, lease_s=60.0, holder=name)


def job(number: int) -> Job:
    return Job(f"{number:012x}", FineTuneConfig(base_model="alexnet", output_model=f"kept{number}"), ["a", "b"], 20)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(EXAMPLES, 7), torch.zeros(EXAMPLES, dtype=torch.long)


def stored_bytes(objects: ObjectStore) -> int:
    return sum(info.size for info in objects.list(f"{LIVE_FOLDER}/"))


def reservations(objects: ObjectStore) -> list[str]:
    return [info.key for info in objects.list(f"{LIVE_FOLDER}/") if info.key.rsplit("/", 1)[1].startswith(RESERVED)]


def test_a_second_replica_is_refused_what_the_first_took_and_says_why(objects: ObjectStore) -> None:
    first, second = replica(objects, "first"), replica(objects, "second")
    one, two = job(1), job(2)
    first.begin(one)
    second.begin(two)
    assert first.keep_inputs(one, *inputs())
    assert not second.keep_inputs(two, *inputs())
    refused = r"its features \(.* MiB\) were not kept: the store held .* --max-kept-job-bytes"
    with pytest.raises(InputsGone, match=refused):
        second.inputs(two.id)
    assert stored_bytes(objects) <= QUOTA
    assert reservations(objects) == []  # an admitted write's reservation goes once it is written
    first.end(one.id)
    assert second.keep_inputs(two, *inputs())  # the room is back once the first job has ended


def test_replicas_admitting_at_the_same_moment_never_pass_the_quota_together(objects: ObjectStore) -> None:
    """Eight replicas, each with a job whose features take over half the quota, keep them at once
    (released together by a barrier), five times: at most one is admitted each time, and what the
    store holds never passes the quota."""
    replicas = [replica(objects, f"replica-{i}") for i in range(8)]
    for round_ in range(5):
        jobs = [job(round_ * 10 + i + 1) for i in range(len(replicas))]
        for keeper, kept in zip(replicas, jobs, strict=True):
            keeper.begin(kept)
        admitted = keep_at_once(replicas, jobs)
        assert sum(admitted) <= 1, admitted
        assert stored_bytes(objects) <= QUOTA
        assert reservations(objects) == []
        for keeper, kept in zip(replicas, jobs, strict=True):
            keeper.end(kept.id)


def keep_at_once(replicas: list[JobKeeper], jobs: list[Job]) -> list[bool]:
    """Each replica keeps its job's features, all released at once by a barrier; which were admitted."""
    barrier = threading.Barrier(len(replicas))
    admitted = [False] * len(replicas)
    failures: list[BaseException] = []

    def keep(index: int) -> None:
        try:
            barrier.wait(60)
            admitted[index] = replicas[index].keep_inputs(jobs[index], *inputs())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=keep, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    return admitted


def test_a_reservation_left_by_a_server_that_died_counts_until_its_job_ends(objects: ObjectStore) -> None:
    dead, alive = replica(objects, "dead"), replica(objects, "alive")
    orphan, other = job(1), job(2)
    dead.begin(orphan)
    alive.begin(other)
    objects.write(f"{LIVE_FOLDER}/{orphan.id}/{RESERVED}features-64000", b"")  # killed before it wrote them
    assert alive.used_bytes() >= 64_000
    assert not alive.keep_inputs(other, *inputs())
    alive.end(orphan.id)  # the job ended (on whichever replica): its folder goes, the reservation too
    assert reservations(objects) == []
    assert alive.keep_inputs(other, *inputs())


@pytest.mark.parametrize("name", [f"{RESERVED}features-x", f"{RESERVED}features-{'9' * 40}", RESERVED])
def test_a_reservation_whose_name_is_no_size_counts_nothing(objects: ObjectStore, name: str) -> None:
    keeper = replica(objects, "one")
    kept = job(1)
    keeper.begin(kept)
    before = keeper.used_bytes()
    objects.write(f"{LIVE_FOLDER}/{kept.id}/{name}", b"")
    assert keeper.used_bytes() == before
    assert keeper.keep_inputs(kept, *inputs())
