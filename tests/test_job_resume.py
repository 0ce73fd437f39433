"""Jobs that survive a restart (service.finetune.durable).

End to end: a real server process killed (SIGKILL) or stopped (SIGTERM) during a job's third epoch
of six; the next start of a server sharing the store goes on from the last checkpoint and finishes
with the very figures of an uninterrupted run, and serves the model; a job whose kept inputs were
removed from the store ends ``failed`` with that reason. A directory store and an S3 one (moto).
The servers serve the tiny network: what is tested is the job, the same whatever the backbone, and
tiny's forward pass costs microseconds.

Without a server: leases claimed by one of several replicas at once, a holder that lost its job
fenced off by the conditional writes, the quota, checkpoints that go on exactly, and damaged ones."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.conftest import ServerProcess, start_server
from tests.support.finetune_data import digits
from tests.test_finetune import config, job_requests
from tests.tiny import TINY
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

# Enough examples (the held-out images start at 1500) that what is left of the job when the test stops
# its server, four epochs of 400 steps or most of 32 chunks of features, lasts far longer than an event
# takes to arrive: the tiny network's steps and chunks take milliseconds.
EXAMPLES = 1000
EPOCHS = 6
SERVER = ("--models", TINY, "--weights", "random")
LEASE_S = "2"  # a killed server's jobs go on after this
RESUMED_WITHIN_S = 240.0


def job_config(name: str) -> pb.FineTuneConfig:
    # Batches of 2 through a 512-wide hidden layer: epochs long enough to kill a server in the third;
    # dropout draws from the random stream a resumed job must go on with.
    return config(
        name,
        base_model=TINY,
        epochs=EPOCHS,
        batch_size=2,
        head=pb.HeadSpec(kind="two_layer", hidden=512, dropout=0.2),
        optimizer=pb.OptimizerSpec(kind="adam", lr=1e-3),
    )


def examples() -> tuple[list[bytes], list[str]]:
    images, targets = digits()
    return images[:EXAMPLES], [str(t) for t in targets[:EXAMPLES]]


@dataclass
class Store:
    args: tuple[str, ...]
    env: dict[str, str]
    folder: Path | None  # a directory store's folder
    s3: object | None = None  # a boto3 client of the S3 store
    bucket: str = ""

    def kept(self, job_id: str) -> list[str]:
        """Keys of what ``job_id`` keeps in the store."""
        prefix = f".jobs/live/{job_id}/"
        if self.folder is not None:
            folder = self.folder / prefix
            return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"models/{prefix}")  # type: ignore[attr-defined]
        return sorted(item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", []))

    def wait_emptied(self, job_id: str) -> None:
        """Until what ``job_id`` kept is deleted: that follows the job's last event."""
        deadline = time.monotonic() + 60
        while kept := self.kept(job_id):
            assert time.monotonic() < deadline, f"job {job_id} still keeps {kept}"
            time.sleep(0.1)

    def remove(self, job_id: str, name: str) -> None:
        if self.folder is not None:
            (self.folder / ".jobs" / "live" / job_id / name).unlink()
        else:
            self.s3.delete_object(Bucket=self.bucket, Key=f"models/.jobs/live/{job_id}/{name}")  # type: ignore[attr-defined]


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "directory":
        folder = tmp_path / "store"
        return Store(("--model-store", str(folder)), {}, folder)
    moto = request.getfixturevalue("moto_server")
    bucket = moto.new_bucket()
    return Store(("--model-store", f"s3://{bucket}/models"), moto.environment(), None, moto.client(), bucket)


