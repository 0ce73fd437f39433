"""Keeps the served fine-tuned models in step with the model store, by polling.

Replicas sharing one store see each other's heads (new, replaced, deleted) within
one poll interval. Each entry is read on its own, in a daemon thread, with a time
limit: an entry that is bad (see :class:`StoreEntryError`) or does not answer is
skipped with one logged error and one count in ``vision_store_errors_total{reason}``,
and every other entry, start-up, readiness and shutdown go on. An entry is read
again only when its manifest changes.

The first complete pass over the store calls ``on_first_pass``: until then the
server does not call itself ready, and answers UNAVAILABLE for models it does not
know yet (they may be in the store).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.errors import BuiltinModelError, VisionServeError, quote
from service.files import TimedOut, call_with_timeout
from service.finetune.heads import StandardizedHead
from service.finetune.store import Manifest, ModelStore, StoreEntryError
from service.metrics import ServerMetrics
from service.models import get_model_spec
from service.repository import ModelRepository

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0  # one entry (manifest and weights) or the listing; a healthy store answers in ms

Fingerprint = tuple[int, int, int]


class StoreSync:
    def __init__(
        self,
        store: ModelStore,
        repository: ModelRepository,
        metrics: ServerMetrics,
        *,
        interval_s: float,
        read_timeout_s: float = READ_TIMEOUT_S,
        on_first_pass: Callable[[], object] = lambda: None,
    ) -> None:
        self._store = store
        self._repository = repository
        self._metrics = metrics
        self._interval_s = interval_s
        self._read_timeout_s = read_timeout_s
        self._on_first_pass = on_first_pass
        self._seen: dict[str, tuple[Fingerprint, str | None]] = {}  # manifest last read and its version
        self._reported: dict[str, tuple[str, Fingerprint | None]] = {}  # (reason, fingerprint) last logged
        self._reading: set[str] = set()  # entries being read (a read that timed out may still be running)
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
        """One pass: unload what was deleted, load what is new or changed."""
        if self._listing:
            return  # the last listing has not returned (a hung file system): do not pile up threads
        self._listing = True

        def entries() -> tuple[dict[str, Fingerprint], dict[str, StoreEntryError]]:
            try:
                return self._store.entries()
            finally:
                self._listing = False

        try:
            stored, errors = await call_with_timeout(entries, self._read_timeout_s, "store-list")
        except (OSError, TimedOut) as exc:
            error = StoreEntryError("unreadable_store", f"cannot list the model store {self._store.root}: {exc}")
            self._report("", error, None)
            return
        for name, error in errors.items():
            self._report(name, error, None)
        builtin = set(self._repository.builtin_names())
        for model in self._repository.all():
            if model.base_model is not None and model.name not in stored and model.name not in errors:
                log.info("model %s was deleted from the store; no longer serving it", model.name)
                self._repository.remove_finetuned(model.name, reason="deleted from the model store")
        for name in [n for n in self._seen if n not in stored]:
            del self._seen[name]
            self._reported.pop(name, None)
        unloaded = {m.name for m in self._repository.all() if m.unloaded}  # loading one later reads the store
        for name, fingerprint in stored.items():
            seen = self._seen.get(name)
            if name in self._reading or name in unloaded:
                continue
            if seen is not None and seen[0] == fingerprint and self._current(name, seen[1]):
                continue
            try:
                version = await self._load(name, builtin)
            except StoreEntryError as exc:
                if exc.reason == "missing_manifest":
                    continue  # deleted while we looked: the next pass sees it gone
                self._report(name, exc, fingerprint)
                if exc.reason in ("timeout", "base_unloaded"):
                    continue  # not served yet: tried again by every pass (logged once) until it is
                version = None
            else:
                self._reported.pop(name, None)
            self._seen[name] = (fingerprint, version)
        self.passes += 1
        if self.passes == 1:
            self._on_first_pass()

    async def serve(self, name: str) -> str:
        """Read ``name`` from the store now and serve it (an explicit load); its version.

        The same checks as a poll's, and a failure is logged and counted the same way
        before it is raised.
        """
        try:
            return await self._load(name, set(self._repository.builtin_names()))
        except StoreEntryError as exc:
            if exc.reason != "missing_manifest":
                self._report(name, exc, None)
            raise

    def _current(self, name: str, version: str | None) -> bool:
        """Whether what is served under ``name`` is what the store held when last read
        (a job of this server may have activated another version meanwhile)."""
        return version is None or self._repository.version_of(name) == version

    async def _load(self, name: str, builtin: set[str]) -> str:
        """Serve the store's version of ``name``; that version."""
        if name in builtin:
            raise StoreEntryError("builtin_name", f"{name}: the name of a built-in model; the entry is ignored")
        withdrawals = self._repository.withdrawals(name)
        manifest, head = await self._read(name)
        if self._served_version(name) == manifest.version:
            return manifest.version  # already served (this server wrote it, or only the file's time changed)
        if manifest.base_model not in builtin:
            raise StoreEntryError(
                "base_not_served", f"{name}: base model {quote(manifest.base_model)} is not served by this server"
            )
        if not self._repository.get(manifest.base_model).ready:
            raise StoreEntryError(
                "base_unloaded",
                f"{name}: base model {quote(manifest.base_model)} is not loaded; it is served once that is loaded",
            )
        expected = get_model_spec(manifest.base_model).feature_dim
        if manifest.feature_dim != expected:
            raise StoreEntryError(
                "bad_dimensions",
                f"{name}: the head takes {manifest.feature_dim} features but {manifest.base_model} gives {expected}",
            )
        try:
            model = await asyncio.to_thread(
                self._repository.install_finetuned, name, manifest.base_model, head, manifest.labels, manifest.version
            )
        except BuiltinModelError as exc:
            raise StoreEntryError("builtin_name", exc.message) from exc
        except VisionServeError as exc:
            raise StoreEntryError("install_failed", f"{name}: {exc.message}") from exc
        except Exception as exc:
            log.exception("installing %s from the store failed", name)
            raise StoreEntryError("install_failed", f"{name}: {type(exc).__name__}: {exc}"[:500]) from exc
        if self._served_version(name) == manifest.version:  # the job that wrote it got there first
            self._repository.discard(model)
            return manifest.version
        if self._repository.withdrawals(name) != withdrawals:  # DeleteModel or an unload came first
            self._repository.discard(model)
            raise StoreEntryError("missing_manifest", f"{name}: deleted or unloaded while it was read")
        self._repository.activate(model)
        log.info("serving fine-tuned model %s (version %s, base %s)", name, manifest.version, manifest.base_model)
        return manifest.version

    def _served_version(self, name: str) -> str | None:
        """The version served under ``name``; None when none is (an unloaded model serves nothing)."""
        if name not in self._repository or self._repository.get(name).unloaded:
            return None
        return self._repository.version_of(name)

    async def _read(self, name: str) -> tuple[Manifest, StandardizedHead]:
        self._reading.add(name)

        def read() -> tuple[Manifest, StandardizedHead]:
            try:
                return self._store.load(name)
            finally:
                self._reading.discard(name)  # only once the read really returned

        try:
            return await call_with_timeout(read, self._read_timeout_s, f"store-read-{name}")
        except FileNotFoundError:
            raise StoreEntryError("missing_manifest", f"{name}: the manifest disappeared (deleted meanwhile)") from None
        except TimedOut as exc:
            raise StoreEntryError("timeout", f"{name}: {exc}; it is tried again once the read returns") from None
        except OSError as exc:
            raise StoreEntryError("unreadable", f"{name}: {exc}") from exc

    def _report(self, name: str, error: StoreEntryError, fingerprint: Fingerprint | None) -> None:
        """Log and count an entry's error once (again only if the entry or the error changes)."""
        key = (error.reason, fingerprint)
        if self._reported.get(name) == key:
            return
        self._reported[name] = key
        self._metrics.record_store_error(error.reason)
        log.error("model store: skipping %r (%s): %s", name, error.reason, error)
