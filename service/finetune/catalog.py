"""The one owner of fine-tuned models: every change of which of them are served goes through here.

Four ways change it, each through the same checks and the same error accounting:

- **publish**: a job that trained a head writes it to the store and serves it;
- **serve from the store**: the store's sync found a new or replaced entry, or
  ``RepositoryModelLoad`` asked for one;
- **withdraw**: ``RepositoryModelUnload`` (or its base model's unload) stops serving it, keeping
  it in the store; a poll that finds it gone from the store stops serving it too;
- **delete**: ``DeleteModel`` takes it out of the store and stops serving it;
- **roll back**: ``RollbackModel`` serves an older version the store keeps, and points the store
  at it (one conditional write, as a publish's), so that every replica follows on its next poll.

Versions: the store numbers each publish of a name (1, 2, 3...) and keeps the last
``--keep-versions``; the served model carries its number (Triton's version), its id in the store
(``revision``) and the numbers kept. A request that names another kept version gets it loaded on
demand (:meth:`load_version`, one load per version however many ask at once), kept resident
as the name's one other version (:meth:`ModelRepository.keep_resident`).

The rule: what is in the store and whose base model is served, is served; a job that fails leaves
nothing behind; and when requests race, the end state is what the last one asked for. Loading from
the store and publishing both take a while (reading or writing files, warming the head up), so
each counts the name's withdrawals (:meth:`ModelRepository.withdrawals`) before it starts and
gives up if a delete or an unload came meanwhile, rather than serving what was withdrawn.

Every version served adds an export of its network to the runtime cache (when its backbone's blocks
were trained); :meth:`collect_exports`, after each publish and rollback and on each poll, leases the
exports of what is served now and deletes those no server uses (``ExportCache.collect``).

Store entries that cannot be served raise :class:`StoreEntryError` with a :class:`StoreReason`;
:meth:`report` logs and counts each once per version of the entry (``vision_store_errors_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from service.engine.factory import ModelFactory
from service.engine.metrics import ServerMetrics
from service.engine.repository import ModelRepository, ModelState, ServedModel
from service.errors import (
    BuiltinModelError,
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
    StoreEntryError,
    StoreWriteError,
    UnavailableError,
    VisionServeError,
    quote,
)
from service.finetune.backbone import start_network
from service.finetune.heads import StandardizedHead, TrainedPart
from service.finetune.names import is_model_name, validate_model_name
from service.finetune.store import Manifest, ModelStore, StoreReason
from service.finetune.trainer import TrainMetrics
from service.host.files import TimedOut, call_with_timeout
from service.models import get_model_spec
from vision_client.protocol import FineTuneConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

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
        self._publishing: set[str] = set()  # names a job of this server is writing and installing now
        self._reported: dict[str, tuple[str, Fingerprint | None]] = {}  # (reason, fingerprint) last logged
        self._version_loads: dict[tuple[str, str, str], asyncio.Task[ServedModel]] = {}  # on-demand loads
        self._collecting = False  # a pass over the runtime cache is running
        repository.on_unknown_model(self._unknown)
        repository.on_version_request(self.load_version)

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
        self._publishing.add(name)
        try:
            return await self._publish(store, config, head, labels, metrics, job_id)
        finally:
            self._publishing.discard(name)

    async def _publish(
        self,
        store: ModelStore,
        config: FineTuneConfig,
        head: StandardizedHead,
        labels: list[str],
        metrics: TrainMetrics,
        job_id: str,
    ) -> Manifest:
        name = config.output_model
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
            model = await self._install(manifest, head)
        except VisionServeError:
            if not config.replace:
                with contextlib.suppress(VisionServeError, OSError):
                    await asyncio.to_thread(store.delete, name)
            raise
        if self._repository.withdrawals(name) != withdrawals:  # DeleteModel or an unload came first
            self._repository.retire(model)
            raise UnavailableError(f"{quote(name)} was deleted or unloaded while the job published it")
        self._repository.activate(model)
        await self.collect_exports()
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
        """Whether a read of ``name`` is still running (one that timed out may be), or a job of this
        server is publishing it (writing it, then building what it serves): a poll that read the new
        manifest meanwhile leaves it to the job rather than build the same network a second time."""
        return name in self._reading or name in self._publishing

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
        if self.served_revision(name) == manifest.version:
            return manifest.version  # served already (written or rolled back to here, or only its time changed)
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
            model = await self._install(manifest, head)
        except BuiltinModelError as exc:
            raise StoreEntryError(StoreReason.BUILTIN_NAME, exc.message) from exc
        except VisionServeError as exc:
            raise StoreEntryError(StoreReason.INSTALL_FAILED, f"{name}: {exc.message}") from exc
        except Exception as exc:
            log.exception("installing %s from the store failed", name)
            raise StoreEntryError(StoreReason.INSTALL_FAILED, f"{name}: {type(exc).__name__}: {exc}"[:500]) from exc
        if self.served_revision(name) == manifest.version:  # the job that wrote it got there first
            self._repository.retire(model)
            return manifest.version
        if self._repository.withdrawals(name) != withdrawals:  # DeleteModel or an unload came first
            self._repository.retire(model)
            raise StoreEntryError(StoreReason.WITHDRAWN, f"{name}: deleted or unloaded while it was read")
        self._repository.activate(model)
        log.info(
            "serving fine-tuned model %s (version %d, %s in the store, base %s)",
            name, manifest.number, manifest.version, manifest.base_model,
        )  # fmt: skip
        return manifest.version

    def served_revision(self, name: str) -> str | None:
        """The store id of the version served under ``name``; None when none is."""
        if name not in self._repository:
            return None
        model = self._repository.get(name)
        return None if model.unloaded else model.revision

    async def load(self, name: str) -> None:
        """``RepositoryModelLoad`` of a fine-tuned model that was unloaded: read it from the store
        again (the version its store serves) and serve it; the same checks and accounting as a poll's."""
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

    async def _install(self, manifest: Manifest, head: StandardizedHead) -> ServedModel:
        """Build (and warm up, in a worker thread) the version ``manifest`` describes with its
        ``head`` on its base model's backbone; not yet served."""
        name = manifest.name
        if name in self._repository.builtin_names():
            raise BuiltinModelError(name, "replaced by a fine-tuned model")
        base_model = self._repository.get_ready(manifest.base_model)
        labels, number = manifest.labels, str(manifest.number)
        if isinstance(head, TrainedPart):  # its backbone's last blocks were trained: the whole new network
            model = await asyncio.to_thread(start_network, self._factory, name, base_model, head, labels, number)
        else:
            model = await asyncio.to_thread(self._factory.start_finetuned, name, base_model, head, labels, number)
        model.revision = manifest.version
        model.versions = tuple(str(ref.number) for ref in manifest.kept)
        return model

    # -- versions -------------------------------------------------------------

    async def load_version(self, served: ServedModel, version: str) -> ServedModel:
        """The model of kept version ``version`` of the model ``served`` (not the one served),
        read from the store and built on demand, then kept resident as the name's other version.
        Requests that ask for it at once share one load."""
        key = (served.name, served.revision, version)
        task = self._version_loads.get(key)
        if task is None:
            task = asyncio.ensure_future(self._build_version(served, version))
            self._version_loads[key] = task
            task.add_done_callback(lambda done: self._version_loaded(key, done))
        return await asyncio.shield(task)

    def _version_loaded(self, key: tuple[str, str, str], task: asyncio.Task[ServedModel]) -> None:
        """A load is over: the next request for the version starts another if it failed (its error
        is read here, so that a load whose requesters all gave up leaves no log of it)."""
        self._version_loads.pop(key, None)
        if not task.cancelled():
            task.exception()

    async def _build_version(self, served: ServedModel, version: str) -> ServedModel:
        name = served.name
        withdrawals = self._repository.withdrawals(name)
        _, _, (manifest, head) = await self._read_version(name, version)
        if manifest.version == self.served_revision(name):  # rolled back to it meanwhile
            return self._repository.get_ready(name)
        try:
            model = await self._install(manifest, head)
        except VisionServeError as exc:
            raise UnavailableError(f"cannot load version {version} of {quote(name)}: {exc.message}") from exc
        if self._repository.withdrawals(name) != withdrawals or name not in self._repository:
            self._repository.retire(model)
            raise UnavailableError(f"{quote(name)} was deleted or unloaded while its version {version} loaded")
        now = self._repository.get(name)
        if version == now.version or version not in now.available_versions:  # a rollback or a publish came
            self._repository.retire(model)
            return await self._repository.get_version_ready(name, version)
        self._repository.keep_resident(model)
        log.info("loaded version %s of %s on demand (%s in the store)", version, name, manifest.version)
        return model

    async def rollback(self, name: str, version: str) -> ServedModel:
        """``RollbackModel``: serve kept version ``version`` of ``name`` and point the store at it.

        The version is read and built before the store is written, so a version that cannot be
        served is refused with the store untouched; the write is conditional on the manifest read,
        so a publish or rollback of another replica in between wins and this one is ABORTED.
        """
        if name in self._repository.builtin_names():
            raise BuiltinModelError(name, "rolled back: it has one version")
        validate_model_name(name, "name")
        store = self.require_store()
        withdrawals = self._repository.withdrawals(name)
        etag, current, (manifest, head) = await self._read_version(name, version)
        served = self._repository.get(name) if name in self._repository else None
        if served is not None and served.unloaded:
            raise UnavailableError(f"{quote(name)} is unloaded; load it (RepositoryModelLoad) before rolling it back")
        resident = self._repository.resident(name)
        if served is not None and served.revision == manifest.version:
            model = served
        elif resident is not None and resident.revision == manifest.version:
            model = resident
        else:
            self.require_base(manifest.base_model)
            model = await self._install(manifest, head)
        if manifest.version != current.version:
            try:
                await self._store_call(lambda: store.roll_back(name, etag, manifest), f"roll back {quote(name)}")
            except VisionServeError:
                if model is not served and model is not resident:
                    self._repository.retire(model)
                raise
        if self._repository.withdrawals(name) != withdrawals:  # DeleteModel or an unload came first
            if model is not served and model is not resident:
                self._repository.retire(model)
            raise UnavailableError(f"{quote(name)} was deleted or unloaded while it was rolled back")
        if model is not served:
            self._repository.activate(model)
        log.info("model %s rolled back to version %s (%s in the store)", name, version, manifest.version)
        await self.collect_exports()
        return model

    async def _read_version(self, name: str, version: str) -> tuple[str, Manifest, tuple[Manifest, StandardizedHead]]:
        """The store's manifest of ``name`` (its ETag, itself) and kept version ``version`` with its head."""
        number = _version_number(version)
        store = self.require_store()

        def read() -> tuple[str, Manifest, tuple[Manifest, StandardizedHead]]:
            etag, current = store.current(name)
            return etag, current, store.load_version(current, number)

        try:
            return await self._store_call(read, f"read version {version} of {quote(name)}")
        except StoreEntryError as exc:
            raise UnavailableError(
                f"version {version} of {quote(name)} cannot be served from the store: {exc}"
            ) from exc

    async def _store_call(self, function: Callable[[], T], what: str) -> T:
        """``function`` on the store in a thread with the read time limit; its failures as errors to answer."""
        store = self.require_store()
        try:
            return await call_with_timeout(function, self._read_timeout_s, "store-version")
        except TimedOut as exc:
            raise UnavailableError(
                f"cannot {what}: the model store {store.location} gave no answer within {exc.timeout_s:g}s; retry"
            ) from None
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"cannot {what}: {exc} is gone from the store (deleted meanwhile?)") from None
        except OSError as exc:
            raise UnavailableError(f"cannot {what}: the model store {store.location} failed: {exc}; retry") from exc

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

    # -- the runtime cache -------------------------------------------------------

    async def collect_exports(self) -> None:
        """Lease the runtime cache's exports of every model served (each name's resident version
        too) and delete the exports no server uses; not while a model is loading (its build may be
        about to use an export nobody leases yet), and one pass at a time. Never raises."""
        models = self._repository.all()
        if self._collecting or any(m.state is ModelState.LOADING and not m.unloaded for m in models):
            return
        models += [r for m in models if (r := self._repository.resident(m.name)) is not None]
        self._collecting = True
        try:
            await asyncio.to_thread(self._factory.collect_exports, models)
        except Exception:
            log.exception("collecting the runtime cache failed; trying again on the next poll")
        finally:
            self._collecting = False

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


def _version_number(version: str) -> int:
    """A fine-tuned model's version as the store numbers it: INVALID_ARGUMENT unless a positive integer."""
    if not (version.isascii() and version.isdigit()) or len(version) > 18 or int(version) < 1:
        raise InvalidInputError(
            f"version {quote(version)} is not a version number: fine-tuned models' versions are 1, 2, 3... "
            "(ModelMetadata's versions, GetModel's versions list them)"
        )
    return int(version)
