"""Fine-tuning through the SDK and its command line, against a real server with a model store.

The server runs in the test process (``tests.client_util.inprocess_server``): the SDK
reaches it over loopback gRPC as it would any other. The command line runs as a process.
Every behaviour is checked for both twins, ``Client`` and ``AsyncClient``, with one
test body (``tests.client_util``). The examples are real labelled images:
scikit-learn's handwritten digits, 120 of them to train on, ten classes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.client_util import (
    CALL_TIMEOUT,
    EVERY_SETTING,
    collect,
    connect,
    inprocess_server,
    readme_examples,
    result,
    run,
    vision_client,
)
from tests.conftest import TOKEN
from tests.inprocess import InProcessServer, running, tiny_config
from tests.support.finetune_data import digits, large_noise_examples
from tests.tiny import TINY
from vision_client import (
    AlreadyExistsError,
    AuthenticationError,
    Client,
    FineTuneConfig,
    FineTuneResult,
    HeadConfig,
    InvalidInputError,
    JobEvent,
    ModelNotFoundError,
    OptimizerConfig,
    VisionClientError,
)
from vision_client.cli import Progress
from vision_client.protocol import from_message
from vision_client.protocol import to_message as config_message
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb

BASE = "alexnet"
DIGITS = tuple(str(d) for d in range(10))
TRAIN = slice(0, 120)
HELD_OUT = slice(1000, 1100)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[InProcessServer]:
    """An AlexNet server that fine-tunes into (and serves from) a model store."""
    with inprocess_server(tmp_path_factory.mktemp("finetune-server"), weights_dir) as server:
        yield server


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A server of the tiny network wanting ``Bearer TOKEN`` for fine-tuning calls (the token is
    checked before any backbone runs: no second AlexNet is needed)."""
    directory = tmp_path_factory.mktemp("token-server")
    (directory / "token").write_text(TOKEN + "\n")
    with running(tiny_config(directory / "store", auth_token_file=directory / "token")) as server:
        yield server


def config(output_model: str, base_model: str = BASE, **settings: Any) -> FineTuneConfig:
    """A job on ``base_model``: the store server's AlexNet unless named."""
    return FineTuneConfig(base_model=base_model, output_model=output_model, **settings)


def training_set(selection: slice = TRAIN) -> list[tuple[bytes, str]]:
    """``(png, class name)`` pairs of the digits in ``selection``."""
    images, targets = digits()
    return [(image, str(target)) for image, target in zip(images[selection], targets[selection], strict=True)]


def write_image_folder(root: Path, examples: list[tuple[bytes, str]]) -> list[tuple[Path, str]]:
    """``examples`` as torchvision's ImageFolder layout: ``root/<class>/<n>.png``."""
    written = []
    for n, (image, label) in enumerate(examples):
        path = root / label / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        written.append((path, label))
    return written


def check_events(events: list[JobEvent], job_id: str, last: str) -> list[JobEvent]:
    """The events of one job, in order, ending with ``last``; returns its epoch events."""
    assert events and all(event.job_id == job_id for event in events)
    kinds = [event.kind for event in events]
    assert kinds[0] == "queued" and "features" in kinds and kinds[-1] == last
    assert [event.terminal for event in events] == [False] * (len(events) - 1) + [True]
    progress = [event.progress for event in events]
    assert progress == sorted(progress) and progress[0] >= 0.0 and progress[-1] <= 1.0
    epochs = [event for event in events if event.kind == "epoch"]
    assert [event.epoch for event in epochs] == list(range(1, len(epochs) + 1))
    return epochs


# -- fine-tuning, end to end -----------------------------------------------------------------


