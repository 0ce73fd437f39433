"""Finished jobs keep no images; their records are bounded and kept in the store, so that
GetJob, ListJobs and WatchJob answer on another server sharing the store (a replica, or
the same one after a restart)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from service.finetune.history import JobHistory
from service.finetune.job import EpochMetrics, Job, JobState
from service.finetune.trainer import TrainMetrics
from tests.support.finetune_data import digits
from vision_client.protocol import FineTuneConfig
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc


def _finished(job_id: str, finished_at: float) -> Job:
    return Job(
        id=job_id, config=FineTuneConfig("alexnet", "pets"), labels=["a", "b"], example_count=10,
        state=JobState.SUCCEEDED, created_at=finished_at - 1, finished_at=finished_at,
        metrics=TrainMetrics(train_loss=0.5, best_epoch=3),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_history_keeps_the_newest_records_only(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    history = JobHistory(tmp_path if kind == "directory" else request.getfixturevalue("s3_store"), max_records=3)
    for i in range(5):
        history.save(_finished(f"{i:012x}", 1_700_000_000.0 + i))
    assert [job.id for job in history.recent()] == [f"{i:012x}" for i in (2, 3, 4)]
    assert history.get(f"{0:012x}") is None
    again = history.get(f"{4:012x}")
    assert again is not None and again.metrics == TrainMetrics(train_loss=0.5, best_epoch=3)
    assert again.state is JobState.SUCCEEDED and again.example_count == 10 and again.examples is None
    history.objects.write(".jobs/1700000009000-0000000000ff.json", b"[" * 10_000)  # a damaged record
    assert [job.id for job in history.recent()] == [f"{i:012x}" for i in (3, 4)]  # newest 3: one skipped
    assert history.get("../../etc/passwd") is None


def test_records_keep_the_curve_and_older_records_read_without_one(tmp_path: Path) -> None:
    """Each epoch's figures stay with the record (the chart of a finished job); NaN, a figure not
    measured, goes to JSON as null and comes back NaN; a record without a curve reads as none."""
    import dataclasses
    import json
    import math

    history = JobHistory(tmp_path, max_records=3)
    curve = [EpochMetrics(1, 0.9, 0.8, 0.5), EpochMetrics(2, 0.4)]
    history.save(dataclasses.replace(_finished(f"{9:012x}", 1_700_000_000.0), curve=curve))
    again = history.get(f"{9:012x}")
    assert again is not None and [point.epoch for point in again.curve] == [1, 2]
    assert again.curve[0] == curve[0] and again.curve[1].train_loss == 0.4
    assert math.isnan(again.curve[1].validation_loss) and math.isnan(again.curve[1].validation_accuracy)
    (path,) = (tmp_path / ".jobs").iterdir()
    record = json.loads(path.read_text())
    assert record["curve"][1] == {"epoch": 2, "train_loss": 0.4, "validation_loss": None, "validation_accuracy": None}
    del record["curve"]
    path.write_text(json.dumps(record))
    assert history.get(f"{9:012x}").curve == []
    record["curve"] = [{"epoch": "one"}]
    path.write_text(json.dumps(record))
    assert history.get(f"{9:012x}") is None  # a damaged record is skipped


def test_records_keep_the_whole_config_and_older_records_still_read(tmp_path: Path) -> None:
    """A record holds the config through the protocol's one JSON conversion; a record of the
    older layout ("spec", Adam's betas as one pair) reads as the same config."""
    import dataclasses
    import json

    from vision_client.protocol import HeadConfig, OptimizerConfig, to_dict

    history = JobHistory(tmp_path, max_records=3)
    config = FineTuneConfig(
        "alexnet", "pets", head=HeadConfig("parallel", hidden=8, blocks=3, dropout=0.25),
        optimizer=OptimizerConfig("sgd", lr=0.5, momentum=0.5, beta1=0.8, beta2=0.95), seed=2**64 - 1, refit=False,
    )  # fmt: skip
    job = _finished(f"{7:012x}", 1_700_000_000.0)
    history.save(dataclasses.replace(job, config=config))
    (path,) = (tmp_path / ".jobs").iterdir()
    record = json.loads(path.read_text())
    assert record["config"] == to_dict(config)
    assert history.get(f"{7:012x}").config == config

    older = dict(record, id=f"{8:012x}")
    spec = older.pop("config")
    spec["optimizer"]["betas"] = [spec["optimizer"].pop("beta1"), spec["optimizer"].pop("beta2")]
    older["spec"] = spec
    (tmp_path / ".jobs" / f"1700000001000-{8:012x}.json").write_text(json.dumps(older))
    assert history.get(f"{8:012x}").config == config


def test_a_finished_job_is_known_to_another_server_on_the_store(tmp_path: Path, serve_inprocess) -> None:
    store = tmp_path / "shared"
    first = serve_inprocess(model_store=store)
    images, targets = digits()
    config = pb.FineTuneConfig(base_model="alexnet", output_model="history", epochs=2, batch_size=4)
    examples = [pb.Example(image=images[i], label=str(targets[i] % 2)) for i in range(8)]
    requests = [pb.CreateJobRequest(config=config), pb.CreateJobRequest(examples=pb.ExampleBatch(examples=examples))]
    with grpc.insecure_channel(first.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        job = stub.CreateJob(iter(requests), timeout=120)
        events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300))
    assert events[-1].kind == "succeeded", events[-1].message
    held = first.call(first.server.jobs.get(job.id))
    assert held.examples is None and held.example_count == 8  # the images were let go

    second = serve_inprocess(model_store=store)
    with grpc.insecure_channel(second.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        again = stub.GetJob(pb.GetJobRequest(job_id=job.id))
        assert again.state == pb.SUCCEEDED and again.examples == 8 and list(again.labels) == ["0", "1"]
        assert again.metrics.epochs_run == 2 and again.config.output_model == "history"
        assert job.id in [j.id for j in stub.ListJobs(pb.ListJobsRequest()).jobs]
        (final,) = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30))
        assert final.kind == "succeeded" and final.state == pb.SUCCEEDED
        deadline = time.monotonic() + 60
        while "history" not in second.server.repository:  # and the model itself, by the store
            assert time.monotonic() < deadline
            time.sleep(0.1)
