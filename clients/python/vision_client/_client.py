"""``Client`` and ``AsyncClient``: twins that differ only in how they send.

All the logic that does no I/O lives in :class:`BaseClient`: each operation is
a *plan*, a generator that yields the steps it needs and receives their
results, then returns its result. A step is a list of calls that may run
concurrently (the plan receives their responses), one call of a
server-streaming RPC (the plan receives its next response, ``None`` at its end),
or :class:`Emit` (a value for the caller: ``on_event``, or the iterator
``watch_job`` returns). The clients drive plans: ``Client`` sends each call in
turn and sleeps with ``time.sleep``; ``AsyncClient`` sends a list's calls
concurrently, sleeps with ``asyncio.sleep`` and awaits ``on_event`` if it is a
coroutine function. Their public methods are one line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import grpc
import grpc.aio
import numpy as np

from vision_client import _protocol as proto
from vision_client._channel import PemSource, channel_credentials, check_token_transport, http_target, http_tls
from vision_client._http import AsyncHttpChannel, HttpChannel
from vision_client._images import ImageInput, encode_images
from vision_client._retry import Attempts, Retry
from vision_client._tracing import trace_headers
from vision_client._types import FineTuneResult, JobEvent, JobInfo, ModelInfo, Prediction
from vision_client._version import __version__
from vision_client.errors import ClientClosedError, UnavailableError
from vision_client.protocol.calls import finish_upload
from vision_client.protocol.fine_tuning import FineTuneConfig, to_message
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import models_pb2 as models_pb

T = TypeVar("T")


@dataclass(frozen=True)
class Emit:
    """A plan's step that hands ``value`` to the caller; the plan receives None."""

    value: Any


Step = list[proto.Call] | proto.Call | Emit
Plan = Generator[Step, Any, T]
"""An operation: yields the steps it needs, receives their results, returns its result."""
Example = tuple[ImageInput, Any]
"""A training example: an image and its label (a class name, or a target vector for mse)."""


@dataclass(frozen=True)
class _Done(Generic[T]):
    """The last item a client's ``_steps`` yields: the plan's result."""

    value: T


DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default limit
DEFAULT_MAX_IMAGES_PER_REQUEST = 32
DEFAULT_MODEL = "resnet101"


