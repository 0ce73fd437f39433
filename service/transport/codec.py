"""Open Inference Protocol tensors <-> the data plane's inputs and outputs.

Pure functions over protobuf messages: every malformed request is an
:class:`InvalidInputError` that names the field and says how to fix it.
Parsing costs at most a pass over the bytes it keeps: counts (inputs,
outputs, elements) are checked before anything is iterated, a BYTES tensor
is split in one pass that stops at the first element too many or the first
empty one, and nothing is decoded here.

Triton's system shared memory: a tensor whose parameters name a
``shared_memory_region`` lies in that region instead of the message. Its bytes
are read through the request's leases (``service.inference.shared_memory``) and then
parsed exactly as ``raw_input_contents`` would be (a BYTES tensor has the same
framing); an output with those parameters is written into its region and the
response carries only the parameters, as Triton's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import numpy as np

from service.errors import FailedPreconditionError, InvalidInputError, quote
from service.inference.classification import top_k
from service.inference.inference_io import InferenceInput, InferenceResult, too_many_images
from service.inference.shared_memory import RegionLeases, SharedTensor
from service.transport import values
from vision_client import protocol
from vision_client.protocol import CLASSIFICATION, IMAGE, LOGITS, PIXELS, encode_bytes_elements
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

_PACKED_FP32_TAG = (6 << 3) | 2  # InferTensorContents.fp32_contents, length-delimited (packed)
# Triton's system shared memory parameters of an input or a requested output.
SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"
SHM_PARAMETERS = (SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET)


@dataclass(frozen=True)
class InferCall:
    """A parsed ``ModelInferRequest``."""

    model_name: str
    model_version: str  # empty: whichever version is served
    request_id: str
    inputs: InferenceInput
    classification: int | None  # k of the classification extension, or raw LOGITS
    output_region: SharedTensor | None = None  # where to write LOGITS instead of the response
    timeout_s: float | None = None  # the request's ``timeout`` parameter (microseconds on the wire)


def names_shared_memory(parameters: Mapping[str, object]) -> bool:
    """Whether a tensor's ``parameters`` (the message's, or REST's JSON) name any of
    :data:`SHM_PARAMETERS` (on every request: a plain loop, no generator)."""
    if parameters:
        for key in SHM_PARAMETERS:
            if key in parameters:
                return True
    return False


def uses_shared_memory(request: pb.ModelInferRequest) -> bool:
    """Whether any input or output of ``request`` names a system shared memory parameter."""
    for tensors in (request.inputs, request.outputs):
        for tensor in tensors:
            if names_shared_memory(tensor.parameters):
                return True
    return False


def shared_input_bytes(request: pb.ModelInferRequest) -> int | None:
    """How many bytes parsing ``request`` reads from shared memory regions, as its inputs' parameters
    say (before any check: parsing refuses what is wrong); None where a byte count is not an integer."""
    total = 0
    for tensor in request.inputs:
        if SHM_BYTE_SIZE in tensor.parameters:
            value = _integer(tensor.parameters[SHM_BYTE_SIZE])
            if value is None:
                return None
            total += max(0, value)
    return total


def parse_infer_request(
    request: pb.ModelInferRequest,
    *,
    max_images: int,
    shared: RegionLeases | None = None,
    max_shared_bytes: int = 0,
) -> InferCall:
    """Check and convert a request; ``max_images``: most images (IMAGE elements or PIXELS rows) it may carry.

    ``shared``: the request's leases on shared memory regions, through which an input in a region
    is read (at most ``max_shared_bytes`` of it) and an output's region is held; None where shared
    memory is not available. Reading blocks: with ``shared``, call this off the event loop.
    """
    if not request.model_name:
        raise InvalidInputError("model_name is empty: name the model to run, e.g. 'resnet101'")
    timeout_s = values.timeout_seconds(request.parameters, "parameters")
    classification, output_region = _parse_outputs(request)
    if output_region is not None:
        _shared(shared).hold(output_region, "output LOGITS")  # exists, and the tensor fits: before any work
    return InferCall(
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.id,
        inputs=_parse_inputs(request, max_images, shared, max_shared_bytes),
        classification=classification,
        output_region=output_region,
        timeout_s=timeout_s,
    )


def build_infer_response(
    call: InferCall, result: InferenceResult, shared: RegionLeases | None = None
) -> pb.ModelInferResponse:
    """The response for ``call``, named after the model and version that computed ``result``.

    An output asked for in a shared memory region is written there (through ``shared``, the
    leases the request was parsed with); the response then carries its parameters, no data.
    """
    response = pb.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=call.request_id
    )
    logits, labels = result.logits, list(result.labels)
    if call.classification is None:
        output = response.outputs.add(name=LOGITS, datatype="FP32", shape=list(logits.shape))
        data = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    else:
        rows = top_k(logits, call.classification, labels)
        k = len(rows[0]) if rows else 0
        output = response.outputs.add(name=LOGITS, datatype="BYTES", shape=[len(rows), k])
        data = encode_bytes_elements(f"{c.score:f}:{c.index}:{c.label}".encode() for row in rows for c in row)
    target = call.output_region
    if target is None:
        response.raw_output_contents.append(data)
        return response
    _shared(shared).write(target, data, "output LOGITS")
    output.parameters[SHM_REGION].string_param = target.region
    output.parameters[SHM_BYTE_SIZE].int64_param = len(data)
    if target.offset:
        output.parameters[SHM_OFFSET].int64_param = target.offset
    return response


def _shared(shared: RegionLeases | None) -> RegionLeases:
    if shared is None:
        raise FailedPreconditionError(
            "system shared memory is off on this server; send tensors in the request and read outputs from the response"
        )
    return shared


def shared_tensor(parameters: Mapping[str, pb.InferParameter], what: str) -> SharedTensor | None:
    """The shared memory place of a tensor from its parameters, or None if it names none."""
    if not names_shared_memory(parameters):
        return None
    region = parameters[SHM_REGION].string_param if SHM_REGION in parameters else ""
    if not region:
        raise InvalidInputError(
            f"{what} has shared memory parameters but no {SHM_REGION}: name a registered region (a string)"
        )
    if SHM_BYTE_SIZE not in parameters:
        raise InvalidInputError(f"{what} names shared memory region {quote(region)} but no {SHM_BYTE_SIZE}")
    byte_size = _byte_count(parameters[SHM_BYTE_SIZE], f"{what}.{SHM_BYTE_SIZE}")
    offset = _byte_count(parameters[SHM_OFFSET], f"{what}.{SHM_OFFSET}") if SHM_OFFSET in parameters else 0
    return SharedTensor(region=region, offset=offset, byte_size=byte_size)


def _integer(parameter: pb.InferParameter) -> int | None:
    """An integer parameter's value (int64 or uint64), or None for any other kind."""
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind in ("int64_param", "uint64_param") else None
    return value if isinstance(value, int) else None


