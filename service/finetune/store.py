"""The model store: one folder (or key prefix) per fine-tuned model, shared by replicas, trusted by none.

Layout, in a directory or under an ``s3://bucket/prefix`` (:mod:`service.storage`)::

    <name>/manifest.json              the version served: base model, head spec, labels, metrics,
                                      time, the weights file it names (+ sha256); its number and
                                      the numbers of the versions kept
    <name>/manifest-<id>.json         one version's own manifest (the same fields, no numbers)
    <name>/head-<id>.safetensors      that version's head tensors
    .jobs/                            records of finished jobs (:mod:`.history`)

**Versions.** Each publish of a name makes a version, numbered 1, 2, 3... as Triton numbers
them; ``manifest.json`` lists the last ``keep_versions`` (the ``--keep-versions`` option) by
number and store id (``<id>``: the write's time and a random part, unique across replicas) and
says which one is served. A rollback points ``manifest.json`` at an older kept version. Every
change of a name (a publish, a rollback) is one conditional write of ``manifest.json``, so the
rules below cover them all. An object belongs to the version whose id its name carries
(``<kind>-<id>.<ext>``): the garbage collection keeps every object of a kept version, whatever
its kind. A ``manifest.json`` written before versions (no numbers) is version 1, alone.

Writing is two steps, so that two writers of one name (two replicas) never destroy
each other's model: :meth:`ModelStore.stage` writes the weights under a key of their
own, :meth:`ModelStore.commit` then makes the version exist by putting its manifest in
place: create-only for a new name (the write fails if any process created the manifest
first, so ``replace=False`` holds across replicas), conditional on the version it replaces
otherwise. A reader never sees half a model: the manifest, written last, names weights that
are whole. An object is deleted only when the current manifest keeps no version of it and it is
older than :data:`GC_GRACE_S`, so a writer whose manifest has not landed yet, and a reader
that read the previous manifest a moment ago, both still find their object; the leftovers of
a writer that died between the two steps are collected by the poll (:meth:`collect_orphans`).

Reading trusts nothing: object names are confined to the model's folder (no path, no
symlink), objects are read only if their size (``fstat``, ``Content-Length``) is within a
cap, the manifest is checked field by field (with its ``format_version``, and its labels by the
one rule for class names that a job's examples meet) before anything is built from it. A bad
entry raises :class:`StoreEntryError` with a short ``reason`` for the metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service.config import FineTuneLimits
from service.errors import (
    AlreadyExistsError,
    ConflictError,
    InternalError,
    InvalidInputError,
    ModelNotFoundError,
    StoreEntryError,
    UnavailableError,
    quote,
)
from service.finetune.heads import (
    StandardizedHead,
    build_standardized_head,
    build_trained_part,
    trained_blocks,
    upgrade_state,
)
from service.finetune.names import is_model_name
from service.finetune.spec import check_head
from service.finetune.trainer import TrainMetrics
from service.host.files import FileRefused
from service.models import get_model_spec, list_models
from service.models.blocks import check_trained_blocks, trained_state_bytes
from service.storage import (
    ObjectChanged,
    ObjectExists,
    ObjectInfo,
    ObjectStore,
    StoreLocation,
    StoreUnreachable,
    open_objects,
)
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol import HEAD_KINDS, LOSSES, HeadConfig
from vision_client.protocol.fine_tuning import head_from_dict, head_to_dict
from vision_client.protocol.labels import label_problem

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# A model whose backbone's last blocks were trained (its weights hold them): servers of before would
# serve its head on the frozen backbone, so they are told it is newer (they skip it, logged).
TRAINED_BLOCKS_FORMAT = 2
MAX_TRAINED_BLOCKS = 64  # of any model's backbone; each base model's own count is checked too
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FEATURE_DIM = 65_536
GC_GRACE_S = 600.0  # unreferenced weights younger than this are kept: a writer or reader may still need them
MAX_KEPT_VERSIONS = 1_000  # versions a manifest may list (--keep-versions is bounded far below)
_VERSION_ID = r"[0-9]{13}-[0-9a-f]{8}"
_VERSION = re.compile(_VERSION_ID)
_WEIGHTS_FILE = re.compile(rf"head-{_VERSION_ID}\.safetensors")
_VERSION_FILE = re.compile(rf"[a-z]+-({_VERSION_ID})\.[a-z]+")  # any object of one version: its kind, its id
_SHA256 = re.compile(r"[0-9a-f]{64}")
_WEIGHTS_SLACK = 1 << 20  # safetensors header and the standardization buffers


class StoreReason(str, enum.Enum):
    """Why a store entry is not served: the one list of ``vision_store_errors_total``'s reasons.

    ``MISSING`` and ``WITHDRAWN`` are outcomes, not errors: they are never counted or logged.
    """

    # the entry itself
    BAD_NAME = "bad_name"  # the folder's name is not a model name
    BAD_JSON = "bad_json"
    BAD_MANIFEST = "bad_manifest"
    FORMAT_VERSION = "format_version"
    UNKNOWN_HEAD = "unknown_head"
    BAD_LABEL = "bad_label"  # a label the job API would refuse (vision_client.protocol.labels)
    BAD_DIMENSIONS = "bad_dimensions"
    OUTSIDE_FOLDER = "outside_folder"
    MISSING_WEIGHTS = "missing_weights"
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_WEIGHTS = "bad_weights"
    NOT_REGULAR_FILE = "not_regular_file"
    TOO_LARGE = "too_large"
    UNREADABLE = "unreadable"
    UNREADABLE_STORE = "unreadable_store"  # the listing itself failed
    TIMEOUT = "timeout"  # retried by every poll
    # the entry against this server
    BUILTIN_NAME = "builtin_name"
    BASE_NOT_SERVED = "base_not_served"
    BASE_UNLOADED = "base_unloaded"  # retried by every poll
    INSTALL_FAILED = "install_failed"
    # outcomes
    MISSING = "missing"  # no manifest (deleted meanwhile, or never written)
    WITHDRAWN = "withdrawn"  # deleted or unloaded while it was read: stays so

    @property
    def retried(self) -> bool:
        """Tried again by every poll until it is served (logged and counted once)."""
        return self in (StoreReason.TIMEOUT, StoreReason.BASE_UNLOADED)

    @property
    def counted(self) -> bool:
        return self not in (StoreReason.MISSING, StoreReason.WITHDRAWN)


@dataclass(frozen=True)
class VersionRef:
    """One kept version of a model: its number (Triton's version) and its id in the store."""

    number: int
    version: str

    @property
    def manifest_file(self) -> str:
        return version_manifest_file(self.version)


def version_manifest_file(version: str) -> str:
    """The object holding version ``version``'s own manifest."""
    return f"manifest-{version}.json"


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    base_model: str
    head: HeadConfig
    feature_dim: int
    labels: list[str]  # class names, or target names for regression
    loss: str
    metrics: TrainMetrics
    created_at: float
    job_id: str
    weights_file: str
    sha256: str
    # Read from manifest.json: this version's number and the versions kept (served included), by
    # number. A version's own manifest object carries neither (its number is given when committed).
    number: int = 1
    versions: tuple[VersionRef, ...] = ()
    train_backbone_blocks: int = 0  # backbone blocks trained with the head (their weights are in the file)

    @property
    def kept(self) -> tuple[VersionRef, ...]:
        """The versions kept in the store, oldest first (this one alone if none are listed)."""
        return self.versions or (VersionRef(self.number, self.version),)

    def ref(self, number: int) -> VersionRef | None:
        return next((ref for ref in self.kept if ref.number == number), None)

    def current_json(self) -> dict[str, Any]:
        """``manifest.json``: this version's fields, its number and the versions kept."""
        return {
            **self.to_json(),
            "number": self.number,
            "versions": [{"number": ref.number, "version": ref.version} for ref in self.kept],
        }

    def to_json(self) -> dict[str, Any]:
        blocks = {"train_backbone_blocks": self.train_backbone_blocks} if self.train_backbone_blocks else {}
        return {
            "format_version": TRAINED_BLOCKS_FORMAT if blocks else FORMAT_VERSION,
            **blocks,
            "name": self.name,
            "version": self.version,
            "base_model": self.base_model,
            "head": head_to_dict(self.head),
            "feature_dim": self.feature_dim,
            "labels": self.labels,
            "loss": self.loss,
            "metrics": self.metrics.to_json(),
            "created_at": self.created_at,
            "job_id": self.job_id,
            "weights": {"file": self.weights_file, "sha256": self.sha256},
        }

    @classmethod
    def from_json(cls, data: object, folder: str, limits: FineTuneLimits) -> Manifest:
        """A manifest read from folder ``folder``, every field checked; :class:`StoreEntryError` if not."""
        fields = _Fields(data, folder)
        version = fields.get("format_version", int)
        if version not in (FORMAT_VERSION, TRAINED_BLOCKS_FORMAT):
            raise StoreEntryError(
                StoreReason.FORMAT_VERSION,
                f"{folder}: manifest format_version {version} is not {FORMAT_VERSION} (or {TRAINED_BLOCKS_FORMAT}, "
                "with trained backbone blocks), the ones this server reads (written by a newer or older server?)",
            )
        name = fields.get("name", str)
        if name != folder:
            raise StoreEntryError(
                StoreReason.BAD_MANIFEST, f"{folder}: the manifest names another model, {quote(name)}"
            )
        head_data = fields.get("head", dict)
        kind = _Fields(head_data, f"{folder}: head").get("kind", str)
        if kind not in HEAD_KINDS:
            raise StoreEntryError(
                StoreReason.UNKNOWN_HEAD,
                f"{folder}: head kind {quote(kind)} is unknown to this server ({', '.join(HEAD_KINDS)})",
            )
        try:  # the head is data: the protocol's one reading of it (a manifest of before layers has none)
            head = head_from_dict(head_data)
        except ConfigError as exc:
            reason = StoreReason.UNKNOWN_HEAD if "is unknown" in exc.message else StoreReason.BAD_DIMENSIONS
            raise StoreEntryError(reason, f"{folder}: head: {exc.message}") from None
        feature_dim = fields.get("feature_dim", int)
        labels = fields.get("labels", list)
        if not all(isinstance(label, str) for label in labels):
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{folder}: labels must be strings")
        if not 1 <= len(labels) <= limits.max_labels or not 1 <= feature_dim <= MAX_FEATURE_DIM:
            raise StoreEntryError(
                StoreReason.BAD_DIMENSIONS,
                f"{folder}: {feature_dim} features and {len(labels)} labels are out of range "
                f"(1..{MAX_FEATURE_DIM} and 1..{limits.max_labels})",
            )
        for position, label in enumerate(labels):  # the rule a job's labels meet (examples.py)
            if (problem := label_problem(label, limits.max_label_length)) is not None:
                raise StoreEntryError(StoreReason.BAD_LABEL, f"{folder}: label {position} {quote(label)} {problem}")
        try:
            check_head(head, feature_dim, len(labels), limits)
        except InvalidInputError as exc:
            raise StoreEntryError(StoreReason.BAD_DIMENSIONS, f"{folder}: {exc.message}") from exc
        loss = fields.get("loss", str)
        if loss not in LOSSES:
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{folder}: loss {quote(loss)} is unknown")
        weights = _Fields(fields.get("weights", dict), f"{folder}: weights")
        weights_file, sha256 = weights.get("file", str), weights.get("sha256", str)
        if not _WEIGHTS_FILE.fullmatch(weights_file):
            raise StoreEntryError(
                StoreReason.OUTSIDE_FOLDER,
                f"{folder}: weights.file {quote(weights_file)} is not a head-<version>.safetensors file of the "
                "model's own folder",
            )
        version = fields.get("version", str)
        if not _VERSION.fullmatch(version) or not _SHA256.fullmatch(sha256):
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{folder}: malformed version {quote(version)} or sha256")
        try:
            metrics = TrainMetrics.from_json(data.get("metrics", {}) if isinstance(data, dict) else {})
        except (ValueError, OverflowError) as exc:
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{folder}: {exc}") from exc
        number, versions = _versions(fields, folder, version)
        trained_format = fields.get("format_version", int) == TRAINED_BLOCKS_FORMAT
        blocks = _trained_blocks(fields, folder, fields.get("base_model", str), trained_format)
        return cls(
            name=name,
            version=version,
            base_model=fields.get("base_model", str),
            head=head,
            feature_dim=feature_dim,
            labels=list(labels),
            loss=loss,
            metrics=metrics,
            created_at=fields.get("created_at", float),
            job_id=fields.get("job_id", str, ""),
            weights_file=weights_file,
            sha256=sha256,
            number=number,
            versions=versions,
            train_backbone_blocks=blocks,
        )


def _trained_blocks(fields: _Fields, folder: str, base: str, trained_format: bool) -> int:
    """A manifest's ``train_backbone_blocks`` (absent: 0, a frozen backbone), within its base model's
    blocks when this server knows the base, and given exactly when the format says so."""
    blocks: int = fields.get("train_backbone_blocks", int, 0)
    if not 0 <= blocks <= MAX_TRAINED_BLOCKS or (blocks > 0) != trained_format:
        raise StoreEntryError(
            StoreReason.BAD_MANIFEST,
            f"{folder}: train_backbone_blocks {blocks} must be 1 to {MAX_TRAINED_BLOCKS} with format_version "
            f"{TRAINED_BLOCKS_FORMAT}, and absent with {FORMAT_VERSION}",
        )
    if blocks and base in list_models():
        try:
            check_trained_blocks(get_model_spec(base), blocks)
        except InvalidInputError as exc:
            raise StoreEntryError(StoreReason.BAD_DIMENSIONS, f"{folder}: {exc.message}") from exc
    return blocks


def _versions(fields: _Fields, folder: str, version: str) -> tuple[int, tuple[VersionRef, ...]]:
    """The number and the kept versions of a manifest (one written before versions: 1, alone)."""
    number = fields.get("number", int, 1)
    listed = fields.get("versions", list, [{"number": number, "version": version}])
    if not 1 <= len(listed) <= MAX_KEPT_VERSIONS:
        raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{folder}: versions must list 1 to {MAX_KEPT_VERSIONS}")
    refs = []
    for position, entry in enumerate(listed):
        item = _Fields(entry, f"{folder}: versions[{position}]")
        ref = VersionRef(item.get("number", int), item.get("version", str))
        if ref.number < 1 or not _VERSION.fullmatch(ref.version):
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{folder}: versions[{position}] is malformed")
        refs.append(ref)
    numbers = [ref.number for ref in refs]
    if numbers != sorted(set(numbers)) or VersionRef(number, version) not in refs:
        raise StoreEntryError(
            StoreReason.BAD_MANIFEST,
            f"{folder}: versions must be in increasing order, each once, and list the served version {number}",
        )
    return number, tuple(refs)


class _Fields:
    """Typed access to a JSON object, refusing what has the wrong type."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{where}: expected a JSON object")
        self._data = data
        self._where = where

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        value: Any = self._data.get(key, default)
        if value is None:
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{self._where}: {key} is missing")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{self._where}: {key} must be a {kind.__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise StoreEntryError(StoreReason.BAD_MANIFEST, f"{self._where}: {key} must be finite")
        return value


def parse_json(data: bytes, where: str) -> object:
    """JSON from untrusted bytes: NaN and Infinity refused, deep nesting a clean error."""

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not allowed")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=refuse)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StoreEntryError(
            StoreReason.BAD_JSON, f"{where}: not valid JSON: {type(exc).__name__}: {exc}"[:500]
        ) from None


@dataclass
class StoredModel:
    """What one listing shows of a model: its manifest (None while being written or deleted) and files."""

    manifest: ObjectInfo | None = None
    files: list[ObjectInfo] = field(default_factory=list)  # every version's objects and leftover temporary files
    error: str = ""  # the entry could not be listed (a directory store's unreadable folder)


def _version_of(file: str) -> str | None:
    """The version id an object of a model's folder belongs to (None: a temporary file)."""
    match = _VERSION_FILE.fullmatch(file)
    return match.group(1) if match else None


class ModelStore:
    """The fine-tuned models of a store: checked reads, two-step writes, versions, garbage collection.

    ``location`` is a directory, an ``s3://`` location or an :class:`ObjectStore`; every
    guarantee below holds for each (:mod:`service.storage`).
    """

    def __init__(self, location: StoreLocation | ObjectStore, limits: FineTuneLimits | None = None) -> None:
        self.objects = open_objects(location)
        self.limits = limits or FineTuneLimits()
        self.max_weights_bytes = 4 * self.limits.max_head_parameters + _WEIGHTS_SLACK
        self._kept_ids: dict[str, tuple[str, frozenset[str]]] = {}  # name -> (manifest ETag, version ids it keeps)

    @property
    def location(self) -> str:
        return self.objects.location

    @property
    def keep_versions(self) -> int:
        return self.limits.keep_versions

    # -- writing -----------------------------------------------------------

    def save(
        self,
        *,
        name: str,
        base_model: str,
        head_spec: HeadConfig,
        head: StandardizedHead,
        labels: list[str],
        loss: str,
        metrics: TrainMetrics | None = None,
        job_id: str,
        replace: bool = True,
    ) -> Manifest:
        """Write a new version of ``name``: :meth:`stage`, then :meth:`commit`; the committed manifest.

        A write that fails (a full disk, an unreachable bucket) leaves nothing of its own behind.
        """
        manifest: Manifest | None = None
        try:
            manifest = self.stage(
                name=name, base_model=base_model, head_spec=head_spec, head=head, labels=labels, loss=loss,
                metrics=metrics or TrainMetrics(), job_id=job_id,
            )  # fmt: skip
            return self.commit(manifest, replace=replace)
        except BaseException:
            if manifest is not None:
                self._discard(manifest)
            raise

    def _discard(self, staged: Manifest) -> None:
        """Delete a staged version's objects unless the current manifest keeps that version.

        When that cannot be known (the store stopped answering: the manifest's write may have
        landed without its answer reaching us), they stay, for :meth:`collect_orphans`.
        """
        try:
            kept = {ref.version for ref in self.read_manifest(staged.name).kept}
        except (FileNotFoundError, FileRefused, StoreEntryError):
            kept = set()
        except OSError:
            return
        if staged.version not in kept:
            self._delete_version(staged)

    def _delete_version(self, staged: Manifest) -> None:
        for file in (staged.weights_file, version_manifest_file(staged.version)):
            with contextlib.suppress(OSError):
                self.objects.delete(_key(staged.name, file))  # ours, and kept by no manifest

    def stage(
        self,
        *,
        name: str,
        base_model: str,
        head_spec: HeadConfig,
        head: StandardizedHead,
        labels: list[str],
        loss: str,
        metrics: TrainMetrics,
        job_id: str,
    ) -> Manifest:
        """Write the objects of a new version under keys of their own (its weights, then its own
        manifest); nothing serves it yet, and it has no number until :meth:`commit`."""
        _check_name(name)
        version = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        state = {key: value.detach().cpu().contiguous() for key, value in head.state_dict().items()}
        blob = save_safetensors(state, metadata={"format": "pt", "model": name, "version": version})
        weights_file = f"head-{version}.safetensors"
        self.objects.write(_key(name, weights_file), blob)
        manifest = Manifest(
            name=name,
            version=version,
            base_model=base_model,
            head=head_spec,
            feature_dim=int(state["mean"].shape[0]),
            labels=labels,
            loss=loss,
            metrics=metrics,
            created_at=time.time(),
            job_id=job_id,
            weights_file=weights_file,
            sha256=hashlib.sha256(blob).hexdigest(),
            train_backbone_blocks=trained_blocks(head),
        )
        self.objects.write(_key(name, version_manifest_file(version)), _encode(manifest.to_json()))
        return manifest

    def commit(self, manifest: Manifest, *, replace: bool) -> Manifest:
        """Make a staged version the one served, numbered after the newest kept; the manifest as
        committed (its number and the versions kept).

        ``replace=False`` claims the name with a create-only write: ALREADY_EXISTS if another
        writer (another replica) got there first. ``replace=True`` adds a version to the ones it
        finds (keeping the last :attr:`keep_versions`) with a write conditional on the manifest it
        read: ABORTED if another writer published, rolled back or deleted in between, so of two
        replacing at once exactly one wins. Either way the loser's objects go and the winner's
        model stays whole; the versions beyond the last ones kept are collected after the grace.
        """
        key = _key(manifest.name, MANIFEST)
        current = self.objects.head(key) if replace else None
        kept: tuple[VersionRef, ...] = ()
        if current is not None:
            kept = self._kept_for_commit(manifest.name)
        number = max((ref.number for ref in kept), default=0) + 1
        kept = (*kept, VersionRef(number, manifest.version))[-self.keep_versions :]
        committed = dataclasses.replace(manifest, number=number, versions=kept)
        data = _encode(committed.current_json())
        try:
            if current is None:
                self.objects.create(key, data)
            else:
                self.objects.replace(key, data, current.etag)
        except (ObjectExists, ObjectChanged) as exc:
            self._delete_version(manifest)
            if isinstance(exc, ObjectExists) and not replace:
                raise AlreadyExistsError(
                    f"a model named {quote(manifest.name)} appeared in the store while this job ran "
                    "(another replica?); pick another name or set replace"
                ) from None
            raise ConflictError(
                f"another writer (another replica?) wrote or deleted {quote(manifest.name)} while this job "
                "published it; its version stands: run the job again to replace it"
            ) from None
        self.collect_garbage(manifest.name)
        return committed

    def _kept_for_commit(self, name: str) -> tuple[VersionRef, ...]:
        """The versions a new one joins: those of the current manifest (a damaged one: none; one
        written before versions: itself as version 1, whose own manifest is written here)."""
        try:
            current = self.read_manifest(name)
        except FileNotFoundError:
            return ()  # deleted since: the conditional write fails
        except (FileRefused, StoreEntryError) as exc:
            log.warning("model store: %s's manifest cannot be read (%s); its versions start again", name, exc)
            return ()
        if not current.versions or self.objects.head(_key(name, version_manifest_file(current.version))) is None:
            with contextlib.suppress(ObjectExists):
                self.objects.create(_key(name, version_manifest_file(current.version)), _encode(current.to_json()))
        return current.kept

    def roll_back(self, name: str, etag: str, target: Manifest) -> Manifest:
        """Serve kept version ``target`` (read with :meth:`load_version`) instead of the one in the
        manifest whose ETag is ``etag``, with a write conditional on that manifest: ABORTED if
        another writer changed the name since it was read. The versions kept stay as they are."""
        key = _key(name, MANIFEST)
        try:
            self.objects.replace(key, _encode(target.current_json()), etag)
        except ObjectChanged:
            raise ConflictError(
                f"another writer (another replica?) published, rolled back or deleted {quote(name)} while this "
                "rollback read it; read its versions again and retry"
            ) from None
        return target

    def collect_garbage(
        self, name: str, *, grace_s: float = GC_GRACE_S, listing: StoredModel | None = None
    ) -> list[str]:
        """Delete the objects of ``name`` of no version the current manifest keeps (versions beyond
        the last ones kept, a loser's or a dead writer's, temporary files) that are older than
        ``grace_s``; the names deleted. Nothing when the manifest cannot be read for want of an
        answer (the store may be failing: never delete on a guess)."""
        info = self.objects.head(_key(name, MANIFEST))
        keep: frozenset[str] = frozenset()
        if info is not None:
            try:
                keep = frozenset(ref.version for ref in self.read_manifest(name).kept)
            except FileNotFoundError:
                pass
            except (FileRefused, StoreEntryError):
                pass  # a damaged entry's objects go
            except OSError:
                return []
            self._kept_ids[name] = (info.etag, keep)
        stored = listing if listing is not None else self._listing(f"{_check_name(name)}/").get(name, StoredModel())
        cutoff = time.time() - grace_s
        deleted: list[str] = []
        for info in stored.files:
            file = info.key.rsplit("/", 1)[-1]
            if _version_of(file) not in keep and info.modified < cutoff:
                self.objects.delete(info.key)
                deleted.append(file)
        return deleted

    def collect_orphans(self, listing: dict[str, StoredModel], *, grace_s: float = GC_GRACE_S) -> list[str]:
        """Collect the leftovers of every model whose listing shows some (a writer that died between
        its weights and its manifest, a version beyond the last ones kept): keys deleted. Costs
        nothing for a model whose objects all belong to the versions its manifest keeps (known
        from the last read of that manifest, read again only when it changes)."""
        cutoff = time.time() - grace_s
        deleted: list[str] = []
        for gone in [name for name in self._kept_ids if name not in listing]:
            del self._kept_ids[gone]
        for name, stored in listing.items():
            old = [info for info in stored.files if info.modified < cutoff]
            if not old:
                continue
            known = self._kept_ids.get(name)
            if (
                stored.manifest is not None
                and known is not None
                and known[0] == stored.manifest.etag
                and all(_version_of(info.key.rsplit("/", 1)[-1]) in known[1] for info in old)
            ):
                continue
            deleted += [f"{name}/{file}" for file in self.collect_garbage(name, grace_s=grace_s, listing=stored)]
        return deleted

    def delete(self, name: str) -> None:
        """Delete ``name`` and every version it keeps: its manifest first (from then on the model
        does not exist for any reader), then each kept version's objects; what no manifest named
        (a writer's staged objects) goes after the grace."""
        key = _key(name, MANIFEST)
        try:
            current: Manifest | None = self.read_manifest(name)
        except FileNotFoundError:
            raise ModelNotFoundError(f"no fine-tuned model {quote(name)} in the store") from None
        except (FileRefused, StoreEntryError):
            current = None  # a damaged entry can be deleted too
        except StoreUnreachable as exc:
            raise UnavailableError(f"cannot reach the model store to delete {quote(name)}: {exc}; retry") from exc
        try:
            self.objects.delete(key)  # from here on the model does not exist for any reader
        except StoreUnreachable as exc:
            raise UnavailableError(f"cannot reach the model store to delete {quote(name)}: {exc}; retry") from exc
        except OSError as exc:
            raise InternalError(f"cannot delete {quote(name)} from the model store {self.location}: {exc}") from exc
        if current is not None:
            self.objects.delete(_key(name, current.weights_file))
            for ref in current.kept:
                for file in (f"head-{ref.version}.safetensors", ref.manifest_file):
                    self.objects.delete(_key(name, file))
        self.collect_garbage(name)

    # -- reading -----------------------------------------------------------

    def listing(self) -> tuple[dict[str, StoredModel], dict[str, StoreEntryError]]:
        """``({name: its manifest and files}, {entry: error})``: one listing of the whole store.

        A model without a manifest (being written or deleted, or left by a writer that died) is
        listed with ``manifest=None``; hidden entries (job records, temporary files at the top)
        are ignored; an entry whose name is not a model name is an error.
        """
        stored = self._listing("")
        errors: dict[str, StoreEntryError] = {}
        for name in [name for name in stored if not is_model_name(name) or stored[name].error]:
            entry = stored.pop(name)
            errors[name] = (
                StoreEntryError(StoreReason.UNREADABLE, f"{name}: {entry.error}")
                if is_model_name(name)
                else StoreEntryError(
                    StoreReason.BAD_NAME, f"store entry {quote(name)} is not a valid model name; it is ignored"
                )
            )
        return stored, errors

    def entries(self) -> tuple[dict[str, str], dict[str, StoreEntryError]]:
        """``({name: fingerprint of its manifest}, {entry: error})`` of every model with a manifest.

        The fingerprint (the manifest's ETag) changes whenever a manifest is replaced (a publish, a
        rollback).
        """
        stored, errors = self.listing()
        return {name: s.manifest.etag for name, s in stored.items() if s.manifest is not None}, errors

    def _listing(self, prefix: str) -> dict[str, StoredModel]:
        stored: dict[str, StoredModel] = {}
        for info in self.objects.list(prefix):
            name, _, rest = info.key.partition("/")
            if name.startswith("."):
                continue  # job records; temporary files
            model = stored.setdefault(name, StoredModel())
            if info.error:
                model.error = info.error
            if rest == MANIFEST:
                model.manifest = info
            elif _version_of(rest) is not None or (rest.startswith(".") and rest.endswith(".tmp")):
                model.files.append(info)
        return stored

    def exists(self, name: str) -> bool:
        return self.objects.head(_key(name, MANIFEST)) is not None

    def read_manifest(self, name: str) -> Manifest:
        """The checked manifest of ``name`` (the version served); FileNotFoundError if there is none."""
        data = self._read(_key(name, MANIFEST), MAX_MANIFEST_BYTES)
        return Manifest.from_json(parse_json(data, f"{name}/{MANIFEST}"), name, self.limits)

    def current(self, name: str) -> tuple[str, Manifest]:
        """The ETag of ``name``'s manifest and the manifest (NOT_FOUND if there is none): what a
        rollback writes conditionally on. Read after the ETag, so a manifest replaced in between
        makes that write fail, never succeed on stale versions."""
        info = self.objects.head(_key(name, MANIFEST))
        try:
            if info is None:
                raise FileNotFoundError(name)
            return info.etag, self.read_manifest(name)
        except FileNotFoundError:
            raise ModelNotFoundError(f"no fine-tuned model {quote(name)} in the store") from None

    def load(self, name: str) -> tuple[Manifest, StandardizedHead]:
        """The manifest and the head with its trained weights (on the CPU): the version served."""
        manifest = self.read_manifest(name)
        return manifest, self._load_head(manifest)

    def load_version(self, current: Manifest, number: int) -> tuple[Manifest, StandardizedHead]:
        """Kept version ``number`` of the model whose manifest is ``current``, with its head:
        NOT_FOUND, naming the kept versions, if it keeps no such version."""
        ref = current.ref(number)
        if ref is None:
            kept = ", ".join(str(r.number) for r in current.kept)
            raise ModelNotFoundError(
                f"model {quote(current.name)} has no version {number}: the store keeps versions {kept} "
                f"(version {current.number} is served; --keep-versions sets how many are kept)"
            )
        if ref.version == current.version:
            return current, self._load_head(current)
        name = current.name
        try:
            data = self._read(_key(name, ref.manifest_file), MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise StoreEntryError(
                StoreReason.MISSING_WEIGHTS, f"{name}: version {number}'s manifest {ref.manifest_file} is missing"
            ) from None
        own = Manifest.from_json(parse_json(data, f"{name}/{ref.manifest_file}"), name, self.limits)
        if own.version != ref.version:
            raise StoreEntryError(
                StoreReason.BAD_MANIFEST, f"{name}: {ref.manifest_file} describes another version, {own.version}"
            )
        manifest = dataclasses.replace(own, number=number, versions=current.kept)
        return manifest, self._load_head(manifest)

    def _load_head(self, manifest: Manifest) -> StandardizedHead:
        name, blocks = manifest.name, manifest.train_backbone_blocks
        if blocks and manifest.base_model not in list_models():
            raise StoreEntryError(
                StoreReason.BASE_NOT_SERVED,
                f"{name}: its trained blocks are of base model {quote(manifest.base_model)}, unknown to this server",
            )
        largest = self.max_weights_bytes + (
            trained_state_bytes(get_model_spec(manifest.base_model), blocks) if blocks else 0
        )
        try:
            blob = self._read(_key(name, manifest.weights_file), largest)
        except FileNotFoundError:
            raise StoreEntryError(StoreReason.MISSING_WEIGHTS, f"{name}: {manifest.weights_file} is missing") from None
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise StoreEntryError(StoreReason.DIGEST_MISMATCH, f"{name}: weights do not match the manifest's sha256")
        regression = manifest.loss == "mse"
        outputs = len(manifest.labels)
        head = (
            build_trained_part(
                manifest.base_model, blocks, manifest.head, manifest.feature_dim, outputs, regression=regression
            )
            if blocks
            else build_standardized_head(manifest.head, manifest.feature_dim, outputs, regression=regression)
        )
        try:
            tensors = upgrade_state(manifest.head, load_safetensors(blob))  # a store of before layers too
            head.load_state_dict(tensors)
        except Exception as exc:  # safetensors raises its own error types on a malformed header
            raise StoreEntryError(
                StoreReason.BAD_WEIGHTS, f"{name}: weights do not fit the manifest's head: {exc}"[:500]
            ) from exc
        if not all(bool(torch.isfinite(t).all()) for t in head.state_dict().values()):
            raise StoreEntryError(StoreReason.BAD_WEIGHTS, f"{name}: weights hold NaN or infinite values")
        return head.eval()

    def _read(self, key: str, max_bytes: int) -> bytes:
        try:
            return self.objects.read(key, max_bytes)
        except FileRefused as exc:
            raise StoreEntryError(StoreReason(exc.reason), str(exc)) from exc


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2).encode()


def _check_name(name: str) -> str:
    if not is_model_name(name):
        raise ModelNotFoundError(f"{quote(name)} is not a valid fine-tuned model name")
    return name


def _key(name: str, file: str) -> str:
    return f"{_check_name(name)}/{file}"
