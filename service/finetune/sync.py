"""Keeps the served fine-tuned models in step with the model store, by polling.

Replicas sharing one store see each other's heads (new, replaced, deleted)
within one poll interval. A model that cannot be read yet (being written by
another replica) is simply tried again at the next poll.
"""

from __future__ import annotations

import asyncio
import logging

from service.errors import VisionServeError
from service.finetune.store import ModelStore, StoreReadError
from service.repository import ModelRepository

log = logging.getLogger(__name__)


class StoreSync:
    def __init__(self, store: ModelStore, repository: ModelRepository, *, interval_s: float) -> None:
        self._store = store
        self._repository = repository
        self._interval_s = interval_s
        self._skipped: set[tuple[str, str]] = set()  # (name, version) already logged as not loadable

    async def run_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:
                log.exception("model store sync failed; retrying in %.1fs", self._interval_s)
            await asyncio.sleep(self._interval_s)

    async def sync_once(self) -> None:
        stored = await asyncio.to_thread(self._store.list_versions)
        served = {m.name: m for m in self._repository.all() if m.base_model is not None}
        for name in served:
            if name not in stored:
                log.info("model %s was deleted from the store; no longer serving it", name)
                self._repository.remove_finetuned(name, reason="deleted from the model store")
        builtin = set(self._repository.builtin_names())
        for name, version in stored.items():
            current = served.get(name)
            unloaded = current is not None and current.unloaded  # loading it later takes the newest version
            if (current is not None and current.version == version) or unloaded or (name, version) in self._skipped:
                continue
            await self._load(name, version, builtin)

    async def _load(self, name: str, version: str, builtin: set[str]) -> None:
        try:
            manifest, head = await asyncio.to_thread(self._store.load, name)
        except StoreReadError as exc:
            log.debug("model %s not readable yet: %s", name, exc)
            return
        if name in builtin or manifest.base_model not in builtin:
            if (name, version) not in self._skipped:
                log.warning(
                    "model store has %s on base %s, which this server does not serve; skipping it",
                    name,
                    manifest.base_model,
                )
                self._skipped.add((name, version))
            return
        try:
            model = await asyncio.to_thread(
                self._repository.install_finetuned, name, manifest.base_model, head, manifest.labels, manifest.version
            )
        except VisionServeError as exc:
            log.warning("cannot serve %s from the store yet: %s", name, exc.message)
            return
        if self._repository.version_of(name) == version:  # the job that wrote it got there first
            self._repository.discard(model)
            return
        self._repository.activate(model)
        log.info("serving fine-tuned model %s (version %s, base %s)", name, manifest.version, manifest.base_model)
