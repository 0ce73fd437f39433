"""A model store that does not answer is named as what it is: its errors and log lines say which
store (a directory or an ``s3://`` location), never "the file system" of a bucket.

The bucket here is a real S3 client (boto3) against a loopback port that takes connections and
never answers, as a stopped or unreachable object store does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator

import pytest
import torch

from service.engine.factory import ModelFactory
from service.engine.metrics import ServerMetrics
from service.engine.repository import ModelRepository
from service.errors import StoreEntryError
from service.finetune.catalog import FineTunedModels
from service.finetune.store import ModelStore, StoreReason
from service.finetune.sync import StoreSync
from service.host.files import TimedOut, call_with_timeout
from service.storage import S3Location
from service.storage.s3 import S3Objects
from tests.core_util import tiny_config

LOCATION = S3Location("silent-bucket", "models")
WAIT_S = 0.5


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: a listener whose connections are never answered."""
    for variable, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(variable, value)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the handshakes; nothing ever reads or answers
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def catalog_and_sync(endpoint: str) -> tuple[FineTunedModels, StoreSync]:
    config = tiny_config(None)
    metrics, devices = ServerMetrics(), [torch.device("cpu")]
    store = ModelStore(S3Objects(LOCATION, endpoint_url=endpoint), config.fine_tuning)
    repository = ModelRepository(metrics, devices)
    catalog = FineTunedModels(store, repository, ModelFactory(config, devices, metrics), metrics, read_timeout_s=WAIT_S)
    return catalog, StoreSync(catalog, repository, interval_s=3600, read_timeout_s=WAIT_S)


def test_a_timeout_says_how_long_and_leaves_what_to_the_caller() -> None:
    release = threading.Event()

    async def hang() -> None:
        with pytest.raises(TimedOut) as timed_out:
            await call_with_timeout(release.wait, 0.2)
        assert str(timed_out.value) == "no answer within 0.2s"
        assert timed_out.value.timeout_s == 0.2

    try:
        asyncio.run(hang())
    finally:
        release.set()


def test_a_silent_bucket_is_named_in_the_polls_log_line(silent_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    _, sync = catalog_and_sync(silent_endpoint)
    with caplog.at_level(logging.ERROR, logger="service"):
        asyncio.run(sync.sync_once())
    lines = [r.getMessage() for r in caplog.records if "model store" in r.getMessage()]
    assert lines, caplog.text
    assert f"cannot list the model store {LOCATION}: no answer within {WAIT_S:g}s" in lines[0]
    assert "file system" not in caplog.text


def test_a_silent_bucket_is_named_when_an_entry_is_read(silent_endpoint: str) -> None:
    catalog, _ = catalog_and_sync(silent_endpoint)
    with pytest.raises(StoreEntryError) as refused:
        asyncio.run(catalog.serve_stored("pets"))
    assert refused.value.reason == StoreReason.TIMEOUT.value
    message = str(refused.value)
    assert f"pets: the model store {LOCATION} gave no answer within {WAIT_S:g}s" in message, message
    assert "file system" not in message
