"""The data plane: every inference goes through here, whatever the transport.

It checks the request against the model, decodes images in a thread pool,
splits the images into work items of at most ``max_batch_size``, queues them
and awaits their outputs. It knows nothing of gRPC or protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Any

import numpy as np
import torch

from service.config import ServeConfig
from service.engine.batching import Reservation, WorkItem
from service.engine.metrics import ServerMetrics
from service.engine.repository import ModelRepository, ServedModel
from service.errors import (
    InvalidInputError,
    QueueClosedError,
    UnavailableError,
    VisionServeError,
)
from service.inference.inference_io import InferenceInput, InferenceResult, too_many_images
from service.inference.preprocess import decode_rows
from service.telemetry.tracing import RequestTrace

# PIXELS tensors view the request's read-only bytes (_pixels_view) and nothing writes into
# them: torch's warning about such arrays says nothing here. A filter set once, not a
# catch_warnings() per request, which swaps process-wide state under the other threads.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class RequestRecord:
    """What :meth:`DataPlane.track` counts a request under: the result, once there is one."""

    result: InferenceResult | None = None

    def ran(self, result: InferenceResult) -> InferenceResult:
        self.result = result
        return result


class DataPlane:
    def __init__(
        self,
        config: ServeConfig,
        repository: ModelRepository,
        metrics: ServerMetrics,
        decode_pool: Executor,
        *,
        models_known: Callable[[], bool] = lambda: True,
    ) -> None:
        """``models_known``: whether every model that can be served is known (false while a model
        store that may hold more has not been read): the server is not ready before."""
        self._config = config
        self.repository = repository
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._models_known = models_known
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._requests: set[asyncio.Task[object]] = set()  # the tasks of requests in flight
        self._abandoning = False
        self._answers: LoopAnswers | None = None  # how workers hand results to the event loop

    @property
    def config(self) -> ServeConfig:
        return self._config

    @property
    def decode_pool(self) -> Executor:
        return self._decode_pool

    # -- readiness -------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready: not draining, every model ready, and the model store read (so that a
        restarted replica serves every fine-tuned model it can before it takes traffic)."""
        models = self.repository.all()
        # Models unloaded on request (RepositoryModelUnload) do not make the server unready.
        return (
            not self._draining
            and self._models_known()
            and bool(models)
            and all(m.ready for m in models if not m.unloaded)
        )

    def model_ready(self, name: str) -> bool:
        return not self._draining and self.repository.get(name).ready

    # -- inference -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def track(
        self, model_name: str, protocol: str = "grpc", trace: RequestTrace | None = None
    ) -> AsyncIterator[RequestRecord]:
        """Count one request (status, latency) and hold off draining while it runs.

        The caller hands the result to the record (:meth:`RequestRecord.ran`): the request is
        counted under the model and version that ran it, not under a second lookup's answer (the
        model may have been replaced meanwhile). ``trace``: the request's trace, ended here with its
        status (its id is the latency histogram's exemplar)."""
        if self._draining:
            if trace is not None:
                trace.finish("UNAVAILABLE")
            raise UnavailableError("the server is shutting down; retry on another replica")
        started = time.monotonic()
        status = "OK"
        self._in_flight += 1
        self._idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._requests.add(task)
        record = RequestRecord()
        try:
            yield record
        except VisionServeError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            if not self._abandoning:
                status = "CANCELLED"
                raise
            # Cancelled by abandon_in_flight, not by the client: the request will not run here.
            status = "UNAVAILABLE"
            raise UnavailableError(
                "the server is shutting down and could not finish this request within its drain time; "
                "retry on another replica"
            ) from None
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self._requests.discard(task)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            if record.result is not None:
                label, version = record.result.model_name, record.result.model_version
            else:
                # Unknown names share one label so that clients cannot grow the series without bound.
                label = model_name if model_name in self.repository else ""
                version = self.repository.version_of(label) or "1"
            if trace is None:
                self._metrics.record_request(label, status, time.monotonic() - started, version, protocol)
            else:
                trace.set("vision.model_version", version)
                trace.finish(status)
                self._metrics.record_request(
                    label, status, time.monotonic() - started, version, protocol, trace_id=trace.trace_id
                )

    async def infer(
        self,
        model_name: str,
        inputs: InferenceInput,
        *,
        version: str = "",
        timeout: float | None = None,
        trace: RequestTrace | None = None,
    ) -> InferenceResult:
        """Run ``inputs`` through the model served as ``model_name``.

        The result names the model and version that ran and carries that model's labels,
        so that a model replaced meanwhile can never pair its labels with another's logits.
        ``version``: empty for whatever version is served, else the one that must run.
        """
        self.check_request_images(inputs.batch_size)
        model = await self.repository.get_version_ready(model_name, version)  # another kept one loads on demand
        while True:
            try:
                logits = await self.infer_model(model, inputs, timeout=timeout, trace=trace)
            except QueueClosedError:
                # A new version replaced the model between lookup and queueing: use that one.
                current = await self.repository.get_version_ready(model_name, version)
                if current is model:
                    raise
                model = current
                continue
            return InferenceResult(
                model_name=model.name, model_version=model.version, logits=logits, labels=model.labels
            )

    def model(self, name: str, version: str = "") -> ServedModel:
        """The model that answers for ``version`` of ``name`` now (empty: the one served; another
        kept version: its model if resident, else the one served); NOT_FOUND for a version not kept."""
        return self.repository.check_version(name, version)

    async def model_version(self, name: str, version: str = "") -> ServedModel:
        """The model of ``version`` of ``name`` (empty: the one served), loaded if it is another kept one."""
        return await self.repository.get_version_ready(name, version)

    @property
    def max_request_images(self) -> int:
        return self._config.request_images_limit

    def check_request_images(self, count: int) -> None:
        """Refuse a request with more images than one request may carry."""
        if count > self._config.request_images_limit:
            raise too_many_images(count, self._config.request_images_limit)

    async def infer_model(
        self,
        model: ServedModel,
        inputs: InferenceInput,
        *,
        timeout: float | None = None,
        trace: RequestTrace | None = None,
    ) -> np.ndarray:
        """Logits [N, C] (float32) of ``model`` for ``inputs`` (also for internal feature extractors).

        Room in the model's queue is reserved before any image is decoded: a request the
        queue cannot take costs nothing but this check.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with model.queue.reserve(inputs.batch_size) as reservation:
            if inputs.images is not None:
                if trace is None:
                    pixels = await self._decode(model, inputs.images)
                else:
                    with trace.phase("decode"):
                        pixels = await self._decode(model, inputs.images)
            else:
                assert inputs.pixels is not None
                self._check_pixels(model, inputs.pixels)
                view = _pixels_view(inputs.pixels)
                if view is not None:
                    pixels = view
                else:  # a large copy stays off the event loop
                    loop = asyncio.get_running_loop()
                    pixels = await loop.run_in_executor(self._decode_pool, _pixels_copy, inputs.pixels)
            return await self._run(model, pixels, deadline, reservation, trace)

    async def _decode(self, model: ServedModel, images: Sequence[bytes]) -> torch.Tensor:
        """Decode ``images`` into one [N, 3, S, S] tensor in the decode pool.

        At most as many at a time as the pool has threads (``preprocess.decode_rows``).
        """
        side = model.input_size
        output = np.empty((len(images), 3, side, side), dtype=np.float32)
        await decode_rows(model.decoder, images, output, self._decode_pool, self._config.decode_thread_count)
        return torch.from_numpy(output)  # a view: the rows the decodes wrote are the tensor's

    def _check_pixels(self, model: ServedModel, pixels: np.ndarray) -> None:
        _, channels, height, width = pixels.shape
        if channels != 3:
            raise InvalidInputError(f"PIXELS must have 3 channels (shape [N,3,H,W]), got {channels}")
        min_h, min_w = model.min_size
        if height < min_h or width < min_w:
            raise InvalidInputError(
                f"PIXELS of {height}x{width} are smaller than {model.name}'s minimum input of {min_h}x{min_w}"
            )
        if height * width > self._config.max_image_pixels:
            raise InvalidInputError(
                f"PIXELS of {height}x{width} exceed the limit of {self._config.max_image_pixels} pixels per image "
                "(--max-image-pixels)"
            )
        if not _all_finite(pixels):
            raise InvalidInputError(
                "PIXELS hold NaN or infinite values; send finite, preprocessed values "
                "(a network's output for them is meaningless)"
            )

    async def _run(
        self,
        model: ServedModel,
        pixels: torch.Tensor,
        deadline: float | None,
        reservation: Reservation,
        trace: RequestTrace | None = None,
    ) -> np.ndarray:
        loop = asyncio.get_running_loop()
        answers = self._answers
        if answers is None or answers.loop is not loop:
            answers = self._answers = LoopAnswers(loop)
        futures: list[asyncio.Future[np.ndarray]] = []
        items: list[WorkItem] = []
        limit = self._config.batching.max_batch_size
        chunks = (pixels,) if pixels.shape[0] <= limit else torch.split(pixels, limit)
        item_trace = None if trace is None else trace.item()
        for index, chunk in enumerate(chunks):
            future: asyncio.Future[np.ndarray] = loop.create_future()
            futures.append(future)
            items.append(
                WorkItem(
                    pixels=chunk,
                    on_result=partial(answers.put, future),
                    deadline=deadline,
                    is_cancelled=future.cancelled,
                    completes_request=index == len(chunks) - 1,
                    trace=item_trace,
                )
            )
        reservation.put(items)
        try:
            outputs = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        except BaseException:
            for future in futures:
                future.cancel()  # queued siblings are dropped before compute
            raise
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    # -- shutdown --------------------------------------------------------

    def start_draining(self) -> None:
        self._draining = True

    def abandon_in_flight(self) -> int:
        """Stop every request still in flight (the drain time ran out): each is answered
        UNAVAILABLE, so that its client retries elsewhere; the number stopped."""
        self._abandoning = True
        for task in self._requests:
            task.cancel()
        return len(self._requests)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


def _pixels_view(pixels: np.ndarray) -> torch.Tensor | None:
    """The request's pixels as a float32 tensor without a copy, if they allow one (aligned
    float32, as ``raw_input_contents`` are; ``fp32_contents`` may not be); else None.

    The tensor views the request's (read-only) bytes: nothing writes into a model's input
    (batches are gathered into memory of their own, or run as they are).
    """
    if pixels.dtype != np.float32 or not (pixels.flags.c_contiguous and pixels.flags.aligned):
        return None
    return torch.from_numpy(pixels)


def _pixels_copy(pixels: np.ndarray) -> torch.Tensor:
    """A float32 tensor of its own (a decode pool job)."""
    return torch.from_numpy(np.array(pixels, dtype=np.float32, copy=True))


class LoopAnswers:
    """Hands worker threads' results (an array, or the exception that stands for it) to one event
    loop's futures, with one wake-up of the loop for all the results handed over while it has not
    run yet: a batch of N requests is answered with one ``call_soon_threadsafe`` (a write to the
    loop's self-pipe and a wake-up each), not N."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Future[Any], object]] = []

    def put(self, future: asyncio.Future[Any], value: object) -> None:
        """From any thread: resolve ``future`` with ``value`` on the loop."""
        with self._lock:
            self._waiting.append((future, value))
            if len(self._waiting) > 1:
                return  # a wake-up is on its way and takes this one too
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for future, value in waiting:
            if future.done():
                continue
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)


def _all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite, at the cost of a minimum and a maximum (NaN carries into both,
    infinities show in one; a third of the time of a sum, which also ran on the event loop for
    every PIXELS request). Any doubt is settled element-wise."""
    if values.size == 0:
        return True
    with np.errstate(invalid="ignore"):
        if np.isfinite(values.min()) and np.isfinite(values.max()):
            return True
    return bool(np.isfinite(values).all())