@pytest.fixture
def serve(tmp_path, store) -> Iterator:
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        proc = start_server(
            tmp_path,
            *SERVER, *store.args,
            "--store-poll-seconds", "1", "--job-lease-seconds", LEASE_S,
            env=store.env,
        )  # fmt: skip
        started.append(proc)
        proc.wait_serving()
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[tuple], np.ndarray]:
    """An uninterrupted run of the job: its curve, and the logits its model gives the held-out images."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = start_server(tmp, *SERVER, "--model-store", str(tmp / "store"))
    try:
        proc.wait_serving()
        images, labels = examples()
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            job = stub.CreateJob(job_requests(job_config("reference"), images, labels), timeout=300)
            events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600))
            assert events[-1].kind == "succeeded", events[-1].message
            done = stub.GetJob(pb.GetJobRequest(job_id=job.id))
        return curve(done), logits(proc.target, "reference")
    finally:
        proc.stop()


def curve(job: pb.Job) -> list[tuple]:
    return [(p.epoch, p.train_loss, p.validation_loss, p.validation_accuracy) for p in job.epoch_metrics]


def logits(target: str, model: str) -> np.ndarray:
    images, _ = digits()
    with triton.InferenceServerClient(target) as client:
        tensor = triton.InferInput("IMAGE", [16], "BYTES")
        tensor.set_data_from_numpy(np.array(images[1500:1516], dtype=np.object_))
        return client.infer(model, [tensor], client_timeout=120).as_numpy("LOGITS")


def start_job_and_stop_in_epoch_3(proc: ServerProcess, name: str, how: signal.Signals) -> tuple[str, list[pb.JobEvent]]:
    """Create the job, and send ``how`` to the server once epoch 2's event (its checkpoint is written
    before it) has come: the server stops in epoch 3. The events seen, up to the stream's end."""
    images, labels = examples()
    seen: list[pb.JobEvent] = []
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        job = stub.CreateJob(job_requests(job_config(name), images, labels), timeout=300)
        try:
            for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600):
                seen.append(event)
                if event.kind == "epoch" and event.epoch == 2:
                    proc.process.send_signal(how)
        except grpc.RpcError as exc:
            assert how == signal.SIGKILL, exc  # a killed server's stream breaks; a stopping one's ends
    assert proc.process.wait(120) == (-signal.SIGKILL if how == signal.SIGKILL else 0), proc.log()
    assert not any(e.kind in ("succeeded", "failed", "cancelled") for e in seen), [e.kind for e in seen]
    return job.id, seen


def follow(proc: ServerProcess, job_id: str) -> tuple[list[pb.JobEvent], pb.Job]:
    """The events of ``job_id`` on ``proc`` once it has claimed the job, to its end, and the job then.
    Until it has (a killed server's lease must expire first), WatchJob answers UNAVAILABLE."""
    deadline = time.monotonic() + RESUMED_WITHIN_S
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        while True:
            try:
                events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=600))
                return events, stub.GetJob(pb.GetJobRequest(job_id=job_id))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < deadline, f"job {job_id} did not go on: {proc.log()[-3000:]}"
                time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("store", "how"),
    [("directory", signal.SIGKILL), ("s3", signal.SIGKILL), ("directory", signal.SIGTERM)],
    ids=["directory-kill-9", "s3-kill-9", "directory-sigterm"],  # SIGTERM is the same on both stores
    indirect=["store"],
)
def test_a_job_goes_on_after_its_server_stops_with_the_same_figures(serve, store, reference, how) -> None:
    expected_curve, expected_logits = reference
    first = serve()
    job_id, before = start_job_and_stop_in_epoch_3(first, "resumed", how)
    if how == signal.SIGTERM:
        assert before[-1].kind == "suspended", before[-1]
    kept = {"job.json", "inputs.safetensors", "checkpoint.safetensors"}
    # A killed server's lease stays until it expires; a stopping server hands it back.
    assert set(store.kept(job_id)) == (kept | {"lease.json"} if how == signal.SIGKILL else kept)

    second = serve()
    with grpc.insecure_channel(second.target) as channel:  # listed, claimed yet or not
        listed = pb_grpc.FineTuningStub(channel).ListJobs(pb.ListJobsRequest()).jobs
        assert job_id in [j.id for j in listed if j.state in (pb.QUEUED, pb.RUNNING, pb.SUCCEEDED)]
    events, job = follow(second, job_id)
    assert job.state == pb.SUCCEEDED, job.error
    resumed = next(e for e in events if e.kind == "resumed")
    assert 2 <= resumed.epoch < EPOCHS, resumed
    # Epochs before the stop come from the checkpoint, the rest from going on: all equal to the
    # uninterrupted run's, to the last bit (the same inputs, model, optimizer and random streams).
    assert curve(job) == expected_curve
    assert [e.epoch for e in events if e.kind == "epoch"] == list(range(1, EPOCHS + 1))
    np.testing.assert_array_equal(logits(second.target, "resumed"), expected_logits)
    store.wait_emptied(job_id)  # what the job kept is deleted once it has ended


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["s3"], indirect=True)  # both stores read a missing object alike (test_object_stores)
def test_a_job_whose_inputs_are_gone_ends_failed_with_the_reason(serve, store) -> None:
    first = serve()
    job_id, _ = start_job_and_stop_in_epoch_3(first, "inputs-gone", signal.SIGKILL)
    store.remove(job_id, "inputs.safetensors")

    second = serve()
    events, job = follow(second, job_id)
    assert job.state == pb.FAILED
    assert "inputs are not in the store" in job.error and "deleted" in job.error, job.error
    assert events[-1].kind == "failed"
    store.wait_emptied(job_id)
    with triton.InferenceServerClient(second.target) as client:
        assert "inputs-gone" not in [m.name for m in client.get_model_repository_index().models]
    second.assert_no_traceback()