@pytest.mark.parametrize(
    "head, optimizer, lr", [("two_layer", "adam", 1e-3), ("linear", "sgd", 0.01)], ids=["two-layer-adam", "linear-sgd"]
)
def test_fine_tune_trains_a_head_that_is_served_at_once(store_server, kind, head, optimizer, lr):
    name = f"digits-{kind}-{optimizer}"
    held_out = training_set(HELD_OUT)
    seen: list[JobEvent] = []  # a plain function as on_event, for both twins

    async def body():
        async with connect(kind, store_server.target) as client:
            done = await result(
                client.fine_tune(
                    config(name, head=HeadConfig(head), optimizer=OptimizerConfig(optimizer, lr=lr), epochs=5),
                    (pair for pair in training_set()),  # any iterable, read lazily
                    on_event=seen.append,
                )
            )
            predictions = await result(client.classify([image for image, _ in held_out], model=name, top_k=1))
            models = {m.name: m for m in await result(client.models())}
            jobs = {job.id: job for job in await result(client.jobs())}
            job = await result(client.job(done.job_id))
            return done, predictions, models, jobs, job

    done, predictions, models, jobs, job = run(body())
    assert isinstance(done, FineTuneResult)
    assert done.state == "succeeded" and done.succeeded and done.error == "", done.error
    assert done.output_model == name and done.labels == DIGITS
    m = done.metrics
    assert m.epochs_run == 5 and 1 <= m.best_epoch <= 5
    assert m.train_loss > 0 and m.validation_loss > 0 and 0 < m.validation_accuracy <= 1
    assert m.validation_examples > 0 and m.train_examples == 120  # refit on every example
    assert done.events == tuple(seen)
    epochs = check_events(seen, done.job_id, "succeeded")
    assert len(epochs) == 5 and done.epochs == tuple(epochs)
    assert all(e.epochs == 5 and e.train_loss > 0 and 0 <= e.validation_accuracy <= 1 for e in epochs)
    assert epochs[-1].train_loss < epochs[0].train_loss

    # Served under its name, with the digits as labels, as soon as fine_tune returns.
    labels = [p[0].label for p in predictions]
    assert set(labels) <= set(DIGITS)
    accuracy = np.mean([label == truth for label, (_, truth) in zip(labels, held_out, strict=True)])
    print(f"\n{name}: held-out accuracy {accuracy:.2f} (chance 0.10)")
    assert accuracy >= 0.5
    model = models[name]
    assert model.base_model == BASE and model.platform == "vision_finetuned" and model.ready
    assert model.labels == DIGITS and model.num_classes == 10
    assert model.version and model.devices == ("cpu",) and model.pending_images == 0
    assert jobs[done.job_id].state == "succeeded" and job == done.job
    assert [(p.epoch, p.train_loss, p.validation_loss) for p in job.epoch_metrics] == [
        (e.epoch, e.train_loss, e.validation_loss) for e in epochs
    ]
    assert (job.base_model, job.output_model, job.head, job.optimizer, job.loss) == (
        BASE,
        name,
        head,
        optimizer,
        "cross_entropy",
    )
    assert job.examples == 120 and job.finished_at >= job.started_at >= job.created_at > 0


def test_every_setting_of_the_config_reaches_the_server(store_server):
    """A config with no field left at its default: the server's job echoes each one, the
    stored head has the asked shape, and ``refit=False`` shows in the examples trained on."""
    every = dataclasses.replace(EVERY_SETTING, base_model=BASE, output_model="digits-every-setting")
    assert every.loss == "mse"  # each digit's value is its target
    with Client(store_server.target, timeout=CALL_TIMEOUT) as client:
        done = client.fine_tune(every, [(image, [float(label)]) for image, label in training_set()])
    assert done.succeeded and done.labels == ("target_0",), done.error
    with grpc.insecure_channel(store_server.target) as channel:
        get_job = channel.unary_unary(
            "/vision.v1.FineTuning/GetJob",
            request_serializer=ft_pb.GetJobRequest.SerializeToString,
            response_deserializer=ft_pb.Job.FromString,
        )
        echoed = get_job(ft_pb.GetJobRequest(job_id=done.job_id), timeout=10).config
    assert echoed == config_message(every)
    assert done.job.config == from_message(config_message(every))  # the SDK reads it back whole (float32 values)
    manifest = json.loads((store_server.config.model_store / every.output_model / "manifest.json").read_text())
    assert manifest["head"] == {"kind": "parallel", "hidden": 64, "blocks": 3, "dropout": 0.25}
    m = done.metrics
    assert m.validation_examples > 0 and m.train_examples + m.validation_examples == 120  # not refit on all


def test_fine_tune_cancelled_from_on_event(store_server, kind):
    """A long job, cancelled at its second epoch by on_event: a plain function, or a coroutine function."""
    name = f"digits-cancelled-{kind}"
    seen: list[JobEvent] = []

    async def body():
        async with connect(kind, store_server.target) as client:

            def on_event(event: JobEvent) -> Any:
                seen.append(event)
                if event.kind == "epoch" and event.epoch == 2:
                    return client.cancel_job(event.job_id)  # a coroutine for AsyncClient: awaited
                return None

            done = await result(
                client.fine_tune(config(name, epochs=1000, batch_size=1), training_set(), on_event=on_event)
            )
            with pytest.raises(ModelNotFoundError):
                await result(client.model(name))  # a cancelled job leaves no model
            return done

    done = run(body())
    assert done.state == "cancelled" and not done.succeeded
    epochs = check_events(seen, done.job_id, "cancelled")
    assert 2 <= len(epochs) < 1000
    assert done.job.metrics.epochs_run == 0


