"""The wire contract, without I/O: which RPCs exist, building requests, parsing responses.

Everything here is a pure function of protobuf messages and numpy arrays, so
that both clients share it and it can be tested without a server.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vision_client._proto.inference import grpc_service_pb2 as infer_pb
from vision_client._proto.vision.v1 import models_pb2 as models_pb
from vision_client._types import ModelInfo, Prediction
from vision_client.errors import InvalidInputError, VisionClientError

IMAGE = "IMAGE"
LOGITS = "LOGITS"
_LENGTH = struct.Struct("<I")
# Room left in a message for everything but the image bytes (names, shape, field tags).
_REQUEST_OVERHEAD = 1024
_RESPONSE_OVERHEAD = 1024


@dataclass(frozen=True)
class Rpc:
    """One RPC: its path, message types, and whether repeating it is harmless.

    ``kind`` names the channel method that makes it: ``unary_unary``, or
    ``stream_unary`` (the request is then an iterable of messages). Calls that
    change the server (creating a fine-tuning job) must say ``idempotent=False``:
    they are never retried.
    """

    path: str
    request_type: type
    response_type: type
    idempotent: bool = True
    kind: str = "unary_unary"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Call:
    """One RPC to make with one request."""

    rpc: Rpc
    request: Any


_INFERENCE = "/inference.GRPCInferenceService/"
_MODELS = "/vision.v1.Models/"
SERVER_LIVE = Rpc(_INFERENCE + "ServerLive", infer_pb.ServerLiveRequest, infer_pb.ServerLiveResponse)
SERVER_READY = Rpc(_INFERENCE + "ServerReady", infer_pb.ServerReadyRequest, infer_pb.ServerReadyResponse)
MODEL_READY = Rpc(_INFERENCE + "ModelReady", infer_pb.ModelReadyRequest, infer_pb.ModelReadyResponse)
MODEL_INFER = Rpc(_INFERENCE + "ModelInfer", infer_pb.ModelInferRequest, infer_pb.ModelInferResponse)
LIST_MODELS = Rpc(_MODELS + "ListModels", models_pb.ListModelsRequest, models_pb.ListModelsResponse)
GET_MODEL = Rpc(_MODELS + "GetModel", models_pb.GetModelRequest, models_pb.ModelInfo)


# -- requests ------------------------------------------------------------------


def infer_request(model: str, images: Sequence[bytes]) -> infer_pb.ModelInferRequest:
    """A ``ModelInfer`` request of encoded images (raw, length-prefixed BYTES) asking for LOGITS."""
    request = infer_pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=IMAGE, datatype="BYTES", shape=[len(images)])
    request.outputs.add(name=LOGITS)
    request.raw_input_contents.append(b"".join(_LENGTH.pack(len(image)) + image for image in images))
    return request


def split_images(
    images: Sequence[bytes], *, num_classes: int, max_message_bytes: int, max_images: int
) -> list[list[bytes]]:
    """``images`` in order, cut into requests whose request and response fit in a message."""
    max_request = max_message_bytes - _REQUEST_OVERHEAD
    per_response = max(1, (max_message_bytes - _RESPONSE_OVERHEAD) // max(1, 4 * num_classes))
    limit = max(1, min(max_images, per_response))
    chunks: list[list[bytes]] = []
    size = 0
    for position, image in enumerate(images):
        cost = _LENGTH.size + len(image)
        if cost > max_request:
            raise InvalidInputError(
                f"image {position} is {len(image)} bytes, more than fits in one message "
                f"(max_message_bytes={max_message_bytes}); make it smaller or raise max_message_bytes "
                "(the server's own limit too)"
            )
        if not chunks or size + cost > max_request or len(chunks[-1]) >= limit:
            chunks.append([])
            size = 0
        chunks[-1].append(image)
        size += cost
    return chunks


# -- responses -----------------------------------------------------------------


def parse_logits(response: infer_pb.ModelInferResponse, expected_rows: int) -> np.ndarray:
    """The LOGITS tensor [N, C] of a ``ModelInfer`` response, as float32."""
    for i, output in enumerate(response.outputs):
        if output.name != LOGITS:
            continue
        shape = tuple(output.shape)
        if output.datatype != "FP32" or len(shape) != 2 or shape[0] != expected_rows:
            raise _bad_response(f"LOGITS is {output.datatype} {list(shape)}, expected FP32 [{expected_rows}, C]")
        if i < len(response.raw_output_contents):
            values = np.frombuffer(response.raw_output_contents[i], dtype="<f4")
        else:
            values = np.asarray(output.contents.fp32_contents, dtype="<f4")
        if values.size != shape[0] * shape[1]:
            raise _bad_response(f"LOGITS has shape {list(shape)} but {values.size} values")
        return values.astype(np.float32, copy=False).reshape(shape)
    raise _bad_response("it has no LOGITS output")


def model_info(message: models_pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        state=message.state,
        reason=message.reason,
        platform=message.platform,
        base_model=message.base_model or None,
        input_size=message.input_size,
        num_classes=message.num_outputs,
        labels=tuple(message.labels),
        min_height=message.min_height,
        min_width=message.min_width,
    )


def _bad_response(problem: str) -> VisionClientError:
    return VisionClientError(f"the server's ModelInfer response is malformed: {problem}")


# -- scores --------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by each row's maximum so that it cannot overflow."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_predictions(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """The ``k`` most probable classes of each row of ``logits`` [N, C], best first."""
    probabilities = softmax(logits) if logits.size else np.zeros(logits.shape)
    k = min(k, logits.shape[1])
    # Sorting the negated row keeps ties in index order.
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [Prediction(_label(labels, int(i)), int(i), float(row[i])) for i in indices]
        for row, indices in zip(probabilities, order, strict=True)
    ]


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive integer (how many classes per image), got {top_k!r}")
    return top_k


def _label(labels: Sequence[str], index: int) -> str:
    return labels[index] if index < len(labels) else str(index)
