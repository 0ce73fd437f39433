"""Built-in models: declared at start-up, built and warmed up in the background, unloaded and
loaded again on request; and their internal feature extractors, made on first use.

The loader builds (through :class:`ModelFactory`) and writes what it built into the
:class:`ModelRepository`; fine-tuned models have their own owner, :mod:`service.finetune.catalog`.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import torch

from service.engine.factory import ModelFactory
from service.engine.repository import FEATURES_SUFFIX, ModelRepository, ModelState, ServedModel
from service.errors import InvalidInputError, ModelNotFoundError, quote
from service.models import WeightsSource, get_model_spec
from service.models.weights import ensure_pretrained

log = logging.getLogger(__name__)

UNLOADED_REASON = "unloaded by RepositoryModelUnload; RepositoryModelLoad serves it again"


class BuiltinModels:
    def __init__(self, factory: ModelFactory, repository: ModelRepository, weights: WeightsSource) -> None:
        self._factory = factory
        self._repository = repository
        self._weights = weights
        self._lock = threading.Lock()  # guards making a feature extractor for several jobs at once

    def declare(self, names: list[str]) -> None:
        """List the built-in models as LOADING, so that they are known before they load."""
        for name in names:
            self._repository.declare(self._factory.declare_builtin(name))

    async def load_all(self) -> None:
        """Build and warm up every declared built-in model, one after the other.

        Pretrained weights are made sure of for all of them first (one error names every model
        whose weights cannot be had). Raises the first failure after marking that model, or for
        the weights every model waiting, UNAVAILABLE.
        """
        waiting = [m for m in self._repository.all() if m.base_model is None and m.state is ModelState.LOADING]
        if self._weights.kind == "pretrained":
            try:
                await asyncio.to_thread(ensure_pretrained, [get_model_spec(m.name) for m in waiting])
            except Exception as exc:
                for model in waiting:
                    self._repository.set_state(model, ModelState.UNAVAILABLE, str(exc))
                raise
        for model in waiting:
            if model.state is ModelState.LOADING:  # not unloaded while the ones before it loaded
                await self._start(model)

    async def load(self, name: str) -> None:
        """Build built-in model ``name`` again after :meth:`unload`, warm it up and serve it.

        A no-op for a model that is loaded or loading. Raises what failed, leaving the model
        UNAVAILABLE with the reason.
        """
        current = self._repository.get(name)
        if current.base_model is not None:
            raise InvalidInputError(f"{quote(name)} is a fine-tuned model; it loads from the model store")
        if not current.unloaded:
            return
        model = self._factory.declare_builtin(name)
        model.unloaded = True  # until it is ready
        self._repository.declare(model)
        await self._start(model)

    async def unload(self, name: str) -> None:
        """Stop serving built-in model ``name`` and free its memory, its feature extractor's too."""
        await self._repository.stop_serving(name, UNLOADED_REASON)

    def features_model(self, base: str) -> ServedModel:
        """The internal feature extractor of built-in model ``base`` (made on first use)."""
        base_model = self._repository.get_ready(base)
        if base_model.base_model is not None:
            raise ModelNotFoundError(f"{quote(base)} is a fine-tuned model; fine-tune from a built-in model instead")
        with self._lock:
            model = self._repository.internal(base + FEATURES_SUFFIX)
            if model is None:
                model = self._factory.start_features(base_model)
                self._repository.add_internal(model)
        return model

    def network(self, base: str) -> torch.nn.Module:
        """A new float32 CPU copy of built-in ``base``'s network with its served weights (blocking)."""
        return self._factory.base_network(self._repository.get_ready(base).name)

    def start_activations(self, base: str, prefix: torch.nn.Module) -> ServedModel:
        """An internal model running ``prefix`` (the frozen part of ``base``'s backbone) on ``base``'s
        preprocessed images, for one job; the job closes its queue when done (blocking)."""
        return self._factory.start_activations(self._repository.get_ready(base), prefix)

    async def _start(self, model: ServedModel) -> None:
        try:
            await self._factory.start_builtin(model, self._weights)
        except Exception as exc:
            self._repository.set_state(model, ModelState.UNAVAILABLE, str(exc))
            raise
        self._repository.activate(model)
        log.info("model %s ready on %s (weights: %s)", model.name, _describe(model), self._weights.describe())


def _describe(model: ServedModel) -> str:
    return ", ".join(f"{device} ({runtime})" for device, runtime in model.runtimes.items())
