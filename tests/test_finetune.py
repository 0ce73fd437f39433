"""Fine-tuning end to end: real images, both optimizers, served at once, survives restarts."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from service.models import get_model_spec
from tests.conftest import load_reference, start_server, store_server_args
from tests.metrics_util import sample_value, scrape
from tests.support.finetune_data import digits
from tests.tiny import TINY
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

TRAIN = slice(0, 500)
HELD_OUT = slice(1000, 1300)


@pytest.fixture(scope="module")
def store_server(tmp_path_factory, weights_dir):
    store = tmp_path_factory.mktemp("store")
    args = store_server_args(weights_dir, store)
    proc = start_server(tmp_path_factory.mktemp("ft"), *args)
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def config(output: str, **overrides) -> pb.FineTuneConfig:
    message = pb.FineTuneConfig(
        base_model="alexnet", output_model=output, epochs=40, batch_size=32, validation_fraction=0.2, seed=0
    )
    for key, value in overrides.items():
        field = getattr(message, key) if key in ("head", "optimizer") else None
        if field is not None:
            field.CopyFrom(value)
        else:
            setattr(message, key, value)
    return message


def job_requests(cfg: pb.FineTuneConfig, images: list[bytes], labels: list[str], chunk: int = 64):
    yield pb.CreateJobRequest(config=cfg)
    for start in range(0, len(images), chunk):
        pairs = zip(images[start : start + chunk], labels[start : start + chunk], strict=True)
        examples = [pb.Example(image=image, label=label) for image, label in pairs]
        yield pb.CreateJobRequest(examples=pb.ExampleBatch(examples=examples))


def run_job(stub, cfg, images, labels) -> tuple[pb.Job, list[pb.JobEvent]]:
    job = stub.CreateJob(job_requests(cfg, images, labels), timeout=300)
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600))
    return stub.GetJob(pb.GetJobRequest(job_id=job.id)), events


def classify(target: str, model: str, images: list[bytes]) -> np.ndarray:
    with triton.InferenceServerClient(target) as client:
        tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
        output = triton.InferRequestedOutput("LOGITS", class_count=1)
        result = client.infer(model, [tensor], outputs=[output], client_timeout=300).as_numpy("LOGITS")
    return np.array([row[0].decode().split(":", 2)[2] for row in result])


@pytest.fixture(scope="module")
def probe_accuracy(weights_dir) -> float:
    """A standardized scikit-learn LogisticRegression on the same backbone's features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torchvision.models import AlexNet_Weights

    images, targets = digits()
    reference = load_reference(weights_dir, "alexnet")
    extractor = get_model_spec("alexnet").features(reference)
    transform = AlexNet_Weights.DEFAULT.transforms()

    def features(selection: slice) -> np.ndarray:
        from io import BytesIO

        from PIL import Image

        batch = torch.stack([transform(Image.open(BytesIO(b)).convert("RGB")) for b in images[selection]])
        with torch.inference_mode():
            return torch.cat([extractor(part) for part in batch.split(64)]).numpy()

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(features(TRAIN), targets[TRAIN])
    accuracy = float(probe.score(features(HELD_OUT), targets[HELD_OUT]))
    print(f"\nlogistic-regression probe, held-out accuracy: {accuracy:.3f}")
    return accuracy