# -- the store side, without a server ------------------------------------------------------------


@pytest.fixture(params=["directory", "s3"])
def objects(request, tmp_path):  # -> service.storage.ObjectStore
    from service.storage import open_objects

    return open_objects(tmp_path / "store" if request.param == "directory" else request.getfixturevalue("s3_store"))


def kept_job(job_id: str = "0123456789ab"):  # -> service.finetune.job.Job
    from service.finetune.job import Job
    from vision_client.protocol import FineTuneConfig

    return Job(job_id, FineTuneConfig(base_model="alexnet", output_model="kept", epochs=4), ["a", "b"], 20)


def keeper(objects, *, lease_s: float = 60.0, quota: int = 1 << 30, holder: str | None = None):
    from service.finetune.durable import JobKeeper

    return JobKeeper(objects, quota_bytes=quota, lease_s=lease_s, holder=holder)


def test_one_replica_of_several_claims_a_job_whose_lease_expired_and_the_old_holder_is_fenced_off(objects) -> None:
    import threading

    import torch

    from service.finetune.durable import LeaseLost
    from service.finetune.trainer import train_head

    job = kept_job()
    # A lease that has already expired when written: its holder "died" (no clock is waited on).
    dead = keeper(objects, lease_s=-1.0, holder="dead")
    dead.begin(job)
    features, targets = torch.randn(20, 8), torch.arange(20) % 2
    assert dead.keep_inputs(job, features, targets)
    states = []

    def checkpoint(state):  # -> None
        states.append(state)
        dead.checkpoint(job.id, state)

    train_head(features, targets, job.config, num_outputs=2, on_checkpoint=checkpoint)

    live = keeper(objects, holder="live")
    assert [job.id] == list(live.unheld())
    assert [(kept.id, kept.state.value, kept.config) for kept in live.kept_jobs()] == [(job.id, "running", job.config)]
    replicas = [keeper(objects, holder=f"replica-{i}") for i in range(4)]
    start = threading.Barrier(len(replicas))
    won: list[bool] = [False] * len(replicas)

    def claim(i: int) -> None:
        start.wait()
        won[i] = replicas[i].claim(job.id)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(won) == 1, won  # the conditional writes let one replica have it
    holder = replicas[won.index(True)]
    assert list(live.unheld()) == []  # its lease is live again
    assert not live.claim(job.id)

    # The new holder goes on from the last checkpoint; the old one can neither renew nor overwrite it.
    resumed = holder.resume_point(job.id)
    assert resumed.state is not None and resumed.state.epoch == 4 and len(resumed.curve) == 4
    with pytest.raises(LeaseLost):
        dead.renew(job.id)
    holder.checkpoint(job.id, states[-1])
    dead._leases[job.id] = "a lease it thinks it has"  # a holder that has not yet noticed
    with pytest.raises(LeaseLost):
        dead.checkpoint(job.id, states[-1])

    holder.end(job.id)
    assert list(objects.list(".jobs/live/")) == []


