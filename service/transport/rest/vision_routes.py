"""``vision.v1.Models`` and ``vision.v1.FineTuning`` over HTTP, in protobuf's canonical JSON.

| method and path | RPC |
|---|---|
| ``GET /v1/models`` (``?without_labels=true``) | ``Models/ListModels`` |
| ``GET /v1/models/{name}[/versions/{version}]`` | ``Models/GetModel`` |
| ``GET /v1/throughput`` | ``Models/GetThroughput`` |
| ``DELETE /v1/models/{name}`` | ``FineTuning/DeleteModel`` |
| ``POST /v1/models/{name}/versions/{version}/rollback`` | ``Models/RollbackModel`` |
| ``POST /v1/jobs`` (``multipart/form-data``) | ``FineTuning/CreateJob`` |
| ``GET /v1/jobs`` | ``FineTuning/ListJobs`` |
| ``GET /v1/jobs/{id}`` | ``FineTuning/GetJob`` |
| ``POST /v1/jobs/{id}/cancel`` | ``FineTuning/CancelJob`` |
| ``GET /v1/jobs/{id}/events`` (Server-Sent Events) | ``FineTuning/WatchJob`` |

A job is created from a multipart body: first a part named ``config`` holding the job's
``FineTuneConfig`` as JSON, then one part per example image, named by its label (a class name):
``curl -F config=@config.json -F cat=@cat1.jpg -F dog=@dog1.jpg``. The parts are read as they
arrive and handed to ``CreateJob`` in batches, so a job's size is bounded by its limits
(``--max-job-bytes``, ``--max-job-examples``), not by the message size. An upload must keep
coming as a gRPC one must (``transport/limits.py``'s ``UploadPace``): each part and each chunk
within ``--upload-idle-seconds``, the whole within ``--max-upload-seconds``. Part names are read
as the HTML standard has browsers write them (:func:`field_name`). Regression targets
(``loss: mse``) need gRPC.

``WatchJob``'s stream sends a comment line every :data:`KEEPALIVE_S` while no event comes, so a
watcher whose client has gone is noticed and its place (``--max-job-watchers``) freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from aiohttp import BodyPartReader, MultipartReader, web
from google.protobuf import json_format

from service.errors import InvalidInputError, quote
from service.transport.limits import UploadPace
from service.transport.rest.routes import Route, call_of
from service.transport.services import FineTuningService, ModelsService
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import models_pb2

_MODELS = "/vision.v1.Models/"
_FINE_TUNING = "/vision.v1.FineTuning/"
EXAMPLES_PER_MESSAGE = 16
CONFIG_PART = "config"
MAX_CONFIG_BYTES = 64 * 1024
KEEPALIVE_S = 15.0


def vision_routes(
    models: ModelsService, fine_tuning: FineTuningService, *, max_part_bytes: int, read_timeout_s: float
) -> list[Route]:
    async def list_models(request: web.Request, body: bytes) -> web.StreamResponse:
        without = request.query.get("without_labels", "").lower() in ("1", "true")
        reply = await models.ListModels(models_pb2.ListModelsRequest(without_labels=without), call_of(request))
        return _canonical(reply)

    async def get_model(request: web.Request, body: bytes) -> web.StreamResponse:
        message = models_pb2.GetModelRequest(
            name=request.match_info["name"], version=request.match_info.get("version", "")
        )
        return _canonical(await models.GetModel(message, call_of(request)))

    async def throughput(request: web.Request, body: bytes) -> web.StreamResponse:
        return _canonical(await models.GetThroughput(models_pb2.GetThroughputRequest(), call_of(request)))

    async def rollback_model(request: web.Request, body: bytes) -> web.StreamResponse:
        message = models_pb2.RollbackModelRequest(
            name=request.match_info["name"], version=request.match_info["version"]
        )
        return _canonical(await models.RollbackModel(message, call_of(request)))

    async def delete_model(request: web.Request, body: bytes) -> web.StreamResponse:
        message = ft_pb.DeleteModelRequest(name=request.match_info["name"])
        return _canonical(await fine_tuning.DeleteModel(message, call_of(request)))

    async def create_job(request: web.Request, body: bytes) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            raise InvalidInputError(
                "send the job as multipart/form-data: a 'config' part (the FineTuneConfig as JSON), "
                "then one part per image named by its label"
            )
        try:
            reader = await request.multipart()
        except ValueError as error:  # aiohttp's word for a Content-Type without a usable boundary
            raise InvalidInputError(
                f"the multipart body cannot be read: {str(error)[:200]}; send Content-Type "
                "multipart/form-data with its boundary parameter (curl -F and browsers do)"
            ) from None
        messages = _job_messages(reader, max_part_bytes, fine_tuning.upload_pace())
        return _canonical(await fine_tuning.create_job(messages, call_of(request)))

    async def list_jobs(request: web.Request, body: bytes) -> web.StreamResponse:
        return _canonical(await fine_tuning.ListJobs(ft_pb.ListJobsRequest(), call_of(request)))

    async def get_job(request: web.Request, body: bytes) -> web.StreamResponse:
        message = ft_pb.GetJobRequest(job_id=request.match_info["job"])
        return _canonical(await fine_tuning.GetJob(message, call_of(request)))

    async def cancel_job(request: web.Request, body: bytes) -> web.StreamResponse:
        message = ft_pb.CancelJobRequest(job_id=request.match_info["job"])
        return _canonical(await fine_tuning.CancelJob(message, call_of(request)))

    async def watch_job(request: web.Request, body: bytes) -> web.StreamResponse:
        events = cast(
            AsyncGenerator[ft_pb.JobEvent, None],
            fine_tuning.WatchJob(ft_pb.WatchJobRequest(job_id=request.match_info["job"]), call_of(request)),
        )
        try:
            # An unknown job, or one with its watchers' cap reached, is an error status, not an empty stream.
            first = await anext(events, None)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):  # the client stopped watching
                await _send_events(response, first, events)
                await response.write_eof()
            return response
        finally:
            await events.aclose()  # its watcher slot is free again at once

    return [
        Route("GET", ("/v1/models",), _MODELS + "ListModels", list_models),
        Route("GET", ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"), _MODELS + "GetModel", get_model),
        Route("GET", ("/v1/throughput",), _MODELS + "GetThroughput", throughput),
        Route("DELETE", ("/v1/models/{name}",), _FINE_TUNING + "DeleteModel", delete_model),
        Route(
            "POST",
            ("/v1/models/{name}/versions/{version}/rollback",),
            _MODELS + "RollbackModel",
            rollback_model,
            has_body=True,
        ),
        Route("POST", ("/v1/jobs",), _FINE_TUNING + "CreateJob", create_job, streams_body=True),
        Route("GET", ("/v1/jobs",), _FINE_TUNING + "ListJobs", list_jobs),
        Route("GET", ("/v1/jobs/{job}",), _FINE_TUNING + "GetJob", get_job),
        Route("POST", ("/v1/jobs/{job}/cancel",), _FINE_TUNING + "CancelJob", cancel_job, has_body=True),
        Route("GET", ("/v1/jobs/{job}/events",), _FINE_TUNING + "WatchJob", watch_job),
    ]


async def _send_events(
    response: web.StreamResponse, first: ft_pb.JobEvent | None, events: AsyncIterator[ft_pb.JobEvent]
) -> None:
    """Each event as it comes; while none does, a comment line every :data:`KEEPALIVE_S`, so that a
    watcher whose client has gone is noticed (the write fails) and its slot freed between events."""
    event = first
    while event is not None:
        data = json_format.MessageToJson(event, indent=None)
        await response.write(f"event: {event.kind}\ndata: {data}\n\n".encode())
        upcoming = asyncio.ensure_future(anext(events, None))
        try:
            while not (await asyncio.wait({upcoming}, timeout=KEEPALIVE_S))[0]:
                await response.write(b": keep-alive\n\n")
        except BaseException:
            upcoming.cancel()
            await asyncio.wait({upcoming})  # the generator is no longer running when it is closed
            raise
        event = upcoming.result()


def _canonical(message: Any) -> web.Response:
    """Protobuf's canonical JSON (lowerCamelCase names, 64-bit integers as strings)."""
    return web.Response(text=json_format.MessageToJson(message, indent=None), content_type="application/json")


