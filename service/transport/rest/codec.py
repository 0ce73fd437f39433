"""The REST binding's bodies <-> the protocol's messages.

An inference request arrives as KServe v2 JSON, optionally followed by binary tensor data
(Triton's binary data extension: the JSON header is ``Inference-Header-Content-Length`` bytes
long, and each input with a ``binary_data_size`` parameter takes that many bytes of what follows,
in input order). It becomes the very ``ModelInferRequest`` a gRPC client would send, with every
tensor in ``raw_input_contents``, so that one parser (``transport/codec.py``) checks both. The
response goes the other way: JSON ``data`` lists, or binary data for outputs that ask for it.
Every value of the JSON is converted by the one rule for callers' values (``transport/values.py``):
a number a tensor's datatype or a parameter cannot hold is a 400 naming its place, never a 500.
Every parameter (of the request, an input, an output) is carried into the message, so that the
shared parser reads ``timeout`` and ``classification`` from the same place on both ports.

Triton's system shared memory parameters (``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``) of an input or an output are carried over into the message's tensor
parameters: such an input has no data here (the servicer reads it from its region), and such an
output is answered with its parameters and no data.

Every other message (metadata, config, statistics, the repository index) is protobuf's JSON of
the gRPC answer, field names as in the proto and 64-bit integers as JSON numbers, as Triton's
REST API writes them.

JSON forms of the inputs:

- ``PIXELS`` (FP32): ``data`` a flat or nested list of numbers, row-major;
- ``IMAGE`` (BYTES): ``data`` a list of strings, each one image. Encoded images are not text, so
  send them base64-encoded with the tensor parameter ``"content_type": "base64"`` (MLServer's
  convention); strings without it are taken as their UTF-8 bytes (what KServe's REST client sends
  for BYTES).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.errors import InvalidInputError, quote
from service.transport import values
from service.transport.codec import SHM_PARAMETERS, SHM_REGION, decode_bytes_elements, names_shared_memory
from vision_client.protocol import encode_bytes_elements
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
CONTENT_TYPE_PARAMETER = "content_type"
_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


# -- any message ---------------------------------------------------------------------------------


def message_to_json(message: Message) -> dict[str, Any]:
    """Protobuf's JSON of ``message`` with the proto's field names and 64-bit integers as numbers."""
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _numbers(data, message)
    return data


def _numbers(data: Any, message: Message) -> Any:
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                entry_value = field.message_type.fields_by_name["value"]
                if entry_value.type == FieldDescriptor.TYPE_MESSAGE:
                    data[field.name] = {k: _numbers(data[field.name][k], value[k]) for k in data[field.name]}
                elif entry_value.type in _INTEGER_TYPES:
                    data[field.name] = {k: int(v) for k, v in data[field.name].items()}
            elif field.is_repeated:
                data[field.name] = [_numbers(d, m) for d, m in zip(data[field.name], value, strict=True)]
            else:
                data[field.name] = _numbers(data[field.name], value)
        elif field.type in _INTEGER_TYPES:
            data[field.name] = [int(v) for v in data[field.name]] if field.is_repeated else int(data[field.name])
    return data


def parse_json(body: bytes, what: str) -> Any:
    """JSON of a request body by the one rule for callers' values (:func:`values.loads`); 400 for
    anything else. Blocking: see ``parse_off_loop``."""
    return values.loads(body, what)


# -- inference -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestInferRequest:
    message: pb.ModelInferRequest
    binary_outputs: frozenset[str]  # outputs to answer as binary data
    binary_by_default: bool  # the request's binary_data_output parameter
    timeout_s: float | None  # the request's timeout parameter (microseconds on the wire)


def parse_infer_body(body: bytes, header_length: str | None, model: str, version: str) -> RestInferRequest:
    """A REST inference body as the ``ModelInferRequest`` it stands for.

    Blocking for large JSON tensors: call it off the event loop.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isascii() or not header_length.isdigit() or len(header_length) > 18:
            raise InvalidInputError(f"{HEADER_LENGTH} must be a byte count, got {quote(header_length)}")
        size = int(header_length)
        if size > len(body):
            raise InvalidInputError(f"{HEADER_LENGTH} is {size} but the body holds only {len(body)} bytes")
        header, binary = body[:size], body[size:]
    data = parse_json(header, "the inference request")
    if not isinstance(data, dict):
        raise InvalidInputError("the inference request must be a JSON object with 'inputs'")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=_text(data.get("id", ""), "id"))
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("'inputs' must be a non-empty list of tensors")
    if len(inputs) > 2:
        raise InvalidInputError(f"the request has {len(inputs)} inputs; send exactly one: IMAGE or PIXELS")
    offset = 0
    for position, tensor in enumerate(inputs):
        raw, offset = _input(request, tensor, position, binary, offset)
        if raw is not None:
            request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidInputError(
            f"the body holds {len(binary) - offset} bytes of binary data that no input's binary_data_size claims"
        )
    # Every parameter travels in the message, as a gRPC client's would, converted by the one rule;
    # the shared parser reads the ones it takes (timeout, classification, shared memory).
    parameters = values.parameters(data.get("parameters", {}), request.parameters, "parameters")
    binary_outputs: set[str] = set()
    outputs = data.get("outputs", [])
    if not isinstance(outputs, list) or len(outputs) > 2:
        raise InvalidInputError("'outputs' must be a list of at most one tensor (LOGITS)")
    for position, tensor in enumerate(outputs):
        if not isinstance(tensor, dict):
            raise InvalidInputError(f"outputs[{position}] must be a JSON object")
        name = _text(tensor.get("name", ""), f"outputs[{position}].name")
        output = request.outputs.add(name=name)
        where = f"outputs[{position}].parameters"
        output_parameters = values.parameters(tensor.get("parameters", {}), output.parameters, where)
        if output_parameters.get("binary_data") is True:
            binary_outputs.add(name)
    return RestInferRequest(
        message=request,
        binary_outputs=frozenset(binary_outputs),
        binary_by_default=parameters.get("binary_data_output") is True,
        timeout_s=values.timeout_seconds(request.parameters, "parameters"),
    )


