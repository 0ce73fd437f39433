"""The model store: one folder per fine-tuned model, written so a reader never sees half of one.

Layout::

    <store>/<name>/manifest.json              base model, head spec, labels, metrics, time,
                                              and the weights file it belongs to (+ sha256)
    <store>/<name>/head-<version>.safetensors the head's tensors

A save writes the weights under a new name, then replaces the manifest with
``os.replace`` (atomic on POSIX); the manifest is what makes a version exist.
Readers that meet a manifest whose weights are gone or do not match its
digest treat the model as not there yet and look again at the next poll.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service.errors import InternalError, ModelNotFoundError
from service.finetune.heads import StandardizedHead, build_standardized_head
from service.finetune.spec import MODEL_NAME, HeadSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    base_model: str
    head: HeadSpec
    feature_dim: int
    labels: list[str]  # class names, or target names for regression
    loss: str
    metrics: dict[str, Any]
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
            "head": self.head.to_dict(),
            "feature_dim": self.feature_dim,
            "labels": self.labels,
            "loss": self.loss,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "job_id": self.job_id,
            "weights": {"file": self.weights_file, "sha256": self.sha256},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        head = data["head"]
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            base_model=str(data["base_model"]),
            head=HeadSpec(
                kind=str(head["kind"]),
                hidden=int(head["hidden"]),
                blocks=int(head["blocks"]),
                dropout=float(head.get("dropout", 0.0)),
            ),
            feature_dim=int(data["feature_dim"]),
            labels=[str(label) for label in data["labels"]],
            loss=str(data["loss"]),
            metrics=dict(data.get("metrics", {})),
            created_at=float(data["created_at"]),
            job_id=str(data.get("job_id", "")),
            weights_file=str(data["weights"]["file"]),
            sha256=str(data["weights"]["sha256"]),
        )


class StoreReadError(Exception):
    """A model folder that cannot be read (yet): half-written, or damaged."""


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def save(
        self,
        *,
        name: str,
        base_model: str,
        head_spec: HeadSpec,
        head: StandardizedHead,
        labels: list[str],
        loss: str,
        metrics: dict[str, Any],
        job_id: str,
    ) -> Manifest:
        folder = self._folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        version = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        state = {key: value.detach().cpu().contiguous() for key, value in head.state_dict().items()}
        blob = save_safetensors(state, metadata={"format": "pt", "model": name, "version": version})
        weights_file = f"head-{version}.safetensors"
        _atomic_write(folder / weights_file, blob)
        manifest = Manifest(
            name=name,
            version=version,
            base_model=base_model,
            head=head_spec,
            feature_dim=int(head.mean.shape[0]),
            labels=labels,
            loss=loss,
            metrics=metrics,
            created_at=time.time(),
            job_id=job_id,
            weights_file=weights_file,
            sha256=hashlib.sha256(blob).hexdigest(),
        )
        _atomic_write(folder / MANIFEST, json.dumps(manifest.to_json(), indent=2).encode())
        for stale in folder.glob("head-*.safetensors"):
            if stale.name != weights_file:
                stale.unlink(missing_ok=True)
        return manifest

    def list_versions(self) -> dict[str, str]:
        """``{name: version}`` of every model whose manifest is readable."""
        versions: dict[str, str] = {}
        for manifest_path in self.root.glob(f"*/{MANIFEST}"):
            name = manifest_path.parent.name
            if not MODEL_NAME.match(name):
                continue
            try:
                versions[name] = self.read_manifest(name).version
            except StoreReadError as exc:
                log.debug("store: skipping %s: %s", name, exc)
        return versions

    def read_manifest(self, name: str) -> Manifest:
        path = self._folder(name) / MANIFEST
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreReadError(f"{path}: {exc}") from exc

    def load(self, name: str) -> tuple[Manifest, StandardizedHead]:
        """The manifest and the head with its trained weights (on the CPU)."""
        try:
            manifest = self.read_manifest(name)
            blob = (self._folder(name) / manifest.weights_file).read_bytes()
        except FileNotFoundError as exc:
            raise StoreReadError(f"{name}: {exc}") from exc
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise StoreReadError(f"{name}: weights do not match the manifest's digest (being replaced?)")
        head = build_standardized_head(
            manifest.head, manifest.feature_dim, len(manifest.labels), regression=manifest.loss == "mse"
        )
        try:
            head.load_state_dict(load_safetensors(blob))
        except (RuntimeError, ValueError) as exc:
            raise StoreReadError(f"{name}: weights do not fit the manifest's head: {exc}") from exc
        return manifest, head.eval()

    def delete(self, name: str) -> None:
        folder = self._folder(name)
        manifest = folder / MANIFEST
        if not manifest.exists():
            raise ModelNotFoundError(f"no fine-tuned model {name!r} in the store")
        try:
            manifest.unlink()  # from here on the model does not exist for any reader
            shutil.rmtree(folder, ignore_errors=True)
        except OSError as exc:
            raise InternalError(f"cannot delete {folder}: {exc}") from exc

    def _folder(self, name: str) -> Path:
        if not MODEL_NAME.match(name):
            raise ModelNotFoundError(f"{name!r} is not a valid fine-tuned model name")
        return self.root / name


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # readable by replicas running as other users
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
