"""The REST binding of the Open Inference Protocol (KServe v2) and Triton's extensions.

Each route names the gRPC method it is the REST form of: the handler builds that method's
request message and the call's information from the HTTP request (:func:`call_of`), calls the
very servicer method gRPC calls, and answers protobuf's JSON of its response. So both ports share
one implementation, one set of checks and one authorization scope per operation
(``transport/auth.py``'s table, looked up by the method's name).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from service.errors import InvalidInputError
from service.telemetry.tracing import trace_carrier
from service.transport import values
from service.transport.call import Call
from service.transport.rest.codec import (
    HEADER_LENGTH,
    build_infer_body,
    message_to_json,
    parse_infer_body,
    parse_json,
)
from service.transport.services import InferenceService
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

_INFERENCE = "/inference.GRPCInferenceService/"
_REPOSITORY = "/v2/repository/models/{model}"
_SHM = "/v2/systemsharedmemory"
_TRACE_PATHS = ("/v2/trace/setting", "/v2/models/{model}/trace/setting")
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in a worker thread
T = TypeVar("T")
# Set by the server (``server.py``) once a request is let in: whether its caller counts as this host
# (a loopback peer whose Host names this host, ``AccessPolicy.is_local``): who may name shared memory.
LOCAL_CALLER = web.RequestKey("local_caller", bool)

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str  # HTTP
    paths: tuple[str, ...]
    rpc: str  # the gRPC method it stands for: its scope, and the name in errors
    handler: Handler
    has_body: bool = False  # read whole (bounded) before the handler runs
    streams_body: bool = False  # the handler reads the body itself, as it arrives


def routes(servicer: InferenceService) -> list[Route]:
    """Every REST route, each with the gRPC method it stands for."""

    def model_paths(suffix: str = "") -> tuple[str, ...]:
        return (f"/v2/models/{{model}}{suffix}", f"/v2/models/{{model}}/versions/{{version}}{suffix}")

    async def live(request: web.Request, body: bytes) -> web.StreamResponse:
        reply = await servicer.ServerLive(pb.ServerLiveRequest(), call_of(request))
        return _health({"live": reply.live})

    async def ready(request: web.Request, body: bytes) -> web.StreamResponse:
        reply = await servicer.ServerReady(pb.ServerReadyRequest(), call_of(request))
        return _health({"ready": reply.ready})

    async def server_metadata(request: web.Request, body: bytes) -> web.StreamResponse:
        return _json(await servicer.ServerMetadata(pb.ServerMetadataRequest(), call_of(request)))

    async def model_metadata(request: web.Request, body: bytes) -> web.StreamResponse:
        name, version = _model(request)
        return _json(
            await servicer.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), call_of(request))
        )

    async def model_ready(request: web.Request, body: bytes) -> web.StreamResponse:
        name, version = _model(request)
        reply = await servicer.ModelReady(pb.ModelReadyRequest(name=name, version=version), call_of(request))
        return _health({"name": name, "ready": reply.ready})

    async def model_config(request: web.Request, body: bytes) -> web.StreamResponse:
        name, version = _model(request)
        reply = await servicer.ModelConfig(pb.ModelConfigRequest(name=name, version=version), call_of(request))
        return _json(reply.config)  # Triton's REST API answers the config itself

    async def statistics(request: web.Request, body: bytes) -> web.StreamResponse:
        name, version = _model(request) if "model" in request.match_info else ("", "")
        message = pb.ModelStatisticsRequest(name=name, version=version)
        return _json(await servicer.ModelStatistics(message, call_of(request)))

    async def repository_index(request: web.Request, body: bytes) -> web.StreamResponse:
        options = await _object(body, "the repository index request")
        reply = await servicer.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=options.get("ready") is True), call_of(request)
        )
        return web.json_response([message_to_json(model) for model in reply.models])

    async def load(request: web.Request, body: bytes) -> web.StreamResponse:
        message = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        _control_parameters(message, await _object(body, "the load request"))
        await servicer.RepositoryModelLoad(message, call_of(request))
        return web.json_response({})

    async def unload(request: web.Request, body: bytes) -> web.StreamResponse:
        message = pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        _control_parameters(message, await _object(body, "the unload request"))
        await servicer.RepositoryModelUnload(message, call_of(request))
        return web.json_response({})

    async def infer(request: web.Request, body: bytes) -> web.StreamResponse:
        name, version = _model(request)
        header_length = request.headers.get(HEADER_LENGTH)
        parsed = await parse_off_loop(body, parse_infer_body, body, header_length, name, version)
        reply = await servicer.infer(parsed.message, call_of(request, timeout=parsed.timeout_s))
        payload, json_length = build_infer_body(reply, parsed)
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )

    async def shm_status(request: web.Request, body: bytes) -> web.StreamResponse:
        message = pb.SystemSharedMemoryStatusRequest(name=request.match_info.get("region", ""))
        reply = await servicer.SystemSharedMemoryStatus(message, call_of(request))
        # Triton's list, every field written (protobuf's JSON would leave out an offset of 0).
        fields = ("name", "key", "offset", "byte_size")
        return web.json_response([{f: getattr(region, f) for f in fields} for region in reply.regions.values()])

    async def shm_register(request: web.Request, body: bytes) -> web.StreamResponse:
        options = await _object(body, "the register request")
        message = pb.SystemSharedMemoryRegisterRequest(
            name=request.match_info["region"],
            key=_string(options.get("key"), "key"),
            offset=_byte_count(options.get("offset", 0), "offset"),
            byte_size=_byte_count(options.get("byte_size"), "byte_size"),
        )
        await servicer.SystemSharedMemoryRegister(message, call_of(request))
        return web.json_response({})

    async def shm_unregister(request: web.Request, body: bytes) -> web.StreamResponse:
        message = pb.SystemSharedMemoryUnregisterRequest(name=request.match_info.get("region", ""))
        await servicer.SystemSharedMemoryUnregister(message, call_of(request))
        return web.json_response({})

    async def trace_setting(request: web.Request, body: bytes) -> web.StreamResponse:
        message = pb.TraceSettingRequest(model_name=request.match_info.get("model", ""))
        if request.method == "POST":
            for key, value in (await _object(body, "the trace settings")).items():
                message.settings[key].value.extend(_setting_values(key, value))
        reply = await servicer.TraceSetting(message, call_of(request))
        # Triton's JSON: trace_level a list, every other setting one string.
        return web.json_response(
            {
                key: list(entry.value) if key == "trace_level" else (entry.value[0] if entry.value else "")
                for key, entry in reply.settings.items()
            }
        )

    def shm_paths(suffix: str) -> tuple[str, ...]:
        return (f"{_SHM}{suffix}", f"{_SHM}/region/{{region}}{suffix}")

    return [
        Route("GET", ("/v2/health/live",), _INFERENCE + "ServerLive", live),
        Route("GET", ("/v2/health/ready",), _INFERENCE + "ServerReady", ready),
        Route("GET", ("/v2",), _INFERENCE + "ServerMetadata", server_metadata),
        Route("GET", model_paths(), _INFERENCE + "ModelMetadata", model_metadata),
        Route("GET", model_paths("/ready"), _INFERENCE + "ModelReady", model_ready),
        Route("GET", model_paths("/config"), _INFERENCE + "ModelConfig", model_config),
        Route("GET", ("/v2/models/stats", *model_paths("/stats")), _INFERENCE + "ModelStatistics", statistics),
        Route("POST", model_paths("/infer"), _INFERENCE + "ModelInfer", infer, has_body=True),
        Route("POST", ("/v2/repository/index",), _INFERENCE + "RepositoryIndex", repository_index, has_body=True),
        Route("POST", (_REPOSITORY + "/load",), _INFERENCE + "RepositoryModelLoad", load, has_body=True),
        Route("POST", (_REPOSITORY + "/unload",), _INFERENCE + "RepositoryModelUnload", unload, has_body=True),
        Route("GET", shm_paths("/status"), _INFERENCE + "SystemSharedMemoryStatus", shm_status),
        Route(
            "POST",
            (f"{_SHM}/region/{{region}}/register",),
            _INFERENCE + "SystemSharedMemoryRegister",
            shm_register,
            has_body=True,
        ),
        Route(
            "POST", shm_paths("/unregister"), _INFERENCE + "SystemSharedMemoryUnregister", shm_unregister, has_body=True
        ),
        Route("GET", _TRACE_PATHS, _INFERENCE + "TraceSetting", trace_setting),
        Route("POST", _TRACE_PATHS, _INFERENCE + "TraceSetting", trace_setting, has_body=True),
    ]


def _setting_values(key: str, value: Any) -> list[str]:
    """A trace setting as Triton's REST body gives it (a string, a number, a list of them, or null to
    clear it), as the gRPC message's list of strings."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise InvalidInputError(
                f"trace setting {key!r} takes a string, a list of strings or null, got {values.describe(value)}"
            )
    return [str(item) for item in items]


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def call_of(request: web.Request, *, timeout: float | None = None) -> Call:
    """What the services read of an HTTP request: its peer, whether it counts as this host (set by
    the port once the request is let in: ``LOCAL_CALLER``), its trace context, and a deadline where
    the request gives one (an inference's ``timeout`` parameter)."""
    return Call(
        "http",
        peer=peer(request),
        local=request.get(LOCAL_CALLER) is True,
        deadline=Call.deadline_in(timeout),
        carrier=trace_carrier(request.headers.items()) or None,
    )


