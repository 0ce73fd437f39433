"""The models a server holds: building them, their state, their queue and workers.

Three kinds of served model share one shape (:class:`ServedModel`):

- built-in models (``alexnet``...), loaded at start-up;
- internal feature extractors (``alexnet:features``), made on demand for
  fine-tuning jobs from the built-in model's instances, weights shared;
- fine-tuned models: a base model's features followed by a trained head.

Internal models are not listed and cannot be reached over the wire.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from service.batching import BatchQueue
from service.config import ServeConfig
from service.devices import resolve_dtype
from service.errors import BuiltinModelError, InvalidInputError, ModelNotFoundError, UnavailableError
from service.finetune.names import is_model_name
from service.metrics import ServerMetrics
from service.models import ModelSpec, WeightsSource, build_model, get_model_spec
from service.preprocess import ImageDecoder
from service.runtime import InferenceWorker, ModelInstance

log = logging.getLogger(__name__)

BUILTIN_PLATFORM = "pytorch_torchvision"
FINETUNED_PLATFORM = "vision_finetuned"
FEATURES_SUFFIX = ":features"


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ServedModel:
    """A model as the data plane sees it: metadata, queue and the workers behind it."""

    name: str
    labels: list[str]
    num_outputs: int
    input_size: int  # side of the square IMAGE preprocessing produces
    min_size: tuple[int, int]  # smallest PIXELS height and width
    platform: str
    decoder: ImageDecoder
    queue: BatchQueue
    base_model: str | None = None
    version: str = "1"
    state: ModelState = ModelState.LOADING
    reason: str = ""
    workers: list[InferenceWorker] = field(default_factory=list)
    # Unloaded on request (RepositoryModelUnload) or never loaded since: such a model does
    # not count against the server's readiness.
    unloaded: bool = False

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def instances(self) -> list[ModelInstance]:
        return [worker.instance for worker in self.workers]


StateListener = Callable[[ServedModel], None]


class ModelRepository:
    """Builds, holds and stops the served models; announces their state changes."""

    def __init__(self, config: ServeConfig, devices: list[torch.device], metrics: ServerMetrics) -> None:
        self._config = config
        self._devices = devices
        self._metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._internal: dict[str, ServedModel] = {}
        self._retired: list[ServedModel] = []
        self._listeners: list[StateListener] = []
        self._lock = threading.Lock()  # guards building internal models from several jobs
        self._store_pending = config.model_store is not None  # fine-tuned models not read yet

    @property
    def devices(self) -> list[torch.device]:
        return list(self._devices)

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def names(self) -> list[str]:
        return list(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def builtin_names(self) -> list[str]:
        return [m.name for m in self._models.values() if m.base_model is None]

    @property
    def store_read(self) -> bool:
        """Whether every model of the store that can be served is (no store: always)."""
        return not self._store_pending

    def mark_store_read(self) -> None:
        """The model store has been read once: from now on an unknown name is NOT_FOUND."""
        self._store_pending = False

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            if self._store_pending and is_model_name(name):
                raise UnavailableError(
                    f"model {name!r} is not loaded yet: the server is still reading its model store; retry shortly"
                ) from None
            served = ", ".join(self._models) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served here; served models: {served}") from None

    def get_ready(self, name: str) -> ServedModel:
        return _require_ready(self.get(name))

    # -- built-in models -------------------------------------------------

    def declare_builtin(self, names: list[str]) -> None:
        """Register the built-in models as LOADING, so they are known before they load."""
        for name in names:
            spec = get_model_spec(name)
            self._models[name] = self._new_served(
                name, spec, spec.categories, spec.num_classes, platform=BUILTIN_PLATFORM
            )

    async def load_builtin(self, weights: WeightsSource) -> None:
        """Build and warm up every declared built-in model, one after the other.

        Raises the first failure after marking that model UNAVAILABLE.
        """
        for model in [m for m in self._models.values() if m.base_model is None]:
            if model.state is not ModelState.LOADING:
                continue
            await self._build_builtin(model, weights)

    async def _build_builtin(self, model: ServedModel, weights: WeightsSource) -> None:
        spec = get_model_spec(model.name)
        try:
            module = await asyncio.to_thread(build_model, spec, weights)
            instances = await asyncio.to_thread(self._place, module)
            await asyncio.to_thread(self._start_workers, model, instances)
        except Exception as exc:
            self._set_state(model, ModelState.UNAVAILABLE, str(exc))
            raise
        model.unloaded = False
        self._set_state(model, ModelState.READY)
        log.info("model %s ready on %s (weights: %s)", model.name, self._device_names(), weights.describe())

    # -- explicit unloading and loading ------------------------------------

    async def unload(self, name: str, reason: str = "") -> None:
        """Stop serving ``name`` and free its memory (idempotent).

        Requests still queued are answered UNAVAILABLE; a batch already running
        finishes. The workers stop and the modules are dropped; for a built-in
        model, its feature extractor too. Fine-tuned models on a built-in one
        share its backbone: unload them first, or its memory stays held.
        The model stays listed, UNAVAILABLE, with ``reason``.
        """
        model = self.get(name)
        if model.unloaded:
            return
        if model.state is ModelState.LOADING:
            raise UnavailableError(f"model {name!r} is still loading; unload it once it is ready")
        reason = reason or "unloaded by RepositoryModelUnload; RepositoryModelLoad serves it again"
        model.unloaded = True
        self._set_state(model, ModelState.UNAVAILABLE, reason)
        stopping = [model]
        features = self._internal.pop(name + FEATURES_SUFFIX, None) if model.base_model is None else None
        if features is not None:
            stopping.append(features)
        refusal = UnavailableError(f"model {name!r} was unloaded before this request ran: {reason}")
        for served in stopping:
            served.queue.close_rejecting(refusal)
        for served in stopping:
            for worker in served.workers:
                await asyncio.to_thread(worker.join)
            served.workers.clear()
        self._retired = [m for m in self._retired if any(w.alive for w in m.workers)]
        log.info("model %s unloaded", name)

    async def load(self, name: str, weights: WeightsSource) -> None:
        """Build built-in model ``name`` again after :meth:`unload`, warm it up and serve it.

        A no-op for a model that is loaded or loading. Raises what failed,
        leaving the model UNAVAILABLE with the reason.
        """
        current = self.get(name)
        if current.base_model is not None:
            raise InvalidInputError(f"{name!r} is a fine-tuned model; it loads from the model store")
        if not current.unloaded:
            return
        spec = get_model_spec(name)
        model = self._new_served(name, spec, spec.categories, spec.num_classes, platform=BUILTIN_PLATFORM)
        model.unloaded = True  # until it is ready
        self._models[name] = model
        self._set_state(model, ModelState.LOADING)
        await self._build_builtin(model, weights)

    # -- derived models ----------------------------------------------------

    def features_model(self, base: str) -> ServedModel:
        """The internal feature extractor of built-in model ``base`` (made on first use)."""
        base_model = self.get_ready(base)
        if base_model.base_model is not None:
            raise ModelNotFoundError(f"{base!r} is a fine-tuned model; fine-tune from a built-in model instead")
        name = base + FEATURES_SUFFIX
        with self._lock:
            model = self._internal.get(name)
            if model is None:
                spec = get_model_spec(base)
                labels = [f"feature_{i}" for i in range(spec.feature_dim)]
                model = self._new_served(name, spec, labels, spec.feature_dim, platform=BUILTIN_PLATFORM)
                model.base_model = base
                instances = [i.derive(spec.features(i.module)) for i in base_model.instances]
                self._start_workers(model, instances, warm_up=False)
                model.state = ModelState.READY
                self._internal[name] = model
        return model

    def install_finetuned(
        self, name: str, base: str, head: torch.nn.Module, labels: list[str], version: str
    ) -> ServedModel:
        """Serve ``head`` on ``base``'s features as ``name``, replacing an older version.

        Blocking (warm-up forward passes): call it from a worker thread.
        """
        existing = self._models.get(name)
        if existing is not None and existing.base_model is None:
            raise BuiltinModelError(name, "replaced by a fine-tuned model")
        base_model = self.get_ready(base)
        spec = get_model_spec(base)
        model = self._new_served(name, spec, labels, len(labels), platform=FINETUNED_PLATFORM)
        model.base_model = base
        model.version = version
        instances = [
            i.derive(torch.nn.Sequential(spec.features(i.module), _copy_to(head, i.device)))
            for i in base_model.instances
        ]
        self._start_workers(model, instances)
        return model

    def activate(self, model: ServedModel) -> None:
        """Make an installed model the one served under its name (in the event loop)."""
        previous = self._models.get(model.name)
        self._models[model.name] = model
        self._set_state(model, ModelState.READY)
        if previous is not None:
            self._retire(previous)

    def version_of(self, name: str) -> str | None:
        model = self._models.get(name)
        return None if model is None else model.version

    def discard(self, model: ServedModel) -> None:
        """Stop an installed model that will not be activated."""
        self._retire(model)

    def remove_finetuned(self, name: str, reason: str = "deleted") -> None:
        model = self.get(name)
        if model.base_model is None:
            raise BuiltinModelError(name, "deleted")
        del self._models[name]
        self._set_state(model, ModelState.UNAVAILABLE, reason)
        self._retire(model)

    async def stop(self) -> None:
        """Close every queue and wait for the workers to finish what was queued."""
        models = [*self._models.values(), *self._internal.values(), *self._retired]
        for model in models:
            model.queue.close()
        for model in models:
            for worker in model.workers:
                await asyncio.to_thread(worker.join)

    # -- internals ---------------------------------------------------------

    def _retire(self, model: ServedModel) -> None:
        """Stop taking work for ``model``; what it queued is still answered."""
        model.queue.close()
        self._retired = [m for m in self._retired if any(w.alive for w in m.workers)] + [model]

    def _new_served(
        self, name: str, spec: ModelSpec, labels: list[str], num_outputs: int, *, platform: str
    ) -> ServedModel:
        gauge = self._metrics.pending_images.labels(name)
        return ServedModel(
            name=name,
            labels=labels,
            num_outputs=num_outputs,
            input_size=spec.crop_size,
            min_size=spec.min_size,
            platform=platform,
            decoder=ImageDecoder(spec.transforms(), max_pixels=self._config.max_image_pixels),
            queue=BatchQueue(capacity_images=self._config.batching.max_queue_size, on_depth_change=gauge.inc),
        )

    def _place(self, module: torch.nn.Module) -> list[ModelInstance]:
        return [
            ModelInstance.place(
                module,
                device,
                dtype=resolve_dtype(self._config.dtype, device),
                channels_last=self._config.channels_last,
            )
            for device in self._devices
        ]

    def _start_workers(self, model: ServedModel, instances: list[ModelInstance], *, warm_up: bool = True) -> None:
        batching = self._config.batching
        for instance in instances:
            worker = InferenceWorker(
                model.name,
                model.queue,
                instance,
                max_batch_size=batching.max_batch_size,
                max_delay_s=batching.max_queue_delay_s,
                on_batch=partial(self._metrics.record_batch, model.name, version=model.version),
                warm_up_shape=(3, model.input_size, model.input_size) if warm_up else None,
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


def _require_ready(model: ServedModel) -> ServedModel:
    if model.state is ModelState.LOADING:
        raise UnavailableError(f"model {model.name!r} is still loading; retry shortly")
    if model.state is not ModelState.READY:
        raise UnavailableError(f"model {model.name!r} is unavailable: {model.reason}")
    return model


def _copy_to(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return copy.deepcopy(module).to(device).eval()