def test_a_checkpoint_whose_last_write_landed_unseen_is_written_while_the_lease_is_held(objects) -> None:
    """A store client that retries a conditional write whose answer was lost sees its condition fail
    on its own write: while the job's lease is this process's, the checkpoint is written anyway;
    once another holds the lease, it is not."""
    import torch

    from service.finetune.durable import LeaseLost
    from service.finetune.trainer import train_head

    job = kept_job()
    holder = keeper(objects, holder="holder")
    holder.begin(job)
    features, targets = torch.randn(20, 8), torch.arange(20) % 2
    assert holder.keep_inputs(job, features, targets)
    states = []
    train_head(features, targets, job.config, num_outputs=2, on_checkpoint=states.append)
    key = f".jobs/live/{job.id}/checkpoint.safetensors"
    holder.checkpoint(job.id, states[0])
    objects.replace(key, b"the same write, landed a second time", objects.head(key).etag)  # its etag moves on
    holder.checkpoint(job.id, states[1])  # the lease is still the holder's: no LeaseLost
    assert holder.resume_point(job.id).state.epoch == 2

    lease = f".jobs/live/{job.id}/lease.json"
    objects.replace(lease, b'{"holder": "another", "expires": 1e12}', objects.head(lease).etag)  # taken over
    objects.replace(key, b"the new holder's checkpoint", objects.head(key).etag)
    with pytest.raises(LeaseLost):
        holder.checkpoint(job.id, states[2])
    assert objects.read(key, 1 << 20) == b"the new holder's checkpoint"


def test_a_resumed_run_goes_on_with_the_same_figures_and_random_streams(tmp_path) -> None:
    import torch

    from service.finetune.trainer import train_head
    from service.storage import open_objects
    from vision_client.protocol import FineTuneConfig, HeadConfig

    objects = open_objects(tmp_path / "store")
    torch.manual_seed(0)
    features, targets = torch.randn(120, 16), torch.arange(120) % 3
    head = HeadConfig(kind="two_layer", hidden=32, dropout=0.3)
    config = FineTuneConfig(base_model="alexnet", output_model="m", epochs=6, batch_size=8, seed=5, head=head)
    job = kept_job()
    job.config = config
    first = keeper(objects, holder="first")
    first.begin(job)
    curve = []
    whole = train_head(features, targets, config, num_outputs=3, on_epoch=lambda r: curve.append(r.train_loss),
                       on_checkpoint=lambda s: first.checkpoint(job.id, s) if s.epoch <= 3 else None)  # fmt: skip

    second = keeper(objects, holder="second")
    resumed = second.resume_point(job.id)
    assert resumed.state is not None and resumed.state.epoch == 3
    assert [p.train_loss for p in resumed.curve] == curve[:3]
    rest = []
    again = train_head(features, targets, config, num_outputs=3, on_epoch=lambda r: rest.append(r.train_loss),
                       resume=resumed.state)  # fmt: skip
    assert rest == curve[3:]  # dropout and the batch order go on with the same draws
    assert again.metrics.confusion == whole.metrics.confusion
    assert again.metrics.validation_loss == whole.metrics.validation_loss
    for name, value in whole.head.state_dict().items():
        assert torch.equal(again.head.state_dict()[name], value), name