class UseClientDefault:
    """The type of :data:`USE_CLIENT_DEFAULT`: "the timeout the client was made with"."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = UseClientDefault()
Timeout = float | None | UseClientDefault


class BaseClient:
    """What both clients share: configuration, channel options, and every operation's plan.

    ``target`` is a gRPC target: ``host:port``, or ``dns:///name:port`` for every
    address a name resolves to (a headless Kubernetes Service), balanced round-robin; or
    the URL of the server's HTTP port, ``http://host:8000`` or ``https://host`` (a path
    prefix is kept, for a server behind a proxy), for the REST binding: the same methods,
    results, errors and retries, over HTTP/1.1 (the SDK's README says what differs).

    Keyword arguments:

    - ``timeout``: seconds each RPC may take, its retries included (None: no deadline);
      every method takes ``timeout=`` to override it for one call.
    - ``token``: sent as ``authorization: Bearer <token>`` with every call. It is sent in
      plaintext only to loopback targets, unless ``allow_insecure_token=True``.
    - ``tls``: True for TLS (with the system's root certificates unless
      ``root_certificates`` is given), False for plaintext, or your own
      ``grpc.ChannelCredentials``; unset, TLS is on when a certificate option is given.
      For a URL the scheme decides (``https://`` is TLS) and the certificate options apply.
    - ``root_certificates``: the CA certificates that sign the server's certificate.
    - ``client_certificate``, ``client_key``: this client's certificate chain and key, for
      servers that want mutual TLS. The three are PEM: a path, or the bytes.
    - ``retries``: how many times an idempotent call is retried after UNAVAILABLE, or a
      :class:`Retry` (0 or None: never).
    - ``max_message_bytes``: the largest message sent or received; calls with more
      image bytes are split into several requests.
    - ``max_images_per_request``: at most this many images in one request.
    - ``options``: extra gRPC channel options, overriding the client's own (gRPC targets only).

    With an active OpenTelemetry span (and ``opentelemetry-api`` installed) every call carries
    its W3C ``traceparent`` (``vision_client._tracing``), on either binding.
    """

    _grpc: ClassVar[Any]  # the module whose channels the client uses: grpc or grpc.aio
    _http_channel: ClassVar[Any]  # the HTTP binding's channel: HttpChannel or AsyncHttpChannel

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials | None = None,
        root_certificates: PemSource | None = None,
        client_certificate: PemSource | None = None,
        client_key: PemSource | None = None,
        allow_insecure_token: bool = False,
        retries: int | Retry | None = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not target:
            raise ValueError("target is empty: pass host:port, e.g. 'localhost:8001'")
        if max_message_bytes < 4096:
            raise ValueError(f"max_message_bytes must be at least 4096, got {max_message_bytes}")
        if max_images_per_request < 1:
            raise ValueError(f"max_images_per_request must be at least 1, got {max_images_per_request}")
        self.target = target
        self.timeout = _check_timeout(timeout)
        self.retry = Retry.of(retries)
        self.max_message_bytes = max_message_bytes
        self.max_images_per_request = max_images_per_request
        self._http = http_target(target)
        if self._http is None:
            self._credentials = channel_credentials(tls, root_certificates, client_certificate, client_key)
            self._ssl = None
        else:
            if options:
                raise ValueError(f"options are gRPC channel options; {target!r} is an HTTP URL")
            self._credentials = None
            self._ssl = http_tls(self._http, tls, root_certificates, client_certificate, client_key)
        check_token_transport(target, token, self._credentials, allow_insecure_token)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = _channel_options(max_message_bytes, options)
        self._labels: dict[str, tuple[str, ...]] = {}
        self._version_labels: dict[tuple[str, str], tuple[str, ...]] = {}  # (model, version) named by a call
        self._channel: Any = None
        self._methods: dict[proto.Rpc, Any] = {}
        self._lock = threading.Lock()  # a Client may be shared by threads
        self._closed = False

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} target={self.target!r}{state}>"

    @property
    def is_closed(self) -> bool:
        return self._closed

    # -- the channel -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(f"this {type(self).__name__} is closed; make a new one to send more calls")

    def _method(self, rpc: proto.Rpc) -> Any:
        """The channel's callable for ``rpc``; opens the channel on first use."""
        method = self._methods.get(rpc)
        if method is not None and not self._closed:
            return method
        with self._lock:
            self._check_open()
            if self._channel is None:
                if self._http is not None:
                    verify = True if self._ssl is None else self._ssl
                    self._channel = self._http_channel(self._http.base_url, verify=verify)
                elif self._credentials is None:
                    self._channel = self._grpc.insecure_channel(self.target, options=self._options)
                else:
                    self._channel = self._grpc.secure_channel(self.target, self._credentials, options=self._options)
            method = self._methods.get(rpc)
            if method is None:
                method = self._methods[rpc] = getattr(self._channel, rpc.kind)(
                    rpc.path,
                    request_serializer=rpc.request_type.SerializeToString,
                    response_deserializer=rpc.response_type.FromString,
                )
            return method

    def _take_channel(self) -> Any:
        """Mark the client closed; the channel to close, if one was opened."""
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
            self._methods.clear()
        return channel

    def _attempts(self, call: proto.Call, timeout: float | None) -> Attempts:
        if call.deadline is not None:
            left = max(0.0, call.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return Attempts(self.retry, call.rpc.name, idempotent=call.rpc.idempotent, timeout=timeout)

    def _reading(self, current: _ResponseStream | None, call: proto.Call, timeout: float | None) -> _ResponseStream:
        """The stream a plan reads with ``call``: the open one, or a new one (a plan reads one at a time)."""
        if current is not None and current.call is call:
            return current
        if current is not None:
            current.close()
        return _ResponseStream(call, self._attempts(call, timeout))

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The token, and the caller's trace context when it has an active OpenTelemetry span."""
        trace = trace_headers()
        return self._metadata + trace if trace else self._metadata

    def _timeout(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, UseClientDefault) else _check_timeout(timeout)

    # -- plans: one per operation, no I/O ------------------------------------------------

    def _live_plan(self) -> Plan[bool]:
        (response,) = yield [proto.Call(proto.SERVER_LIVE, infer_pb.ServerLiveRequest())]
        return bool(response.live)

    def _ready_plan(self, model: str | None) -> Plan[bool]:
        if model is None:
            (response,) = yield [proto.Call(proto.SERVER_READY, infer_pb.ServerReadyRequest())]
        else:
            (response,) = yield [proto.Call(proto.MODEL_READY, infer_pb.ModelReadyRequest(name=model))]
        return bool(response.ready)

    def _models_plan(self, labels: bool) -> Plan[list[ModelInfo]]:
        (response,) = yield [proto.Call(proto.LIST_MODELS, models_pb.ListModelsRequest(without_labels=not labels))]
        infos = [proto.model_info(message) for message in response.models]
        for info in infos:
            if info.labels:
                self._labels[info.name] = info.labels
        return infos

    def _model_plan(self, name: str, version: str = "") -> Plan[ModelInfo]:
        (response,) = yield [proto.Call(proto.GET_MODEL, models_pb.GetModelRequest(name=name, version=version))]
        info = proto.model_info(response)
        if version:
            self._version_labels[(info.name, version)] = info.labels
        else:
            self._labels[info.name] = info.labels
        return info

    def _labels_plan(self, model: str, version: str = "") -> Plan[tuple[str, ...]]:
        labels = self._version_labels.get((model, version)) if version else self._labels.get(model)
        if labels is None:
            labels = (yield from self._model_plan(model, version)).labels
        return labels

    def _logits_plan(self, images: ImageInput | Iterable[ImageInput], model: str, version: str) -> Plan[np.ndarray]:
        logits, _ = yield from self._scored_plan(images, model, version)
        return logits

    def _classify_plan(
        self, images: ImageInput | Iterable[ImageInput], model: str, top_k: int, version: str
    ) -> Plan[list[list[Prediction]]]:
        top_k = proto.check_top_k(top_k)
        logits, labels = yield from self._scored_plan(images, model, version)
        return proto.top_predictions(logits, labels, top_k)

    def _scored_plan(
        self, images: ImageInput | Iterable[ImageInput], model: str, version: str = ""
    ) -> Plan[tuple[np.ndarray, tuple[str, ...]]]:
        """Logits [N, C] of every image, and the labels of the model's version (cached per model and
        version named; empty: the version served)."""
        encoded = encode_images(images)  # before any call: a bad image fails fast
        labels = yield from self._labels_plan(model, version)
        chunks = proto.split_images(
            encoded,
            num_classes=len(labels),
            max_message_bytes=self.max_message_bytes,
            max_images=self.max_images_per_request,
        )
        if not chunks:
            return np.zeros((0, len(labels)), dtype=np.float32), labels
        responses = yield [
            proto.Call(proto.MODEL_INFER, proto.infer_request(model, chunk, version)) for chunk in chunks
        ]
        logits = np.concatenate([proto.parse_logits(r, len(c)) for r, c in zip(responses, chunks, strict=True)])
        if logits.shape[1] != len(labels):  # the model was replaced since its labels were cached
            labels = (yield from self._model_plan(model, version)).labels
        return logits, labels

    # -- fine-tuning plans ---------------------------------------------------------------

    def _fine_tune_plan(
        self, config: FineTuneConfig, examples: Iterable[Example], timeout: float | None
    ) -> Plan[FineTuneResult]:
        seconds = _check_timeout(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        job = yield from self._create_job_plan(config, examples, deadline)
        events = yield from self._watch_plan(job.id, deadline)
        (final,) = yield [proto.Call(proto.GET_JOB, ft_pb.GetJobRequest(job_id=job.id), deadline)]
        return proto.fine_tune_result(proto.job_info(final), events)

    def _create_job_plan(
        self, config: FineTuneConfig, examples: Iterable[Example], deadline: float | None = None
    ) -> Plan[JobInfo]:
        if not isinstance(config, FineTuneConfig):  # before any call: a bad value fails fast
            raise TypeError(
                f"config must be a vision_client.FineTuneConfig, got {type(config).__name__}; "
                "e.g. FineTuneConfig(base_model='resnet101', output_model='pets')"
            )
        requests = proto.create_job_requests(to_message(config), examples, max_message_bytes=self.max_message_bytes)
        (job,) = yield [proto.Call(proto.CREATE_JOB, proto.RequestStream(requests), deadline)]
        # The new model's labels may differ from those cached under its name (replace=True).
        self._labels.pop(config.output_model, None)
        return proto.job_info(job)

    def _watch_plan(self, job_id: str, deadline: float | None = None) -> Plan[list[JobEvent]]:
        """Emits each event of the job, from its first to its last; returns them all."""
        watch = proto.Call(proto.WATCH_JOB, ft_pb.WatchJobRequest(job_id=job_id), deadline)
        events: list[JobEvent] = []
        while (message := (yield watch)) is not None:
            events.append(proto.job_event(message))
            yield Emit(events[-1])
            if events[-1].terminal:
                return events
        raise UnavailableError(
            f"the server closed the event stream of job {job_id!r} before the job ended; watch it again"
        )

    def _job_plan(self, job_id: str) -> Plan[JobInfo]:
        (job,) = yield [proto.Call(proto.GET_JOB, ft_pb.GetJobRequest(job_id=job_id))]
        return proto.job_info(job)

    def _jobs_plan(self) -> Plan[list[JobInfo]]:
        (response,) = yield [proto.Call(proto.LIST_JOBS, ft_pb.ListJobsRequest())]
        return [proto.job_info(job) for job in response.jobs]

    def _cancel_job_plan(self, job_id: str) -> Plan[JobInfo]:
        (job,) = yield [proto.Call(proto.CANCEL_JOB, ft_pb.CancelJobRequest(job_id=job_id))]
        return proto.job_info(job)

    def _load_model_plan(self, name: str) -> Plan[None]:
        yield [proto.Call(proto.REPOSITORY_LOAD, infer_pb.RepositoryModelLoadRequest(model_name=name))]
        self._labels.pop(name, None)  # a fine-tuned model may come back with other labels

    def _unload_model_plan(self, name: str) -> Plan[None]:
        yield [proto.Call(proto.REPOSITORY_UNLOAD, infer_pb.RepositoryModelUnloadRequest(model_name=name))]

    def _delete_model_plan(self, name: str) -> Plan[None]:
        yield [proto.Call(proto.DELETE_MODEL, ft_pb.DeleteModelRequest(name=name))]
        self._forget_labels(name)

    def _rollback_model_plan(self, name: str, version: int | str) -> Plan[ModelInfo]:
        request = models_pb.RollbackModelRequest(name=name, version=str(version))
        (response,) = yield [proto.Call(proto.ROLLBACK_MODEL, request)]
        info = proto.model_info(response)
        self._labels[info.name] = info.labels  # the version now served
        return info

    def _forget_labels(self, name: str) -> None:
        """A deleted name may come back with other versions and labels."""
        self._labels.pop(name, None)
        for key in [key for key in self._version_labels if key[0] == name]:
            del self._version_labels[key]


class _ResponseStream:
    """A server-streaming call that a plan reads one response at a time.

    After a failure that may be retried the call is made again. WatchJob then
    replays the job's events from its start, so as many responses as the plan
    already has are skipped. Each new response earns the retries back: a long
    watch survives any number of brief outages, each within the retry policy.
    """

    def __init__(self, call: proto.Call, attempts: Attempts) -> None:
        self.call = call
        self.attempts = attempts
        self.responses: Any = None  # the channel's call object while it is open
        self._taken = 0
        self._skip = 0

    def take(self, response: Any) -> bool:
        """Whether ``response`` is new, rather than one replayed after the call was made again."""
        if self._skip:
            self._skip -= 1
            return False
        self._taken += 1
        self.attempts.retries = 0
        return True

    def backoff(self, error: grpc.RpcError) -> float:
        """Seconds to wait before making the call again; raises the client error if there is no retry."""
        self.close()
        self._skip = self._taken
        return self.attempts.backoff(error)

    def close(self) -> None:
        responses, self.responses = self.responses, None
        if responses is not None:
            responses.cancel()  # a no-op once the call has ended


class Client(BaseClient):
    """A blocking client of vision-serving. Use it in a ``with`` block, or ``close()`` it.

    >>> with Client("localhost:8001") as client:           # doctest: +SKIP
    ...     client.classify("cat.jpg", model="resnet101")
    """

    _grpc: ClassVar[Any] = grpc
    _http_channel: ClassVar[Any] = HttpChannel

    def __enter__(self) -> Client:
        self._check_open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls made afterwards raise :class:`ClientClosedError`."""
        channel = self._take_channel()
        if channel is not None:
            channel.close()

    def live(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool:
        """Whether the server process is up."""
        return self._run(self._live_plan(), timeout)

    def ready(self, model: str | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool:
        """Whether the server (every model), or the one ``model``, is ready for inference."""
        return self._run(self._ready_plan(model), timeout)

    def models(self, *, labels: bool = True, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        """Every model the server knows, loaded or not."""
        return self._run(self._models_plan(labels), timeout)

    def model(self, name: str, *, version: int | str = "", timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """One model (``version``: one of its versions; empty: the one served); :class:`ModelNotFoundError`
        if the server does not know it, or keeps no such version."""
        return self._run(self._model_plan(name, str(version)), timeout)

    def classify(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        top_k: int = 5,
        *,
        version: int | str = "",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[list[Prediction]]:
        """The ``top_k`` most probable classes of each image, best first: one list per image.
        ``version``: one of the model's versions (:attr:`ModelInfo.versions`); empty: the one served."""
        return self._run(self._classify_plan(images, model, top_k, str(version)), timeout)

    def logits(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        *,
        version: int | str = "",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> np.ndarray:
        """The model's raw outputs, float32 ``[N, C]``, one row per image (of ``version``, as
        :meth:`classify` has it)."""
        return self._run(self._logits_plan(images, model, str(version)), timeout)

    def fine_tune(
        self,
        config: FineTuneConfig,
        examples: Iterable[Example] = (),
        *,
        on_event: Callable[[JobEvent], object] | None = None,
        timeout: float | None = None,
    ) -> FineTuneResult:
        """Train a new head on ``config.base_model``'s features of ``examples`` (none where
        ``config.dataset`` names the images); served as ``config.output_model`` once done.

        Streams the examples, then waits for the job to end, calling ``on_event`` with each
        :class:`JobEvent`. Returns however the job ended (``result.state``); raises for a job
        the server refuses. ``timeout`` bounds all of it (None: no deadline). See the README.
        """
        return self._run(self._fine_tune_plan(config, examples, timeout), None, on_event)

    def create_job(
        self, config: FineTuneConfig, examples: Iterable[Example] = (), *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> JobInfo:
        """Stream the examples and return the queued job at once (``fine_tune`` without the wait)."""
        return self._run(self._create_job_plan(config, examples), timeout)

    def watch_job(self, job_id: str, *, timeout: Timeout = None) -> Iterator[JobEvent]:
        """The job's events from its start (replayed) until it ends, as they come."""
        return self._iterate(self._watch_plan(job_id), timeout)

    def job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> JobInfo:
        """One fine-tuning job; :class:`ModelNotFoundError` if the server has no such job."""
        return self._run(self._job_plan(job_id), timeout)

    def jobs(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[JobInfo]:
        """Every fine-tuning job since the server started, oldest first."""
        return self._run(self._jobs_plan(), timeout)

    def cancel_job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> JobInfo:
        """Ask a queued or running job to stop; it ends ``cancelled`` soon after. A finished job is left as it is."""
        return self._run(self._cancel_job_plan(job_id), timeout)

    def delete_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Delete a fine-tuned model from the server's store and stop serving it."""
        return self._run(self._delete_model_plan(name), timeout)

    def rollback_model(self, name: str, version: int | str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """Serve ``version`` of fine-tuned model ``name`` again, one its store keeps
        (:attr:`ModelInfo.versions`); every replica follows on its next poll. The model as now served."""
        return self._run(self._rollback_model_plan(name, version), timeout)

    def load_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Load (or load again) a model the server knows; returns once it serves. Large models
        take a while: pass a ``timeout`` to match."""
        return self._run(self._load_model_plan(name), timeout)

    def unload_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Stop serving a model, keeping it known (``models()`` lists it unloaded); ``load_model``
        serves it again."""
        return self._run(self._unload_model_plan(name), timeout)

    # -- sending: the only part that differs from AsyncClient --------------------------

    def _run(self, plan: Plan[T], timeout: Timeout, on_emit: Callable[[Any], object] | None = None) -> T:
        with contextlib.closing(self._steps(plan, timeout)) as steps:
            for item in steps:
                if isinstance(item, _Done):
                    return item.value
                if on_emit is not None:
                    on_emit(item.value)
        raise AssertionError("a plan's steps end with its result")

    def _iterate(self, plan: Plan[Any], timeout: Timeout) -> Iterator[Any]:
        with contextlib.closing(self._steps(plan, timeout)) as steps:
            yield from (item.value for item in steps if isinstance(item, Emit))

    def _steps(self, plan: Plan[T], timeout: Timeout) -> Generator[Emit | _Done[T], None, None]:
        """Drive ``plan``: yields each ``Emit`` step, then ``_Done(result)``."""
        seconds = self._timeout(timeout)
        reading: _ResponseStream | None = None
        try:
            step = next(plan)
            while True:
                if isinstance(step, Emit):
                    yield step
                    reply = None
                elif isinstance(step, proto.Call):
                    reading = self._reading(reading, step, seconds)
                    reply = self._read(reading)
                else:
                    reply = [self._send(call, seconds) for call in step]
                step = plan.send(reply)
        except StopIteration as done:
            yield _Done(done.value)
        finally:
            plan.close()
            if reading is not None:
                reading.close()

    def _send(self, call: proto.Call, timeout: float | None) -> Any:
        attempts = self._attempts(call, timeout)
        while True:
            try:
                if isinstance(call.request, proto.RequestStream):
                    return self._upload(call, attempts.timeout())
                return self._method(call.rpc)(call.request, timeout=attempts.timeout(), metadata=self._call_metadata())
            except grpc.RpcError as error:
                time.sleep(attempts.backoff(error))  # raises instead when there is no retry left

    def _upload(self, call: proto.Call, timeout: float | None) -> Any:
        """A client-streaming call; its RequestStream cancels it if making a message fails."""
        future = self._method(call.rpc).future(call.request, timeout=timeout, metadata=self._call_metadata())
        call.request.started(future.cancel)
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise call.request.failure() from None
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C): stop sending; a no-op once the call has ended
            raise

    def _read(self, stream: _ResponseStream) -> Any:
        """The stream's next new response; None once it has ended."""
        while True:
            try:
                if stream.responses is None:
                    method = self._method(stream.call.rpc)
                    timeout = stream.attempts.timeout()
                    stream.responses = method(stream.call.request, timeout=timeout, metadata=self._call_metadata())
                response = next(stream.responses, None)
                if response is None or stream.take(response):
                    return response
            except grpc.RpcError as error:
                time.sleep(stream.backoff(error))  # raises instead when there is no retry left


class AsyncClient(BaseClient):
    """An asyncio client of vision-serving, with the methods of :class:`Client` as coroutines.

    Use it in an ``async with`` block, or ``await client.close()``. It opens its channel
    on first use, in the running event loop, and must stay in that loop. The requests
    of a call that is split into several run concurrently (``max_concurrency`` at once).
    """

    _grpc: ClassVar[Any] = grpc.aio
    _http_channel: ClassVar[Any] = AsyncHttpChannel
    max_concurrency = 4

    async def __aenter__(self) -> AsyncClient:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls made afterwards raise :class:`ClientClosedError`."""
        channel = self._take_channel()
        if channel is not None:
            await channel.close()

    async def live(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool:
        """Whether the server process is up."""
        return await self._run(self._live_plan(), timeout)

    async def ready(self, model: str | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool:
        """Whether the server (every model), or the one ``model``, is ready for inference."""
        return await self._run(self._ready_plan(model), timeout)

    async def models(self, *, labels: bool = True, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        """Every model the server knows, loaded or not."""
        return await self._run(self._models_plan(labels), timeout)

    async def model(self, name: str, *, version: int | str = "", timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """:meth:`Client.model`."""
        return await self._run(self._model_plan(name, str(version)), timeout)

    async def classify(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        top_k: int = 5,
        *,
        version: int | str = "",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[list[Prediction]]:
        """:meth:`Client.classify`."""
        return await self._run(self._classify_plan(images, model, top_k, str(version)), timeout)

    async def logits(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        *,
        version: int | str = "",
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> np.ndarray:
        """:meth:`Client.logits`."""
        return await self._run(self._logits_plan(images, model, str(version)), timeout)

    async def fine_tune(
        self,
        config: FineTuneConfig,
        examples: Iterable[Example] = (),
        *,
        on_event: Callable[[JobEvent], object] | None = None,
        timeout: float | None = None,
    ) -> FineTuneResult:
        """:meth:`Client.fine_tune`; ``on_event`` may be a plain function or a coroutine function."""
        return await self._run(self._fine_tune_plan(config, examples, timeout), None, on_event)

    async def create_job(
        self, config: FineTuneConfig, examples: Iterable[Example] = (), *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> JobInfo:
        """Stream the examples and return the queued job at once (``fine_tune`` without the wait)."""
        return await self._run(self._create_job_plan(config, examples), timeout)

    def watch_job(self, job_id: str, *, timeout: Timeout = None) -> AsyncIterator[JobEvent]:
        """The job's events from its start (replayed) until it ends: ``async for event in ...``."""
        return self._iterate(self._watch_plan(job_id), timeout)

    async def job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> JobInfo:
        """One fine-tuning job; :class:`ModelNotFoundError` if the server has no such job."""
        return await self._run(self._job_plan(job_id), timeout)

    async def jobs(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[JobInfo]:
        """Every fine-tuning job since the server started, oldest first."""
        return await self._run(self._jobs_plan(), timeout)

    async def cancel_job(self, job_id: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> JobInfo:
        """Ask a queued or running job to stop; it ends ``cancelled`` soon after. A finished job is left as it is."""
        return await self._run(self._cancel_job_plan(job_id), timeout)

    async def delete_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Delete a fine-tuned model from the server's store and stop serving it."""
        return await self._run(self._delete_model_plan(name), timeout)

    async def rollback_model(
        self, name: str, version: int | str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> ModelInfo:
        """:meth:`Client.rollback_model`."""
        return await self._run(self._rollback_model_plan(name, version), timeout)

    async def load_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """:meth:`Client.load_model`."""
        return await self._run(self._load_model_plan(name), timeout)

    async def unload_model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """:meth:`Client.unload_model`."""
        return await self._run(self._unload_model_plan(name), timeout)

    # -- sending: the only part that differs from Client -------------------------------

    async def _run(self, plan: Plan[T], timeout: Timeout, on_emit: Callable[[Any], object] | None = None) -> T:
        async with contextlib.aclosing(self._steps(plan, timeout)) as steps:
            async for item in steps:
                if isinstance(item, _Done):
                    return item.value
                if on_emit is not None:
                    outcome = on_emit(item.value)
                    if inspect.isawaitable(outcome):
                        await outcome
        raise AssertionError("a plan's steps end with its result")

    async def _iterate(self, plan: Plan[Any], timeout: Timeout) -> AsyncIterator[Any]:
        async with contextlib.aclosing(self._steps(plan, timeout)) as steps:
            async for item in steps:
                if isinstance(item, Emit):
                    yield item.value

    async def _steps(self, plan: Plan[T], timeout: Timeout) -> AsyncGenerator[Emit | _Done[T], None]:
        """Drive ``plan``: yields each ``Emit`` step, then ``_Done(result)``."""
        seconds = self._timeout(timeout)
        reading: _ResponseStream | None = None
        try:
            step = next(plan)
            while True:
                if isinstance(step, Emit):
                    yield step
                    reply = None
                elif isinstance(step, proto.Call):
                    reading = self._reading(reading, step, seconds)
                    reply = await self._read(reading)
                else:
                    reply = await self._gather([self._send(call, seconds) for call in step])
                step = plan.send(reply)
        except StopIteration as done:
            yield _Done(done.value)
        finally:
            plan.close()
            if reading is not None:
                reading.close()

    async def _send(self, call: proto.Call, timeout: float | None) -> Any:
        attempts = self._attempts(call, timeout)
        while True:
            try:
                if isinstance(call.request, proto.RequestStream):
                    return await self._upload(call, attempts.timeout())
                return await self._method(call.rpc)(
                    call.request, timeout=attempts.timeout(), metadata=self._call_metadata()
                )
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.backoff(error))  # raises instead when there is no retry left

    async def _upload(self, call: proto.Call, timeout: float | None) -> Any:
        """A client-streaming call; its RequestStream cancels it if making a message fails."""
        pending = self._method(call.rpc)(call.request, timeout=timeout, metadata=self._call_metadata())
        call.request.started(pending.cancel)
        try:
            return await finish_upload(pending)
        except asyncio.CancelledError:
            if call.request.error is None:  # this task was cancelled
                raise
            raise call.request.failure() from None

    async def _read(self, stream: _ResponseStream) -> Any:
        """The stream's next new response; None once it has ended."""
        while True:
            try:
                if stream.responses is None:
                    method = self._method(stream.call.rpc)
                    timeout = stream.attempts.timeout()
                    stream.responses = method(stream.call.request, timeout=timeout, metadata=self._call_metadata())
                response = await stream.responses.read()
                if response is grpc.aio.EOF:
                    return None
                if stream.take(response):
                    return response
            except grpc.RpcError as error:
                await asyncio.sleep(stream.backoff(error))  # raises instead when there is no retry left

    async def _gather(self, sends: list[Awaitable[Any]]) -> list[Any]:
        """Await ``sends`` with at most ``max_concurrency`` at once; the first failure cancels the rest."""
        if len(sends) <= 1:
            return [await send for send in sends]
        slots = asyncio.Semaphore(self.max_concurrency)

        async def limited(send: Awaitable[Any]) -> Any:
            async with slots:
                return await send

        tasks = [asyncio.ensure_future(limited(send)) for send in sends]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None (no deadline), got {timeout!r}")
    return None if timeout is None else float(timeout)


def _channel_options(max_message_bytes: int, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        # Spread calls over every address the target resolves to (a headless Service's
        # pods); one HTTP/2 connection would otherwise pin a client to one replica.
        "grpc.lb_policy_name": "round_robin",
        # Reconnect to a restarted replica within seconds, not gRPC's default two minutes.
        "grpc.max_reconnect_backoff_ms": 10_000,
        "grpc.primary_user_agent": f"vision-client/{__version__}",
    }
    options.update(dict(extra))
    return list(options.items())
