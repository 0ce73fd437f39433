"""The models a server holds, by name, and their state; listeners hear every state change.

Three kinds of served model share one shape (:class:`ServedModel`):

- built-in models (``alexnet``...), declared at start-up and loaded in the background;
- internal feature extractors (``alexnet:features``), made on demand for
  fine-tuning jobs from the built-in model's instances, weights shared;
- fine-tuned models: a base model's features followed by a trained head.

Internal models are not listed and cannot be reached over the wire. Building and
starting models is :class:`service.factory.ModelFactory`'s job; this module only
keeps them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import torch

from service.errors import BuiltinModelError, InvalidInputError, ModelNotFoundError, UnavailableError, quote
from service.factory import ModelFactory
from service.finetune.names import is_model_name
from service.metrics import ServerMetrics
from service.models import WeightsSource
from service.served import (
    BUILTIN_PLATFORM,
    FEATURES_SUFFIX,
    FINETUNED_PLATFORM,
    ModelState,
    ServedModel,
)

__all__ = [
    "BUILTIN_PLATFORM",
    "FEATURES_SUFFIX",
    "FINETUNED_PLATFORM",
    "ModelRepository",
    "ModelState",
    "ServedModel",
    "StateListener",
]

log = logging.getLogger(__name__)

StateListener = Callable[[ServedModel], None]


class ModelRepository:
    """Holds and stops the served models; announces their state changes."""

    def __init__(self, factory: ModelFactory, metrics: ServerMetrics, *, store_pending: bool = False) -> None:
        """``store_pending``: a model store will be read, so until :meth:`mark_store_read` an
        unknown (valid) name may be a fine-tuned model not read yet: UNAVAILABLE, not NOT_FOUND."""
        self._factory = factory
        self._metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._internal: dict[str, ServedModel] = {}
        self._retired: list[ServedModel] = []
        self._withdrawals: dict[str, int] = {}  # name -> how often a model of that name was removed or unloaded
        self._listeners: list[StateListener] = []
        self._lock = threading.Lock()  # guards building internal models from several jobs
        self._store_pending = store_pending

    @property
    def devices(self) -> list[torch.device]:
        return self._factory.devices

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
                    f"model {quote(name)} is not loaded yet: the server is still reading its model store; retry shortly"
                ) from None
            served = ", ".join(self._models) or "none"
            raise ModelNotFoundError(f"model {quote(name)} is not served here; served models: {served}") from None

    def get_ready(self, name: str) -> ServedModel:
        return _require_ready(self.get(name))

    # -- built-in models -------------------------------------------------

    def declare_builtin(self, names: list[str]) -> None:
        """Register the built-in models as LOADING, so they are known before they load."""
        for name in names:
            self._models[name] = self._factory.declare_builtin(name)

    async def load_builtin(self, weights: WeightsSource) -> None:
        """Build and warm up every declared built-in model, one after the other.

        Raises the first failure after marking that model UNAVAILABLE.
        """
        for model in [m for m in self._models.values() if m.base_model is None]:
            if model.state is ModelState.LOADING:
                await self._start(model, weights)

    async def _start(self, model: ServedModel, weights: WeightsSource) -> None:
        try:
            await self._factory.start_builtin(model, weights)
        except Exception as exc:
            self._set_state(model, ModelState.UNAVAILABLE, str(exc))
            raise
        model.unloaded = False
        self._set_state(model, ModelState.READY)
        log.info("model %s ready on %s (weights: %s)", model.name, _describe(model), weights.describe())

    # -- explicit unloading and loading ------------------------------------

    async def unload(self, name: str, reason: str = "") -> None:
        """Stop serving ``name`` and free its memory (idempotent).

        Requests still queued are answered UNAVAILABLE; a batch already running
        finishes. The workers stop and the instances are dropped; for a built-in
        model, its feature extractor too. Fine-tuned models on a built-in one
        share its backbone: unload them first, or its memory stays held.
        The model stays listed, UNAVAILABLE, with ``reason``.
        """
        model = self.get(name)
        if model.unloaded:
            return
        if model.state is ModelState.LOADING:
            raise UnavailableError(f"model {quote(name)} is still loading; unload it once it is ready")
        reason = reason or "unloaded by RepositoryModelUnload; RepositoryModelLoad serves it again"
        model.unloaded = True
        self._withdraw(name)
        self._set_state(model, ModelState.UNAVAILABLE, reason)
        stopping = [model]
        if model.base_model is None:
            with self._lock:
                features = self._internal.pop(name + FEATURES_SUFFIX, None)
            if features is not None:
                stopping.append(features)
        refusal = UnavailableError(f"model {quote(name)} was unloaded before this request ran: {reason}")
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
            raise InvalidInputError(f"{quote(name)} is a fine-tuned model; it loads from the model store")
        if not current.unloaded:
            return
        model = self._factory.declare_builtin(name)
        model.unloaded = True  # until it is ready
        self._models[name] = model
        self._set_state(model, ModelState.LOADING)
        await self._start(model, weights)

    # -- derived models ----------------------------------------------------

    def features_model(self, base: str) -> ServedModel:
        """The internal feature extractor of built-in model ``base`` (made on first use)."""
        base_model = self.get_ready(base)
        if base_model.base_model is not None:
            raise ModelNotFoundError(f"{quote(base)} is a fine-tuned model; fine-tune from a built-in model instead")
        name = base + FEATURES_SUFFIX
        with self._lock:
            model = self._internal.get(name)
            if model is None:
                model = self._factory.start_features(base_model)
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
        return self._factory.start_finetuned(name, self.get_ready(base), head, labels, version)

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
        self._withdraw(name)
        self._set_state(model, ModelState.UNAVAILABLE, reason)
        self._retire(model)

    def withdrawals(self, name: str) -> int:
        """How often a model called ``name`` was removed or unloaded: a reader of the store
        compares it before and after a read, so that a model deleted or unloaded meanwhile
        stays so rather than being served again by the read's result."""
        return self._withdrawals.get(name, 0)

    def _withdraw(self, name: str) -> None:
        self._withdrawals[name] = self._withdrawals.get(name, 0) + 1

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

    def _set_state(self, model: ServedModel, state: ModelState, reason: str = "") -> None:
        model.state = state
        model.reason = reason
        ready = state is ModelState.READY
        self._metrics.set_model_state(model.name, ready=ready, runtimes=model.runtimes if ready else {})
        for listener in self._listeners:
            listener(model)


def _describe(model: ServedModel) -> str:
    return ", ".join(f"{device} ({runtime})" for device, runtime in model.runtimes.items())


def _require_ready(model: ServedModel) -> ServedModel:
    if model.state is ModelState.LOADING:
        raise UnavailableError(f"model {quote(model.name)} is still loading; retry shortly")
    if model.state is not ModelState.READY:
        raise UnavailableError(f"model {quote(model.name)} is unavailable: {model.reason}")
    return model
