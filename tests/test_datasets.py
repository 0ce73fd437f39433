"""Data sets in the store: a job that names its images (a directory under --dataset-roots, or an
s3:// prefix on moto) instead of uploading them.

The name is checked against the roots before anything is read; the listing goes through the
upload's collector (its limits and words, each error naming the file); the images are read a
chunk at a time while the job runs, and a bad one fails the job with its file's name. The
servers are in-process servers of the tiny network; the S3 server is moto on loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest
import torchvision
from google.protobuf import json_format
from PIL import Image

from service.config import FineTuneLimits
from service.errors import (
    FailedPreconditionError,
    InvalidInputError,
    PermissionDeniedError,
    VisionServeError,
)
from service.finetune import datasets
from service.finetune.datasets import DatasetImages, check_name, list_dataset
from service.finetune.examples import ExampleCollector
from service.inference.preprocess import ImageDecoder
from service.storage import S3Location
from tests.test_console import browser, screenshots  # noqa: F401  (fixtures of the console's tests)
from tests.test_orphans import no_tracebacks, ready
from tests.tiny import TINY
from vision_client import Client, FineTuneConfig, HeadConfig
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol import to_message
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

MIB = 1024 * 1024


def png(shade: int, side: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (shade, shade, 255 - shade)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path, classes: dict[str, int], *, first_shade: int = 20) -> Path:
    """An ImageFolder tree: ``classes`` {name: images}, each class a shade apart, and some files the
    layout leaves out (a note at the top, a hidden folder, a text file in a class)."""
    root.mkdir(parents=True, exist_ok=True)
    for number, (name, count) in enumerate(sorted(classes.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (folder / f"{i:03d}.png").write_bytes(png(first_shade + 180 * number + i))
    (root / "README.txt").write_text("left out: not in a class folder")
    (root / ".cache").mkdir(exist_ok=True)
    (root / ".cache" / "x.png").write_bytes(png(1))
    if classes:
        (root / sorted(classes)[0] / "notes.txt").write_text("left out: not an image")
    return root


def config(dataset: str, **fields: object) -> FineTuneConfig:
    settings: dict[str, object] = {"output_model": "from-dataset", "epochs": 2, "batch_size": 8, "seed": 1}
    settings.update(fields)
    return FineTuneConfig(base_model=TINY, dataset=dataset, **settings)  # type: ignore[arg-type]


def listed(
    dataset: str, roots: tuple, *, limits: FineTuneLimits | None = None, max_image_bytes: int = 64 * MIB, **fields
):
    """(examples, labels) of the dataset, listed as a server with ``roots`` lists it."""
    limits = replace(limits or FineTuneLimits(), dataset_roots=roots)
    job = config(dataset, **fields)
    return asyncio.run(list_dataset(job, ExampleCollector(job, limits), limits, max_image_bytes))


def refusal(dataset: str, roots: tuple, **kwargs) -> VisionServeError:
    with pytest.raises(VisionServeError) as caught:
        listed(dataset, roots, **kwargs)
    return caught.value


# -- the name against the roots, before anything is read ------------------------------------------


def test_with_no_roots_every_dataset_is_refused_and_the_message_says_how_to_allow_one() -> None:
    with pytest.raises(PermissionDeniedError, match="--dataset-roots") as caught:
        check_name("/data/pets", ())
    assert "upload the images" in caught.value.message
    with pytest.raises(PermissionDeniedError, match="--dataset-roots"):
        check_name("s3://bucket/pets/", ())


@pytest.mark.parametrize(
    "name",
    [
        "/data/other",  # beside the root
        "/data/setsX/pets",  # a name that starts like the root
        "/data/sets/../private",  # '..' out of the root
        "/data/sets/pets/../../../etc",
        "/",
        "s3://bucket/sets2/pets/",  # a prefix that starts like the root's
        "s3://elsewhere/sets/pets/",  # another bucket
        "s3://bucket/",  # the bucket above the root
    ],
)
def test_a_name_outside_the_roots_is_permission_denied_by_name_alone(name: str) -> None:
    roots = (Path("/data/sets"), S3Location("bucket", "sets"))
    with pytest.raises(PermissionDeniedError, match="outside the places this server reads datasets from"):
        check_name(name, roots)


def test_names_under_a_root_pass() -> None:
    roots = (Path("/data/sets"), S3Location("bucket", "sets"))
    assert check_name("/data/sets/pets/", roots) == Path("/data/sets/pets")
    assert check_name("/data/sets/x/../pets", roots) == Path("/data/sets/pets")
    assert check_name("s3://bucket/sets/pets/", roots) == S3Location("bucket", "sets/pets")
    assert check_name("s3://bucket/sets", roots) == S3Location("bucket", "sets")
    assert check_name("s3://any/thing", (S3Location("any", ""),)) == S3Location("any", "thing")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("gs://bucket/sets/", "not a gs:// URL"),
        ("s3://Bad_Bucket/sets/", "not a valid S3 bucket name"),
        ("s3://bucket/sets/a b/", "must be '/'-separated segments"),
    ],
)
def test_a_url_that_is_not_a_dataset_is_invalid_argument(name: str, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        check_name(name, (S3Location("bucket", "sets"),))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"dataset": "pets"}, "neither s3://bucket/prefix/ nor an absolute directory path"),
        ({"dataset": "/data/pets", "loss": "mse"}, "it takes loss cross_entropy"),
        ({"dataset": "/data/\npets"}, "one line"),
        ({"dataset": "/" + "x" * 2000}, "at most 1024 characters"),
    ],
)
def test_the_config_refuses_what_is_no_dataset_name_where_it_is_made(fields: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        FineTuneConfig(TINY, "out", **fields)


# -- the listing: the layout, links, the upload's limits -------------------------------------------


def test_a_directory_lists_as_torchvisions_image_folder_does(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"zebra": 3, "Ant": 2, "cat": 4, "b": 2})
    (root / "cat" / "deeper").mkdir()
    (root / "cat" / "deeper" / "x.PNG").write_bytes(png(90))
    examples, labels = listed(str(root), (tmp_path / "sets",))
    shutil.rmtree(root / ".cache")  # hidden: left out by our layout (as by vision-client's), kept by ImageFolder
    reference = torchvision.datasets.ImageFolder(str(root))
    assert labels == reference.classes  # sorted as ImageFolder sorts them
    assert examples.labels == [reference.classes[target] for _, target in reference.samples]
    assert len(examples) == len(reference.samples) == 12
    assert examples.images == []  # nothing read: the images are the job's to read


def test_a_dataset_reached_through_a_link_that_leaves_the_roots_is_refused(tmp_path: Path) -> None:
    outside = write_folder(tmp_path / "private", {"a": 2, "b": 2})
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "pets").symlink_to(outside)
    error = refusal(str(tmp_path / "sets" / "pets"), (tmp_path / "sets",))
    assert isinstance(error, PermissionDeniedError)
    assert "leads (through a symbolic link) outside" in error.message
    assert str(outside) not in error.message  # where the link leads is not told


def test_a_file_link_that_leaves_the_roots_is_refused_by_its_name(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"a": 2, "b": 2})
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(5))
    (root / "a" / "stolen.png").symlink_to(secret)
    error = refusal(str(root), (tmp_path / "sets",))
    assert isinstance(error, PermissionDeniedError)
    assert "a/stolen.png' is a symbolic link that leads outside" in error.message


def test_links_that_stay_under_a_root_are_followed_and_a_loop_is_not(tmp_path: Path) -> None:
    sets = tmp_path / "sets"
    shared = write_folder(sets / "shared", {"b": 3})
    root = write_folder(sets / "pets", {"a": 2})
    (root / "b").symlink_to(shared / "b")
    (root / "a" / "loop").symlink_to(root)  # a link back up: not walked again
    examples, labels = listed(str(root), (sets,))
    assert labels == ["a", "b"] and len(examples) == 5


def test_a_dataset_that_is_no_directory_or_is_missing_is_a_clear_error(tmp_path: Path) -> None:
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "file.png").write_bytes(png(1))
    assert "does not exist on this server" in refusal(str(sets / "nothing"), (sets,)).message
    assert "is not a directory" in refusal(str(sets / "file.png"), (sets,)).message


def test_an_unreadable_folder_is_failed_precondition(tmp_path: Path, monkeypatch) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"a": 2, "b": 2})
    (root / "b").chmod(0)
    if os.access(root / "b", os.R_OK):  # root reads any folder: the kernel's refusal, as it would come
        scandir = os.scandir

        def refusing(path: str) -> Iterator[os.DirEntry[str]]:
            if Path(path) == root / "b":
                raise PermissionError(13, "Permission denied", str(path))
            return scandir(path)

        monkeypatch.setattr(datasets.os, "scandir", refusing)
    try:
        error = refusal(str(root), (tmp_path / "sets",))
    finally:
        (root / "b").chmod(0o755)
    assert isinstance(error, FailedPreconditionError)
    assert f"this server cannot list '{root}/b/': Permission denied" in error.message, error.message


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        ({}, "no images in the dataset"),
        ({"a": 3, "b": 0}, "the class folder 'b' of the dataset"),
        ({"a": 3, "b": 1}, "the class 'b' of the dataset"),
        ({"a": 3}, "a classifier needs at least 2 classes"),
    ],
)
def test_a_dataset_of_too_little_is_a_clear_error(tmp_path: Path, classes: dict, words: str) -> None:
    root = write_folder(tmp_path / "sets" / "pets", classes)
    error = refusal(str(root), (tmp_path / "sets",))
    assert isinstance(error, InvalidInputError) and words in error.message, error.message


def test_a_class_of_one_image_is_fine_when_nothing_is_held_out(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"a": 3, "b": 1})
    _, labels = listed(str(root), (tmp_path / "sets",), validation_fraction=0.0)
    assert labels == ["a", "b"]


def upload_refusal(limits: FineTuneLimits, images: list[tuple[bytes, str]]) -> str:
    collector = ExampleCollector(FineTuneConfig(TINY, "out"), limits)
    with pytest.raises(InvalidInputError) as caught:
        for image, label in images:
            collector.add(image, label, ())
        collector.finish()
    return caught.value.message


@pytest.mark.parametrize(
    ("limits", "shared_words"),
    [
        (FineTuneLimits(max_examples=5), "a job takes at most 5 examples (--max-job-examples)"),
        (FineTuneLimits(max_total_bytes=600), "exceed 600 bytes in all (--max-job-bytes)"),
        (FineTuneLimits(max_labels=2), "a job takes at most 2 classes (--max-labels)"),
        (FineTuneLimits(max_label_length=3), "bytes of UTF-8, over the limit of 3"),
    ],
)
def test_the_uploads_limits_apply_with_the_uploads_words(tmp_path: Path, limits, shared_words: str) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"ab": 3, "cd": 3, "long-name": 3})
    uploaded = [
        ((root / name / f"{i:03d}.png").read_bytes(), name) for name in ("ab", "cd", "long-name") for i in range(3)
    ]
    assert shared_words in upload_refusal(limits, uploaded)
    error = refusal(str(root), (tmp_path / "sets",), limits=limits)
    assert isinstance(error, InvalidInputError) and shared_words in error.message, error.message


def test_a_class_name_the_label_rule_refuses_is_named_with_its_file(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"a": 2, "b\u202ec": 2})
    error = refusal(str(root), (tmp_path / "sets",))
    assert "b\\u202ec/000.png': its label 'b\\u202ec' has U+202E (RIGHT-TO-LEFT OVERRIDE)" in error.message


def test_an_image_over_the_size_of_one_message_is_refused_by_name(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"a": 2, "b": 2})
    (root / "b" / "huge.png").write_bytes(b"\x89PNG" + b"\0" * 5000)
    error = refusal(str(root), (tmp_path / "sets",), max_image_bytes=4000)
    assert "b/huge.png' is 5,004 bytes, over the 4,000 bytes one image may have (--max-message-bytes" in error.message


# -- reading while the job runs -----------------------------------------------------------------


def read_all(images: DatasetImages, size: int) -> list[list[bytes]]:
    async def go() -> list[list[bytes]]:
        return [chunk async for chunk in images.chunks(size)]

    return asyncio.run(go())


def test_images_are_read_in_order_a_bounded_chunk_at_a_time(tmp_path: Path, monkeypatch) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"a": 7, "b": 6})
    examples, _ = listed(str(root), (tmp_path / "sets",))
    assert isinstance(examples.dataset, DatasetImages)
    chunks = read_all(examples.dataset, 4)
    assert [len(chunk) for chunk in chunks] == [4, 4, 4, 1]
    expected = [(root / name / f"{i:03d}.png").read_bytes() for name, n in (("a", 7), ("b", 6)) for i in range(n)]
    assert [data for chunk in chunks for data in chunk] == expected
    one = len(expected[0])
    monkeypatch.setattr(datasets, "CHUNK_BYTES", 2 * one + 1)  # bytes bound a chunk too
    assert max(len(chunk) for chunk in read_all(examples.dataset, 32)) == 2


def test_a_file_removed_after_the_listing_fails_the_read_by_its_name(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "sets" / "pets", {"a": 2, "b": 2})
    examples, _ = listed(str(root), (tmp_path / "sets",))
    (root / "b" / "001.png").unlink()
    with pytest.raises(InvalidInputError, match=r"b/001\.png' is gone"):
        read_all(examples.dataset, 32)


def test_a_refused_chunk_is_checked_an_image_at_a_time_to_name_the_bad_one(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.models import get_model_spec
    from service.models.preprocessing import preprocessing_of

    root = write_folder(tmp_path / "sets" / "pets", {"a": 3, "b": 3})
    (root / "b" / "001.png").write_bytes(b"not an image at all")
    examples, _ = listed(str(root), (tmp_path / "sets",))
    (chunk,) = read_all(examples.dataset, 32)
    decoder = ImageDecoder(preprocessing_of(get_model_spec(TINY).transforms()), max_pixels=10**7)
    with ThreadPoolExecutor(1) as pool:
        error = asyncio.run(examples.dataset.refused(0, chunk, InvalidInputError("IMAGE element 4 ..."), decoder, pool))
    assert f"'{root}/b/001.png': IMAGE element 4" in error.message
    assert "is not a decodable image" in error.message


# -- jobs on a real server: a directory and moto's S3 -----------------------------------------------


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    from tests.inprocess import InProcessServer, tiny_config

    started: list[InProcessServer] = []

    def start(roots: tuple = (), **overrides: object) -> InProcessServer:
        limits = FineTuneLimits(dataset_roots=roots)
        settings: dict[str, object] = {"store_poll_seconds": 3600, "fine_tuning": limits}
        settings.update(overrides)
        server = InProcessServer(tiny_config(tmp_path / f"store-{len(started)}", **settings))
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


def train(server, job: FineTuneConfig):
    with Client(server.target) as sdk:
        return sdk.fine_tune(job, timeout=180)


def test_a_directory_dataset_trains_and_is_served(serve, tmp_path: Path, caplog) -> None:
    sets = tmp_path / "sets"
    root = write_folder(sets / "pets", {"dark": 8, "light": 8})
    server = serve((sets,))
    result = train(server, config(f"{root}/", output_model="pets", epochs=3))
    assert result.job.state == "succeeded", result.job.error
    assert result.job.labels == ("dark", "light") and result.job.examples == 16
    assert result.job.config is not None and result.job.config.dataset == f"{root}/"
    assert ready(server, "pets")
    with Client(server.target) as sdk:
        top = sdk.classify([png(25), png(215)], model="pets", top_k=1)
    assert [answer[0].label for answer in top] == ["dark", "light"]
    no_tracebacks(caplog)


def test_an_image_over_the_pixel_limit_fails_the_job_by_its_name(serve, tmp_path: Path, caplog) -> None:
    sets = tmp_path / "sets"
    root = write_folder(sets / "pets", {"dark": 4, "light": 4})
    (root / "light" / "poster.png").write_bytes(png(200, side=600))
    server = serve((sets,), max_image_pixels=100_000)
    failed = train(server, config(str(root), output_model="too-many-pixels"))
    assert failed.job.state == "failed"
    assert f"'{root}/light/poster.png': IMAGE element" in failed.job.error, failed.job.error
    assert "600x600 = 360000 pixels, over the limit of 100000 (--max-image-pixels)" in failed.job.error
    assert not ready(server, "too-many-pixels")
    no_tracebacks(caplog)


def put_folder(client, bucket: str, prefix: str, classes: dict[str, int], bad: str | None = None) -> None:
    for number, (name, count) in enumerate(sorted(classes.items())):
        for i in range(count):
            client.put_object(Bucket=bucket, Key=f"{prefix}/{name}/{i:03d}.png", Body=png(20 + 180 * number + i))
    client.put_object(Bucket=bucket, Key=f"{prefix}/README.txt", Body=b"left out")
    if bad is not None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{bad}", Body=b"\x89PNG broken")


@pytest.fixture
def s3_bucket(moto_server, monkeypatch: pytest.MonkeyPatch) -> tuple:
    for variable, value in moto_server.environment().items():
        monkeypatch.setenv(variable, value)
    return moto_server.client(), moto_server.new_bucket()


def test_an_s3_dataset_trains_and_is_served_and_a_bad_image_fails_by_its_key(serve, s3_bucket, caplog) -> None:
    client, bucket = s3_bucket
    put_folder(client, bucket, "sets/pets", {"dark": 6, "light": 6})
    put_folder(client, bucket, "sets/broken", {"dark": 6, "light": 6}, bad="light/zz bad.png")
    server = serve((S3Location(bucket, "sets"),))
    result = train(server, config(f"s3://{bucket}/sets/pets/", output_model="pets-s3"))
    assert result.job.state == "succeeded", result.job.error
    assert result.job.labels == ("dark", "light") and result.job.examples == 12
    assert ready(server, "pets-s3")
    failed = train(server, config(f"s3://{bucket}/sets/broken/", output_model="broken"))
    assert failed.job.state == "failed"
    assert f"'s3://{bucket}/sets/broken/light/zz bad.png': IMAGE element" in failed.job.error, failed.job.error
    assert "truncated or corrupt" in failed.job.error or "not a decodable image" in failed.job.error
    assert not ready(server, "broken")
    no_tracebacks(caplog)


def test_a_missing_bucket_is_a_clear_error(serve, s3_bucket) -> None:
    server = serve((S3Location("no-such-bucket-here", ""),))
    with Client(server.target) as sdk, pytest.raises(Exception, match="names a bucket that does not exist"):
        sdk.fine_tune(config("s3://no-such-bucket-here/pets/"), (), timeout=60)


def create(server, job: pb.FineTuneConfig, *examples: pb.Example) -> grpc.RpcError:
    def requests():
        yield pb.CreateJobRequest(config=job)
        if examples:
            yield pb.CreateJobRequest(examples=pb.ExampleBatch(examples=list(examples)))

    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.FineTuningStub(channel).CreateJob(requests(), timeout=60)
    return caught.value


def test_refused_datasets_over_grpc_read_nothing_and_write_nothing(serve, tmp_path: Path, caplog) -> None:
    sets = tmp_path / "sets"
    root = write_folder(sets / "pets", {"a": 2, "b": 2})
    outside = write_folder(tmp_path / "private", {"a": 2, "b": 2})
    (sets / "escape").symlink_to(outside)
    closed = serve()
    error = create(closed, to_message(config(str(root))))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "--dataset-roots" in error.details()
    server = serve((sets,))
    cases = {
        str(outside): "outside the places this server reads datasets from",
        f"{sets}/../private": "outside the places this server reads datasets from",
        str(sets / "escape"): "leads (through a symbolic link) outside",
    }
    for name, words in cases.items():
        error = create(server, to_message(config(name)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (name, error.details())
        assert words in error.details(), error.details()
    error = create(server, to_message(config(str(root))), pb.Example(image=png(1), label="a"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a job that names a dataset sends no examples" in error.details()
    for store in (tmp_path / "store-0", tmp_path / "store-1"):
        assert not any(path.is_file() and ".jobs" not in path.parts for path in store.rglob("*"))
    no_tracebacks(caplog)


def test_over_rest_a_dataset_job_is_its_config_alone_and_its_record_keeps_the_name(serve, tmp_path: Path) -> None:
    sets = tmp_path / "sets"
    root = write_folder(sets / "pets", {"a": 3, "b": 3})
    server = serve((sets,), http_port=0)
    with Client(server.http_url) as sdk:  # the REST binding: a multipart body of the config alone
        result = sdk.fine_tune(config(str(root), output_model="over-rest", epochs=1), (), timeout=120)
    assert result.job.state == "succeeded", result.job.error
    wire = json_format.MessageToJson(to_message(config(str(root), output_model="with-parts")))
    files = [("config", ("config.json", wire, "application/json")), ("a", ("a.png", png(1), "image/png"))]
    answer = httpx.post(f"{server.http_url}/v1/jobs", files=files, timeout=60)
    assert answer.status_code == 400, answer.text
    assert "a job that names a dataset sends no examples" in answer.json()["error"]
    server.stop()  # its jobs' records are written once it has stopped
    (record,) = (tmp_path / "store-0" / ".jobs").glob(f"*{result.job.id}*.json")
    assert json.loads(record.read_text())["config"]["dataset"] == str(root)


def test_the_listing_reads_no_image(tmp_path: Path, monkeypatch) -> None:
    """The listing holds names and sizes, never bytes: a dataset lists without one image read."""
    root = write_folder(tmp_path / "sets" / "pets", {"a": 20, "b": 20})

    def refuse(path: Path, max_bytes: int) -> bytes:
        raise AssertionError(f"{path} was read while listing")

    monkeypatch.setattr(datasets, "read_bounded", refuse)
    examples, labels = listed(str(root), (tmp_path / "sets",))
    assert len(examples) == 40 and labels == ["a", "b"] and examples.images == []
    with pytest.raises(AssertionError, match="was read while listing"):
        read_all(examples.dataset, 32)  # reading is what reads


def test_the_command_line_trains_on_a_dataset_and_takes_a_folder_or_a_dataset_not_both(
    serve, tmp_path: Path, capsys
) -> None:
    from vision_client.cli import main

    sets = tmp_path / "sets"
    root = write_folder(sets / "pets", {"a": 3, "b": 3})
    server = serve((sets,))
    common = ["--target", server.target, "fine-tune", "--base", TINY, "--epochs", "1", "--json"]
    assert main([*common, "--output", "cli-pets", "--dataset", str(root)]) == 0
    out = capsys.readouterr()
    assert f"training on the dataset {root} (read by the server)" in out.err
    shown = json.loads(out.out)
    assert shown["state"] == "succeeded" and shown["dataset"] == str(root)
    assert main(["--target", server.target, "jobs", "show", shown["job_id"]]) == 0
    assert re.search(rf"^\s+dataset\s+{re.escape(str(root))}$", capsys.readouterr().out, re.M)
    assert main([*common, "--output", "both", "--dataset", str(root), str(root)]) == 1
    assert "give DIR (images to upload) or --dataset (images the server reads), one of them" in capsys.readouterr().err
    assert main([*common, "--output", "outside", "--dataset", str(tmp_path)]) == 1
    assert "outside the places this server reads datasets from" in capsys.readouterr().err


# -- the console names a dataset instead of uploading images -------------------------------------


@pytest.fixture
def dataset_console(tmp_path: Path) -> Iterator:
    from tests.conftest import TOKEN
    from tests.inprocess import InProcessServer, tiny_config

    (tmp_path / "token").write_text(TOKEN + "\n")
    limits = FineTuneLimits(dataset_roots=(tmp_path / "sets",))
    config = tiny_config(
        tmp_path / "store", fine_tuning=limits, http_port=0, auth_token_file=tmp_path / "token", store_poll_seconds=3600
    )
    with InProcessServer(config) as server:
        yield server


def test_the_console_trains_on_a_dataset_it_names(browser, dataset_console, screenshots, tmp_path: Path) -> None:  # noqa: F811
    from tests.conftest import TOKEN
    from tests.test_console import Page

    root = write_folder(tmp_path / "sets" / "pets", {"dark": 4, "light": 4})
    page = Page(browser, dataset_console, screenshots)
    page.open("finetune")
    page.set_token(TOKEN)
    page.type("ft-output", "console-dataset")
    page.type("ft-epochs", "1")
    page.type("ft-dataset", str(tmp_path / "private"))
    page.find("#ft-start").click()
    page.wait(lambda d: "outside the places this server reads datasets from" in d.find_element("id", "ft-status").text)
    page.type("ft-dataset", str(root))
    page.find("#ft-start").click()
    page.wait_for_job()
    assert "succeeded: console-dataset is served" in page.text("ft-status"), page.text("ft-status")
    assert ready(dataset_console, "console-dataset")
    page.no_alert()
    browser.execute_script("sessionStorage.clear()")


# -- a dataset job that outlives its server -----------------------------------------------------------

RESUME_EPOCHS = 6


def write_digits(root: Path, count: int) -> Path:
    """scikit-learn's digits (upscaled PNGs) as an ImageFolder tree, a folder per class."""
    from tests.support.finetune_data import digits

    images, targets = digits()
    for i, (image, target) in enumerate(zip(images[:count], targets[:count], strict=True)):
        folder = root / f"digit{target}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(image)
    return root


