"""Where the model store keeps its objects: the store location a flag or variable names, and the
object operations both stores give (a directory, and a bucket of a real S3-compatible server)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from service.host.files import FileRefused
from service.options import build_serve_parser, config_from_args
from service.storage import (
    DirectoryObjects,
    ObjectChanged,
    ObjectExists,
    ObjectStore,
    S3Location,
    StoreUnreachable,
    open_objects,
    parse_store_location,
)

# -- the location -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3://models", S3Location("models", "")),
        ("s3://models/vision", S3Location("models", "vision")),
        ("s3://models/a/b/", S3Location("models", "a/b")),
        ("S3://models.example-1/x", S3Location("models.example-1", "x")),
        ("file:///srv/models", Path("/srv/models")),
        ("/srv/models", Path("/srv/models")),
        ("relative/dir", Path("relative/dir")),
    ],
)
def test_a_store_url_is_never_taken_for_a_directory(value: str, expected: object) -> None:
    assert parse_store_location(value) == expected
    config = config_from_args(build_serve_parser({}).parse_args(["--model-store", value]))
    assert config.model_store == expected
    assert config_from_args(build_serve_parser({"VISION_SERVE_MODEL_STORE": value}).parse_args([])).model_store == (
        expected
    )


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("gs://models/vision", "not a gs:// URL"),
        ("azure://x/y", "not a azure:// URL"),
        ("http://minio:9000/models", "AWS_ENDPOINT_URL"),
        ("s3://AB/x", "not a valid S3 bucket name"),
        ("s3://a/x", "not a valid S3 bucket name"),
        ("s3://key:secret@models/x", "credentials"),
        ("s3://models/x?versionId=1", "s3://bucket/prefix"),
        ("s3://models/../etc", "prefix"),
        ("s3://models/a b", "prefix"),
    ],
)
def test_other_urls_are_refused_with_what_to_write(value: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError) as refused:
        parse_store_location(value)
    assert says in str(refused.value)
    with pytest.raises(SystemExit):
        build_serve_parser({}).parse_args(["--model-store", value])
    assert says in capsys.readouterr().err


# -- the object operations, on both stores ------------------------------------------------


@pytest.fixture(params=["directory", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "directory":
        return DirectoryObjects(tmp_path / "store")
    return open_objects(request.getfixturevalue("s3_store"))


def test_objects_are_written_read_listed_and_deleted(objects: ObjectStore) -> None:
    assert objects.head("a/x.json") is None
    with pytest.raises(FileNotFoundError):
        objects.read("a/x.json", 100)
    objects.write("a/x.json", b"one")
    objects.write("b/y.json", b"two")
    objects.write(".jobs/r.json", b"three")
    assert [i.key for i in objects.list()] == [".jobs/r.json", "a/x.json", "b/y.json"]
    assert [i.key for i in objects.list("a/")] == ["a/x.json"]
    assert [(i.key, i.size) for i in objects.list("b/")] == [("b/y.json", 3)]
    assert objects.read("a/x.json", 3) == b"one"
    objects.delete("a/x.json")
    objects.delete("a/x.json")  # gone already: no error
    assert objects.head("a/x.json") is None
    assert [i.key for i in objects.list("a/")] == []


def test_a_read_over_its_cap_is_refused_from_the_size_it_is_told(objects: ObjectStore) -> None:
    objects.write("a/big", b"x" * 1000)
    with pytest.raises(FileRefused) as refused:
        objects.read("a/big", 999)
    assert refused.value.reason == "too_large"


def test_create_only_and_conditional_replace(objects: ObjectStore) -> None:
    first = objects.create("a/m.json", b"1")
    with pytest.raises(ObjectExists):
        objects.create("a/m.json", b"2")
    current = objects.head("a/m.json")
    assert current is not None and current.etag == first.etag
    second = objects.replace("a/m.json", b"22", current.etag)
    assert second.etag != first.etag
    with pytest.raises(ObjectChanged):
        objects.replace("a/m.json", b"3", first.etag)  # a version that is no longer there
    objects.delete("a/m.json")
    with pytest.raises(ObjectChanged):
        objects.replace("a/m.json", b"4", second.etag)  # deleted since it was read
    assert objects.head("a/m.json") is None


def test_keys_are_plain_relative_segments(objects: ObjectStore) -> None:
    for key in ("../x", "a/../../x", "/etc/passwd", "a//b", "a/b c", ""):
        with pytest.raises(ValueError):
            objects.write(key, b"x")


def test_a_deleted_models_folder_does_not_stay_behind(tmp_path: Path) -> None:
    objects = DirectoryObjects(tmp_path / "store")
    objects.write("pets/head.safetensors", b"w")
    objects.create("pets/manifest.json", b"{}")
    objects.replace("pets/manifest.json", b"{ }", objects.head("pets/manifest.json").etag)  # type: ignore[union-attr]
    objects.delete("pets/manifest.json")
    objects.delete("pets/head.safetensors")
    assert os.listdir(tmp_path / "store") == []


# -- an S3 store that cannot be reached ---------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SECRET = "do-not-log-this-secret-key"


def test_an_unreachable_store_is_an_oserror_that_names_it_and_no_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    objects = open_objects(S3Location("models", "vision"))
    for action in (lambda: list(objects.list()), lambda: objects.read("a/b", 10), lambda: objects.write("a/b", b"")):
        with pytest.raises(StoreUnreachable) as refused:
            action()
        assert isinstance(refused.value, OSError)
        assert "s3://models/vision" in str(refused.value) and SECRET not in str(refused.value)


@pytest.mark.e2e  # a server on the tiny model
def test_a_server_on_an_unreachable_store_logs_it_without_secrets_and_no_traceback(
    serve_inprocess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from service.config import RuntimeConfig
    from tests.conftest import session_runtime_cache
    from tests.tiny import TINY

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    server = serve_inprocess(
        models=(TINY,), weights="random", runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        model_store=S3Location("models", "vision"), store_poll_seconds=0.2, wait_loaded=False,
    )  # fmt: skip
    import time

    import tritonclient.grpc as triton

    def logged() -> str:
        return "\n".join(record.getMessage() for record in caplog.records)

    deadline = time.monotonic() + 60
    while "cannot list the model store s3://models/vision" not in logged():
        assert time.monotonic() < deadline, logged()
        time.sleep(0.2)
    with triton.InferenceServerClient(server.target) as client:
        assert client.is_server_live()
        assert not client.is_server_ready()  # the store was never read: documented, as for a hung directory
    text = logged()
    assert SECRET not in text
    assert [r.getMessage() for r in caplog.records if r.exc_info and r.name.startswith("service")] == []


def test_an_https_endpoint_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose certificate no trusted CA signed is refused; trusting its CA
    (``AWS_CA_BUNDLE``, the standard variable) lets the same store work."""
    from tests.certs import CertificateAuthority, write_pair
    from tests.support.servers import MotoServer

    authority = CertificateAuthority("test S3 CA")
    cert, key = write_pair(tmp_path / "tls", authority.issue("127.0.0.1", server=True), "server")
    server = MotoServer(tmp_path, tls=(cert, key)).start()
    try:
        for variable, value in server.environment().items():
            monkeypatch.setenv(variable, value)
        location = S3Location("models", "vision")
        with pytest.raises(StoreUnreachable, match=r"(?i)certificate|ssl"):
            list(open_objects(location).list())
        (tmp_path / "ca.pem").write_bytes(authority.pem)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "ca.pem"))
        objects = open_objects(location)
        with pytest.raises(StoreUnreachable, match="NoSuchBucket"):
            objects.write("a/b", b"x")  # verified and answered: the bucket is not there yet
    finally:
        server.stop()