def test_a_runs_draws_are_its_own_whatever_other_threads_do_with_torchs_generator() -> None:
    """The same job's figures and weights, alone and while another thread builds networks and
    reseeds torch's global generator (a server building a model, another job): the head's
    initialization, the batch order and every dropout mask, of the head's and of the trained blocks'
    (torch's own Dropout in a base such as AlexNet's fc6), come from the run's own generators."""
    import threading

    import torch

    from service.finetune.trainer import train_head
    from vision_client.protocol import FineTuneConfig, HeadConfig

    torch.manual_seed(0)
    features, targets = torch.randn(96, 16), torch.arange(96) % 3
    blocks = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(16, 16), torch.nn.ReLU())
    given = blocks[1].weight.detach().clone()
    head = HeadConfig(kind="two_layer", hidden=32, dropout=0.3)
    config = FineTuneConfig(base_model=TINY, output_model="m", epochs=4, batch_size=8, seed=5, head=head,
                            train_backbone_blocks=1, backbone_lr_factor=1.0)  # fmt: skip

    def run() -> tuple[list[float], dict[str, torch.Tensor]]:
        curve: list[float] = []
        result = train_head(features, targets, config, num_outputs=3, trunk=blocks,
                            on_epoch=lambda report: curve.append(report.train_loss))  # fmt: skip
        return curve, result.head.state_dict()

    alone = run()
    stop = threading.Event()

    def meddle() -> None:
        while not stop.is_set():
            torch.manual_seed(int(time.monotonic_ns() % 1000))
            torch.nn.Linear(64, 64)  # its initialization draws from the global generator
            torch.rand(100)

    meddler = threading.Thread(target=meddle)
    meddler.start()
    try:
        beside = run()
    finally:
        stop.set()
        meddler.join()
    assert beside[0] == alone[0]
    for name, value in alone[1].items():
        assert torch.equal(beside[1][name], value), name
    assert type(blocks[0]) is torch.nn.Dropout and torch.equal(blocks[1].weight, given)  # the blocks given: untouched


def test_inputs_over_the_quota_are_not_kept_and_the_job_says_why_when_it_cannot_go_on(tmp_path) -> None:
    import torch

    from service.finetune.durable import InputsGone
    from service.storage import open_objects

    objects = open_objects(tmp_path / "store")
    small = keeper(objects, quota=1000)
    job = kept_job()
    small.begin(job)
    assert not small.keep_inputs(job, torch.zeros(100, 8), torch.zeros(100, dtype=torch.long))
    with pytest.raises(InputsGone, match=r"were not kept.*--max-kept-job-bytes"):
        small.inputs(job.id)

    other = kept_job("ba9876543210")
    small.begin(other)  # a job stopped before its features were kept
    with pytest.raises(InputsGone, match="stopped before its features were kept"):
        small.inputs(other.id)


