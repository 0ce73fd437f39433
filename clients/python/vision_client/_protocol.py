"""The wire contract, without I/O: which RPCs exist, building requests, parsing responses.

Everything here is a pure function of protobuf messages and numpy arrays, so
that both clients share it and it can be tested without a server.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import Message

from vision_client._images import encode_image
from vision_client._types import (
    ClassMetrics,
    ConfusionCell,
    EpochMetrics,
    FineTuneResult,
    JobEvent,
    JobInfo,
    JobMetrics,
    ModelInfo,
    Prediction,
)
from vision_client.errors import InvalidInputError, VisionClientError
from vision_client.protocol.fine_tuning import FineTuneConfig, from_message
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import models_pb2 as models_pb
from vision_client.protocol.tensors import IMAGE, LENGTH_PREFIX_BYTES, LOGITS, encode_bytes_elements

# Room left in a message for everything but the image bytes (names, shape, field tags).
_REQUEST_OVERHEAD = 1024
_RESPONSE_OVERHEAD = 1024


@dataclass(frozen=True)
class Rpc:
    """One RPC: its path, message types, and whether repeating it is harmless.

    ``kind`` names the channel method that makes it: ``unary_unary``;
    ``stream_unary`` (the request is then a :class:`RequestStream`); or
    ``unary_stream`` (a plan reads its responses one at a time). Calls that
    change the server (creating a fine-tuning job) must say ``idempotent=False``:
    they are never retried.
    """

    path: str
    request_type: type[Message]
    response_type: type[Message]
    idempotent: bool = True
    kind: str = "unary_unary"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True, eq=False)
class Call:
    """One RPC to make with one request.

    ``deadline`` (a ``time.monotonic()`` instant) bounds the call whatever its
    timeout: the calls of one operation that has a deadline of its own share it.
    """

    rpc: Rpc
    request: Any
    deadline: float | None = None


_INFERENCE = "/inference.GRPCInferenceService/"
_MODELS = "/vision.v1.Models/"
SERVER_LIVE = Rpc(_INFERENCE + "ServerLive", infer_pb.ServerLiveRequest, infer_pb.ServerLiveResponse)
SERVER_READY = Rpc(_INFERENCE + "ServerReady", infer_pb.ServerReadyRequest, infer_pb.ServerReadyResponse)
MODEL_READY = Rpc(_INFERENCE + "ModelReady", infer_pb.ModelReadyRequest, infer_pb.ModelReadyResponse)
MODEL_INFER = Rpc(_INFERENCE + "ModelInfer", infer_pb.ModelInferRequest, infer_pb.ModelInferResponse)
# Loading a loaded model and unloading an unloaded one are harmless: both may be retried.
REPOSITORY_LOAD = Rpc(
    _INFERENCE + "RepositoryModelLoad", infer_pb.RepositoryModelLoadRequest, infer_pb.RepositoryModelLoadResponse
)
REPOSITORY_UNLOAD = Rpc(
    _INFERENCE + "RepositoryModelUnload", infer_pb.RepositoryModelUnloadRequest, infer_pb.RepositoryModelUnloadResponse
)
LIST_MODELS = Rpc(_MODELS + "ListModels", models_pb.ListModelsRequest, models_pb.ListModelsResponse)
GET_MODEL = Rpc(_MODELS + "GetModel", models_pb.GetModelRequest, models_pb.ModelInfo)
# Rolling back to the version served already is harmless: it may be retried.
ROLLBACK_MODEL = Rpc(_MODELS + "RollbackModel", models_pb.RollbackModelRequest, models_pb.ModelInfo)

_FINE_TUNING = "/vision.v1.FineTuning/"
CREATE_JOB = Rpc(_FINE_TUNING + "CreateJob", ft_pb.CreateJobRequest, ft_pb.Job, idempotent=False, kind="stream_unary")
# WatchJob replays a job's events from its start: a retried watch skips those already seen.
WATCH_JOB = Rpc(_FINE_TUNING + "WatchJob", ft_pb.WatchJobRequest, ft_pb.JobEvent, kind="unary_stream")
GET_JOB = Rpc(_FINE_TUNING + "GetJob", ft_pb.GetJobRequest, ft_pb.Job)
LIST_JOBS = Rpc(_FINE_TUNING + "ListJobs", ft_pb.ListJobsRequest, ft_pb.ListJobsResponse)
CANCEL_JOB = Rpc(_FINE_TUNING + "CancelJob", ft_pb.CancelJobRequest, ft_pb.Job)  # cancelling twice is harmless
# Deleting twice is not: the second answers NOT_FOUND, so a lost answer must not be retried.
DELETE_MODEL = Rpc(_FINE_TUNING + "DeleteModel", ft_pb.DeleteModelRequest, ft_pb.DeleteModelResponse, idempotent=False)


# -- requests ------------------------------------------------------------------


def infer_request(model: str, images: Sequence[bytes], version: str = "") -> infer_pb.ModelInferRequest:
    """A ``ModelInfer`` request of encoded images (raw, length-prefixed BYTES) asking for LOGITS
    (of ``version`` of the model; empty: the version it serves)."""
    request = infer_pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=IMAGE, datatype="BYTES", shape=[len(images)])
    request.outputs.add(name=LOGITS)
    request.raw_input_contents.append(encode_bytes_elements(images))
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
        cost = LENGTH_PREFIX_BYTES + len(image)
        if cost > max_request:
            raise InvalidInputError(
                f"image {position} is {len(image)} bytes, more than fits in one message "
                f"(max_message_bytes={max_message_bytes}); make it smaller or raise max_message_bytes "
                "(the server's --max-message-bytes bounds it too)"
            )
        if not chunks or size + cost > max_request or len(chunks[-1]) >= limit:
            chunks.append([])
            size = 0
        chunks[-1].append(image)
        size += cost
    return chunks


# -- fine-tuning requests --------------------------------------------------------

# Bytes of examples per CreateJob message: well under the message limit, so that the
# upload streams (and holds little in memory) rather than sending a few huge messages.
EXAMPLES_MESSAGE_BYTES = 4 * 1024 * 1024
_EXAMPLE_FRAMING = 16  # an Example's field tag and length prefix inside its ExampleBatch


def create_job_requests(
    config: ft_pb.FineTuneConfig, examples: Iterable[Any], *, max_message_bytes: int
) -> Iterator[ft_pb.CreateJobRequest]:
    """The messages of a CreateJob call: the config, then the examples in batches that fit.

    Made lazily, one batch at a time: each example is read and encoded only when its
    batch is about to be sent.
    """
    yield ft_pb.CreateJobRequest(config=config)
    limit = max_message_bytes - _REQUEST_OVERHEAD
    batch_limit = min(limit, EXAMPLES_MESSAGE_BYTES)
    batch: list[ft_pb.Example] = []
    size = 0
    for position, item in enumerate(examples):
        example = make_example(item, position, config.loss)
        cost = example.ByteSize() + _EXAMPLE_FRAMING
        if cost > limit:
            raise InvalidInputError(
                f"example {position} is {cost} bytes, more than fits in one message "
                f"(max_message_bytes={max_message_bytes}); make the image smaller or raise max_message_bytes "
                "(the server's --max-message-bytes bounds it too)"
            )
        if batch and size + cost > batch_limit:
            yield ft_pb.CreateJobRequest(examples=ft_pb.ExampleBatch(examples=batch))
            batch, size = [], 0
        batch.append(example)
        size += cost
    if batch:
        yield ft_pb.CreateJobRequest(examples=ft_pb.ExampleBatch(examples=batch))


def make_example(item: Any, position: int, loss: str) -> ft_pb.Example:
    """One ``(image, label)`` pair as an Example: a class name, or a target vector for mse."""
    try:
        image, label = item
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"example {position}: expected an (image, label) pair, got {type(item).__name__}"
        ) from None
    data = encode_image(image, position)
    if loss == "mse":
        return ft_pb.Example(image=data, target=_target(label, position))
    if isinstance(label, str):
        name = label
    elif isinstance(label, numbers.Integral) and not isinstance(label, bool):
        name = str(int(label))  # class 3 is the class named "3"
    else:
        raise InvalidInputError(
            f"example {position}: the label must be a class name (str), got {type(label).__name__}; "
            "pass loss='mse' for regression targets"
        )
    if not name:
        raise InvalidInputError(f"example {position}: the label is empty; name its class")
    return ft_pb.Example(image=data, label=name)


def _target(label: Any, position: int) -> list[float]:
    if isinstance(label, numbers.Real) and not isinstance(label, bool):
        values = [float(label)]
    elif isinstance(label, (str, bytes)) or not isinstance(label, (Sequence, np.ndarray)):
        raise InvalidInputError(
            f"example {position}: with loss='mse' the label must be a sequence of numbers (the target), "
            f"got {type(label).__name__}"
        )
    else:
        try:
            values = [float(v) for v in np.asarray(label, dtype=np.float64).reshape(-1)]
        except (TypeError, ValueError) as error:
            raise InvalidInputError(f"example {position}: the target is not a sequence of numbers ({error})") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InvalidInputError(f"example {position}: the target must be non-empty and finite, got {label!r}")
    return values


class RequestStream:
    """The messages of a client-streaming call, made lazily from the caller's data.

    Making a message may fail (a file that cannot be read, a label of the wrong
    type). gRPC must not see that exception: it would only report "Exception
    iterating requests!" (and log a traceback). So the stream keeps it in
    ``error``, cancels the call through the callback the client gave
    :meth:`started` (so that the server never takes a half-sent job for a whole
    one), and ends; the client then raises ``error`` itself.
    """

    def __init__(self, messages: Iterator[Any]) -> None:
        self._messages = messages
        self._cancel: Callable[[], object] | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def started(self, cancel: Callable[[], object]) -> None:
        """The call is under way; ``cancel`` stops it."""
        self._cancel = cancel
        self._started.set()

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Any:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._messages)
        except StopIteration:
            raise
        except Exception as error:
            self.error = error
            # A blocking client iterates in gRPC's thread, which may get here before
            # the call object (and so the callback) exists; it comes at once.
            if not self._started.wait(60) or self._cancel is None:
                raise  # never end the stream as if it were whole: gRPC cancels the call itself
            self._cancel()
            raise StopIteration from None

    def failure(self) -> BaseException:
        """What to raise when the call was cancelled: the error that stopped the stream."""
        return self.error or VisionClientError("the upload was cancelled")


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
        runtime=message.runtime,
        version=message.version,
        devices=tuple(message.devices),
        pending_images=message.pending_images,
        versions=tuple(message.versions),
    )


def job_event(message: ft_pb.JobEvent) -> JobEvent:
    return JobEvent(
        job_id=message.job_id,
        kind=message.kind,
        state=_state(message.state),
        epoch=message.epoch,
        epochs=message.epochs,
        train_loss=message.train_loss,
        validation_loss=message.validation_loss,
        validation_accuracy=message.validation_accuracy,
        eta_seconds=message.eta_seconds,
        progress=message.progress,
        message=message.message,
    )


def job_info(message: ft_pb.Job) -> JobInfo:
    m, config = message.metrics, message.config
    return JobInfo(
        id=message.id,
        state=_state(message.state),
        base_model=config.base_model,
        output_model=config.output_model,
        head=config.head.kind,
        optimizer=config.optimizer.kind,
        loss=config.loss,
        epochs=config.epochs,
        error=message.error,
        examples=message.examples,
        labels=tuple(message.labels),
        metrics=JobMetrics(
            train_loss=m.train_loss,
            validation_loss=m.validation_loss,
            validation_accuracy=m.validation_accuracy,
            best_epoch=m.best_epoch,
            epochs_run=m.epochs_run,
            train_examples=m.train_examples,
            validation_examples=m.validation_examples,
            train_seconds=m.train_seconds,
            class_metrics=tuple(
                ClassMetrics(label, c.precision, c.recall, c.support)
                for label, c in zip(message.labels, m.class_metrics, strict=False)
            ),
            confusion=tuple(ConfusionCell(c.actual, c.predicted, c.count) for c in m.confusion_matrix),
        ),
        created_at=message.created_at,
        started_at=message.started_at or None,
        finished_at=message.finished_at or None,
        config=_config(config),
        epoch_metrics=tuple(
            EpochMetrics(p.epoch, p.train_loss, p.validation_loss, p.validation_accuracy) for p in message.epoch_metrics
        ),
    )


def _config(message: ft_pb.FineTuneConfig) -> FineTuneConfig | None:
    try:
        return from_message(message)
    except InvalidInputError:
        return None


def fine_tune_result(job: JobInfo, events: Sequence[JobEvent]) -> FineTuneResult:
    return FineTuneResult(
        job_id=job.id,
        output_model=job.output_model,
        state=job.state,
        error=job.error,
        metrics=job.metrics,
        labels=job.labels,
        events=tuple(events),
        job=job,
    )


def _state(value: int) -> str:
    """``SUCCEEDED`` as ``succeeded``; a state this client does not know keeps its number."""
    try:
        return ft_pb.JobState.Name(value).lower()
    except ValueError:
        return str(value)


def _bad_response(problem: str) -> VisionClientError:
    return VisionClientError(f"the server's ModelInfer response is malformed: {problem}")


# -- scores --------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by each row's maximum so that it cannot overflow."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


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
