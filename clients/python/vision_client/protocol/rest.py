"""The REST binding of the protocol, without I/O: each gRPC method's HTTP route, and its bodies.

The server's HTTP port answers every route with the servicer method gRPC calls, so a gRPC
method's request message can be sent as its REST request and the REST answer read back into the
gRPC method's response message (:func:`request_for`, :func:`response_for`). The SDK's plans name
gRPC methods; this module is how they travel over HTTP, so both bindings give equal results.

| gRPC method | HTTP |
|---|---|
| ``GRPCInferenceService/ServerLive`` | ``GET /v2/health/live`` (200, or 503 with ``{"live": false}``) |
| ``GRPCInferenceService/ServerReady`` | ``GET /v2/health/ready`` (200, or 503 with ``{"ready": false}``) |
| ``GRPCInferenceService/ServerMetadata`` | ``GET /v2`` |
| ``GRPCInferenceService/ModelMetadata`` | ``GET /v2/models/{name}[/versions/{version}]`` |
| ``GRPCInferenceService/ModelReady`` | ``GET /v2/models/{name}[/versions/{version}]/ready`` |
| ``GRPCInferenceService/ModelConfig`` | ``GET /v2/models/{name}[/versions/{version}]/config`` |
| ``GRPCInferenceService/ModelStatistics`` | ``GET /v2/models/stats``, ``GET /v2/models/{name}[...]/stats`` |
| ``GRPCInferenceService/ModelInfer`` | ``POST /v2/models/{name}[/versions/{version}]/infer`` |
| ``GRPCInferenceService/RepositoryIndex`` | ``POST /v2/repository/index`` |
| ``GRPCInferenceService/RepositoryModelLoad`` | ``POST /v2/repository/models/{name}/load`` |
| ``GRPCInferenceService/RepositoryModelUnload`` | ``POST /v2/repository/models/{name}/unload`` |
| ``vision.v1.Models/ListModels`` | ``GET /v1/models`` (``?without_labels=true``) |
| ``vision.v1.Models/GetModel`` | ``GET /v1/models/{name}[/versions/{version}]`` |
| ``vision.v1.Models/GetThroughput`` | ``GET /v1/throughput`` |
| ``vision.v1.Models/RollbackModel`` | ``POST /v1/models/{name}/versions/{version}/rollback`` |
| ``vision.v1.FineTuning/DeleteModel`` | ``DELETE /v1/models/{name}`` |
| ``vision.v1.FineTuning/CreateJob`` | ``POST /v1/jobs`` (``multipart/form-data``: :func:`job_parts`) |
| ``vision.v1.FineTuning/ListJobs`` | ``GET /v1/jobs`` |
| ``vision.v1.FineTuning/GetJob`` | ``GET /v1/jobs/{job_id}`` |
| ``vision.v1.FineTuning/CancelJob`` | ``POST /v1/jobs/{job_id}/cancel`` |
| ``vision.v1.FineTuning/WatchJob`` | ``GET /v1/jobs/{job_id}/events`` (Server-Sent Events: :class:`EventStream`) |

Inference travels as KServe v2 JSON with Triton's binary tensor data extension: every tensor of
``raw_input_contents`` as binary data after the JSON header, every output asked for as binary
data, so that no number is converted to text and back. ``vision.v1`` answers are protobuf's
canonical JSON, the Triton routes' protobuf's JSON with the proto's field names: both are read
back with :mod:`google.protobuf.json_format`, unknown fields ignored (as protobuf's binary
parser does). Errors are an HTTP status and ``{"error": message}``; ``vision_client.errors``
maps the status to the gRPC code it stands for.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from vision_client.errors import InvalidInputError
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb
from vision_client.protocol.stubs.inference import model_config_pb2 as config_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import models_pb2 as models_pb
from vision_client.protocol.tensors import encode_bytes_elements

__all__ = [
    "CONFIG_PART",
    "HEADER_LENGTH",
    "ROUTES",
    "EventStream",
    "RestRequest",
    "RestRoute",
    "is_answer",
    "job_parts",
    "request_for",
    "response_for",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's header: the length of the JSON before an inference body's binary tensor data."""