def test_a_damaged_checkpoint_makes_the_job_start_over_and_damaged_inputs_end_it(tmp_path, caplog) -> None:
    import torch

    from service.finetune.durable import InputsGone
    from service.storage import open_objects

    objects = open_objects(tmp_path / "store")
    holder = keeper(objects)
    job = kept_job()
    holder.begin(job)
    assert holder.keep_inputs(job, torch.zeros(20, 8), torch.zeros(20, dtype=torch.long))
    for damage in (b"", b"\xff" * 64, (10**9).to_bytes(8, "little") + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00{}"):
        objects.write(f".jobs/live/{job.id}/checkpoint.safetensors", damage)
        assert holder.resume_point(job.id).state is None  # the first epoch again, from the kept inputs
    assert "cannot be read" in caplog.text and "Traceback" not in caplog.text
    objects.write(f".jobs/live/{job.id}/inputs.safetensors", b"\x00" * 100)
    with pytest.raises(InputsGone, match="cannot be read"):
        holder.inputs(job.id)


@pytest.mark.parametrize("checkpoint_s", [0.0, float("inf")], ids=["every-epoch", "last-only"])
def test_checkpoints_are_written_after_every_epoch_or_at_most_every_so_often(tmp_path, checkpoint_s) -> None:
    import torch

    from service.finetune.trainer import train_head
    from service.storage import open_objects

    objects = open_objects(tmp_path / "store")
    holder = keeper(objects, holder="one")
    holder.checkpoint_s = checkpoint_s
    job = kept_job()
    holder.begin(job)
    features, targets = torch.randn(20, 8), torch.arange(20) % 2
    job.kept = job.inputs_kept = holder.keep_inputs(job, features, targets)
    resume, on_checkpoint = holder.training_hooks(job)
    assert resume is None and on_checkpoint is not None
    written = []  # after each epoch (its event follows its checkpoint): the epoch the store's checkpoint is of

    reader = keeper(objects, holder="reader")  # as a server that claims the job would read it

    def on_epoch(report) -> None:  # -> None
        point = reader.resume_point(job.id)
        written.append(point.state.epoch if point.state is not None else 0)

    train_head(features, targets, job.config, num_outputs=2, on_epoch=on_epoch, on_checkpoint=on_checkpoint)
    epochs = job.config.epochs
    assert written == (list(range(1, epochs + 1)) if checkpoint_s == 0 else [0] * (epochs - 1) + [epochs])
    assert len(reader.resume_point(job.id).curve) == epochs  # every epoch's figures, written or not


def test_an_uploads_images_are_kept_until_its_features_are_and_read_back_checked(tmp_path) -> None:
    import numpy as np
    import torch

    from service.finetune.durable import InputsGone
    from service.finetune.examples import TrainingExamples
    from service.storage import open_objects

    objects = open_objects(tmp_path / "store")
    holder = keeper(objects)
    images, labels = examples()
    for job, given in (
        (kept_job(), TrainingExamples(images[:20], labels=labels[:20])),
        (kept_job("ba9876543210"), TrainingExamples(images[:5], targets=np.arange(10, dtype=np.float32).reshape(5, 2))),
    ):
        holder.begin(job)
        assert holder.keep_images(job, given)
        back = holder.kept_examples(job.id)
        assert back is not None and back.images == given.images and back.labels == given.labels
        assert (back.targets is None) == (given.targets is None)
        if given.targets is not None:
            np.testing.assert_array_equal(back.targets, given.targets)
    # Damaged images end the job with a reason; once its features are kept, they are not read.
    key = ".jobs/live/0123456789ab/images.bin"
    whole = objects.read(key, 1 << 30)
    for damage in (whole[:-1], whole + b"x", b"\x00" * 8, (10**6).to_bytes(8, "little") + b"{}"):
        objects.write(key, damage)
        with pytest.raises(InputsGone, match="cannot be read"):
            holder.kept_examples("0123456789ab")
    assert holder.keep_inputs(kept_job(), torch.zeros(20, 8), torch.zeros(20, dtype=torch.long))
    assert holder.kept_examples("0123456789ab") is None
    # Over the quota they are not kept.
    small = keeper(objects, quota=holder.used_bytes() + 100)
    other = kept_job("00000000000a")
    small.begin(other)
    assert not small.keep_images(other, TrainingExamples(images[:20], labels=labels[:20]))
    assert small.kept_examples(other.id) is None
    with pytest.raises(InputsGone, match=r"its images \(.*\) were not kept.*--max-kept-job-bytes"):
        small.inputs(other.id)


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["directory"], indirect=True)  # the kept images are one more object
def test_a_job_stopped_while_its_features_are_extracted_goes_on_from_its_kept_images(serve, store, reference) -> None:
    expected_curve, expected_logits = reference
    first = serve()
    images, labels = examples()
    with grpc.insecure_channel(first.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        job_id = stub.CreateJob(job_requests(job_config("from-images"), images, labels), timeout=300).id
        assert "images.bin" in store.kept(job_id)  # kept before CreateJob answers
        with pytest.raises(grpc.RpcError):
            for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=600):
                assert event.kind in ("queued", "features"), event  # killed at its first chunk of features
                if event.kind == "features":
                    first.process.kill()
    first.process.wait(60)
    assert "inputs.safetensors" not in store.kept(job_id)

    second = serve()
    events, job = follow(second, job_id)
    assert job.state == pb.SUCCEEDED, job.error
    resumed = next(e for e in events if e.kind == "resumed")
    assert resumed.epoch == 0 and "first epoch" in resumed.message
    assert curve(job) == expected_curve
    np.testing.assert_array_equal(logits(second.target, "from-images"), expected_logits)
    store.wait_emptied(job_id)


