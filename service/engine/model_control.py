"""Explicit model control: unloading and loading models while the server runs.

Triton's model repository extension (``RepositoryModelLoad``/``Unload``) over our two kinds of
served model:

- a built-in model (one of ``--models``) is built again from its weights source, warmed up,
  and served (:class:`BuiltinModels`);
- a fine-tuned model is read again from the model store (the version it serves) and put on its
  base model's backbone, which must be loaded (:class:`FineTunedModels`).

Fine-tuned models share their base model's backbone, so unloading a built-in model unloads the
fine-tuned models on it too (to free the memory), and loading it again brings those back. One
operation runs at a time.
"""

from __future__ import annotations

import asyncio
import logging

from service.engine.loader import UNLOADED_REASON, BuiltinModels
from service.engine.repository import ModelRepository
from service.errors import ModelNotFoundError, VisionServeError, quote
from service.finetune.catalog import FineTunedModels
from service.models import list_models

log = logging.getLogger(__name__)


class ModelControl:
    def __init__(self, repository: ModelRepository, builtin: BuiltinModels, finetuned: FineTunedModels) -> None:
        self._repository = repository
        self._builtin = builtin
        self._finetuned = finetuned
        self._lock = asyncio.Lock()
        self._unloaded_with_base: dict[str, set[str]] = {}  # base -> fine-tuned models unloaded with it

    async def unload(self, name: str) -> None:
        async with self._lock:
            model = self._repository.get(name)
            if model.base_model is not None:
                await self._finetuned.unload(name, UNLOADED_REASON)
                return
            dependents = [m.name for m in self._repository.all() if m.base_model == name and not m.unloaded]
            for dependent in dependents:
                await self._finetuned.unload(
                    dependent, f"its base model {quote(name)} was unloaded; loading {quote(name)} serves it again"
                )
            self._unloaded_with_base.setdefault(name, set()).update(dependents)
            await self._builtin.unload(name)

    async def load(self, name: str) -> None:
        if name not in self._repository and name in list_models():
            raise ModelNotFoundError(
                f"{quote(name)} is a built-in model this server was not started with; "
                "restart it with the model in --models (those load at start and can then be unloaded and loaded)"
            )
        async with self._lock:
            model = self._repository.get(name)
            if model.base_model is not None:
                await self._finetuned.load(name)
                return
            await self._builtin.load(name)
            for dependent in sorted(self._unloaded_with_base.pop(name, set())):
                if dependent not in self._repository or not self._repository.get(dependent).unloaded:
                    continue
                try:
                    await self._finetuned.load(dependent)
                except VisionServeError as exc:
                    log.warning("cannot serve %s again after loading %s: %s", dependent, name, exc.message)