BINARY_DATA_SIZE = "binary_data_size"
TIMEOUT_PARAMETER = "timeout"  # microseconds, Triton's request parameter
CONFIG_PART = "config"
_INFERENCE = "/inference.GRPCInferenceService/"
_MODELS = "/vision.v1.Models/"
_FINE_TUNING = "/vision.v1.FineTuning/"


@dataclass(frozen=True)
class RestRequest:
    """One HTTP request: method, path (query included) below the base URL, headers and body."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class RestRoute:
    """The REST form of one gRPC method: its HTTP method, how its request becomes a
    :class:`RestRequest`, and how a successful answer becomes its response message."""

    method: str
    path: Callable[[Any], str]
    response_type: type[Message]
    body: Callable[[Any], bytes] | None = None
    parse: Callable[[bytes, Mapping[str, str]], Message] | None = None
    health: str = ""  # the answer's key of a health route, which says "no" with 503


def _segment(value: str) -> str:
    return quote(value, safe="")


def _model(name: str, version: str = "", suffix: str = "") -> str:
    path = f"/v2/models/{_segment(name)}"
    if version:
        path += f"/versions/{_segment(version)}"
    return path + suffix


def _canonical(response_type: type[Message]) -> Callable[[bytes, Mapping[str, str]], Message]:
    def parse(body: bytes, headers: Mapping[str, str]) -> Message:
        message = response_type()
        json_format.Parse(body, message, ignore_unknown_fields=True)
        return message

    return parse


def _statistics_path(request: infer_pb.ModelStatisticsRequest) -> str:
    return _model(request.name, request.version, "/stats") if request.name else "/v2/models/stats"


def _config_answer(body: bytes, headers: Mapping[str, str]) -> Message:
    config = config_pb.ModelConfig()  # Triton's REST answer is the config itself
    json_format.Parse(body, config, ignore_unknown_fields=True)
    return infer_pb.ModelConfigResponse(config=config)


def _index_answer(body: bytes, headers: Mapping[str, str]) -> Message:
    response = infer_pb.RepositoryIndexResponse()
    json_format.ParseDict({"models": json.loads(body)}, response, ignore_unknown_fields=True)
    return response


def _control_body(request: infer_pb.RepositoryModelLoadRequest | infer_pb.RepositoryModelUnloadRequest) -> bytes:
    parameters = {key: _parameter_value(value) for key, value in request.parameters.items()}
    return json.dumps({"parameters": parameters} if parameters else {}).encode()


def _empty(response_type: type[Message]) -> Callable[[bytes, Mapping[str, str]], Message]:
    return lambda body, headers: response_type()


ROUTES: dict[str, RestRoute] = {
    _INFERENCE + "ServerLive": RestRoute(
        "GET", lambda r: "/v2/health/live", infer_pb.ServerLiveResponse, health="live"
    ),
    _INFERENCE + "ServerReady": RestRoute(
        "GET", lambda r: "/v2/health/ready", infer_pb.ServerReadyResponse, health="ready"
    ),
    _INFERENCE + "ServerMetadata": RestRoute("GET", lambda r: "/v2", infer_pb.ServerMetadataResponse),
    _INFERENCE + "ModelMetadata": RestRoute("GET", lambda r: _model(r.name, r.version), infer_pb.ModelMetadataResponse),
    _INFERENCE + "ModelReady": RestRoute(
        "GET", lambda r: _model(r.name, r.version, "/ready"), infer_pb.ModelReadyResponse, health="ready"
    ),
    _INFERENCE + "ModelConfig": RestRoute(
        "GET", lambda r: _model(r.name, r.version, "/config"), infer_pb.ModelConfigResponse, parse=_config_answer
    ),
    _INFERENCE + "ModelStatistics": RestRoute("GET", _statistics_path, infer_pb.ModelStatisticsResponse),
    _INFERENCE + "ModelInfer": RestRoute(
        "POST", lambda r: _model(r.model_name, r.model_version, "/infer"), infer_pb.ModelInferResponse
    ),
    _INFERENCE + "RepositoryIndex": RestRoute(
        "POST",
        lambda r: "/v2/repository/index",
        infer_pb.RepositoryIndexResponse,
        body=lambda r: json.dumps({"ready": r.ready} if r.ready else {}).encode(),
        parse=_index_answer,
    ),
    _INFERENCE + "RepositoryModelLoad": RestRoute(
        "POST",
        lambda r: f"/v2/repository/models/{_segment(r.model_name)}/load",
        infer_pb.RepositoryModelLoadResponse,
        body=_control_body,
        parse=_empty(infer_pb.RepositoryModelLoadResponse),
    ),
    _INFERENCE + "RepositoryModelUnload": RestRoute(
        "POST",
        lambda r: f"/v2/repository/models/{_segment(r.model_name)}/unload",
        infer_pb.RepositoryModelUnloadResponse,
        body=_control_body,
        parse=_empty(infer_pb.RepositoryModelUnloadResponse),
    ),
    _MODELS + "ListModels": RestRoute(
        "GET",
        lambda r: "/v1/models?without_labels=true" if r.without_labels else "/v1/models",
        models_pb.ListModelsResponse,
    ),
    _MODELS + "GetModel": RestRoute(
        "GET",
        lambda r: f"/v1/models/{_segment(r.name)}" + (f"/versions/{_segment(r.version)}" if r.version else ""),
        models_pb.ModelInfo,
    ),
    _MODELS + "GetThroughput": RestRoute("GET", lambda r: "/v1/throughput", models_pb.Throughput),
    _MODELS + "RollbackModel": RestRoute(
        "POST",
        lambda r: f"/v1/models/{_segment(r.name)}/versions/{_segment(r.version)}/rollback",
        models_pb.ModelInfo,
        body=lambda r: b"",
    ),
    _FINE_TUNING + "DeleteModel": RestRoute(
        "DELETE", lambda r: f"/v1/models/{_segment(r.name)}", ft_pb.DeleteModelResponse
    ),
    _FINE_TUNING + "CreateJob": RestRoute("POST", lambda r: "/v1/jobs", ft_pb.Job),
    _FINE_TUNING + "ListJobs": RestRoute("GET", lambda r: "/v1/jobs", ft_pb.ListJobsResponse),
    _FINE_TUNING + "GetJob": RestRoute("GET", lambda r: f"/v1/jobs/{_segment(r.job_id)}", ft_pb.Job),
    _FINE_TUNING + "CancelJob": RestRoute(
        "POST", lambda r: f"/v1/jobs/{_segment(r.job_id)}/cancel", ft_pb.Job, body=lambda r: b""
    ),
    _FINE_TUNING + "WatchJob": RestRoute("GET", lambda r: f"/v1/jobs/{_segment(r.job_id)}/events", ft_pb.JobEvent),
}
"""Each gRPC method (its full path, as the server's routes name it) and its REST route."""


def route_of(method: str) -> RestRoute:
    route = ROUTES.get(method)
    if route is None:
        raise ValueError(f"{method} has no REST route")
    return route


def request_for(method: str, request: Message, *, timeout: float | None = None) -> RestRequest:
    """The REST request standing for ``request`` to the gRPC ``method`` (not CreateJob: see :func:`job_parts`).

    ``timeout`` (seconds) travels as an inference request's ``timeout`` parameter, so that the server
    drops work whose caller has given up, as a gRPC deadline has it do.
    """
    route = route_of(method)
    path = route.path(request)
    if isinstance(request, infer_pb.ModelInferRequest):
        body, header_length = infer_body(request, timeout=timeout)
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        return RestRequest(route.method, path, headers, body)
    if route.body is not None:
        return RestRequest(route.method, path, {"Content-Type": "application/json"}, route.body(request))
    return RestRequest(route.method, path)


def is_answer(method: str, status: int, body: bytes) -> bool:
    """Whether an HTTP answer is the method's response (rather than an error): a 2xx, or a health
    route's 503 that says "not live" or "not ready"."""
    if 200 <= status < 300:
        return True
    route = ROUTES.get(method)
    if route is None or not route.health or status != 503:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get(route.health) is False


def response_for(method: str, body: bytes, headers: Mapping[str, str]) -> Message:
    """The gRPC ``method``'s response message of a successful REST answer.

    Raises ``ValueError`` for an answer that is not the route's (not JSON, or not its message).
    """
    route = route_of(method)
    try:
        if route.response_type is infer_pb.ModelInferResponse:
            return infer_response(body, headers)
        if route.health:
            data = json.loads(body)
            response = route.response_type()
            setattr(response, route.health, data.get(route.health) is True)
            return response
        if route.parse is not None:
            return route.parse(body, headers)
        return _canonical(route.response_type)(body, headers)
    except (json_format.ParseError, ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
        raise ValueError(f"{str(error)[:200]}") from None


# -- inference -----------------------------------------------------------------------------


_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameter_value(parameter: Any) -> Any:
    """An InferParameter's (or a ModelRepositoryParameter's) value."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _parameters(parameters: Mapping[str, infer_pb.InferParameter]) -> dict[str, Any]:
    return {key: _parameter_value(value) for key, value in parameters.items()}


def infer_body(request: infer_pb.ModelInferRequest, *, timeout: float | None = None) -> tuple[bytes, int]:
    """A ``ModelInferRequest`` as a REST body: the JSON header, then the binary tensor data; and
    the header's length (for :data:`HEADER_LENGTH`)."""
    binary: list[bytes] = []
    inputs: list[dict[str, Any]] = []
    for position, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = _parameters(tensor.parameters)
        if position < len(request.raw_input_contents):
            raw = request.raw_input_contents[position]
            parameters[BINARY_DATA_SIZE] = len(raw)
            binary.append(raw)
        else:
            values = list(getattr(tensor.contents, _CONTENTS.get(tensor.datatype, "fp32_contents")))
            if tensor.datatype == "BYTES":
                parameters["content_type"] = "base64"
                values = [base64.b64encode(value).decode("ascii") for value in values]
            entry["data"] = values
        if parameters:
            entry["parameters"] = parameters
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    outputs = [
        {"name": output.name, "parameters": {**_parameters(output.parameters), "binary_data": True}}
        for output in request.outputs
    ]
    if outputs:
        header["outputs"] = outputs
    parameters = _parameters(request.parameters)
    if not outputs:
        parameters["binary_data_output"] = True
    if timeout is not None and TIMEOUT_PARAMETER not in parameters:
        parameters[TIMEOUT_PARAMETER] = max(1, round(timeout * 1e6))
    if parameters:
        header["parameters"] = parameters
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b"".join(binary), len(text)


def infer_response(body: bytes, headers: Mapping[str, str]) -> infer_pb.ModelInferResponse:
    """A REST inference answer as the ``ModelInferResponse`` gRPC answers: every output's data in
    ``raw_output_contents`` (binary data as it came; JSON ``data`` packed little-endian)."""
    length = _header_length(headers)
    header = json.loads(body if length is None else body[:length])
    binary = b"" if length is None else body[length:]
    response = infer_pb.ModelInferResponse(
        model_name=str(header.get("model_name", "")),
        model_version=str(header.get("model_version", "")),
        id=str(header.get("id", "")),
    )
    offset = 0
    for tensor in header.get("outputs", []):
        output = response.outputs.add(
            name=str(tensor["name"]), datatype=str(tensor["datatype"]), shape=[int(d) for d in tensor["shape"]]
        )
        parameters = dict(tensor.get("parameters", {}))
        size = parameters.pop(BINARY_DATA_SIZE, None)
        _set_parameters(output.parameters, parameters)
        if size is not None:
            if not isinstance(size, int) or offset + size > len(binary):
                raise ValueError(f"output {output.name!r} claims {size!r} bytes of binary data that are not there")
            response.raw_output_contents.append(binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            response.raw_output_contents.append(_pack(tensor["data"], output.datatype))
    return response


def _header_length(headers: Mapping[str, str]) -> int | None:
    for key, value in headers.items():
        if key.lower() == HEADER_LENGTH.lower():
            return int(value)
    return None


_NUMPY = {
    "BOOL": "?",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def _pack(data: Any, datatype: str) -> bytes:
    if datatype == "BYTES":
        return encode_bytes_elements([str(item).encode("utf-8") for item in data])
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise ValueError(f"datatype {datatype!r} is not one this client reads")
    return np.asarray(data, dtype=dtype).tobytes()


def _set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value


# -- fine-tuning jobs ----------------------------------------------------------------------

# The HTML standard's escapes of a form field's name (WHATWG "multipart/form-data encoding
# algorithm"), which the server decodes, and nothing else: "%" itself is not escaped.
_NAME_ESCAPES = {"\n": "%0A", "\r": "%0D", '"': "%22"}
_ESCAPE_LOOKALIKE = re.compile("%0A|%0D|%22")


def _field_name(label: str, position: int) -> str:
    if _ESCAPE_LOOKALIKE.search(label):
        raise InvalidInputError(
            f"example {position}: the label {label[:80]!r} holds %0A, %0D or %22, which the HTTP binding "
            "cannot send as written (a form field's name escapes a line break or a quote that way); "
            "rename the class or connect to the gRPC port"
        )
    return "".join(_NAME_ESCAPES.get(character, character) for character in label)


def job_parts(messages: Iterable[Any], boundary: str) -> Iterator[bytes]:
    """A CreateJob call's messages as a ``multipart/form-data`` body, made lazily: the config
    part (its canonical JSON), then one part per example, named by its label (a class name).

    Raises :class:`InvalidInputError` for what the REST binding cannot carry: regression targets
    (``loss='mse'``) need the gRPC port. An error of ``messages`` propagates, so the body is never
    ended as if it were whole.
    """
    stream = iter(messages)
    first = next(stream, None)
    if first is None or not first.HasField("config"):
        raise InvalidInputError("a fine-tuning job starts with its config")
    if first.config.loss == "mse":
        raise InvalidInputError(
            "regression jobs (loss='mse') need the gRPC port: over HTTP each example is named by its "
            "class. Connect to the server's gRPC address (host:8001) for this job"
        )
    delimiter = f"--{boundary}\r\n".encode()
    config = json_format.MessageToJson(first.config, indent=None).encode()
    yield (
        delimiter
        + f'Content-Disposition: form-data; name="{CONFIG_PART}"\r\n'.encode()
        + b"Content-Type: application/json\r\n\r\n"
        + config
        + b"\r\n"
    )
    position = 0
    for message in stream:
        for example in message.examples.examples:
            if example.target:
                raise InvalidInputError(f"example {position} has a regression target: those need the gRPC port")
            name = _field_name(example.label, position)
            yield (
                delimiter
                + f'Content-Disposition: form-data; name="{name}"; filename="{position}"\r\n'.encode()
                + b"Content-Type: application/octet-stream\r\n\r\n"
                + example.image
                + b"\r\n"
            )
            position += 1
    yield f"--{boundary}--\r\n".encode()


def new_boundary() -> str:
    """A multipart boundary: 32 random hex digits, which no image holds by chance."""
    return f"vision-client-{secrets.token_hex(16)}"


# -- Server-Sent Events ----------------------------------------------------------------------


class EventStream:
    """WatchJob's Server-Sent Events, fed line by line: each event's ``data`` as a ``JobEvent``.

    Comment lines (the server's keep-alives) and fields other than ``data`` are skipped, as the
    SSE standard has clients do.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> ft_pb.JobEvent | None:
        """The event that ``line`` completes (a blank line ends one), else None."""
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            text, self._data = "\n".join(self._data), []
            event = ft_pb.JobEvent()
            try:
                json_format.Parse(text, event, ignore_unknown_fields=True)
            except json_format.ParseError as error:
                raise ValueError(f"an event is not a JobEvent: {str(error)[:200]}") from None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None
