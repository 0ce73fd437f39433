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

Collection (:meth:`ExportCache.collect`): every new version of a fine-tuned network
adds an entry, so entries nobody uses are deleted, safely for servers sharing the
cache (a volume, several replicas, any torch version):

- A server holds a shared ``flock`` (an :class:`ExportLeases` lease) on the
  ``entry.json`` of each entry its models run from, for as long as it serves them;
  the kernel drops it when the process dies, ``kill -9`` included.
- Using an entry touches its ``entry.json`` (its mtime is the entry's last use),
  under a shared lock held while the entry is checked.
- A collector deletes an entry only when it is not its own server's, was last used
  more than :data:`GRACE_S` ago, and it gets the exclusive lock at once (nobody holds a
  lease nor is checking it); under that lock it looks at the last use again, renames
  the entry out of the way (atomically: a reader sees the whole entry or none) and
  then deletes it. A reader that finds the entry gone exports it again, as for any
  missing entry. Where the file system has no locks nothing is deleted.
- Leftovers of writers that died (``.tmp-*`` staging untouched for
  :data:`STAGING_GRACE_S`, ``.discard-*``) go too; anything else is not ours and stays.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from service.config import default_cache_dir as default_cache_dir
from service.errors import FailedPreconditionError
from service.host.files import MAX_CACHE_ENTRY_BYTES, MAX_NETWORK_FILE_BYTES, FileRefused, open_regular, read_bounded
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
# An entry's directory name (export_key's): the digest's prefix, torch's version, the opset, the format.
KEY_PATTERN = re.compile(r"[0-9a-f]{24}-torch[0-9A-Za-z._-]+-opset[0-9]+-f[0-9]+")
STAGING_PREFIX = ".tmp-"
DISCARD_PREFIX = ".discard-"
# Unused this long, and leased by no server, an entry may be deleted. It covers a writer's step from
# renaming a new entry into place to leasing it (milliseconds), the reuse of a version just replaced
# (a rollback within the hour exports nothing), and restarts (a test session's servers reuse each other's).
GRACE_S = 3600.0
# A staging directory untouched this long belongs to a writer that died (an export of VGG16 writes
# its files within two minutes of each other).
STAGING_GRACE_S = 3600.0
# torch.onnx.export keeps its state in process globals (and warnings' filters are the process's):
# two exports at once in one process fail ("GLOBALS.in_onnx_export must be False"), so a process
# exports one network at a time (a job's publish and a store poll may build the same one at once).
_EXPORTING = threading.Lock()


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
        if self.check_in_use(entry) is None:
            log.info("%s: exported network found in %s", spec.name, entry)
            return entry / MODEL_FILE
        with _EXPORTING:
            problem = self.check_in_use(entry)  # again: another thread may have exported it meanwhile
            if problem is None:
                log.info("%s: exported network found in %s", spec.name, entry)
                return entry / MODEL_FILE
            if entry.exists():
                log.warning("%s: cache entry %s is unusable (%s); exporting again", spec.name, entry, problem)
                self.discard(entry)
            self._export(spec, net, digest, entry)
        return entry / MODEL_FILE

    def check_in_use(self, entry: Path) -> str | None:
        """:meth:`check` of ``entry`` about to be used: under a shared lock, so that no collector
        deletes it meanwhile, and touched (its last use, which a collector reads under its lock)."""
        try:
            try:
                fd = _open_locked(entry, fcntl.LOCK_SH)
            except _Replaced:  # replaced while locked (discarded and exported again): the new one
                fd = _open_locked(entry, fcntl.LOCK_SH)
            try:
                with suppress(OSError):  # a read-only cache: used, but its last use stays unknown
                    os.utime(fd)
                return self.check(entry)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return f"{ENTRY_FILE} is missing"
        except _Unlockable:  # no locks here: checked unlocked (and collect deletes nothing)
            return self.check(entry)
        except OSError as exc:
            return f"{ENTRY_FILE}: {exc.strerror or exc}"

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
        doomed = entry.with_name(f"{DISCARD_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            entry.rename(doomed)
        except OSError:  # gone already, or a read-only cache: exporting will say so
            return
        if doomed.is_dir():
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            doomed.unlink(missing_ok=True)

    def collect(
        self, *, held: Iterable[Path] = (), grace_s: float = GRACE_S, staging_grace_s: float = STAGING_GRACE_S
    ) -> Collected:
        """Delete the entries no server uses (see the module's docstring) and writers' leftovers.

        ``held``: the entries of this server's models, never deleted. Blocking: a directory listing
        and a few ``stat`` calls per entry, plus the deletions. Never raises for what it finds: a
        foreign, corrupt or unreadable file is left alone and counted."""
        keep = {Path(entry) for entry in held}
        result = Collected()
        now = time.time()
        for model_dir in _directories(self.root, result):
            for child in _children(model_dir, result):
                if child.name.startswith(DISCARD_PREFIX):
                    result.removed_bytes += _remove(child)
                elif child.name.startswith(STAGING_PREFIX):
                    if _age(child, now) >= staging_grace_s:
                        result.leftovers.append(child.name)
                        result.removed_bytes += _remove(child)
                elif not KEY_PATTERN.fullmatch(child.name) or not _is_directory(child):
                    result.foreign += 1
                elif child in keep:
                    result.kept += 1
                else:
                    self._collect_entry(child, now, grace_s, result)
            if _age(model_dir, now) >= grace_s:
                with suppress(OSError):
                    model_dir.rmdir()  # only if empty: a writer makes it again (its staging's parents)
        if result.removed:
            log.info(
                "runtime cache %s: deleted %d exports no server uses (%.1f MB): %s",
                self.root, len(result.removed), result.removed_bytes / 1e6, ", ".join(result.removed[:10]),
            )  # fmt: skip
        return result

    def _collect_entry(self, entry: Path, now: float, grace_s: float, result: Collected) -> None:
        """Delete ``entry`` if it is unused past the grace and nobody holds or checks it."""
        with suppress(OSError):  # (no entry.json: see below)
            if now - os.lstat(entry / ENTRY_FILE).st_mtime < grace_s:  # used lately: known without a lock
                result.recent += 1
                return
        try:
            with _locked(entry, fcntl.LOCK_EX | fcntl.LOCK_NB) as fd:
                if now - os.fstat(fd).st_mtime < grace_s:  # its last use (under the lock: no reader now)
                    result.recent += 1
                    return
                result.removed_bytes += self._delete(entry, result)
        except _Replaced:  # another process's work of this very moment: its business
            result.busy += 1
        except FileNotFoundError:  # no entry.json: half an entry, which no reader uses (check refuses it)
            if _age(entry, now) >= grace_s:
                result.removed_bytes += self._delete(entry, result)
            else:
                result.recent += 1
        except BlockingIOError:  # a server holds it (or checks it right now)
            result.busy += 1
        except _Unlockable:
            result.unlockable += 1
        except OSError:  # unreadable, a symlink, not a regular file: not ours to judge
            result.foreign += 1

    def _delete(self, entry: Path, result: Collected) -> int:
        doomed = entry.with_name(f"{DISCARD_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            entry.rename(doomed)  # atomically out of the way: a reader sees the whole entry or none
        except OSError:
            return 0
        result.removed.append(f"{entry.parent.name}/{entry.name}")
        return _remove(doomed)

    def _export(self, spec: ModelSpec, net: torch.nn.Module, digest: str, entry: Path) -> None:
        try:
            staging = entry.parent / f"{STAGING_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}"
            for attempt in range(3):  # a collector may remove the model's empty directory in between
                try:
                    staging.mkdir(parents=True)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
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


@dataclass
class Collected:
    """What :meth:`ExportCache.collect` did, for the log and tests."""

    removed: list[str] = field(default_factory=list)  # "<model>/<key>" of each entry deleted
    leftovers: list[str] = field(default_factory=list)  # staging directories of writers that died
    removed_bytes: int = 0
    kept: int = 0  # this server's
    busy: int = 0  # another server's (a lease), or being checked
    recent: int = 0  # used within the grace period
    unlockable: int = 0  # on a file system without locks: never deleted
    foreign: int = 0  # not an entry of ours: left alone


class ExportLeases:
    """Shared locks on the ``entry.json`` of the entries a server's models run from: while one is
    held, no collector (of any process sharing the cache) deletes that entry. Thread-safe."""

    def __init__(self) -> None:
        self._held: dict[Path, int] = {}
        self._lock = threading.Lock()

    @property
    def held(self) -> frozenset[Path]:
        with self._lock:
            return frozenset(self._held)

    def hold(self, entries: Iterable[Path]) -> None:
        """Lease each of ``entries`` not leased yet (one gone or unlockable is skipped: its model
        runs from memory, and a later build exports it again)."""
        with self._lock:
            for entry in entries:
                if entry in self._held:
                    continue
                try:
                    fd = _open_locked(entry, fcntl.LOCK_SH)
                except OSError:
                    continue
                self._held[entry] = fd

    def keep_only(self, entries: Iterable[Path]) -> None:
        """Lease exactly ``entries``: those missing, and release the others."""
        wanted = set(entries)
        with self._lock:
            for entry in [e for e in self._held if e not in wanted]:
                os.close(self._held.pop(entry))
        self.hold(wanted)

    def close(self) -> None:
        self.keep_only(())


class _Replaced(FileNotFoundError):
    """The entry locked is no longer at its path: collected, or discarded and exported again."""


class _Unlockable(OSError):
    """The cache's file system has no advisory locks (some network and FUSE file systems)."""


def _open_locked(entry: Path, operation: int) -> int:
    """An open descriptor of ``entry``'s ``entry.json`` locked by ``operation`` (``flock``), verified
    to be still the file at that path once locked (a collector may have renamed the entry away)."""
    path = entry / ENTRY_FILE
    mode = os.O_RDWR if operation & fcntl.LOCK_EX else os.O_RDONLY  # (NFS: an exclusive lock needs write)
    fd = os.open(path, mode | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise _Unlockable(exc.errno, f"{path}: no file locks here ({exc.strerror})") from exc
            raise
        try:
            now = os.lstat(path)
        except FileNotFoundError as exc:
            raise _Replaced(errno.ENOENT, "the entry was removed while it was locked", str(path)) from exc
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise _Replaced(errno.ENOENT, "the entry was replaced while it was locked", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def _locked(entry: Path, operation: int) -> Iterator[int]:
    fd = _open_locked(entry, operation)
    try:
        yield fd
    finally:
        os.close(fd)


def _is_directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # a symlink is never one of ours
    except OSError:
        return False


def _directories(root: Path, result: Collected) -> Iterator[Path]:
    """The models' directories of the cache (anything else at its top is foreign)."""
    for child in _children(root, result):
        if child.name.startswith(".") or not _is_directory(child):
            result.foreign += 1
        else:
            yield child


def _children(directory: Path, result: Collected) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:  # gone meanwhile, unreadable
        return []


def _age(path: Path, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> int:
    """Delete ``path`` (a directory tree, never following its symlinks, or a file); its bytes."""
    size = 0
    if _is_directory(path):
        for parent, _, files in os.walk(path):
            for name in files:
                with suppress(OSError):
                    size += os.lstat(os.path.join(parent, name)).st_size
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            size = os.lstat(path).st_size
            path.unlink()
    return size