def test_create_job_returns_at_once_then_watch_and_cancel(store_server, kind):
    name = f"digits-watched-{kind}"

    async def body():
        async with connect(kind, store_server.target) as client:
            job = await result(client.create_job(config(name, epochs=1000, batch_size=1), training_set()))
            events: list[JobEvent] = []

            async def follow(event: JobEvent) -> None:
                events.append(event)
                if event.kind == "epoch" and event.epoch == 2:
                    cancelling = await result(client.cancel_job(job.id))
                    assert cancelling.id == job.id

            stream = client.watch_job(job.id)
            if kind == "sync":
                for event in stream:
                    await follow(event)
            else:
                async for event in stream:
                    await follow(event)
            replayed = await collect(client.watch_job(job.id))  # a finished job's events, from the start
            final = await result(client.job(job.id))
            listed = {j.id: j for j in await result(client.jobs())}
            again = await result(client.cancel_job(job.id))  # a finished job is left as it is
            return job, events, replayed, final, listed, again

    job, events, replayed, final, listed, again = run(body())
    assert job.state in ("queued", "running") and not job.done
    assert job.output_model == name and job.examples == 120 and job.labels == DIGITS and job.epochs == 1000
    assert len(check_events(events, job.id, "cancelled")) < 1000
    assert replayed == events
    assert final.state == "cancelled" and final.done and listed[job.id].state == "cancelled"
    assert again.state == "cancelled"


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def existing_model(store_server) -> str:
    """A fine-tuned model on the store server, made by the SDK."""
    with Client(store_server.target, timeout=CALL_TIMEOUT) as client:
        done = client.fine_tune(config("digits-existing", epochs=2), training_set())
    assert done.succeeded, done.error
    return done.output_model


def test_refused_jobs_raise_and_create_nothing(store_server, existing_model, kind, tmp_path):
    examples = training_set()

    async def attempt(client: Any, examples: Any = examples[:12], **settings: Any) -> None:
        await result(client.fine_tune(config(f"refused-{kind}", **settings), examples))

    async def body():
        async with connect(kind, store_server.target) as client:
            before = len(await result(client.jobs()))
            # Refused by the server, before any job exists.
            with pytest.raises(InvalidInputError, match="at least 2 classes") as one_class:
                await attempt(client, examples=[(image, "7") for image, _ in examples[:12]])
            with pytest.raises(ModelNotFoundError, match="inception"):
                await result(client.fine_tune(FineTuneConfig("inception", f"refused-{kind}"), examples[:12]))
            with pytest.raises(AlreadyExistsError, match=existing_model) as taken:
                await result(client.fine_tune(config(existing_model), examples[:12]))
            with pytest.raises(InvalidInputError, match="example 5"):
                await attempt(client, examples=[*examples[:5], (b"not an image", "3")])
            with pytest.raises(InvalidInputError, match="built-in"):
                await result(client.fine_tune(config(BASE), examples[:12]))
            with pytest.raises(InvalidInputError, match="head blocks must be at most 8 on this server"):
                await attempt(client, head=HeadConfig("parallel", blocks=1000))
            # Refused by the client: while the examples stream, or before anything is sent.
            with pytest.raises(InvalidInputError, match="example 8: the label must be a class name"):
                await attempt(client, examples=[*examples[:8], (examples[8][0], [0.5, 1.0])])
            with pytest.raises(FileNotFoundError):
                await attempt(client, examples=[*examples[:8], (tmp_path / "missing.png", "3")])
            with pytest.raises(TypeError, match="FineTuneConfig"):
                await result(client.fine_tune({"base_model": BASE, "output_model": "dict"}, examples[:12]))
            after = len(await result(client.jobs()))
            (predictions,) = await result(client.classify(examples[0][0], model=existing_model, top_k=1))
            return before, after, one_class.value, taken.value, predictions

    before, after, one_class, taken, predictions = run(body())
    assert after == before
    assert one_class.code is grpc.StatusCode.INVALID_ARGUMENT and isinstance(one_class.__cause__, grpc.RpcError)
    assert taken.code is grpc.StatusCode.ALREADY_EXISTS and "replace" in str(taken)
    assert predictions[0].label in DIGITS  # the server kept serving