async def _job_messages(
    reader: MultipartReader, max_part_bytes: int, pace: UploadPace
) -> AsyncIterator[ft_pb.CreateJobRequest]:
    """The CreateJob messages of a multipart body, made as its parts arrive, each read (the next
    part, each chunk of it) within ``pace``."""
    part = await _next_part(reader, pace)
    if part is None or field_name(part) != CONFIG_PART:
        raise InvalidInputError(f"the first part must be '{CONFIG_PART}': the job's FineTuneConfig as JSON")
    text = await _read_part(part, MAX_CONFIG_BYTES, pace, "a FineTuneConfig's JSON is far smaller")
    try:
        config = json_format.Parse(text, ft_pb.FineTuneConfig())
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as error:
        raise InvalidInputError(f"the config part is not a FineTuneConfig in JSON: {str(error)[:300]}") from None
    yield ft_pb.CreateJobRequest(config=config)
    batch: list[ft_pb.Example] = []
    while (part := await _next_part(reader, pace)) is not None:
        label = field_name(part)
        if label == CONFIG_PART:
            raise InvalidInputError("send the config part once, first")
        image = await _read_part(part, max_part_bytes, pace, "--max-message-bytes")
        batch.append(ft_pb.Example(image=image, label=label))
        if len(batch) >= EXAMPLES_PER_MESSAGE:
            yield ft_pb.CreateJobRequest(examples=ft_pb.ExampleBatch(examples=batch))
            batch = []
    if batch:
        yield ft_pb.CreateJobRequest(examples=ft_pb.ExampleBatch(examples=batch))