@pytest.mark.parametrize(
    "name, head, optimizer",
    [
        ("digits-adam-two-layer", pb.HeadSpec(kind="two_layer", hidden=256), pb.OptimizerSpec(kind="adam", lr=1e-3)),
        ("digits-sgd-linear", pb.HeadSpec(kind="linear"), pb.OptimizerSpec(kind="sgd", lr=0.001, momentum=0.9)),
    ],
)
def test_heads_match_a_logistic_regression_probe_and_are_served_at_once(
    store_server, probe_accuracy, name, head, optimizer
) -> None:
    images, targets = digits()
    labels = [str(t) for t in targets]
    with grpc.insecure_channel(store_server.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        job, events = run_job(stub, config(name, head=head, optimizer=optimizer), images[TRAIN], labels[TRAIN])
    assert job.state == pb.SUCCEEDED, job.error
    assert list(job.labels) == [str(d) for d in range(10)]
    epochs = [e for e in events if e.kind == "epoch"]
    assert [e.epoch for e in epochs] == list(range(1, 41))
    assert all(e.validation_loss > 0 and 0 <= e.validation_accuracy <= 1 for e in epochs)
    assert epochs[-1].train_loss < epochs[0].train_loss
    assert [e.kind for e in events][:2] == ["queued", "features"] and events[-1].kind == "succeeded"
    predicted = classify(store_server.target, name, images[HELD_OUT])
    accuracy = float((predicted == np.array(labels[HELD_OUT])).mean())
    print(f"\n{name}: held-out accuracy {accuracy:.3f} (probe {probe_accuracy:.3f})")
    assert accuracy >= probe_accuracy - 0.03


def test_model_survives_a_restart_on_the_same_store(store_server, tmp_path, weights_dir) -> None:
    images, _ = digits()
    sample = images[HELD_OUT][:40]
    with triton.InferenceServerClient(store_server.target) as client:
        assert client.is_model_ready("digits-adam-two-layer")
    before = classify(store_server.target, "digits-adam-two-layer", sample)
    store = store_server.args[store_server.args.index("--model-store") + 1]
    second = start_server(tmp_path, "--models", "alexnet", "--weights", str(weights_dir), "--model-store", store)
    try:
        second.wait_serving("digits-adam-two-layer")
        with triton.InferenceServerClient(second.target) as client:
            metadata = client.get_model_metadata("digits-adam-two-layer")
            assert metadata.platform == "vision_finetuned"
            assert list(metadata.outputs[0].shape) == [-1, 10]
        assert (classify(second.target, "digits-adam-two-layer", sample) == before).all()
    finally:
        assert second.stop() == 0


def _expect_error(call, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() == code, raised.value.details()
    assert text in raised.value.details()


def test_bad_jobs_fail_clearly_and_inference_keeps_working(store_server) -> None:
    images, targets = digits()
    labels = [str(t) for t in targets]
    with grpc.insecure_channel(store_server.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        _expect_error(
            lambda: stub.CreateJob(job_requests(config("x"), images[:20], ["7"] * 20)), bad, "at least 2 classes"
        )
        _expect_error(
            lambda: stub.CreateJob(job_requests(config("x", base_model="inception"), images[:4], labels[:4])),
            grpc.StatusCode.NOT_FOUND,
            "inception",
        )
        _expect_error(lambda: stub.CreateJob(job_requests(config("x"), [], [])), bad, "at least 2 examples")
        _expect_error(
            lambda: stub.CreateJob(job_requests(config("x"), [*images[:5], b"not an image"], labels[:6])),
            bad,
            "example 5",
        )
        _expect_error(lambda: stub.CreateJob(job_requests(config("alexnet"), images[:4], labels[:4])), bad, "built-in")
        _expect_error(
            lambda: stub.CreateJob(job_requests(config("Bad Name"), images[:4], labels[:4])), bad, "valid model name"
        )
        _expect_error(
            lambda: stub.CreateJob(iter([pb.CreateJobRequest(examples=pb.ExampleBatch())])),
            bad,
            "first CreateJobRequest",
        )
        _expect_error(lambda: stub.GetJob(pb.GetJobRequest(job_id="nope")), grpc.StatusCode.NOT_FOUND, "nope")
        _expect_error(lambda: stub.DeleteModel(pb.DeleteModelRequest(name="alexnet")), bad, "built-in")
    assert store_server.alive()
    assert classify(store_server.target, "alexnet", images[:2]).shape == (2,)


def test_cancel_stops_a_running_job(store_server) -> None:
    images, targets = digits()
    labels = [str(t) for t in targets]
    with grpc.insecure_channel(store_server.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        cfg = config("digits-cancelled", epochs=1000, batch_size=4)
        job = stub.CreateJob(job_requests(cfg, images[:200], labels[:200]), timeout=300)
        kinds = []
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600):
            kinds.append(event.kind)
            if event.kind == "epoch" and event.epoch == 2:
                assert stub.CancelJob(pb.CancelJobRequest(job_id=job.id)).id == job.id
        final = stub.GetJob(pb.GetJobRequest(job_id=job.id))
        assert final.state == pb.CANCELLED
        assert kinds[-1] == "cancelled" and kinds.count("epoch") < 1000
        listed = {j.id: j.state for j in stub.ListJobs(pb.ListJobsRequest()).jobs}
        assert listed[job.id] == pb.CANCELLED
    with (
        triton.InferenceServerClient(store_server.target) as client,
        pytest.raises(Exception, match="digits-cancelled"),
    ):
        client.get_model_metadata("digits-cancelled")


def test_inference_is_answered_while_a_job_trains(store_server) -> None:
    """Inference latency during training is printed (measured, never asserted as a time)."""
    images, targets = digits()
    labels = [str(t) for t in targets]
    latencies: list[float] = []
    stop = threading.Event()

    def keep_classifying() -> None:
        with triton.InferenceServerClient(store_server.target) as client:
            tensor = triton.InferInput("IMAGE", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([images[1500]], dtype=np.object_))
            while not stop.is_set() and len(latencies) < 2000:
                started = time.monotonic()
                client.infer("alexnet", [tensor], client_timeout=60)
                latencies.append(time.monotonic() - started)

    thread = threading.Thread(target=keep_classifying)
    thread.start()
    try:
        with grpc.insecure_channel(store_server.target) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            job, _ = run_job(stub, config("digits-busy", epochs=20), images[:300], labels[:300])
    finally:
        stop.set()
        thread.join()
    assert job.state == pb.SUCCEEDED
    assert len(latencies) > 5
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"\ninference during fine-tuning: {len(latencies)} requests, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    text = scrape(store_server.metrics_url)
    assert sample_value(text, "vision_finetune_jobs", state="succeeded") >= 1
    assert sample_value(text, "vision_finetune_images_total") > 0
    assert sample_value(text, "vision_inference_images_total", model="alexnet:features") > 0


def test_delete_model_stops_serving_it(store_server) -> None:
    images, targets = digits()
    labels = [str(t) for t in targets]
    with grpc.insecure_channel(store_server.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        job, _ = run_job(stub, config("digits-doomed", epochs=2), images[:60], labels[:60])
        assert job.state == pb.SUCCEEDED
        assert stub.DeleteModel(pb.DeleteModelRequest(name="digits-doomed")).deleted
        _expect_error(
            lambda: stub.DeleteModel(pb.DeleteModelRequest(name="digits-doomed")),
            grpc.StatusCode.NOT_FOUND,
            "digits-doomed",
        )
    with triton.InferenceServerClient(store_server.target) as client:
        assert "digits-doomed" not in [m.name for m in client.get_model_repository_index().models]


def test_fine_tuning_requires_the_token_when_one_is_set(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proc = start_server(
        tmp_path, "--models", TINY, "--weights", "random",  # the token is checked before any backbone runs
        "--model-store", str(tmp_path / "store"), "--auth-token-file", str(token),
    )  # fmt: skip
    try:
        proc.wait_serving()
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            _expect_error(lambda: stub.ListJobs(pb.ListJobsRequest()), grpc.StatusCode.UNAUTHENTICATED, "Bearer")
            wrong = (("authorization", "Bearer nope"),)
            _expect_error(
                lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=wrong),
                grpc.StatusCode.UNAUTHENTICATED,
                "not valid",
            )
            _expect_error(
                lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="x"))), grpc.StatusCode.UNAUTHENTICATED, "Bearer"
            )
            assert stub.ListJobs(pb.ListJobsRequest(), metadata=(("authorization", "Bearer s3cret"),)).jobs == []
        images, _ = digits()
        assert classify(proc.target, TINY, images[:1]).shape == (1,)  # inference needs no token
    finally:
        proc.stop()