def test_replace_trains_the_model_again(store_server, existing_model, kind):
    async def body():
        async with connect(kind, store_server.target) as client:
            # Only two classes this time: the served model's labels follow the new head.
            pairs = [pair for pair in training_set() if pair[1] in ("0", "1")]
            done = await result(client.fine_tune(config(existing_model, epochs=2, replace=True), pairs))
            predictions = await result(client.classify(pairs[0][0], model=existing_model, top_k=5))
            return done, predictions

    done, (predictions,) = run(body())
    assert done.succeeded and done.labels == ("0", "1")
    assert sorted(p.label for p in predictions) == ["0", "1"]


def test_delete_model_stops_serving_it(store_server, kind):
    name = f"digits-doomed-{kind}"
    image = training_set()[0][0]

    async def body():
        async with connect(kind, store_server.target) as client:
            done = await result(client.fine_tune(config(name, epochs=2), training_set()))
            assert done.succeeded, done.error
            assert len((await result(client.classify(image, model=name)))[0]) == 5
            assert await result(client.delete_model(name)) is None
            with pytest.raises(ModelNotFoundError):
                await result(client.classify(image, model=name))
            with pytest.raises(ModelNotFoundError):
                await result(client.delete_model(name))
            with pytest.raises(InvalidInputError, match="built-in"):
                await result(client.delete_model(BASE))
            return [m.name for m in await result(client.models(labels=False))]

    assert name not in run(body())


def test_fine_tuning_needs_the_token_when_the_server_wants_one(token_server, kind):
    name = f"digits-token-{kind}"

    async def body(token: str | None):
        async with connect(kind, token_server.target, token=token) as client:
            return await result(client.fine_tune(config(name, base_model=TINY, epochs=2), training_set()))

    with pytest.raises(AuthenticationError, match="Bearer") as caught:
        run(body(None))
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    done = run(body(TOKEN))
    assert done.succeeded and done.labels == DIGITS


def test_an_upload_refused_while_its_images_still_stream_reports_the_servers_status(token_server, kind):
    """The server refuses a job from its first message (no token; a base it does not serve) while
    the client still writes large images. Each of 40 refusals must come back as the server's
    status: grpc.aio itself turns about one in six into INTERNAL, "Internal error from Core", when
    a write fails after the server has ended the call (``vision_client.protocol.calls``)."""
    noise = large_noise_examples(64, seed=7)

    async def refusals(token: str | None, base_model: str) -> list[type]:
        raised = []
        async with connect(kind, token_server.target, token=token) as client:
            for n in range(20):
                try:
                    await result(client.fine_tune(config(f"refused-{n}", base_model=base_model), noise))
                except VisionClientError as error:
                    raised.append(type(error))
        return raised

    assert run(refusals(None, TINY)) == [AuthenticationError] * 20
    assert run(refusals(TOKEN, "inception")) == [ModelNotFoundError] * 20


# -- the command line ---------------------------------------------------------------------------


LINE = re.compile(r"^(?P<image>\S+)\s+(?P<rank>\d+)\s+(?P<score>\d\.\d{4})\s+(?P<label>.+) \((?P<index>\d+)\)$")