def _input(
    request: pb.ModelInferRequest, tensor: Any, position: int, binary: bytes, offset: int
) -> tuple[bytes | None, int]:
    where = f"inputs[{position}]"
    if not isinstance(tensor, dict):
        raise InvalidInputError(f"{where} must be a JSON object with name, datatype, shape and data")
    name = _text(tensor.get("name", ""), f"{where}.name")
    datatype = _text(tensor.get("datatype", ""), f"{where}.datatype")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInputError(f"{where}.shape must be a list of integers, got {values.describe(shape)}")
    if len(shape) > 8 or not all(0 <= d < 2**40 for d in shape):
        raise InvalidInputError(f"{where}.shape {quote(shape)} is not a tensor's shape")
    added = request.inputs.add(name=name, datatype=datatype, shape=shape)
    parameters = values.parameters(tensor.get("parameters", {}), added.parameters, f"{where}.parameters")
    if names_shared_memory(parameters):
        if "data" in tensor or BINARY_DATA_SIZE in parameters:
            raise InvalidInputError(f"{where} is in shared memory and has data too; send one")
        return None, offset  # the servicer reads it from its region
    size = parameters.get(BINARY_DATA_SIZE)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInputError(
                f"{where}.parameters.binary_data_size {values.describe(size)} does not fit the "
                f"{len(binary) - offset} bytes of binary data left in the body"
            )
        if "data" in tensor:
            raise InvalidInputError(f"{where} has both binary data and 'data'; send one")
        return binary[offset : offset + size], offset + size
    if "data" not in tensor:
        raise InvalidInputError(f"{where} has no 'data' and no binary_data_size parameter")
    data = tensor["data"]
    if datatype == "BYTES":
        return _bytes(data, where, parameters.get(CONTENT_TYPE_PARAMETER)), offset
    return values.tensor(data, datatype, where).tobytes(), offset


def _bytes(data: Any, where: str, content_type: Any) -> bytes:
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise InvalidInputError(f"{where}.data must be a list of strings (base64 with content_type 'base64')")
    if content_type == "base64":
        try:
            elements = [base64.b64decode(item, validate=True) for item in data]
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{where}.data holds a string that is not base64") from None
    elif content_type in (None, "str"):
        elements = [item.encode("utf-8", "surrogatepass") for item in data]
    else:
        raise InvalidInputError(f"{where}.parameters.content_type must be 'base64' or 'str', got {quote(content_type)}")
    return encode_bytes_elements(elements)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{where} must be a string")
    return value


def build_infer_body(response: pb.ModelInferResponse, request: RestInferRequest) -> tuple[bytes, int | None]:
    """The REST body of ``response``, and the JSON header's length when binary data follows it."""
    outputs: list[dict[str, Any]] = []
    binary: list[bytes] = []
    contents = iter(response.raw_output_contents)  # one per output not written to shared memory
    for output in response.outputs:
        tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if SHM_REGION in output.parameters:  # written to its region: the parameters say where, as Triton's do
            tensor["parameters"] = {
                key: values.parameter_value(output.parameters[key])
                for key in SHM_PARAMETERS
                if key in output.parameters
            }
            outputs.append(tensor)
            continue
        raw = next(contents)
        if request.binary_by_default or output.name in request.binary_outputs:
            tensor["parameters"] = {BINARY_DATA_SIZE: len(raw)}
            binary.append(raw)
        elif output.datatype == "FP32":
            tensor["data"] = np.frombuffer(raw, dtype="<f4").tolist()
        else:
            elements = decode_bytes_elements(raw, output.name)
            tensor["data"] = [element.decode("utf-8", "replace") for element in elements]
        outputs.append(tensor)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)