async def _next_part(reader: MultipartReader, pace: UploadPace) -> BodyPartReader | None:
    try:
        part = await pace.next(reader.next(), "the next part")
    except ValueError as error:  # aiohttp's word for a malformed multipart body
        raise InvalidInputError(f"the multipart body is malformed: {str(error)[:200]}") from None
    if part is not None and not isinstance(part, BodyPartReader):
        raise InvalidInputError("nested multipart bodies are not taken; send one part per image")
    return part


async def _read_part(part: BodyPartReader, max_bytes: int, pace: UploadPace, limit: str) -> bytes:
    """A part's bytes, at most ``max_bytes``; ``limit`` says in the error where that bound comes from."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await pace.next(part.read_chunk(64 * 1024), f"the rest of part {quote(field_name(part))}")
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise InvalidInputError(f"part {quote(field_name(part))} is over {max_bytes} bytes ({limit})")
        chunks.append(chunk)


_FORM_ESCAPES = {"%0A": "\n", "%0D": "\r", "%22": '"'}
_FORM_ESCAPE = re.compile("%0A|%0D|%22")


def field_name(part: BodyPartReader) -> str:
    """A part's field name as the person typed it.

    The HTML standard (WHATWG, "multipart/form-data encoding algorithm") has browsers write a
    field name's (and a file name's) line feed, carriage return and double quote as ``%0A``,
    ``%0D`` and ``%22``, and perform no other escapes; so exactly those three are decoded
    (``%25`` and any other ``%`` stay as they are, since ``%`` itself is never escaped).
    """
    return _FORM_ESCAPE.sub(lambda match: _FORM_ESCAPES[match.group()], part.name or "")
