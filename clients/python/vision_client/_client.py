"""``Client`` and ``AsyncClient``: twins that differ only in how they send.

All the logic that does no I/O lives in :class:`BaseClient`: each operation is
a *plan*, a generator that yields the RPCs it needs (a list of calls that may
run concurrently) and receives their responses, then returns the result. The
clients drive plans: ``Client`` sends each call in turn and sleeps with
``time.sleep``; ``AsyncClient`` sends a list's calls concurrently and sleeps with
``asyncio.sleep``. Their public methods are one line each.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Generator, Iterable, Sequence
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import grpc
import grpc.aio
import numpy as np

from vision_client import _protocol as proto
from vision_client._images import ImageInput, encode_images
from vision_client._proto.inference import grpc_service_pb2 as infer_pb
from vision_client._proto.vision.v1 import models_pb2 as models_pb
from vision_client._retry import Attempts, Retry
from vision_client._types import ModelInfo, Prediction
from vision_client._version import __version__
from vision_client.errors import ClientClosedError

T = TypeVar("T")
Plan = Generator[list[proto.Call], list[Any], T]
"""An operation: yields the calls it needs, receives their responses, returns its result."""

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
    address a name resolves to (a headless Kubernetes Service), balanced round-robin.

    Keyword arguments:

    - ``timeout``: seconds each RPC may take, its retries included (None: no deadline);
      every method takes ``timeout=`` to override it for one call.
    - ``token``: sent as ``authorization: Bearer <token>`` with every call.
    - ``tls``: True for TLS with the system's root certificates, or your own
      ``grpc.ChannelCredentials``.
    - ``retries``: how many times an idempotent call is retried after UNAVAILABLE, or a
      :class:`Retry` (0 or None: never).
    - ``max_message_bytes``: the largest message sent or received; calls with more
      image bytes are split into several requests.
    - ``max_images_per_request``: at most this many images in one request.
    - ``options``: extra gRPC channel options, overriding the client's own.
    """

    _grpc: ClassVar[Any]  # the module whose channels the client uses: grpc or grpc.aio

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
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
        self._credentials = _credentials(tls)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = _channel_options(max_message_bytes, options)
        self._labels: dict[str, tuple[str, ...]] = {}
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
                if self._credentials is None:
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

    def _attempts(self, rpc: proto.Rpc, timeout: float | None) -> Attempts:
        return Attempts(self.retry, rpc.name, idempotent=rpc.idempotent, timeout=timeout)

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

    def _model_plan(self, name: str) -> Plan[ModelInfo]:
        (response,) = yield [proto.Call(proto.GET_MODEL, models_pb.GetModelRequest(name=name))]
        info = proto.model_info(response)
        self._labels[info.name] = info.labels
        return info

    def _labels_plan(self, model: str) -> Plan[tuple[str, ...]]:
        labels = self._labels.get(model)
        if labels is None:
            labels = (yield from self._model_plan(model)).labels
        return labels

    def _logits_plan(self, images: ImageInput | Iterable[ImageInput], model: str) -> Plan[np.ndarray]:
        logits, _ = yield from self._scored_plan(images, model)
        return logits

    def _classify_plan(
        self, images: ImageInput | Iterable[ImageInput], model: str, top_k: int
    ) -> Plan[list[list[Prediction]]]:
        top_k = proto.check_top_k(top_k)
        logits, labels = yield from self._scored_plan(images, model)
        return proto.top_predictions(logits, labels, top_k)

    def _scored_plan(
        self, images: ImageInput | Iterable[ImageInput], model: str
    ) -> Plan[tuple[np.ndarray, tuple[str, ...]]]:
        """Logits [N, C] of every image, and the model's labels (cached per model)."""
        encoded = encode_images(images)  # before any call: a bad image fails fast
        labels = yield from self._labels_plan(model)
        chunks = proto.split_images(
            encoded,
            num_classes=len(labels),
            max_message_bytes=self.max_message_bytes,
            max_images=self.max_images_per_request,
        )
        if not chunks:
            return np.zeros((0, len(labels)), dtype=np.float32), labels
        responses = yield [proto.Call(proto.MODEL_INFER, proto.infer_request(model, chunk)) for chunk in chunks]
        logits = np.concatenate([proto.parse_logits(r, len(c)) for r, c in zip(responses, chunks, strict=True)])
        if logits.shape[1] != len(labels):  # the model was replaced since its labels were cached
            labels = (yield from self._model_plan(model)).labels
        return logits, labels


