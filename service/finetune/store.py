"""The model store: one folder per fine-tuned model, shared by replicas, trusted by none.

Layout::

    <store>/<name>/manifest.json              base model, head spec, labels, metrics, time,
                                              and the weights file it names (+ sha256)
    <store>/<name>/head-<version>.safetensors the head's tensors, one file per version
    <store>/.jobs/                            records of finished jobs (:mod:`.history`)

Writing is two steps, so that two writers of one name (two replicas) never destroy
each other's model: :meth:`ModelStore.stage` writes the weights under a name of their
own, :meth:`ModelStore.commit` then makes the version exist by putting its manifest in
place, with ``os.replace`` (replace) or ``os.link`` (create only: the link fails if any
process created the manifest first, so ``replace=False`` holds across replicas). A
weights file is deleted only when no current manifest names it and it is older than
:data:`GC_GRACE_S`, so a writer whose manifest has not landed yet, and a reader that read
the previous manifest a moment ago, both still find their file.

Reading trusts nothing: file names are confined to the model's folder (no path, no
symlink), files are opened without blocking and read only if ``fstat`` says they are
regular and not larger than a cap, the manifest is checked field by field (with its
``format_version``) before anything is built from it. A bad entry raises
:class:`StoreEntryError` with a short ``reason`` for the metric.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service.config import FineTuneLimits
from service.errors import (
    AlreadyExistsError,
    InternalError,
    InvalidInputError,
    ModelNotFoundError,
    StoreEntryError,
    quote,
)
from service.files import FileRefused, read_bounded, sync_directory, write_temporary
from service.finetune.heads import StandardizedHead, build_standardized_head
from service.finetune.names import is_model_name
from service.finetune.spec import check_head
from service.finetune.trainer import TrainMetrics
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol import HEAD_KINDS, LOSSES, HeadConfig

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
            "head": asdict(self.head),
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
        head_fields = _Fields(fields.get("head", dict), f"{folder}: head")
        kind = head_fields.get("kind", str)
        if kind not in HEAD_KINDS:
            raise StoreEntryError(
                StoreReason.UNKNOWN_HEAD,
                f"{folder}: head kind {quote(kind)} is unknown to this server ({', '.join(HEAD_KINDS)})",
            )
        try:
            head = HeadConfig(
                kind=kind,  # one of HEAD_KINDS
                hidden=head_fields.get("hidden", int),
                blocks=head_fields.get("blocks", int),
                dropout=head_fields.get("dropout", float, 0.0),
            )
        except ConfigError as exc:
            raise StoreEntryError(StoreReason.BAD_DIMENSIONS, f"{folder}: {exc.message}") from None
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


class ModelStore:
    def __init__(self, root: Path, limits: FineTuneLimits | None = None) -> None:
        self.root = root
        self.limits = limits or FineTuneLimits()
        self.max_weights_bytes = 4 * self.limits.max_head_parameters + _WEIGHTS_SLACK
        self.root.mkdir(parents=True, exist_ok=True)

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

        A write that fails (a full disk) leaves nothing of its own behind: not its weights, and
        not the model's folder if it made it.
        """
        folder = self._folder(name)
        created = not folder.exists()
        manifest: Manifest | None = None
        try:
            manifest = self.stage(
                name=name, base_model=base_model, head_spec=head_spec, head=head, labels=labels, loss=loss,
                metrics=metrics or TrainMetrics(), job_id=job_id,
            )  # fmt: skip
            self.commit(manifest, replace=replace)
        except BaseException:
            if manifest is not None and self._names_weights(name) != manifest.weights_file:
                (folder / manifest.weights_file).unlink(missing_ok=True)  # ours, and named by no manifest
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: another writer's files keep it
            raise
        return manifest

    def _names_weights(self, name: str) -> str | None:
        """The weights file the current manifest of ``name`` names, if it can be read."""
        try:
            return self.read_manifest(name).weights_file
        except (FileNotFoundError, StoreEntryError):
            return None

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
        """Write the weights of a new version under a file name of their own; nothing serves it yet."""
        folder = self._folder(name)
        version = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        state = {key: value.detach().cpu().contiguous() for key, value in head.state_dict().items()}
        blob = save_safetensors(state, metadata={"format": "pt", "model": name, "version": version})
        weights_file = f"head-{version}.safetensors"
        for attempt in range(3):  # a concurrent delete may remove the (empty) folder between mkdir and write
            folder.mkdir(parents=True, exist_ok=True)
            try:
                temporary = write_temporary(folder, weights_file, blob)
                os.replace(temporary, folder / weights_file)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
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

        ``replace=False`` claims the name atomically (``os.link`` fails if the manifest
        exists, whoever made it): ALREADY_EXISTS if another writer got there first.
        """
        folder = self._folder(manifest.name)
        data = json.dumps(manifest.to_json(), indent=2).encode()
        temporary = write_temporary(folder, MANIFEST, data)
        try:
            if replace:
                os.replace(temporary, folder / MANIFEST)
            else:
                try:
                    os.link(temporary, folder / MANIFEST)
                except FileExistsError:
                    (folder / manifest.weights_file).unlink(missing_ok=True)  # ours, and named by no manifest
                    raise AlreadyExistsError(
                        f"a model named {quote(manifest.name)} appeared in the store while this job ran "
                        "(another replica?); pick another name or set replace"
                    ) from None
        finally:
            temporary.unlink(missing_ok=True)
        sync_directory(folder)
        self.collect_garbage(manifest.name)

    def collect_garbage(self, name: str, *, grace_s: float = GC_GRACE_S) -> list[str]:
        """Delete weights and temporary files of ``name`` that the current manifest does not name
        and that are older than ``grace_s``; the names deleted."""
        folder = self._folder(name)
        keep = set()
        with contextlib.suppress(FileNotFoundError, StoreEntryError):
            keep.add(self.read_manifest(name).weights_file)
        deleted: list[str] = []
        cutoff = time.time() - grace_s
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return deleted
        for entry in entries:
            collectable = _WEIGHTS_FILE.fullmatch(entry.name) or (
                entry.name.startswith(".") and entry.name.endswith(".tmp")
            )
            if not collectable or entry.name in keep:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    deleted.append(entry.name)
            except FileNotFoundError:
                pass  # another replica collected it
        return deleted

    def delete(self, name: str) -> None:
        folder = self._folder(name)
        manifest_path = folder / MANIFEST
        try:
            weights_file = self.read_manifest(name).weights_file
        except FileNotFoundError:
            raise ModelNotFoundError(f"no fine-tuned model {quote(name)} in the store") from None
        except StoreEntryError:
            weights_file = None  # a damaged entry can be deleted too
        try:
            manifest_path.unlink()  # from here on the model does not exist for any reader
        except FileNotFoundError:
            raise ModelNotFoundError(f"no fine-tuned model {quote(name)} in the store") from None
        except OSError as exc:
            raise InternalError(f"cannot delete {manifest_path}: {exc}") from exc
        if weights_file is not None:
            (folder / weights_file).unlink(missing_ok=True)
        self.collect_garbage(name)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: another writer's staged weights keep it

    # -- reading -----------------------------------------------------------

    def entries(self) -> tuple[dict[str, tuple[int, int, int]], dict[str, StoreEntryError]]:
        """``({name: fingerprint of its manifest}, {entry: error})`` of every folder in the store.

        The fingerprint (inode, mtime, size) changes whenever a manifest is replaced; a
        folder without a manifest (being written or deleted) is not listed. Hidden entries
        (temporary files, job records) are ignored.
        """
        found: dict[str, tuple[int, int, int]] = {}
        errors: dict[str, StoreEntryError] = {}
        with os.scandir(self.root) as listing:
            for entry in listing:
                if entry.name.startswith("."):
                    continue
                if not is_model_name(entry.name):
                    errors[entry.name] = StoreEntryError(
                        StoreReason.BAD_NAME,
                        f"store entry {quote(entry.name)} is not a valid model name; it is ignored",
                    )
                    continue
                try:
                    info = os.lstat(os.path.join(entry.path, MANIFEST))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    errors[entry.name] = StoreEntryError(StoreReason.UNREADABLE, f"{entry.name}: {exc}")
                    continue
                found[entry.name] = (info.st_ino, info.st_mtime_ns, info.st_size)
        return found, errors

    def exists(self, name: str) -> bool:
        return os.path.lexists(self._folder(name) / MANIFEST)

    def read_manifest(self, name: str) -> Manifest:
        """The checked manifest of ``name``; FileNotFoundError if there is none."""
        data = self._read(self._folder(name) / MANIFEST, MAX_MANIFEST_BYTES)
        return Manifest.from_json(parse_json(data, f"{name}/{MANIFEST}"), name, self.limits)

    def load(self, name: str) -> tuple[Manifest, StandardizedHead]:
        """The manifest and the head with its trained weights (on the CPU)."""
        manifest = self.read_manifest(name)
        try:
            blob = self._read(self._folder(name) / manifest.weights_file, self.max_weights_bytes)
        except FileNotFoundError:
            raise StoreEntryError(StoreReason.MISSING_WEIGHTS, f"{name}: {manifest.weights_file} is missing") from None
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise StoreEntryError(StoreReason.DIGEST_MISMATCH, f"{name}: weights do not match the manifest's sha256")
        head = build_standardized_head(
            manifest.head, manifest.feature_dim, len(manifest.labels), regression=manifest.loss == "mse"
        )
        try:
            tensors = load_safetensors(blob)
            head.load_state_dict(tensors)
        except Exception as exc:  # safetensors raises its own error types on a malformed header
            raise StoreEntryError(
                StoreReason.BAD_WEIGHTS, f"{name}: weights do not fit the manifest's head: {exc}"[:500]
            ) from exc
        if not all(bool(torch.isfinite(t).all()) for t in head.state_dict().values()):
            raise StoreEntryError(StoreReason.BAD_WEIGHTS, f"{name}: weights hold NaN or infinite values")
        return manifest, head.eval()

    def _read(self, path: Path, max_bytes: int) -> bytes:
        try:
            return read_bounded(path, max_bytes)
        except FileRefused as exc:
            raise StoreEntryError(StoreReason(exc.reason), str(exc)) from exc

    def _folder(self, name: str) -> Path:
        if not is_model_name(name):
            raise ModelNotFoundError(f"{quote(name)} is not a valid fine-tuned model name")
        return self.root / name
