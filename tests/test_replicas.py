"""Replicas sharing one model store, and a SIGTERM that arrives while a job trains.

The servers serve the tiny network: what is tested (what replicas see of each other's models, how a
job stops) is the same whatever the backbone, and tiny's forward pass costs microseconds."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import start_server
from tests.support.finetune_data import digits
from tests.test_finetune import config, job_requests, run_job
from tests.tiny import TINY
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

VISIBLE_WITHIN_S = 30.0
SERVER = ("--models", TINY, "--weights", "random")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    store = tmp_path_factory.mktemp("shared-store")
    logs = tmp_path_factory.mktemp("replicas")
    args = (*SERVER, "--model-store", str(store), "--store-poll-seconds", "1")
    first, second = start_server(logs, *args), start_server(logs, *args)
    try:
        first.wait_serving()
        second.wait_serving()
        yield first, second
    finally:
        first.stop()
        second.stop()


def logits(target: str, model: str, images: list[bytes]) -> np.ndarray:
    with triton.InferenceServerClient(target) as client:
        tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
        return client.infer(model, [tensor], client_timeout=120).as_numpy("LOGITS")


def wait_until_gone(target: str, model: str, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service=model)).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            time.sleep(0.2)
    raise TimeoutError(f"{model} still served by {target} after {timeout}s")


def train(target: str, name: str, seed: int, replace: bool = False) -> pb.Job:
    images, targets = digits()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        job, _ = run_job(
            stub,
            config(name, base_model=TINY, epochs=5, seed=seed, replace=replace),
            images[:150],
            [str(t) for t in targets[:150]],
        )
    assert job.state == pb.SUCCEEDED, job.error
    return job


def test_a_head_trained_on_one_replica_is_served_by_the_other(replicas) -> None:
    first, second = replicas
    images, _ = digits()
    sample = images[1500:1516]
    train(first.target, "shared-digits", seed=1)
    second.wait_serving("shared-digits", timeout=VISIBLE_WITHIN_S)
    np.testing.assert_allclose(
        logits(second.target, "shared-digits", sample),
        logits(first.target, "shared-digits", sample),
        rtol=1e-4,
        atol=1e-4,
    )

    # A replacement (another seed) reaches the other replica too.
    old = logits(second.target, "shared-digits", sample)
    train(first.target, "shared-digits", seed=2, replace=True)
    expected = logits(first.target, "shared-digits", sample)
    assert not np.allclose(expected, old)
    import time

    deadline = time.monotonic() + VISIBLE_WITHIN_S
    while not np.allclose(logits(second.target, "shared-digits", sample), expected, rtol=1e-4, atol=1e-4):
        assert time.monotonic() < deadline, "the replaced head did not reach the second replica"
        time.sleep(0.5)

    # A deletion too.
    with grpc.insecure_channel(first.target) as channel:
        assert pb_grpc.FineTuningStub(channel).DeleteModel(pb.DeleteModelRequest(name="shared-digits")).deleted
    wait_until_gone(second.target, "shared-digits", VISIBLE_WITHIN_S)
    with triton.InferenceServerClient(second.target) as client:
        assert "shared-digits" not in [m.name for m in client.get_model_repository_index().models]


def test_sigterm_stops_a_running_job_cleanly_for_the_next_start_and_exits_zero(tmp_path) -> None:
    """The job stops after its batch with its features and last checkpoint kept in the store, where the
    next start of a server sharing it goes on with it (tests/test_job_resume.py)."""
    proc = start_server(tmp_path, *SERVER, "--model-store", str(tmp_path / "store"))
    proc.wait_serving()
    images, targets = digits()
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        job = stub.CreateJob(
            job_requests(
                config("endless", base_model=TINY, epochs=1000, batch_size=4),
                images[:100],
                [str(t) for t in targets[:100]],
            )
        )
        kinds = []
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300):
            kinds.append(event.kind)
            if event.kind == "epoch" and event.epoch == 1:
                proc.process.terminate()
    assert kinds[-1] == "suspended"
    assert proc.process.wait(60) == 0, proc.log()
    assert not (tmp_path / "store" / "endless").exists()
    kept = tmp_path / "store" / ".jobs" / "live" / job.id
    assert {"job.json", "inputs.safetensors", "checkpoint.safetensors"} <= {p.name for p in kept.iterdir()}
