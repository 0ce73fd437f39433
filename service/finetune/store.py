"""The model store: one folder (or key prefix) per fine-tuned model, shared by replicas, trusted by none.

Layout, in a directory or under an ``s3://bucket/prefix`` (:mod:`service.storage`)::

    <name>/manifest.json              base model, head spec, labels, metrics, time,
                                      and the weights file it names (+ sha256)
    <name>/head-<version>.safetensors the head's tensors, one object per version
    .jobs/                            records of finished jobs (:mod:`.history`)

Writing is two steps, so that two writers of one name (two replicas) never destroy
each other's model: :meth:`ModelStore.stage` writes the weights under a key of their
own, :meth:`ModelStore.commit` then makes the version exist by putting its manifest in
place: create-only for a new name (the write fails if any process created the manifest
first, so ``replace=False`` holds across replicas), conditional on the version it replaces
otherwise. A reader never sees half a model: the manifest, written last, names weights that
are whole. A weights object is deleted only when no current manifest names it and it is
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
from service.files import FileRefused
from service.finetune.heads import StandardizedHead, build_standardized_head, upgrade_state
from service.finetune.names import is_model_name
from service.finetune.spec import check_head
from service.finetune.trainer import TrainMetrics
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
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FEATURE_DIM = 65_536
GC_GRACE_S = 600.0  # unreferenced weights younger than this are kept: a writer or reader may still need them
_VERSION = re.compile(r"[0-9]{13}-[0-9a-f]{8}")
_WEIGHTS_FILE = re.compile(r"head-[0-9]{13}-[0-9a-f]{8}\.safetensors")
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

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
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
        if version != FORMAT_VERSION:
            raise StoreEntryError(
                StoreReason.FORMAT_VERSION,
                f"{folder}: manifest format_version {version} is not {FORMAT_VERSION}, the one this server reads "
                "(written by a newer or older server?)",
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
        )


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
    """What one listing shows of a model: its manifest (None while being written or deleted) and weights."""

    manifest: ObjectInfo | None = None
    weights: list[ObjectInfo] = field(default_factory=list)  # head files and leftover temporary files
    error: str = ""  # the entry could not be listed (a directory store's unreadable folder)


class ModelStore:
    """The fine-tuned models of a store: checked reads, two-step writes, garbage collection.

    ``location`` is a directory, an ``s3://`` location or an :class:`ObjectStore`; every
    guarantee below holds for each (:mod:`service.storage`).
    """

    def __init__(self, location: StoreLocation | ObjectStore, limits: FineTuneLimits | None = None) -> None:
        self.objects = open_objects(location)
        self.limits = limits or FineTuneLimits()
        self.max_weights_bytes = 4 * self.limits.max_head_parameters + _WEIGHTS_SLACK

    @property
    def location(self) -> str:
        return self.objects.location

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
        """Write a new version of ``name``: :meth:`stage`, then :meth:`commit`.

        A write that fails (a full disk, an unreachable bucket) leaves nothing of its own behind.
        """
        manifest: Manifest | None = None
        try:
            manifest = self.stage(
                name=name, base_model=base_model, head_spec=head_spec, head=head, labels=labels, loss=loss,
                metrics=metrics or TrainMetrics(), job_id=job_id,
            )  # fmt: skip
            self.commit(manifest, replace=replace)
        except BaseException:
            if manifest is not None:
                self._discard(manifest)
            raise
        return manifest

    def _discard(self, staged: Manifest) -> None:
        """Delete a staged version's weights unless the current manifest names them.

        When that cannot be known (the store stopped answering: the manifest's write may have
        landed without its answer reaching us), they stay, for :meth:`collect_orphans`.
        """
        try:
            current: str | None = self.read_manifest(staged.name).weights_file
        except (FileNotFoundError, FileRefused, StoreEntryError):
            current = None
        except OSError:
            return
        if current != staged.weights_file:
            with contextlib.suppress(OSError):
                self.objects.delete(_key(staged.name, staged.weights_file))  # ours, and named by no manifest

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
        """Write the weights of a new version under a key of their own; nothing serves it yet."""
        _check_name(name)
        version = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        state = {key: value.detach().cpu().contiguous() for key, value in head.state_dict().items()}
        blob = save_safetensors(state, metadata={"format": "pt", "model": name, "version": version})
        weights_file = f"head-{version}.safetensors"
        self.objects.write(_key(name, weights_file), blob)
        return Manifest(
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
        )

    def commit(self, manifest: Manifest, *, replace: bool) -> None:
        """Make a staged version the one that exists.

        ``replace=False`` claims the name with a create-only write: ALREADY_EXISTS if another
        writer (another replica) got there first. ``replace=True`` replaces the version it finds
        with a write conditional on that version: ABORTED if another writer replaced or deleted it
        in between, so of two replacing at once exactly one wins. Either way the loser's weights
        go and the winner's model stays whole.
        """
        key = _key(manifest.name, MANIFEST)
        data = json.dumps(manifest.to_json(), indent=2).encode()
        current = self.objects.head(key) if replace else None
        try:
            if current is None:
                self.objects.create(key, data)
            else:
                self.objects.replace(key, data, current.etag)
        except (ObjectExists, ObjectChanged) as exc:
            with contextlib.suppress(OSError):
                self.objects.delete(_key(manifest.name, manifest.weights_file))  # ours, and named by no manifest
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

    def collect_garbage(
        self, name: str, *, grace_s: float = GC_GRACE_S, listing: StoredModel | None = None
    ) -> list[str]:
        """Delete weights and temporary files of ``name`` that the current manifest does not name
        and that are older than ``grace_s``; the names deleted."""
        keep = set()
        with contextlib.suppress(OSError, FileRefused, StoreEntryError):
            keep.add(self.read_manifest(name).weights_file)
        stored = listing if listing is not None else self._listing(f"{_check_name(name)}/").get(name, StoredModel())
        cutoff = time.time() - grace_s
        deleted: list[str] = []
        for info in stored.weights:
            file = info.key.rsplit("/", 1)[-1]
            if file not in keep and info.modified < cutoff:
                self.objects.delete(info.key)
                deleted.append(file)
        return deleted

    def collect_orphans(self, listing: dict[str, StoredModel], *, grace_s: float = GC_GRACE_S) -> list[str]:
        """Collect the leftovers of every model whose listing shows some (a writer that died between
        its weights and its manifest, a replaced version): keys deleted. Costs nothing for a model
        with one weights object and a manifest."""
        cutoff = time.time() - grace_s
        deleted: list[str] = []
        for name, stored in listing.items():
            old = [info for info in stored.weights if info.modified < cutoff]
            if not old or (stored.manifest is not None and len(stored.weights) == 1):
                continue
            deleted += [f"{name}/{file}" for file in self.collect_garbage(name, grace_s=grace_s, listing=stored)]
        return deleted

    def delete(self, name: str) -> None:
        key = _key(name, MANIFEST)
        try:
            weights_file: str | None = self.read_manifest(name).weights_file
        except FileNotFoundError:
            raise ModelNotFoundError(f"no fine-tuned model {quote(name)} in the store") from None
        except (FileRefused, StoreEntryError):
            weights_file = None  # a damaged entry can be deleted too
        except StoreUnreachable as exc:
            raise UnavailableError(f"cannot reach the model store to delete {quote(name)}: {exc}; retry") from exc
        try:
            self.objects.delete(key)  # from here on the model does not exist for any reader
        except StoreUnreachable as exc:
            raise UnavailableError(f"cannot reach the model store to delete {quote(name)}: {exc}; retry") from exc
        except OSError as exc:
            raise InternalError(f"cannot delete {quote(name)} from the model store {self.location}: {exc}") from exc
        if weights_file is not None:
            self.objects.delete(_key(name, weights_file))
        self.collect_garbage(name)

    # -- reading -----------------------------------------------------------

    def listing(self) -> tuple[dict[str, StoredModel], dict[str, StoreEntryError]]:
        """``({name: its manifest and weights}, {entry: error})``: one listing of the whole store.

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

        The fingerprint (the manifest's ETag) changes whenever a manifest is replaced.
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
            elif _WEIGHTS_FILE.fullmatch(rest) or (rest.startswith(".") and rest.endswith(".tmp")):
                model.weights.append(info)
        return stored

    def exists(self, name: str) -> bool:
        return self.objects.head(_key(name, MANIFEST)) is not None

    def read_manifest(self, name: str) -> Manifest:
        """The checked manifest of ``name``; FileNotFoundError if there is none."""
        data = self._read(_key(name, MANIFEST), MAX_MANIFEST_BYTES)
        return Manifest.from_json(parse_json(data, f"{name}/{MANIFEST}"), name, self.limits)

    def load(self, name: str) -> tuple[Manifest, StandardizedHead]:
        """The manifest and the head with its trained weights (on the CPU)."""
        manifest = self.read_manifest(name)
        try:
            blob = self._read(_key(name, manifest.weights_file), self.max_weights_bytes)
        except FileNotFoundError:
            raise StoreEntryError(StoreReason.MISSING_WEIGHTS, f"{name}: {manifest.weights_file} is missing") from None
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise StoreEntryError(StoreReason.DIGEST_MISMATCH, f"{name}: weights do not match the manifest's sha256")
        head = build_standardized_head(
            manifest.head, manifest.feature_dim, len(manifest.labels), regression=manifest.loss == "mse"
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
        return manifest, head.eval()

    def _read(self, key: str, max_bytes: int) -> bytes:
        try:
            return self.objects.read(key, max_bytes)
        except FileRefused as exc:
            raise StoreEntryError(StoreReason(exc.reason), str(exc)) from exc


def _check_name(name: str) -> str:
    if not is_model_name(name):
        raise ModelNotFoundError(f"{quote(name)} is not a valid fine-tuned model name")
    return name


def _key(name: str, file: str) -> str:
    return f"{_check_name(name)}/{file}"