def test_a_run_that_stopped_early_goes_on_to_its_end_without_another_epoch(tmp_path) -> None:
    import torch

    from service.finetune.trainer import train_head
    from service.storage import open_objects
    from vision_client.protocol import FineTuneConfig

    objects = open_objects(tmp_path / "store")
    torch.manual_seed(1)
    features, targets = torch.randn(60, 8), torch.randint(0, 3, (60,))  # noise: validation stops improving soon
    config = FineTuneConfig(
        base_model="alexnet", output_model="m", epochs=50, batch_size=8, seed=2, early_stopping_patience=1
    )
    job = kept_job()
    job.config = config
    holder = keeper(objects, holder="first")
    holder.begin(job)
    whole = train_head(features, targets, config, num_outputs=3, on_checkpoint=lambda s: holder.checkpoint(job.id, s))
    assert whole.metrics.epochs_run < 50  # it stopped early

    resumed = keeper(objects, holder="second").resume_point(job.id)
    assert resumed.state is not None and resumed.state.stopped
    more = []
    again = train_head(features, targets, config, num_outputs=3, on_epoch=more.append, resume=resumed.state)
    assert more == []
    assert again.metrics.epochs_run == whole.metrics.epochs_run and again.metrics.best_epoch == whole.metrics.best_epoch
    assert again.metrics.validation_loss == whole.metrics.validation_loss


def test_backbone_blocks_trained_with_the_head_go_on_from_a_checkpoint_too(tmp_path) -> None:
    import torch
    from torch import nn

    from service.finetune.trainer import train_head
    from service.storage import open_objects
    from vision_client.protocol import FineTuneConfig

    objects = open_objects(tmp_path / "store")
    torch.manual_seed(0)
    # A stand-in for the last blocks of a backbone: their input activations are the features.
    trunk = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    activations, targets = torch.randn(80, 4, 6, 6), torch.arange(80) % 3
    config = FineTuneConfig(base_model="alexnet", output_model="m", epochs=5, batch_size=8, seed=1)
    job = kept_job()
    job.config = config
    holder = keeper(objects, holder="first")
    holder.begin(job)
    curve = []
    whole = train_head(
        activations, targets, config, num_outputs=3, trunk=trunk, on_epoch=lambda r: curve.append(r.train_loss),
        on_checkpoint=lambda s: holder.checkpoint(job.id, s) if s.epoch <= 2 else None,
    )  # fmt: skip

    resumed = keeper(objects, holder="second").resume_point(job.id)
    assert resumed.state is not None and resumed.state.epoch == 2
    rest = []
    again = train_head(
        activations, targets, config, num_outputs=3, trunk=trunk, on_epoch=lambda r: rest.append(r.train_loss),
        resume=resumed.state,
    )  # fmt: skip
    assert rest == curve[2:]
    for name, value in whole.head.state_dict().items():  # the blocks' weights and the head's
        assert torch.equal(again.head.state_dict()[name], value), name
