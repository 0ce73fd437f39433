"""The models a server serves, by name, and their state; listeners hear every state change.

A registry, and nothing more: what is served under each name, its state, who is told when
that changes, and which models were stopped but may still be finishing work. Building models
is the loaders' job (:mod:`service.engine.loader` for built-in models and their feature extractors,
:mod:`service.finetune.catalog` for fine-tuned ones); they write through this registry.

Three kinds of served model share one shape (:class:`ServedModel`): built-in models
(``alexnet``...), internal feature extractors (``alexnet:features``, not listed, not reachable
over the wire) and fine-tuned models (a base model's features followed by a trained head).

**Versions.** A name serves one version (the one a request without ``model_version`` gets).
A fine-tuned model may keep others in the store (:attr:`ServedModel.versions`); a request that
names one of those is run by a model of that version that the catalog loads on demand
(:meth:`on_version_request`); at most one such other version per name is resident
(:meth:`keep_resident`), the one asked for last, so that the memory a name holds is at most two
versions whatever ``--keep-versions`` is (docs/fine-tuning.md says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import torch

from service.engine.metrics import ServerMetrics
from service.engine.served import (
    BUILTIN_PLATFORM,
    FEATURES_SUFFIX,
    FINETUNED_PLATFORM,
    ModelState,
    ServedModel,
)
from service.errors import ModelNotFoundError, UnavailableError, VisionServeError, quote

__all__ = [
    "BUILTIN_PLATFORM",
    "FEATURES_SUFFIX",
    "FINETUNED_PLATFORM",
    "ModelRepository",
    "ModelState",
    "ServedModel",
    "StateListener",
    "UnknownModelHandler",
    "VersionLoader",
]

log = logging.getLogger(__name__)

StateListener = Callable[[ServedModel], None]
# What to raise for a name nothing is served under, instead of NOT_FOUND (None: NOT_FOUND).
UnknownModelHandler = Callable[[str], VisionServeError | None]
# Loads kept version ``version`` of the model served (given), not served: the model that runs it.
VersionLoader = Callable[[ServedModel, str], Awaitable[ServedModel]]


class ModelRepository:
    """Name -> served model, its state and listeners; the one owner of that mapping."""

    def __init__(self, metrics: ServerMetrics, devices: list[torch.device]) -> None:
        self.devices = devices  # where this server's models run
        self._metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._internal: dict[str, ServedModel] = {}
        self._retired: list[ServedModel] = []
        self._withdrawals: dict[str, int] = {}  # name -> how often a model of that name was removed or unloaded
        self._listeners: list[StateListener] = []
        self._unknown: UnknownModelHandler = lambda name: None
        self._resident: dict[str, ServedModel] = {}  # name -> the one other version resident, loaded on demand
        self._load_version: VersionLoader | None = None

    # -- reading -----------------------------------------------------------

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def on_unknown_model(self, handler: UnknownModelHandler) -> None:
        """``handler(name)`` decides what a lookup of an unknown name raises (for example
        UNAVAILABLE while a model store that may hold it has not been read)."""
        self._unknown = handler

    def names(self) -> list[str]:
        return list(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def builtin_names(self) -> list[str]:
        return [m.name for m in self._models.values() if m.base_model is None]

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            error = self._unknown(name)
            if error is not None:
                raise error from None
            served = ", ".join(self._models) or "none"
            raise ModelNotFoundError(f"model {quote(name)} is not served here; served models: {served}") from None

    def get_ready(self, name: str) -> ServedModel:
        return _require_ready(self.get(name))

    def version_of(self, name: str) -> str | None:
        model = self._models.get(name)
        return None if model is None else model.version

    def served_version(self, name: str) -> str | None:
        """The version served under ``name``; None when none is (an unloaded model serves nothing)."""
        model = self._models.get(name)
        return None if model is None or model.unloaded else model.version

    def internal(self, name: str) -> ServedModel | None:
        return self._internal.get(name)

    # -- versions ------------------------------------------------------------

    def on_version_request(self, loader: VersionLoader) -> None:
        """``loader`` builds a kept version that is not resident when a request names it."""
        self._load_version = loader

    def check_version(self, name: str, version: str) -> ServedModel:
        """The model that answers for ``version`` of ``name`` now: the one served when ``version``
        is empty or its own, the resident model of another kept version, else the one served
        (the version loads when a request runs it). NOT_FOUND for a version that is not kept."""
        model = self.get(name)
        if not version or version == model.version:
            return model
        _require_kept(model, version)
        resident = self._resident.get(name)
        return resident if resident is not None and resident.version == version else model

    async def get_version_ready(self, name: str, version: str) -> ServedModel:
        """The ready model that runs ``version`` of ``name`` (empty: the one served), a kept
        version loaded on demand; NOT_FOUND for a version that is not kept."""
        model = self.get_ready(name)
        if not version or version == model.version:
            return model
        _require_kept(model, version)
        resident = self._resident.get(name)
        if resident is not None and resident.version == version:
            return resident
        if self._load_version is None:
            raise ModelNotFoundError(f"model {quote(name)} has no version {quote(version)} loaded here")
        return await self._load_version(model, version)

    def keep_resident(self, model: ServedModel) -> None:
        """Keep ``model``, a version of a served name other than the one served, ready for the
        requests that name it; the other version resident before it stops taking work."""
        previous = self._resident.get(model.name)
        model.state = ModelState.READY
        self._resident[model.name] = model
        if previous is not None and previous is not model:
            self.retire(previous)

    def resident(self, name: str) -> ServedModel | None:
        """The other version of ``name`` resident now, if any."""
        return self._resident.get(name)

    def _drop_resident(self, name: str, served: ServedModel | None = None) -> None:
        """Retire the other version of ``name`` resident, unless it is still another version that
        ``served``, the model now served under ``name``, keeps."""
        resident = self._resident.get(name)
        if resident is None:
            return
        if served is not None and resident.version != served.version and resident.version in served.versions:
            resident.versions = served.versions  # what it lists is the name's, as the model served has it
            return
        del self._resident[name]
        if resident is not served:  # a rollback to it makes it the one served
            self.retire(resident)

    # -- writing (by the loaders) -------------------------------------------

    def declare(self, model: ServedModel) -> None:
        """List ``model`` under its name in its current state (a model about to load)."""
        self._models[model.name] = model
        self.set_state(model, model.state, model.reason)

    def activate(self, model: ServedModel) -> None:
        """Serve ``model`` under its name, READY; the model it replaces stops taking work."""
        previous = self._models.get(model.name)
        self._models[model.name] = model
        model.unloaded = False
        self.set_state(model, ModelState.READY)
        if previous is not None and previous is not model:
            self.retire(previous)
        self._drop_resident(model.name, served=model)

    def add_internal(self, model: ServedModel) -> None:
        model.state = ModelState.READY
        self._internal[model.name] = model

    def remove(self, name: str, reason: str) -> ServedModel:
        """Stop listing ``name``; what it queued is still answered."""
        model = self._models.pop(name)
        self._drop_resident(name)
        self.withdraw(name)
        self.set_state(model, ModelState.UNAVAILABLE, reason)
        self.retire(model)
        return model

    async def stop_serving(self, name: str, reason: str) -> None:
        """Keep ``name`` listed, UNAVAILABLE with ``reason``, and free its memory (idempotent).

        Requests still queued are answered UNAVAILABLE; a batch already running finishes. The
        workers stop and the instances are dropped; for a built-in model, its feature extractor too.
        """
        model = self.get(name)
        if model.state is ModelState.LOADING and not model.unloaded:
            raise UnavailableError(f"model {quote(name)} is still loading; unload it once it is ready")
        self.withdraw(name)  # also when unloaded already: a load of it under way must not serve it
        if model.unloaded:
            return
        model.unloaded = True
        self.set_state(model, ModelState.UNAVAILABLE, reason)
        stopping = [model]
        resident = self._resident.pop(name, None)
        if resident is not None:
            stopping.append(resident)
        if model.base_model is None:
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

    def retire(self, model: ServedModel) -> None:
        """Stop taking work for ``model`` (never served, or replaced); what it queued is still answered."""
        model.queue.close()
        self._retired = [m for m in self._retired if any(w.alive for w in m.workers)] + [model]

    def withdraw(self, name: str) -> None:
        """Count one removal or unload of ``name`` (also of a name not served yet: see :meth:`withdrawals`)."""
        self._withdrawals[name] = self._withdrawals.get(name, 0) + 1

    def withdrawals(self, name: str) -> int:
        """How often a model called ``name`` was removed, deleted or unloaded: a loader compares it
        before and after its slow part, so that a model withdrawn meanwhile stays withdrawn rather
        than being served by the load's result."""
        return self._withdrawals.get(name, 0)

    def set_state(self, model: ServedModel, state: ModelState, reason: str = "") -> None:
        model.state = state
        model.reason = reason
        ready = state is ModelState.READY
        self._metrics.set_model_state(model.name, ready=ready, runtimes=model.runtimes if ready else {})
        for listener in self._listeners:
            listener(model)

    async def stop(self) -> None:
        """Close every queue and wait for the workers to finish what was queued."""
        models = [*self._models.values(), *self._internal.values(), *self._resident.values(), *self._retired]
        for model in models:
            model.queue.close()
        for model in models:
            for worker in model.workers:
                await asyncio.to_thread(worker.join)


def _require_kept(model: ServedModel, version: str) -> None:
    if version not in model.available_versions:
        versions = ", ".join(model.available_versions)
        raise ModelNotFoundError(
            f"model {quote(model.name)} has no version {quote(version)}: its versions are {versions} "
            f"(version {model.version} is served); ask for one of them or leave model_version empty"
        )


def _require_ready(model: ServedModel) -> ServedModel:
    if model.state is ModelState.LOADING:
        raise UnavailableError(f"model {quote(model.name)} is still loading; retry shortly")
    if model.state is not ModelState.READY:
        raise UnavailableError(f"model {quote(model.name)} is unavailable: {model.reason}")
    return model