def _byte_count(parameter: pb.InferParameter, field: str) -> int:
    value = _integer(parameter)
    if value is None or value < 0:
        raise InvalidInputError(f"{field} must be a non-negative integer (bytes), got {quote(parameter)}")
    return value


def decode_bytes_elements(
    raw: bytes, field: str, *, max_elements: int | None = None, allow_empty: bool = True
) -> list[bytes]:
    """The protocol's BYTES framing, its errors naming ``field`` (one pass; see ``protocol.tensors``)."""
    try:
        return protocol.decode_bytes_elements(raw, max_elements=max_elements, allow_empty=allow_empty)
    except protocol.FramingError as error:
        raise InvalidInputError(f"{field}: {error}") from None


def _parse_inputs(
    request: pb.ModelInferRequest, max_images: int, shared: RegionLeases | None, max_shared_bytes: int
) -> InferenceInput:
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
    tensor = request.inputs[0]
    where = shared_tensor(tensor.parameters, f"input {tensor.name}")
    raw_count = len(request.raw_input_contents)
    if raw_count not in (0, len(names)) or (where is not None and raw_count):
        raise InvalidInputError(
            f"raw_input_contents has {raw_count} entries for {len(names)} input"
            + (" in shared memory; send none" if where is not None else "; send one entry per input")
        )
    raw: bytes | np.ndarray | None = request.raw_input_contents[0] if raw_count else None
    has_contents = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
    if has_contents and (raw is not None or where is not None):
        raise InvalidInputError(
            f"input {tensor.name} has data both in contents and in "
            f"{'raw_input_contents' if where is None else 'shared memory'}; send it in one of them"
        )
    shape = list(tensor.shape)
    if len(tensor.shape) > 4:
        raise InvalidInputError(f"input {tensor.name} has rank {len(tensor.shape)}; IMAGE is [N], PIXELS [N,3,H,W]")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {tensor.name} has a negative dimension in shape {shape}")
    if shape and shape[0] > max_images:
        raise too_many_images(shape[0], max_images)
    source = "raw_input_contents[0]"
    if where is not None:
        raw, source = _read_shared(tensor, shape, where, _shared(shared), max_shared_bytes), "shared memory"
    if tensor.name == IMAGE:
        images = raw.tobytes() if isinstance(raw, np.ndarray) else raw
        return InferenceInput(images=_parse_images(tensor, shape, images, source))
    return InferenceInput(pixels=_parse_pixels(tensor, shape, raw, source))


def _read_shared(
    tensor: pb.ModelInferRequest.InferInputTensor,
    shape: list[int],
    where: SharedTensor,
    shared: RegionLeases,
    max_bytes: int,
) -> np.ndarray:
    """An input's bytes from its shared memory region, once what can be checked without them is.

    The array is aligned and the request's own: a PIXELS tensor views it without another copy.
    """
    what = f"input {tensor.name}"
    if tensor.name == PIXELS and tensor.datatype == "FP32" and len(shape) == 4:
        expected = prod(shape) * 4
        if where.byte_size != expected:
            raise InvalidInputError(
                f"input PIXELS has shape {shape}, which needs {expected} bytes of FP32 data, "
                f"but its {SHM_BYTE_SIZE} is {where.byte_size}; make them agree"
            )
    if where.byte_size > max_bytes:
        raise InvalidInputError(
            f"{what}: {where.byte_size} bytes from shared memory are over this server's limit of {max_bytes} "
            "per request (--max-message-bytes); split the request"
        )
    return shared.read(where, what)


def _parse_images(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | None, source: str
) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise InvalidInputError(
            f"input IMAGE must have datatype BYTES (encoded image files), got {quote(tensor.datatype)}"
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInputError(f"input IMAGE must have shape [N] or [N,1], got {shape}")
    if shape[0] == 0:
        raise InvalidInputError("input IMAGE has shape [0]: send at least one image")
    if raw is not None:
        images = decode_bytes_elements(raw, f"{source} (IMAGE)", max_elements=shape[0], allow_empty=False)
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


def _parse_pixels(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | np.ndarray | None, source: str
) -> np.ndarray:
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
                f"but {source} has {len(raw)} bytes"
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


def _parse_outputs(request: pb.ModelInferRequest) -> tuple[int | None, SharedTensor | None]:
    classification: int | None = None
    region: SharedTensor | None = None
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
        region = shared_tensor(output.parameters, "output LOGITS")
    return classification, region


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