def test_cli_fine_tune_plots_and_the_model_classifies(store_server, tmp_path):
    folder = tmp_path / "digits"
    written = write_image_folder(folder, training_set(slice(0, 60)))
    (folder / "README.txt").write_text("not an image: skipped")
    (folder / "3" / "notes.md").write_text("skipped too")
    target = ("--target", store_server.target)

    done = vision_client(
        *target, "fine-tune", str(folder), "--base", BASE, "--output", "cli-digits", "--epochs", "3",
        "--head", "two_layer", "--plot", "loss.png", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Progress on stderr: lines, as stderr is not a terminal here.
    assert "uploading 60 images of 10 classes" in done.stderr and "skipped 1 file that" in done.stderr
    assert [int(n) for n in re.findall(r"^epoch (\d+)/3 ", done.stderr, re.M)] == [1, 2, 3]
    assert re.search(r"^job \w+ succeeded", done.stderr, re.M)
    # A summary on stdout.
    assert re.match(r"job \w+ succeeded: cli-digits is served", done.stdout)
    assert re.search(r"^\s+classes\s+10: 0 1 2 3 4 5 6 7 8 9$", done.stdout, re.M)
    assert re.search(r"^\s+validation accuracy\s+[01]\.\d{3}$", done.stdout, re.M)
    assert re.search(r"^\s+plot\s+loss\.png$", done.stdout, re.M)
    with Image.open(tmp_path / "loss.png") as plot:
        assert plot.format == "PNG" and plot.width > 300 and plot.height > 200
        plot.load()

    classified = vision_client(*target, "classify", str(written[0][0]), "--model", "cli-digits", "--top-k", "1")
    assert classified.returncode == 0, classified.stderr
    (line,) = [LINE.match(row) for row in classified.stdout.splitlines()]
    assert line and line["label"] in DIGITS

    listed = vision_client(*target, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    (job,) = [j for j in json.loads(listed.stdout) if j["output_model"] == "cli-digits"]
    assert job["state"] == "succeeded" and job["labels"] == list(DIGITS) and job["metrics"]["epochs_run"] == 3
    table = vision_client(*target, "jobs")
    row = rf"^{job['job_id']}\s+succeeded\s+{BASE}\s+cli-digits\s+two_layer\s+3/3\s+60\s+[01]\.\d{{3}}$"
    assert re.search(row, table.stdout, re.M), table.stdout

    cancelled = vision_client(*target, "cancel", job["job_id"])
    assert cancelled.returncode == 0 and "already" in cancelled.stdout
    deleted = vision_client(*target, "delete-model", "cli-digits")
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted cli-digits"
    gone = vision_client(*target, "classify", str(written[0][0]), "--model", "cli-digits")
    assert gone.returncode == 1 and "cli-digits" in gone.stderr


def test_cli_fine_tune_json_and_errors(store_server, tmp_path):
    target = ("--target", store_server.target)
    folder = tmp_path / "digits"
    write_image_folder(folder, training_set(slice(0, 30)))
    done = vision_client(
        *target, "fine-tune", str(folder), "--base", BASE, "--output", "cli-json", "--epochs", "2", "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["state"] == "succeeded" and summary["output_model"] == "cli-json" and summary["plot"] is None
    assert summary["metrics"]["epochs_run"] == 2 and summary["labels"] == list(DIGITS)

    # Every field of the config has its option; with --loss mse the folders' names are the targets.
    every = vision_client(
        *target, "fine-tune", str(folder), "--base", BASE, "--output", "cli-every", "--json",
        "--head", "parallel", "--hidden", "16", "--blocks", "3", "--dropout", "0.125",
        "--optimizer", "sgd", "--lr", "0.01", "--momentum", "0.5", "--weight-decay", "0.001",
        "--beta1", "0.5", "--beta2", "0.75", "--loss", "mse", "--epochs", "2", "--batch-size", "8",
        "--validation-fraction", "0.25", "--early-stopping-patience", "1", "--seed", "3", "--no-refit", "--replace",
    )  # fmt: skip
    assert every.returncode == 0, every.stderr
    assert "uploading 30 images of 10 targets" in every.stderr
    summary = json.loads(every.stdout)
    assert summary["state"] == "succeeded" and summary["labels"] == ["target_0"]
    assert (summary["head"], summary["optimizer"], summary["loss"], summary["epochs"]) == ("parallel", "sgd", "mse", 2)
    assert summary["metrics"]["train_examples"] < 30  # --no-refit: trained on the split only
    manifest = json.loads((store_server.config.model_store / "cli-every" / "manifest.json").read_text())
    assert manifest["head"] == {"kind": "parallel", "hidden": 16, "blocks": 3, "dropout": 0.125}

    one_class = tmp_path / "one-class"
    write_image_folder(one_class, [(image, "7") for image, _ in training_set(slice(0, 6))])
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    named = tmp_path / "named"
    write_image_folder(named, [(image, "cat" if n % 2 else "dog") for n, (image, _) in enumerate(training_set())])
    for args, message in [
        ((str(folder), "--base", BASE, "--output", "x", "--epochs", "0"), "epochs must be a positive integer"),
        ((str(folder), "--base", BASE, "--output", "x", "--beta1", "0"), "beta1 must be in (0, 1)"),
        ((str(folder), "--base", BASE, "--output", "x", "--dropout", "1"), "dropout must be in [0, 1)"),
        ((str(named), "--base", BASE, "--output", "x", "--loss", "mse"), "'cat' is not"),
        ((str(one_class), "--base", BASE, "--output", "x"), "at least 2 classes"),
        ((str(folder), "--base", "inception", "--output", "x"), "inception"),
        ((str(folder), "--base", BASE, "--output", "cli-json"), "cli-json"),  # exists
        ((str(empty), "--base", BASE, "--output", "x"), "no images in"),
        ((str(tmp_path / "missing"), "--base", BASE, "--output", "x"), "not a directory"),
    ]:
        failed = vision_client(*target, "fine-tune", *args)
        assert failed.returncode == 1, failed.stdout
        error = failed.stderr.splitlines()[-1]  # after the "uploading ..." line, if it got that far
        assert error.startswith("vision-client: error: ") and message in error, failed.stderr
        assert "Traceback" not in failed.stderr
    unknown = vision_client(*target, "cancel", "no-such-job")
    assert unknown.returncode == 1 and "no-such-job" in unknown.stderr


def test_cli_plot_without_matplotlib_says_how_to_get_it(store_server, tmp_path):
    folder = tmp_path / "digits"
    write_image_folder(folder, training_set(slice(0, 20)))
    # matplotlib made unimportable, as in an install without the [plot] extra.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from vision_client.cli import main\n"
        f"sys.exit(main(['--target', {store_server.target!r}, 'fine-tune', {str(folder)!r}, '--base', 'alexnet', "
        "'--output', 'no-plot', '--plot', 'loss.png']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "pip install 'matplotlib>=3.8'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "loss.png").exists()
    listed = vision_client("--target", store_server.target, "jobs", "--json")
    assert "no-plot" not in [job["output_model"] for job in json.loads(listed.stdout)]  # refused before the job


def test_cli_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    def event(kind: str, state: str, progress: float, epoch: int = 0, message: str = "") -> JobEvent:
        losses = (0.5, 0.25, 0.75) if kind == "epoch" else (0.0, 0.0, 0.0)
        return JobEvent("j1", kind, state, epoch, 2, *losses, eta_seconds=90.0, progress=progress, message=message)

    events = [
        event("queued", "queued", 0.0),
        event("features", "running", 0.3, message="features of 10/10 examples"),
        event("epoch", "running", 0.65, epoch=1),
        event("epoch", "running", 1.0, epoch=2),
        event("succeeded", "succeeded", 1.0, epoch=2, message="serving m"),
    ]
    lines, bar = io.StringIO(), io.StringIO()
    for stream, interactive in ((lines, False), (bar, True)):
        progress = Progress(stream, interactive=interactive)
        for e in events:
            progress(e)
        progress.end()
        assert progress.job_id == "j1"
    assert lines.getvalue().splitlines() == [
        "job j1 queued",
        "features of 10/10 examples",
        "epoch 1/2  loss 0.5000  val 0.2500  acc 0.750  eta 1m30s",
        "epoch 2/2  loss 0.5000  val 0.2500  acc 0.750",
        "job j1 succeeded: serving m",
    ]
    # One line, redrawn in place, ended once the job has.
    drawn = bar.getvalue()
    assert drawn.count("\r") == len(events) and drawn.endswith("\n") and drawn.count("\n") == 1
    assert "[" + "#" * Progress.BAR_WIDTH + "] 100%  job j1 succeeded" in drawn


# -- the README -------------------------------------------------------------------------------


def test_readme_has_fine_tuning_examples():
    assert len(readme_examples(fine_tuning=True)) >= 3


@pytest.mark.parametrize("index", range(len(readme_examples(fine_tuning=True))))
def test_readme_fine_tuning_example_runs(store_server, tmp_path, index):
    """Each python block of the README's fine-tuning section, run as written against the store server.

    The substitutions: the server's address for ``localhost:8001`` and ``alexnet`` (the
    model it serves) for ``resnet101``; ``digits/`` in the working directory holds the
    training set in the ImageFolder layout.
    """
    code = readme_examples(fine_tuning=True)[index]
    code = code.replace("localhost:8001", store_server.target).replace("resnet101", BASE)
    write_image_folder(tmp_path / "digits", training_set())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README example {index} failed:\n{code}\n{done.stderr}"
    print(done.stdout)


def test_pngs_of_the_training_set_are_real_images():
    (image, label), *_ = training_set()
    with Image.open(io.BytesIO(image)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (64, 64)
    assert label in DIGITS
