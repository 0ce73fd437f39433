"""Explicit model control: unloading and loading models while the server runs.

Triton's model repository extension (``RepositoryModelLoad``/``Unload``) over
our two kinds of served model:

- a built-in model (one of ``--models``) is built again from its weights source,
  warmed up, and served;
- a fine-tuned model is read again from the model store (its newest version) and
  put on its base model's backbone, which must be loaded.

Fine-tuned models share their base model's backbone, so unloading a built-in
model unloads the fine-tuned models on it too (to free the memory), and loading
it again brings those back. One operation runs at a time.
"""

from __future__ import annotations

import asyncio
import logging

from service.errors import ModelNotFoundError, UnavailableError, VisionServeError, quote
from service.finetune.store import StoreEntryError
from service.finetune.sync import StoreSync
from service.models import WeightsSource, list_models
from service.repository import ModelRepository

log = logging.getLogger(__name__)


class ModelControl:
    def __init__(self, repository: ModelRepository, store_sync: StoreSync | None, weights: WeightsSource) -> None:
        self._repository = repository
        self._store_sync = store_sync
        self._weights = weights
        self._lock = asyncio.Lock()
        self._unloaded_with_base: dict[str, set[str]] = {}  # base -> fine-tuned models unloaded with it

    async def unload(self, name: str) -> None:
        async with self._lock:
            model = self._repository.get(name)
            if model.base_model is None:
                dependents = [m.name for m in self._repository.all() if m.base_model == name and not m.unloaded]
                for dependent in dependents:
                    await self._repository.unload(
                        dependent,
                        reason=f"its base model {quote(name)} was unloaded; loading {quote(name)} serves it again",
                    )
                self._unloaded_with_base.setdefault(name, set()).update(dependents)
            await self._repository.unload(name)

    async def load(self, name: str) -> None:
        if name not in self._repository and name in list_models():
            raise ModelNotFoundError(
                f"{quote(name)} is a built-in model this server was not started with; "
                "restart it with the model in --models (those load at start and can then be unloaded and loaded)"
            )
        async with self._lock:
            model = self._repository.get(name)
            if model.base_model is not None:
                await self._load_finetuned(name, model.base_model)
                return
            await self._repository.load(name, self._weights)
            for dependent in sorted(self._unloaded_with_base.pop(name, set())):
                if dependent not in self._repository or not self._repository.get(dependent).unloaded:
                    continue
                try:
                    await self._load_finetuned(dependent, name)
                except VisionServeError as exc:
                    log.warning("cannot serve %s again after loading %s: %s", dependent, name, exc.message)

    async def _load_finetuned(self, name: str, base: str) -> None:
        if not self._repository.get(name).unloaded:
            return
        if not self._repository.get(base).ready:
            raise UnavailableError(
                f"cannot load {quote(name)}: its base model {quote(base)} is not loaded; load {quote(base)} first"
            )
        if self._store_sync is None:
            raise ModelNotFoundError(f"{quote(name)} has no model store to load from")
        try:
            version = await self._store_sync.serve(name)
        except StoreEntryError as exc:
            if exc.reason == "missing_manifest":
                raise ModelNotFoundError(f"{quote(name)} is no longer in the model store") from exc
            raise UnavailableError(f"cannot load {quote(name)} from the model store: {exc}") from exc
        log.info("model %s loaded (version %s, base %s)", name, version, base)