def peer(request: web.Request) -> str:
    """The caller as a gRPC peer string, for the one loopback rule (``auth.is_loopback_peer``)."""
    host = request.remote or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ""
    return f"ipv6:[{host}]:0" if address.version == 6 else f"ipv4:{host}:0"


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{field} must be a string, got {values.describe(value)}")
    return value


def _byte_count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidInputError(f"{field} must be a non-negative integer (bytes), got {values.describe(value)}")
    return value


def _json(message: Any) -> web.Response:
    return web.json_response(message_to_json(message))


def _health(answer: dict[str, Any]) -> web.Response:
    """KServe's JSON answer, and a status that says it too (Triton's clients read only the status):
    200, or 503 so that probes and load balancers take the replica out."""
    ok = bool(answer.get("live", answer.get("ready")))
    return web.json_response(answer, status=200 if ok else 503)


async def parse_off_loop(body: bytes, parse: Callable[..., T], *args: Any) -> T:
    """``parse(*args)`` of a request ``body``: in a worker thread when the body is larger than
    :data:`OFF_LOOP_BYTES`, so that parsing a large body never holds the event loop."""
    if len(body) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse, *args)
    return parse(*args)


async def _object(body: bytes, what: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    data = await parse_off_loop(body, parse_json, body, what)
    if not isinstance(data, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return data


def _control_parameters(
    message: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest, options: dict[str, Any]
) -> None:
    """Load and unload parameters as the gRPC request carries them (the servicer decides what it takes)."""
    values.parameters(options.get("parameters", {}), message.parameters, "parameters")
