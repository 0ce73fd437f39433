"""A model store that cannot be read or written: jobs are looked up as UNAVAILABLE (503), never
"not found", and a job is refused before its training, not failed after it; a delete of an invalid
name says what a valid one looks like. Both ports, a real S3-compatible server (moto)."""

from __future__ import annotations

import logging

import aiohttp
import grpc
import pytest

from service.config import RuntimeConfig
from service.storage import S3Location
from tests.conftest import session_runtime_cache
from tests.test_orphans import examples, no_tracebacks
from tests.tiny import TINY
from vision_client import Client, FineTuneConfig, VisionClientError
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc


@pytest.fixture
def s3_server(serve_inprocess, s3_store: S3Location, moto_server):
    server = serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        model_store=s3_store,
        store_poll_seconds=3600,
    )

    def remove_bucket() -> None:
        client = moto_server.client()
        for item in client.list_objects_v2(Bucket=s3_store.bucket).get("Contents", []):
            client.delete_object(Bucket=s3_store.bucket, Key=item["Key"])
        client.delete_bucket(Bucket=s3_store.bucket)

    server.remove_bucket = remove_bucket
    return server


def rest(server, method: str, path: str) -> tuple[int, dict]:
    async def call() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session, session.request(method, server.http_url + path) as answer:
            return answer.status, await answer.json()

    return server.call(call())


def test_a_job_looked_up_while_the_store_is_gone_is_unavailable_on_both_ports(s3_server, caplog) -> None:
    s3_server.remove_bucket()
    with grpc.insecure_channel(s3_server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.FineTuningStub(channel).GetJob(pb.GetJobRequest(job_id="0123456789ab"), timeout=30)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "model store" in caught.value.details() and "retry" in caught.value.details()
    status, body = rest(s3_server, "GET", "/v1/jobs/0123456789ab")
    assert status == 503 and "model store" in body["error"]
    no_tracebacks(caplog)


def test_a_job_is_refused_before_training_while_the_store_cannot_be_written(s3_server, caplog) -> None:
    caplog.set_level(logging.INFO)
    s3_server.remove_bucket()
    with Client(s3_server.target) as client, pytest.raises(VisionClientError) as caught:
        client.create_job(FineTuneConfig(TINY, "never", epochs=1), examples())
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert "cannot write to the model store" in str(caught.value)
    with Client(s3_server.target) as client:
        assert [job for job in client.jobs() if job.config.output_model == "never"] == []
    no_tracebacks(caplog)


def test_deleting_an_invalid_name_says_what_a_valid_one_looks_like_on_both_ports(s3_server) -> None:
    with grpc.insecure_channel(s3_server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.FineTuningStub(channel).DeleteModel(pb.DeleteModelRequest(name="Bad Name!"), timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid model name" in caught.value.details()
    status, body = rest(s3_server, "DELETE", "/v1/models/Bad%20Name!")
    assert status == 400 and "not a valid model name" in body["error"]
    status, body = rest(s3_server, "DELETE", "/v1/models/no-such-model")
    assert status == 404  # a valid name that is not there is still NOT_FOUND
