"""Open Inference Protocol tensors <-> the data plane's inputs and outputs.

Pure functions over protobuf messages: every malformed request is an
:class:`InvalidInputError` that names the field and says how to fix it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from math import prod

import numpy as np

from service.classification import top_k
from service.dataplane import InferenceInput
from service.errors import InvalidInputError, ModelNotFoundError
from vision_client._proto.inference import grpc_service_pb2 as pb

IMAGE = "IMAGE"
PIXELS = "PIXELS"
LOGITS = "LOGITS"
CLASSIFICATION = "classification"
SUPPORTED_VERSIONS = ("", "1")
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InferCall:
    """A parsed ``ModelInferRequest``."""

    model_name: str
    request_id: str
    inputs: InferenceInput
    classification: int | None  # k of the classification extension, or raw LOGITS


def parse_infer_request(request: pb.ModelInferRequest) -> InferCall:
    if not request.model_name:
        raise InvalidInputError("model_name is empty: name the model to run, e.g. 'resnet101'")
    if request.model_version not in SUPPORTED_VERSIONS:
        raise ModelNotFoundError(
            f"model {request.model_name!r} has no version {request.model_version!r}; "
            "leave model_version empty or use '1'"
        )
    return InferCall(
        model_name=request.model_name,
        request_id=request.id,
        inputs=_parse_inputs(request),
        classification=_parse_outputs(request),
    )


def build_infer_response(call: InferCall, logits: np.ndarray, labels: list[str]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=call.model_name, model_version="1", id=call.request_id)
    if call.classification is None:
        response.outputs.add(name=LOGITS, datatype="FP32", shape=list(logits.shape))
        response.raw_output_contents.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
        return response
    rows = top_k(logits, call.classification, labels)
    k = len(rows[0]) if rows else 0
    response.outputs.add(name=LOGITS, datatype="BYTES", shape=[len(rows), k])
    response.raw_output_contents.append(
        encode_bytes_elements(f"{c.score:f}:{c.index}:{c.label}".encode() for row in rows for c in row)
    )
    return response


def encode_bytes_elements(elements: Iterable[bytes]) -> bytes:
    """Serialize BYTES elements the raw way: each one prefixed by its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def decode_bytes_elements(raw: bytes, field: str) -> list[bytes]:
    """Split raw BYTES tensor contents into elements, checking every length prefix."""
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInputError(
                f"{field}: element {len(elements)} has a truncated length prefix ({len(raw) - offset} of 4 bytes); "
                "each BYTES element must be a 4-byte little-endian length followed by that many bytes"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInputError(
                f"{field}: element {len(elements)}'s length prefix says {length} bytes but only "
                f"{len(raw) - offset} remain; fix the length prefixes of the raw BYTES tensor"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def _parse_inputs(request: pb.ModelInferRequest) -> InferenceInput:
    names = [tensor.name for tensor in request.inputs]
    unknown = [name for name in names if name not in (IMAGE, PIXELS)]
    if unknown:
        raise InvalidInputError(
            f"unknown input {unknown[0]!r}: inputs are IMAGE (BYTES [N], encoded images) "
            "or PIXELS (FP32 [N,3,H,W], preprocessed)"
        )
    if len(names) != 1:
        raise InvalidInputError(
            f"the request has {len(names)} inputs ({', '.join(names) or 'none'}); send exactly one: "
            "IMAGE (BYTES [N], encoded images) or PIXELS (FP32 [N,3,H,W], preprocessed)"
        )
    raw_count = len(request.raw_input_contents)
    if raw_count not in (0, len(names)):
        raise InvalidInputError(
            f"raw_input_contents has {raw_count} entries for {len(names)} input; send one entry per input"
        )
    tensor = request.inputs[0]
    raw = request.raw_input_contents[0] if raw_count else None
    if raw is not None and tensor.HasField("contents") and tensor.contents.ByteSize() > 0:
        raise InvalidInputError(
            f"input {tensor.name} has data both in contents and in raw_input_contents; send it in one of them"
        )
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {tensor.name} has a negative dimension in shape {shape}")
    if tensor.name == IMAGE:
        return InferenceInput(images=_parse_images(tensor, shape, raw))
    return InferenceInput(pixels=_parse_pixels(tensor, shape, raw))


def _parse_images(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | None) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise InvalidInputError(f"input IMAGE must have datatype BYTES (encoded image files), got {tensor.datatype!r}")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInputError(f"input IMAGE must have shape [N] or [N,1], got {shape}")
    if shape[0] == 0:
        raise InvalidInputError("input IMAGE has shape [0]: send at least one image")
    if raw is not None:
        images = decode_bytes_elements(raw, "raw_input_contents[0] (IMAGE)")
    else:
        images = list(tensor.contents.bytes_contents)
    if len(images) != shape[0]:
        raise InvalidInputError(f"input IMAGE has shape {shape} but {len(images)} elements were sent; make them agree")
    return images


def _parse_pixels(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | None) -> np.ndarray:
    if tensor.datatype != "FP32":
        raise InvalidInputError(f"input PIXELS must have datatype FP32, got {tensor.datatype!r}")
    if len(shape) != 4:
        raise InvalidInputError(f"input PIXELS must have shape [N,3,H,W], got {shape} (rank {len(shape)})")
    if 0 in shape:
        raise InvalidInputError(f"input PIXELS has an empty dimension in shape {shape}")
    count = prod(shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise InvalidInputError(
                f"input PIXELS has shape {shape}, which needs {count * 4} bytes of FP32 data, "
                f"but raw_input_contents[0] has {len(raw)} bytes"
            )
        values = np.frombuffer(raw, dtype="<f4")
    else:
        sent = len(tensor.contents.fp32_contents)
        if sent != count:
            raise InvalidInputError(
                f"input PIXELS has shape {shape} ({count} values) but contents.fp32_contents holds {sent}"
            )
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    return values.reshape(shape)


def _parse_outputs(request: pb.ModelInferRequest) -> int | None:
    classification: int | None = None
    seen: set[str] = set()
    for output in request.outputs:
        if output.name != LOGITS:
            raise InvalidInputError(f"unknown output {output.name!r}: the only output is LOGITS")
        if output.name in seen:
            raise InvalidInputError("output LOGITS is requested twice; request it once")
        seen.add(output.name)
        if CLASSIFICATION in output.parameters:
            classification = _positive_int(output.parameters[CLASSIFICATION], "outputs[LOGITS].classification")
    return classification


def _positive_int(parameter: pb.InferParameter, field: str) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    value: object = getattr(parameter, kind) if kind else None
    if kind == "string_param" and str(value).isdigit():
        value = int(str(value))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{field} must be a positive integer (the number of classes), got {value!r}")
    return value
