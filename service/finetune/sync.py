"""Keeps the served fine-tuned models in step with the model store, by polling.

Replicas sharing one store see each other's heads (new, replaced, rolled back, deleted) within
one poll interval: a publish and a rollback both replace the model's manifest, whose fingerprint
the listing shows. Each pass lists the store once (one request per thousand objects on S3; the cost
does not grow with the weights), in a daemon thread with a time limit; each new or changed entry
is handed to the catalog (:class:`FineTunedModels`), which reads, checks and serves it. An entry
that cannot be served is logged and counted once (the catalog's :meth:`~FineTunedModels.report`)
and every other entry, start-up, readiness and shutdown go on. An entry is read again only when
its manifest changes, or on every pass while its reason says it may yet be served (a read that
timed out, a base model that is unloaded).

The first complete pass over the store calls ``on_first_pass``: until then the server does not
call itself ready, and answers UNAVAILABLE for models it does not know yet (they may be in the store).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.engine.repository import ModelRepository
from service.errors import StoreEntryError
from service.finetune.catalog import READ_TIMEOUT_S, FineTunedModels, Fingerprint
from service.finetune.store import ModelStore, StoredModel, StoreReason
from service.host.files import TimedOut, call_with_timeout

log = logging.getLogger(__name__)


class StoreSync:
    def __init__(
        self,
        catalog: FineTunedModels,
        repository: ModelRepository,
        *,
        interval_s: float,
        read_timeout_s: float = READ_TIMEOUT_S,
        on_first_pass: Callable[[], object] = lambda: None,
    ) -> None:
        self._catalog = catalog
        self._store: ModelStore = catalog.require_store()
        self._repository = repository
        self._interval_s = interval_s
        self._read_timeout_s = read_timeout_s
        self._on_first_pass = on_first_pass
        self._seen: dict[str, tuple[Fingerprint, str | None]] = {}  # manifest last read and its version
        self._listing = False  # a listing of the store is running
        self.passes = 0

    async def run_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:
                log.exception("model store sync failed; retrying in %.1fs", self._interval_s)
            await asyncio.sleep(self._interval_s)

    async def sync_once(self) -> None:
        """One pass: stop serving what was deleted, serve what is new or changed."""
        if self._listing:
            return  # the last listing has not returned (a hung store): do not pile up threads
        self._listing = True

        def entries() -> tuple[dict[str, Fingerprint], dict[str, StoreEntryError]]:
            try:
                listing, errors = self._store.listing()
                self._collect_orphans(listing)
                return {n: s.manifest.etag for n, s in listing.items() if s.manifest is not None}, errors
            finally:
                self._listing = False

        try:
            stored, errors = await call_with_timeout(entries, self._read_timeout_s, "store-list")
        except (OSError, TimedOut) as exc:
            error = StoreEntryError(
                StoreReason.UNREADABLE_STORE, f"cannot list the model store {self._store.location}: {exc}"
            )
            self._catalog.report("", error, None)
            return
        for name, error in errors.items():
            self._catalog.report(name, error, None)
        for model in self._repository.all():
            if model.base_model is not None and model.name not in stored and model.name not in errors:
                self._catalog.gone_from_store(model.name)
        for name in [n for n in self._seen if n not in stored]:
            del self._seen[name]
            self._catalog.forget_report(name)
        unloaded = {m.name for m in self._repository.all() if m.unloaded}  # loading one later reads the store
        for name, fingerprint in stored.items():
            seen = self._seen.get(name)
            if self._catalog.reading(name) or name in unloaded:
                continue
            if seen is not None and seen[0] == fingerprint and self._current(name, seen[1]):
                continue
            try:
                version = await self._catalog.serve_stored(name)
            except StoreEntryError as exc:
                reason = StoreReason(exc.reason)
                if reason in (StoreReason.MISSING, StoreReason.WITHDRAWN):
                    continue  # deleted or unloaded while we looked: the next pass sees what stands
                self._catalog.report(name, exc, fingerprint)
                if reason.retried:
                    continue  # not served yet: tried again by every pass (logged once) until it is
                version = None
            else:
                self._catalog.forget_report(name)
            self._seen[name] = (fingerprint, version)
        self.passes += 1
        if self.passes == 1:
            self._on_first_pass()
        await self._catalog.collect_exports()  # what replicas replaced or deleted no longer needs its export

    def _collect_orphans(self, listing: dict[str, StoredModel]) -> None:
        """Delete what writers left behind (weights no manifest names, past the grace period).

        Part of the pass's listing thread: it costs requests only when the listing shows leftovers.
        """
        try:
            deleted = self._store.collect_orphans(listing)
        except (OSError, StoreEntryError) as exc:
            log.warning("model store: collecting leftovers failed; trying again next poll: %s", exc)
            return
        if deleted:
            log.info("model store: deleted %d leftover objects: %s", len(deleted), ", ".join(deleted[:10]))

    def _current(self, name: str, version: str | None) -> bool:
        """Whether what is served under ``name`` is what the store held when last read (a job or a
        rollback of this server may have activated another version meanwhile); ``version`` is the
        store's id of the version read."""
        return version is None or self._catalog.served_revision(name) == version
