"""The data plane: every inference goes through here, whatever the transport.

It checks the request against the model, decodes images in a thread pool,
splits the images into work items of at most ``max_batch_size``, queues them
and awaits their outputs. It knows nothing of gRPC or protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from service.batching import WorkItem
from service.config import ServeConfig
from service.errors import InvalidInputError, QueueClosedError, UnavailableError, VisionServeError
from service.metrics import ServerMetrics
from service.repository import ModelRepository, ServedModel


@dataclass(frozen=True)
class InferenceInput:
    """Exactly one of: encoded images, or preprocessed pixels [N, 3, H, W]."""

    images: Sequence[bytes] | None = None
    pixels: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        if self.images is not None:
            return len(self.images)
        assert self.pixels is not None
        return int(self.pixels.shape[0])


class DataPlane:
    def __init__(
        self,
        config: ServeConfig,
        repository: ModelRepository,
        metrics: ServerMetrics,
        decode_pool: Executor,
    ) -> None:
        self._config = config
        self.repository = repository
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._requests: set[asyncio.Task[object]] = set()  # the tasks of requests in flight
        self._abandoning = False

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
            and self.repository.store_read
            and bool(models)
            and all(m.ready for m in models if not m.unloaded)
        )

    def model_ready(self, name: str) -> bool:
        return not self._draining and self.repository.get(name).ready

    # -- inference -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def track(self, model_name: str) -> AsyncIterator[None]:
        """Count one request (status, latency) and hold off draining while it runs."""
        if self._draining:
            raise UnavailableError("the server is shutting down; retry on another replica")
        started = time.monotonic()
        status = "OK"
        self._in_flight += 1
        self._idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._requests.add(task)
        try:
            yield
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
            self._requests.discard(task)  # type: ignore[arg-type]
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            # Unknown names share one label so that clients cannot grow the series without bound.
            label = model_name if model_name in self.repository else ""
            version = self.repository.version_of(label) or "1"
            self._metrics.record_request(label, status, time.monotonic() - started, version)

    async def infer(self, model_name: str, inputs: InferenceInput, *, timeout: float | None = None) -> np.ndarray:
        """Logits [N, C] (float32) of the model for ``inputs``."""
        model = self.repository.get_ready(model_name)
        while True:
            try:
                return await self.infer_model(model, inputs, timeout=timeout)
            except QueueClosedError:
                # A new version replaced the model between lookup and queueing: use that one.
                current = self.repository.get_ready(model_name)
                if current is model:
                    raise
                model = current

    async def infer_model(
        self, model: ServedModel, inputs: InferenceInput, *, timeout: float | None = None
    ) -> np.ndarray:
        """Like :meth:`infer`, for a model already in hand (internal feature extractors)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if inputs.images is not None:
            pixels = await self._decode(model, inputs.images)
        else:
            assert inputs.pixels is not None
            pixels = self._check_pixels(model, inputs.pixels)
        return await self._run(model, pixels, deadline)

    async def _decode(self, model: ServedModel, images: Sequence[bytes]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        tensors = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, model.decoder, data, i) for i, data in enumerate(images))
        )
        return torch.stack(tensors)

    def _check_pixels(self, model: ServedModel, pixels: np.ndarray) -> torch.Tensor:
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
                f"PIXELS of {height}x{width} exceed the limit of {self._config.max_image_pixels} pixels per image"
            )
        return torch.from_numpy(np.array(pixels, dtype=np.float32, copy=True))

    async def _run(self, model: ServedModel, pixels: torch.Tensor, deadline: float | None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[np.ndarray]] = []
        items: list[WorkItem] = []
        for chunk in torch.split(pixels, self._config.batching.max_batch_size):
            future: asyncio.Future[np.ndarray] = loop.create_future()
            futures.append(future)
            items.append(
                WorkItem(
                    pixels=chunk,
                    on_result=partial(_resolve_from_thread, loop, future),
                    deadline=deadline,
                    is_cancelled=future.cancelled,
                )
            )
        model.queue.put(items)
        try:
            outputs = await asyncio.gather(*futures)
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


def _resolve_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: object) -> None:
    """Hand a worker thread's result to the event loop that awaits it."""

    def resolve() -> None:
        if future.done():
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(resolve)
