"""The models a server holds: building them, their state, their queue and workers."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.batching import BatchQueue
from service.config import ServeConfig
from service.devices import resolve_dtype
from service.errors import ModelNotFoundError, UnavailableError
from service.metrics import ServerMetrics
from service.models import ModelSpec, WeightsSource, build_model, get_model_spec
from service.preprocess import ImageDecoder
from service.runtime import InferenceWorker, ModelInstance

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ServedModel:
    """A model as the data plane sees it: metadata, queue and the workers behind it."""

    name: str
    labels: list[str]
    input_size: int  # side of the square IMAGE preprocessing produces
    min_size: tuple[int, int]  # smallest PIXELS height and width
    platform: str
    decoder: ImageDecoder
    queue: BatchQueue
    base_model: str | None = None
    state: ModelState = ModelState.LOADING
    reason: str = ""
    workers: list[InferenceWorker] = field(default_factory=list)

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


StateListener = Callable[[ServedModel], None]


class ModelRepository:
    """Builds, holds and stops the served models; announces their state changes."""

    def __init__(self, config: ServeConfig, devices: list[torch.device], metrics: ServerMetrics) -> None:
        self._config = config
        self._devices = devices
        self._metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._listeners: list[StateListener] = []

    @property
    def devices(self) -> list[torch.device]:
        return list(self._devices)

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def names(self) -> list[str]:
        return list(self._models)

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            served = ", ".join(self._models) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served here; served models: {served}") from None

    def get_ready(self, name: str) -> ServedModel:
        model = self.get(name)
        if model.state is ModelState.LOADING:
            raise UnavailableError(f"model {name!r} is still loading; retry shortly")
        if model.state is not ModelState.READY:
            raise UnavailableError(f"model {name!r} is unavailable: {model.reason}")
        return model

    def declare_builtin(self, names: list[str]) -> None:
        """Register the built-in models as LOADING, so they are known before they load."""
        for name in names:
            spec = get_model_spec(name)
            self._models[name] = self._new_served(spec.name, spec, spec.categories, platform="pytorch_torchvision")

    async def load_builtin(self, weights: WeightsSource) -> None:
        """Build and warm up every declared built-in model, one after the other.

        Raises the first failure after marking that model UNAVAILABLE.
        """
        for model in list(self._models.values()):
            if model.state is not ModelState.LOADING:
                continue
            spec = get_model_spec(model.name)
            try:
                module = await asyncio.to_thread(build_model, spec, weights)
                await asyncio.to_thread(self._start_workers, model, module)
            except Exception as exc:
                self._set_state(model, ModelState.UNAVAILABLE, str(exc))
                raise
            self._set_state(model, ModelState.READY)
            log.info("model %s ready on %s (weights: %s)", model.name, self._device_names(), weights.describe())

    async def stop(self) -> None:
        """Close every queue and wait for the workers to finish what was queued."""
        for model in self._models.values():
            model.queue.close()
        for model in self._models.values():
            for worker in model.workers:
                await asyncio.to_thread(worker.join)

    def _new_served(self, name: str, spec: ModelSpec, labels: list[str], *, platform: str) -> ServedModel:
        gauge = self._metrics.pending_images.labels(name)
        return ServedModel(
            name=name,
            labels=labels,
            input_size=spec.crop_size,
            min_size=spec.min_size,
            platform=platform,
            decoder=ImageDecoder(spec.transforms(), max_pixels=self._config.max_image_pixels),
            queue=BatchQueue(capacity_images=self._config.batching.max_queue_size, on_depth_change=gauge.inc),
        )

    def _start_workers(self, model: ServedModel, module: torch.nn.Module) -> None:
        batching = self._config.batching
        for device in self._devices:
            instance = ModelInstance(
                module,
                device,
                dtype=resolve_dtype(self._config.dtype, device),
                channels_last=self._config.channels_last,
            )
            instance.warm_up((3, model.input_size, model.input_size))
            worker = InferenceWorker(
                model.name,
                model.queue,
                instance,
                max_batch_size=batching.max_batch_size,
                max_delay_s=batching.max_queue_delay_s,
                on_batch=lambda stats, name=model.name: self._metrics.record_batch(name, stats),
            )
            worker.start()
            model.workers.append(worker)

    def _set_state(self, model: ServedModel, state: ModelState, reason: str = "") -> None:
        model.state = state
        model.reason = reason
        self._metrics.model_ready.labels(model.name).set(1 if state is ModelState.READY else 0)
        for listener in self._listeners:
            listener(model)

    def _device_names(self) -> str:
        return ", ".join(str(d) for d in self._devices)