def resumable_job(dataset: str, name: str) -> pb.FineTuneConfig:
    # The last block of the backbone trained with the head, batches of 2: epochs long enough to kill
    # the server in the third; dropout draws from the random stream the resumed job must go on with.
    return to_message(
        FineTuneConfig(
            TINY, name, dataset=dataset, epochs=RESUME_EPOCHS, batch_size=2, seed=3, train_backbone_blocks=1,
            head=HeadConfig("two_layer", hidden=256, dropout=0.2),
        )
    )  # fmt: skip


def figures(job: pb.Job) -> list[tuple]:
    return [(p.epoch, p.train_loss, p.validation_loss, p.validation_accuracy) for p in job.epoch_metrics]


def digit_logits(target: str, model: str) -> object:
    import numpy as np
    import tritonclient.grpc as triton

    from tests.support.finetune_data import digits

    images, _ = digits()
    tensor = triton.InferInput("IMAGE", [8], "BYTES")
    tensor.set_data_from_numpy(np.array(images[1700:1708], dtype=np.object_))
    with triton.InferenceServerClient(target) as client:
        return client.infer(model, [tensor], client_timeout=120).as_numpy("LOGITS")


@pytest.mark.e2e
def test_a_dataset_job_whose_server_is_killed_goes_on_at_the_next_start_with_the_same_figures(tmp_path: Path) -> None:
    """``kill -9`` during epoch 3 of 6 of a job that names a directory dataset; the next start of a
    server on the same store lists the dataset again, goes on from epoch 2's checkpoint and ends with
    the figures and the model of an uninterrupted run of the same job."""
    import signal
    import time

    import numpy as np

    from tests.support.servers import start_server

    sets = tmp_path / "sets"
    dataset = f"{write_digits(sets / 'digits', 300)}/"
    args = (
        "--models", TINY, "--weights", "random", "--model-store", str(tmp_path / "store"),
        "--dataset-roots", str(sets), "--store-poll-seconds", "1", "--job-lease-seconds", "2",
    )  # fmt: skip
    first = start_server(tmp_path, *args)
    second = None
    try:
        first.wait_serving()
        with grpc.insecure_channel(first.target) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            reference = stub.CreateJob(iter([pb.CreateJobRequest(config=resumable_job(dataset, "reference"))]))
            ended = list(stub.WatchJob(pb.WatchJobRequest(job_id=reference.id), timeout=600))
            assert ended[-1].kind == "succeeded", ended[-1].message
            expected = figures(stub.GetJob(pb.GetJobRequest(job_id=reference.id)))
            job = stub.CreateJob(iter([pb.CreateJobRequest(config=resumable_job(dataset, "resumed"))]))
            seen = []
            with pytest.raises(grpc.RpcError):  # the killed server's stream breaks
                for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600):
                    seen.append(event.kind)
                    if event.kind == "epoch" and event.epoch == 2:  # its checkpoint is written before
                        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(120) == -signal.SIGKILL
        assert not {"succeeded", "failed", "cancelled"} & set(seen), seen

        second = start_server(tmp_path, *args)
        second.wait_serving()
        deadline = time.monotonic() + 240
        with grpc.insecure_channel(second.target) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            while True:  # UNAVAILABLE until the killed server's lease has expired and this one claimed it
                try:
                    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600))
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    assert time.monotonic() < deadline, second.log()[-3000:]
                    time.sleep(0.2)
            done = stub.GetJob(pb.GetJobRequest(job_id=job.id))
        assert done.state == pb.SUCCEEDED, done.error
        resumed = next(e for e in events if e.kind == "resumed")
        assert 2 <= resumed.epoch < RESUME_EPOCHS, resumed
        assert done.examples == 300 and list(done.labels) == [f"digit{d}" for d in range(10)]
        assert figures(done) == expected  # to the last bit: the same images, model, optimizer and streams
        np.testing.assert_array_equal(digit_logits(second.target, "resumed"), digit_logits(second.target, "reference"))
        second.assert_no_traceback()
    finally:
        first.stop()
        if second is not None:
            second.stop()
