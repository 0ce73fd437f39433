"""The one owner of fine-tuned models: every change of which of them are served goes through here.

Four ways change it, each through the same checks and the same error accounting:

- **publish**: a job that trained a head writes it to the store and serves it;
- **serve from the store**: the store's sync found a new or replaced entry, or
  ``RepositoryModelLoad`` asked for one;
- **withdraw**: ``RepositoryModelUnload`` (or its base model's unload) stops serving it, keeping
  it in the store; a poll that finds it gone from the store stops serving it too;
- **delete**: ``DeleteModel`` takes it out of the store and stops serving it.

The rule: what is in the store and whose base model is served, is served; a job that fails leaves
nothing behind; and when requests race, the end state is what the last one asked for. Loading from
the store and publishing both take a while (reading or writing files, warming the head up), so
each counts the name's withdrawals (:meth:`ModelRepository.withdrawals`) before it starts and
gives up if a delete or an unload came meanwhile, rather than serving what was withdrawn.

Store entries that cannot be served raise :class:`StoreEntryError` with a :class:`StoreReason`;
:meth:`report` logs and counts each once per version of the entry (``vision_store_errors_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from service.errors import (
    BuiltinModelError,
    FailedPreconditionError,
    ModelNotFoundError,
    StoreEntryError,
    StoreWriteError,
    UnavailableError,
    VisionServeError,
    quote,
)
from service.factory import ModelFactory
from service.files import TimedOut, call_with_timeout
from service.finetune.heads import StandardizedHead
from service.finetune.names import is_model_name, validate_model_name
from service.finetune.store import Manifest, ModelStore, StoreReason
from service.finetune.trainer import TrainMetrics
from service.metrics import ServerMetrics
from service.models import get_model_spec
from service.repository import ModelRepository, ServedModel
from vision_client.protocol import FineTuneConfig

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0  # one entry (manifest and weights); a healthy store answers in ms
FINE_TUNING_OFF = "fine-tuning is off: the server was started with --model-store none; start it with --model-store DIR"

Fingerprint = str  # a manifest's ETag in the store's listing


class FineTunedModels:
    def __init__(
        self,
        store: ModelStore | None,
        repository: ModelRepository,
        factory: ModelFactory,
        metrics: ServerMetrics,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.store = store
        self._repository = repository
        self._factory = factory
        self._metrics = metrics
        self._read_timeout_s = read_timeout_s
        self._store_read = store is None
        self._reading: set[str] = set()  # entries being read (a read that timed out may still be running)
        self._reported: dict[str, tuple[str, Fingerprint | None]] = {}  # (reason, fingerprint) last logged
        repository.on_unknown_model(self._unknown)

    # -- the store's first reading -------------------------------------------

    @property
    def store_read(self) -> bool:
        """Whether every model of the store that can be served is (no store: always)."""
        return self._store_read

    def mark_store_read(self) -> None:
        """The store has been read once: from now on an unknown name is NOT_FOUND."""
        self._store_read = True

    def _unknown(self, name: str) -> VisionServeError | None:
        if not self._store_read and is_model_name(name):
            return UnavailableError(
                f"model {quote(name)} is not loaded yet: the server is still reading its model store; retry shortly"
            )
        return None

    def require_store(self) -> ModelStore:
        if self.store is None:
            raise FailedPreconditionError(FINE_TUNING_OFF)
        return self.store

    # -- publish ------------------------------------------------------------

    async def publish(
        self, config: FineTuneConfig, head: StandardizedHead, labels: list[str], metrics: TrainMetrics, job_id: str
    ) -> Manifest:
        """Write a trained head to the store (claiming the name unless ``config.replace``) and serve it.

        The base must be served before anything is written; a base unloaded after the write fails
        the job and takes a new name's entry out again (a replaced one stays: the sync serves it
        once the base is back); a model deleted or unloaded while this ran stays so.
        """
        store = self.require_store()
        name = config.output_model
        self.require_base(config.base_model)
        withdrawals = self._repository.withdrawals(name)
        try:
            manifest = await asyncio.to_thread(
                store.save,
                name=name,
                base_model=config.base_model,
                head_spec=config.head,
                head=head,
                labels=labels,
                loss=config.loss,
                metrics=metrics,
                job_id=job_id,
                replace=config.replace,
            )
        except OSError as exc:
            raise StoreWriteError(store.location, exc) from exc
        try:
            self.require_base(config.base_model)
            model = await self._install(name, config.base_model, head, labels, manifest.version)
        except VisionServeError:
            if not config.replace:
                with contextlib.suppress(VisionServeError, OSError):
                    await asyncio.to_thread(store.delete, name)
            raise
        if self._repository.withdrawals(name) != withdrawals:  # DeleteModel or an unload came first
            self._repository.retire(model)
            raise UnavailableError(f"{quote(name)} was deleted or unloaded while the job published it")
        self._repository.activate(model)
        return manifest

    def base_served(self, base: str) -> bool:
        """Whether built-in model ``base`` is served (safe to ask from a training thread)."""
        return self._repository.get(base).ready

    def require_base(self, base: str) -> None:
        if not self.base_served(base):
            raise UnavailableError(
                f"the base model {quote(base)} was unloaded while the job ran, so its head cannot be served; "
                f"load {quote(base)} (RepositoryModelLoad) and run the job again"
            )

    # -- serve from the store -------------------------------------------------

    def reading(self, name: str) -> bool:
        """Whether a read of ``name`` is still running (one that timed out may be)."""
        return name in self._reading

    async def serve_stored(self, name: str) -> str:
        """Serve the store's version of ``name`` (a poll's find); that version.

        :class:`StoreEntryError` when it cannot be; ``WITHDRAWN`` when a delete or an unload
        came while it was read, ``MISSING`` when there is no manifest.
        """
        builtin = set(self._repository.builtin_names())
        if name in builtin:
            raise StoreEntryError(
                StoreReason.BUILTIN_NAME, f"{name}: the name of a built-in model; the entry is ignored"
            )
        withdrawals = self._repository.withdrawals(name)
        manifest, head = await self._read(name)
        if self._repository.served_version(name) == manifest.version:
            return manifest.version  # already served (this server wrote it, or only the file's time changed)
        if manifest.base_model not in builtin:
            raise StoreEntryError(
                StoreReason.BASE_NOT_SERVED,
                f"{name}: base model {quote(manifest.base_model)} is not served by this server",
            )
        if not self.base_served(manifest.base_model):
            raise StoreEntryError(
                StoreReason.BASE_UNLOADED,
                f"{name}: base model {quote(manifest.base_model)} is not loaded; it is served once that is loaded",
            )
        expected = get_model_spec(manifest.base_model).feature_dim
        if manifest.feature_dim != expected:
            raise StoreEntryError(
                StoreReason.BAD_DIMENSIONS,
                f"{name}: the head takes {manifest.feature_dim} features but {manifest.base_model} gives {expected}",
            )
        try:
            model = await self._install(name, manifest.base_model, head, manifest.labels, manifest.version)
        except BuiltinModelError as exc:
            raise StoreEntryError(StoreReason.BUILTIN_NAME, exc.message) from exc
        except VisionServeError as exc:
            raise StoreEntryError(StoreReason.INSTALL_FAILED, f"{name}: {exc.message}") from exc
        except Exception as exc:
            log.exception("installing %s from the store failed", name)
            raise StoreEntryError(StoreReason.INSTALL_FAILED, f"{name}: {type(exc).__name__}: {exc}"[:500]) from exc
        if self._repository.served_version(name) == manifest.version:  # the job that wrote it got there first
            self._repository.retire(model)
            return manifest.version
        if self._repository.withdrawals(name) != withdrawals:  # DeleteModel or an unload came first
            self._repository.retire(model)
            raise StoreEntryError(StoreReason.WITHDRAWN, f"{name}: deleted or unloaded while it was read")
        self._repository.activate(model)
        log.info("serving fine-tuned model %s (version %s, base %s)", name, manifest.version, manifest.base_model)
        return manifest.version

    async def load(self, name: str) -> None:
        """``RepositoryModelLoad`` of a fine-tuned model that was unloaded: read it from the store
        again (its newest version) and serve it; the same checks and accounting as a poll's."""
        model = self._repository.get(name)
        if not model.unloaded:
            return
        base = model.base_model
        if base is not None and not self.base_served(base):
            raise UnavailableError(
                f"cannot load {quote(name)}: its base model {quote(base)} is not loaded; load {quote(base)} first"
            )
        if self.store is None:
            raise ModelNotFoundError(f"{quote(name)} has no model store to load from")
        try:
            version = await self.serve_stored(name)
        except StoreEntryError as exc:
            self.report(name, exc, None)
            if exc.reason is StoreReason.MISSING:
                raise ModelNotFoundError(f"{quote(name)} is no longer in the model store") from exc
            raise UnavailableError(f"cannot load {quote(name)} from the model store: {exc}") from exc
        log.info("model %s loaded (version %s, base %s)", name, version, base)

    async def _install(
        self, name: str, base: str, head: StandardizedHead, labels: list[str], version: str
    ) -> ServedModel:
        """Build (and warm up, in a worker thread) ``head`` on ``base``'s backbone; not yet served."""
        if name in self._repository.builtin_names():
            raise BuiltinModelError(name, "replaced by a fine-tuned model")
        base_model = self._repository.get_ready(base)
        return await asyncio.to_thread(self._factory.start_finetuned, name, base_model, head, labels, version)

    async def _read(self, name: str) -> tuple[Manifest, StandardizedHead]:
        store = self.require_store()
        self._reading.add(name)

        def read() -> tuple[Manifest, StandardizedHead]:
            try:
                return store.load(name)
            finally:
                self._reading.discard(name)  # only once the read really returned

        try:
            return await call_with_timeout(read, self._read_timeout_s, f"store-read-{name}")
        except FileNotFoundError:
            raise StoreEntryError(StoreReason.MISSING, f"{name}: there is no manifest (deleted meanwhile?)") from None
        except TimedOut as exc:
            raise StoreEntryError(
                StoreReason.TIMEOUT,
                f"{name}: the model store {store.location} gave no answer within {exc.timeout_s:g}s; "
                "it is tried again once the read returns",
            ) from None
        except OSError as exc:
            raise StoreEntryError(StoreReason.UNREADABLE, f"{name}: {exc}") from exc

    # -- withdraw and delete ----------------------------------------------------

    async def unload(self, name: str, reason: str) -> None:
        """Stop serving fine-tuned model ``name``, keeping it listed and in the store."""
        await self._repository.stop_serving(name, reason)

    def gone_from_store(self, name: str) -> None:
        """A poll found ``name`` no longer in the store: stop serving it."""
        if name in self._repository and self._repository.get(name).base_model is not None:
            log.info("model %s was deleted from the store; no longer serving it", name)
            self._repository.remove(name, reason="deleted from the model store")

    def delete(self, name: str) -> None:
        """``DeleteModel``: take ``name`` out of the store and stop serving it.

        The withdrawal is counted whether or not ``name`` is served yet, so that a job publishing
        it or a poll reading it right now gives up rather than serving it after the delete.
        """
        if name in self._repository.builtin_names():
            raise BuiltinModelError(name, "deleted")
        validate_model_name(name, "name")  # INVALID_ARGUMENT with the rule, not NOT_FOUND
        store = self.require_store()
        store.delete(name)  # NOT_FOUND if the store holds no such model
        if name in self._repository:
            self._repository.remove(name, reason="deleted")
        else:
            self._repository.withdraw(name)

    # -- accounting -----------------------------------------------------------

    def report(self, name: str, error: StoreEntryError, fingerprint: Fingerprint | None) -> None:
        """Log and count an entry's error once (again only if the entry or the error changes)."""
        reason = StoreReason(error.reason)
        if not reason.counted:
            return
        key = (reason.value, fingerprint)
        if self._reported.get(name) == key:
            return
        self._reported[name] = key
        self._metrics.record_store_error(reason.value)
        log.error("model store: skipping %r (%s): %s", name, reason.value, error)

    def forget_report(self, name: str) -> None:
        """``name`` is served or gone: its next error is news again."""
        self._reported.pop(name, None)
