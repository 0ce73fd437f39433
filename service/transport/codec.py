"""Open Inference Protocol tensors <-> the data plane's inputs and outputs.

Pure functions over protobuf messages: every malformed request is an
:class:`InvalidInputError` that names the field and says how to fix it.
Parsing costs at most a pass over the bytes it keeps: counts (inputs,
outputs, elements) are checked before anything is iterated, a BYTES tensor
is split in one pass that stops at the first element too many or the first
empty one, and nothing is decoded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from service.classification import top_k
from service.dataplane import InferenceInput, InferenceResult, too_many_images
from service.errors import InvalidInputError, quote
from vision_client import protocol
from vision_client.protocol import CLASSIFICATION, IMAGE, LOGITS, PIXELS, encode_bytes_elements
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

_PACKED_FP32_TAG = (6 << 3) | 2  # InferTensorContents.fp32_contents, length-delimited (packed)


@dataclass(frozen=True)
class InferCall:
    """A parsed ``ModelInferRequest``."""

    model_name: str
    model_version: str  # empty: whichever version is served
    request_id: str
    inputs: InferenceInput
    classification: int | None  # k of the classification extension, or raw LOGITS


def parse_infer_request(request: pb.ModelInferRequest, *, max_images: int) -> InferCall:
    """Check and convert a request; ``max_images``: most images (IMAGE elements or PIXELS rows) it may carry."""
    if not request.model_name:
        raise InvalidInputError("model_name is empty: name the model to run, e.g. 'resnet101'")
    return InferCall(
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.id,
        inputs=_parse_inputs(request, max_images),
        classification=_parse_outputs(request),
    )


def build_infer_response(call: InferCall, result: InferenceResult) -> pb.ModelInferResponse:
    """The response for ``call``, named after the model and version that computed ``result``."""
    response = pb.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=call.request_id
    )
    logits, labels = result.logits, list(result.labels)
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


def decode_bytes_elements(
    raw: bytes, field: str, *, max_elements: int | None = None, allow_empty: bool = True
) -> list[bytes]:
    """The protocol's BYTES framing, its errors naming ``field`` (one pass; see ``protocol.tensors``)."""
    try:
        return protocol.decode_bytes_elements(raw, max_elements=max_elements, allow_empty=allow_empty)
    except protocol.FramingError as error:
        raise InvalidInputError(f"{field}: {error}") from None


def _parse_inputs(request: pb.ModelInferRequest, max_images: int) -> InferenceInput:
    if len(request.inputs) > 2:
        raise InvalidInputError(
            f"the request has {len(request.inputs)} inputs; send exactly one: "
            "IMAGE (BYTES [N], encoded images) or PIXELS (FP32 [N,3,H,W], preprocessed)"
        )
    names = [tensor.name for tensor in request.inputs]
    unknown = [name for name in names if name not in (IMAGE, PIXELS)]
    if unknown:
        raise InvalidInputError(
            f"unknown input {quote(unknown[0])}: inputs are IMAGE (BYTES [N], encoded images) "
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
    if len(tensor.shape) > 4:
        raise InvalidInputError(f"input {tensor.name} has rank {len(tensor.shape)}; IMAGE is [N], PIXELS [N,3,H,W]")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {tensor.name} has a negative dimension in shape {shape}")
    if shape and shape[0] > max_images:
        raise too_many_images(shape[0], max_images)
    if tensor.name == IMAGE:
        return InferenceInput(images=_parse_images(tensor, shape, raw))
    return InferenceInput(pixels=_parse_pixels(tensor, shape, raw))


def _parse_images(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | None) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise InvalidInputError(
            f"input IMAGE must have datatype BYTES (encoded image files), got {quote(tensor.datatype)}"
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInputError(f"input IMAGE must have shape [N] or [N,1], got {shape}")
    if shape[0] == 0:
        raise InvalidInputError("input IMAGE has shape [0]: send at least one image")
    if raw is not None:
        images = decode_bytes_elements(raw, "raw_input_contents[0] (IMAGE)", max_elements=shape[0], allow_empty=False)
    else:
        sent = tensor.contents.bytes_contents
        if len(sent) != shape[0]:
            raise InvalidInputError(
                f"input IMAGE has shape {shape} but {len(sent)} elements were sent; make them agree"
            )
        images = []
        for index, element in enumerate(sent):
            if not element:
                raise InvalidInputError(f"input IMAGE: element {index} is empty; every element must hold an image")
            images.append(element)
    if len(images) != shape[0]:
        raise InvalidInputError(f"input IMAGE has shape {shape} but {len(images)} elements were sent; make them agree")
    return images


def _parse_pixels(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | None) -> np.ndarray:
    if tensor.datatype != "FP32":
        raise InvalidInputError(f"input PIXELS must have datatype FP32, got {quote(tensor.datatype)}")
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
        values = _fp32_values(tensor.contents)
    return values.reshape(shape)


def _fp32_values(contents: pb.InferTensorContents) -> np.ndarray:
    """``contents.fp32_contents`` as an array, without a Python float per value.

    Iterating the repeated field costs seconds for a large tensor (and would hold the
    event loop); its serialized form is one packed field whose payload is the array.
    """
    blob = contents.SerializeToString()
    if not blob:
        return np.empty(0, dtype=np.float32)
    length, offset = 0, 1
    if blob[0] == _PACKED_FP32_TAG:
        for shift in range(0, 64, 7):
            if offset >= len(blob):
                break
            byte = blob[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
    if blob[0] != _PACKED_FP32_TAG or offset + length != len(blob) or length % 4:
        raise InvalidInputError(
            "input PIXELS: contents holds other fields besides fp32_contents; send the values in fp32_contents only"
        )
    return np.frombuffer(blob, dtype="<f4", offset=offset)


def _parse_outputs(request: pb.ModelInferRequest) -> int | None:
    classification: int | None = None
    seen: set[str] = set()
    if len(request.outputs) > 1:
        raise InvalidInputError(
            f"{len(request.outputs)} outputs are requested; the only output is LOGITS: request it once"
        )
    for output in request.outputs:
        if output.name != LOGITS:
            raise InvalidInputError(f"unknown output {quote(output.name)}: the only output is LOGITS")
        if output.name in seen:
            raise InvalidInputError("output LOGITS is requested twice; request it once")
        seen.add(output.name)
        if CLASSIFICATION in output.parameters:
            classification = _positive_int(output.parameters[CLASSIFICATION], "outputs[LOGITS].classification")
    return classification


MAX_INT_PARAMETER_DIGITS = 18  # any int64 fits; longer strings are refused before int() sees them


def _positive_int(parameter: pb.InferParameter, field: str) -> int:
    """A positive integer request parameter, as an int64 parameter or a string of ASCII digits.

    ``str.isdigit`` and ``int`` accept far more than a number a person writes ("²", "٣",
    thousands of digits that cost ``int`` quadratic time): only ``0-9`` are taken, and only so
    many of them.
    """
    kind = parameter.WhichOneof("parameter_choice")
    value: object = getattr(parameter, kind) if kind else None
    if kind == "string_param":
        text = str(value)
        if text.isascii() and text.isdigit() and len(text) <= MAX_INT_PARAMETER_DIGITS:
            value = int(text)
        else:
            raise InvalidInputError(f"{field} must be a positive integer (the number of classes), got {quote(text)}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{field} must be a positive integer (the number of classes), got {quote(value)}")
    return value