class Client(BaseClient):
    """A blocking client of vision-serving. Use it in a ``with`` block, or ``close()`` it.

    >>> with Client("localhost:8001") as client:           # doctest: +SKIP
    ...     client.classify("cat.jpg", model="resnet101")
    """

    _grpc = grpc

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

    def model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """One model; :class:`ModelNotFoundError` if the server does not know it."""
        return self._run(self._model_plan(name), timeout)

    def classify(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        top_k: int = 5,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[list[Prediction]]:
        """The ``top_k`` most probable classes of each image, best first: one list per image."""
        return self._run(self._classify_plan(images, model, top_k), timeout)

    def logits(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> np.ndarray:
        """The model's raw outputs, float32 ``[N, C]``, one row per image."""
        return self._run(self._logits_plan(images, model), timeout)

    # -- sending: the only part that differs from AsyncClient --------------------------

    def _run(self, plan: Plan[T], timeout: Timeout) -> T:
        seconds = self._timeout(timeout)
        try:
            calls = next(plan)
            while True:
                calls = plan.send([self._send(call, seconds) for call in calls])
        except StopIteration as done:
            return done.value
        finally:
            plan.close()

    def _send(self, call: proto.Call, timeout: float | None) -> Any:
        attempts = self._attempts(call.rpc, timeout)
        while True:
            try:
                return self._method(call.rpc)(call.request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as error:
                time.sleep(attempts.backoff(error))  # raises instead when there is no retry left


class AsyncClient(BaseClient):
    """An asyncio client of vision-serving, with the methods of :class:`Client` as coroutines.

    Use it in an ``async with`` block, or ``await client.close()``. It opens its channel
    on first use, in the running event loop, and must stay in that loop. The requests
    of a call that is split into several run concurrently (``max_concurrency`` at once).
    """

    _grpc = grpc.aio
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

    async def model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """One model; :class:`ModelNotFoundError` if the server does not know it."""
        return await self._run(self._model_plan(name), timeout)

    async def classify(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        top_k: int = 5,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[list[Prediction]]:
        """The ``top_k`` most probable classes of each image, best first: one list per image."""
        return await self._run(self._classify_plan(images, model, top_k), timeout)

    async def logits(
        self,
        images: ImageInput | Iterable[ImageInput],
        model: str = DEFAULT_MODEL,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> np.ndarray:
        """The model's raw outputs, float32 ``[N, C]``, one row per image."""
        return await self._run(self._logits_plan(images, model), timeout)

    # -- sending: the only part that differs from Client -------------------------------

    async def _run(self, plan: Plan[T], timeout: Timeout) -> T:
        seconds = self._timeout(timeout)
        try:
            calls = next(plan)
            while True:
                calls = plan.send(await self._gather([self._send(call, seconds) for call in calls]))
        except StopIteration as done:
            return done.value
        finally:
            plan.close()

    async def _send(self, call: proto.Call, timeout: float | None) -> Any:
        attempts = self._attempts(call.rpc, timeout)
        while True:
            try:
                return await self._method(call.rpc)(call.request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.backoff(error))  # raises instead when there is no retry left

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


def _credentials(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if tls is True:
        return grpc.ssl_channel_credentials()  # the system's root certificates
    if tls is False:
        return None
    raise TypeError(f"tls must be a bool or grpc.ChannelCredentials, got {type(tls).__name__}")


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
