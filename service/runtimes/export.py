"""Export a network to ONNX once per model and weights, into an on-disk cache.

An entry is a directory ``<cache>/<model>/<key>/`` holding ``model.onnx`` (the
graph), ``weights.bin`` (its initializers, as ONNX external data) and
``entry.json``. Weights outside the graph make a session start several times
faster: the runtime need not parse hundreds of megabytes of protobuf (AlexNet's
session is built in 0.3 s rather than 0.9 s). The key names everything the files
depend on: the state dict's SHA-256, torch's version (the exporter), the ONNX
opset and this module's export format. ``entry.json`` records each file's size
and SHA-256 and is written last, so an entry without it, or whose files do not
match it, is incomplete or corrupt: it is removed and exported again. Entries
are built in a temporary directory next to their final place and renamed into
it, so replicas sharing the cache never see half an entry. Runtime-specific
compiled blobs (OpenVINO's model cache) go into a subdirectory named after the
runtime and its version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import BinaryIO

import torch

from service.config import default_cache_dir as default_cache_dir
from service.errors import FailedPreconditionError
from service.files import MAX_CACHE_ENTRY_BYTES, MAX_NETWORK_FILE_BYTES, FileRefused, open_regular, read_bounded
from service.models import ModelSpec
from service.runtimes.base import FEATURES, LOGITS

log = logging.getLogger(__name__)

INPUT = "pixels"
OPSET = 17
EXPORT_FORMAT = 2  # bump when the exported files change for the same weights
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"  # the graph's initializers, named by MODEL_FILE as external data
ENTRY_FILES = (MODEL_FILE, WEIGHTS_FILE)
ENTRY_FILE = "entry.json"


def state_digest(net: torch.nn.Module) -> str:
    """SHA-256 of a network's state dict: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class DualOutput(torch.nn.Module):
    """``(logits, features)`` of a network split into its backbone and its last layer."""

    def __init__(self, features: torch.nn.Module, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(pixels)
        return self.classifier(features), features


class ShapeGenericAdaptiveAvgPool2d(torch.nn.Module):
    """``AdaptiveAvgPool2d`` written as two matrix products whose averaging matrices are
    computed from the input's size, so that it exports with dynamic height and width.

    torch's ONNX exporter can only export adaptive pooling to a fixed output other than
    1x1 for a fixed input size; AlexNet and VGG pool to 6x6 and 7x7. Same bins as torch:
    output cell ``k`` of ``o`` averages inputs ``floor(k*n/o)`` to ``ceil((k+1)*n/o)``.
    """

    def __init__(self, output_size: tuple[int, int]) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _averaging_matrix(x.shape[-2], self.output_size[0], x)
        cols = _averaging_matrix(x.shape[-1], self.output_size[1], x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def _averaging_matrix(n: int, o: int, like: torch.Tensor) -> torch.Tensor:
    # While exporting, ``n`` is a traced size: the matrix is built in the graph from the input's shape.
    k = torch.arange(o, device=like.device)
    index = torch.arange(n, device=like.device)
    start = torch.div(k * n, o, rounding_mode="floor")
    end = torch.div((k + 1) * n + o - 1, o, rounding_mode="floor")
    inside = (index[None, :] >= start[:, None]) & (index[None, :] < end[:, None])
    weights = inside.to(like.dtype)
    return weights / weights.sum(1, keepdim=True)


def exportable(spec: ModelSpec, net: torch.nn.Module) -> DualOutput:
    """``net`` as a two-output module that exports with dynamic batch, height and width."""
    model = DualOutput(spec.features(net), spec.classifier(net))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.AdaptiveAvgPool2d):
                size = child.output_size
                h, w = (size, size) if isinstance(size, int) else size  # type: ignore[misc]
                if h is None or w is None or (h, w) == (1, 1):  # 1x1 exports as GlobalAveragePool: generic
                    continue
                setattr(parent, name, ShapeGenericAdaptiveAvgPool2d((h, w)))
    return model.eval()


def export_key(digest: str) -> str:
    return f"{digest[:24]}-torch{torch.__version__}-opset{OPSET}-f{EXPORT_FORMAT}".replace("+", "_")


class ExportCache:
    """The ``--runtime-cache`` directory: one ONNX export per model and weights."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, model: str, digest: str) -> Path:
        return self.root / model / export_key(digest)

    def onnx_file(self, spec: ModelSpec, net: torch.nn.Module, digest: str) -> Path:
        """The exported network of ``net`` (whose state dict hashes to ``digest``),
        exported now if the cache has no sound entry for it."""
        entry = self.entry(spec.name, digest)
        problem = self.check(entry)
        if problem is None:
            log.info("%s: exported network found in %s", spec.name, entry)
            return entry / MODEL_FILE
        if entry.exists():
            log.warning("%s: cache entry %s is unusable (%s); exporting again", spec.name, entry, problem)
            self.discard(entry)
        self._export(spec, net, digest, entry)
        return entry / MODEL_FILE

    def check(self, entry: Path) -> str | None:
        """Why ``entry`` cannot be used, or None when it is sound."""
        try:
            meta = json.loads(read_bounded(entry / ENTRY_FILE, MAX_CACHE_ENTRY_BYTES))
            if meta.get("format") != EXPORT_FORMAT or meta.get("key") != entry.name:
                return "written by another version"
            for name in ENTRY_FILES:
                recorded = meta["files"][name]
                with open_regular(entry / name, MAX_NETWORK_FILE_BYTES) as file:
                    size = os.fstat(file.fileno()).st_size
                    if size != recorded["size"]:
                        return f"{name} has {size} bytes, expected {recorded['size']}"
                    if _sha256(file) != recorded["sha256"]:
                        return f"{name} does not match its recorded SHA-256"
        except FileNotFoundError as exc:
            return f"{Path(exc.filename or '?').name} is missing"
        except FileRefused as exc:
            return str(exc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def discard(self, entry: Path) -> None:
        """Remove an entry (atomically out of the way first, then deleted)."""
        doomed = entry.with_name(f".discard-{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            entry.rename(doomed)
        except OSError:  # gone already, or a read-only cache: exporting will say so
            return
        if doomed.is_dir():
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            doomed.unlink(missing_ok=True)

    def _export(self, spec: ModelSpec, net: torch.nn.Module, digest: str, entry: Path) -> None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            staging = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
        except OSError as exc:
            raise FailedPreconditionError(
                f"cannot write the runtime cache {self.root} ({exc}); point --runtime-cache at a writable "
                "directory or use --runtime torch"
            ) from exc
        started = time.monotonic()
        try:
            size = spec.crop_size
            exported = staging / "exported.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
                torch.onnx.export(
                    exportable(spec, net),
                    (torch.zeros(1, 3, size, size),),
                    str(exported),
                    input_names=[INPUT],
                    output_names=[LOGITS, FEATURES],
                    dynamic_axes={
                        INPUT: {0: "batch", 2: "height", 3: "width"},
                        LOGITS: {0: "batch"},
                        FEATURES: {0: "batch"},
                    },
                    opset_version=OPSET,
                    dynamo=False,
                )
            _move_weights_out(exported, staging)
            meta = {
                "format": EXPORT_FORMAT,
                "key": entry.name,
                "model": spec.name,
                "state_sha256": digest,
                "torch": torch.__version__,
                "opset": OPSET,
                "files": {
                    name: {"size": (staging / name).stat().st_size, "sha256": _file_sha256(staging / name)}
                    for name in ENTRY_FILES
                },
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staging / ENTRY_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _fsync_dir(staging)
            try:
                staging.rename(entry)
            except OSError:
                # Another process placed the same entry first: keep theirs if it is sound.
                if self.check(entry) is not None:
                    self.discard(entry)
                    staging.rename(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("%s: exported to ONNX in %.1fs (%s)", spec.name, time.monotonic() - started, entry)


def _move_weights_out(exported: Path, staging: Path) -> None:
    """Rewrite ``exported`` (a self-contained ONNX file) as ``MODEL_FILE`` with every
    initializer of more than a kilobyte in ``WEIGHTS_FILE`` next to it, and remove it."""
    import onnx

    model = onnx.load(str(exported))
    exported.unlink()
    onnx.save_model(
        model,
        str(staging / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE,
        size_threshold=1024,
    )
    if not (staging / WEIGHTS_FILE).is_file():  # the entry's format promises both files
        (staging / WEIGHTS_FILE).touch()


def _file_sha256(path: Path) -> str:
    with open_regular(path, MAX_NETWORK_FILE_BYTES) as file:
        return _sha256(file)


def _sha256(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(1 << 22):
        digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as file:
            os.fsync(file.fileno())
