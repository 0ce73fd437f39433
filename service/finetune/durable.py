"""Jobs that survive a restart: what a running job keeps in the model store, and who runs it.

A job accepted by a server with a store writes, under ``.jobs/live/<job id>/``::

    job.json                what the job is: its config, labels, example count, times
    lease.json              who runs it and until when: {"holder": ..., "expires": unix seconds}
    images.bin              an upload's images, labels and targets, until its features are kept
    inputs.safetensors      what training reads (the extracted features and the targets), once extracted
    checkpoint.safetensors  the training run's state after its last finished epoch, and each epoch's figures

The job's holder renews its lease (a conditional replace on the ETag it last wrote) a few times per
``lease_s``; a server that stops on SIGTERM hands its leases back at once; one that dies keeps them
until they expire. Every replica sharing the store looks for jobs whose lease is gone or expired
and claims one with a conditional write (a create where there is no lease, a replace on the ETag of
the expired one it read), so two replicas never both take a job. The new holder goes on from the
checkpoint's epoch with the kept inputs: features and targets exactly as extracted, the validation
split made again from the same targets and seed, the model, optimizer and random generators as they
were (:class:`~service.finetune.trainer.FitState`), so the resumed job's figures are those an
uninterrupted run would have had. Each checkpoint replaces the last one conditionally on the ETag
its writer last saw: a holder that lost its job to another replica finds out at its next epoch and
stops, never overwriting the new holder's work.

What training goes on from is the features (smaller than the images, exactly what training reads,
no extraction to run again); until they are kept, an upload's images are (a dataset job lists its
dataset again), so a job stopped during extraction starts it again. A job whose inputs are gone
from the store, or cannot be read, ends ``failed`` with that reason on the next start; so does one
whose inputs were over the quota. ``quota_bytes`` bounds the images, features and checkpoints of
all running jobs of the store together, whichever replicas write them: before a job's images or
features are written, a *reservation* of their size is (an empty object whose name holds the
size), and only then is the store listed; the write goes ahead if everything listed, reservations
included, fits the quota, and otherwise the reservation is withdrawn. Of two replicas admitting at
once, the one that lists last sees the other's reservation, so together they never pass the quota
(both may be refused, which costs only the survival of a restart). A checkpoint is not refused:
it counts against the images and features admitted after it, so the store holds at most the quota
plus the running jobs' checkpoints.
A job over the quota runs as before, without surviving a restart. When a job ends, however it ends, its folder
is deleted (its record goes to ``.jobs/`` as before, :mod:`.history`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch

from service.errors import StoreEntryError, UnavailableError, quote
from service.finetune.examples import TrainingExamples
from service.finetune.history import JOB_ID, JOBS_FOLDER
from service.finetune.job import EpochMetrics, Job, JobState
from service.finetune.store import parse_json
from service.finetune.trainer import FitState
from service.host.files import FileRefused
from service.storage import ObjectChanged, ObjectExists, ObjectInfo, ObjectStore
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol import from_dict, to_dict

log = logging.getLogger(__name__)

LIVE_FOLDER = f"{JOBS_FOLDER}/live"
JOB_FILE = "job.json"
LEASE_FILE = "lease.json"
INPUTS_FILE = "inputs.safetensors"
IMAGES_FILE = "images.bin"
CHECKPOINT_FILE = "checkpoint.safetensors"
RESERVED = "reserved-"  # reserved-<what>-<bytes>: the room a write admitted under the quota holds until done
MAX_JSON_BYTES = 1024 * 1024
FORMAT_VERSION = 1
KEPT = "kept"  # a kept job's "inputs" once they are in the store


class LeaseLost(UnavailableError):
    """Another replica holds the job now (this one's lease expired and was taken): stop, keep nothing."""


class InputsGone(UnavailableError):
    """A resumed job's inputs are not in the store: it cannot go on."""


@dataclass(frozen=True)
class Resumed:
    """Where a claimed job goes on from: the checkpoint (None: the first epoch) and the figures of the
    epochs before it."""

    state: FitState | None
    curve: list[EpochMetrics]


def default_holder() -> str:
    """This process among the replicas: host, process id and a random part (a pid is reused)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobKeeper:
    """The store side of jobs that survive a restart (blocking; the manager calls it in threads,
    the training thread calls :meth:`checkpoint`)."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        quota_bytes: int,
        lease_s: float,
        holder: str | None = None,
        checkpoint_s: float = 0.0,
    ) -> None:
        self.objects = objects
        self.quota_bytes = quota_bytes
        self.lease_s = lease_s
        self.checkpoint_s = checkpoint_s  # least time between two checkpoints of a job (0: every epoch)
        self.holder = holder or default_holder()
        self._leases: dict[str, str] = {}  # job id -> ETag of the lease this process last wrote
        self._checkpoints: dict[str, str] = {}  # job id -> ETag of the checkpoint this process last wrote
        self._curves: dict[str, list[EpochMetrics]] = {}  # job id -> figures of its epochs so far

    @property
    def enabled(self) -> bool:
        return self.quota_bytes > 0

    def holds(self, job_id: str) -> bool:
        return job_id in self._leases

    # -- a job's life -----------------------------------------------------

    def begin(self, job: Job) -> None:
        """Keep ``job`` (accepted here): its description and this process's lease."""
        self._write_job(job, inputs="")
        self._leases[job.id] = self.objects.create(_key(job.id, LEASE_FILE), self._lease_bytes()).etag
        self._curves[job.id] = []

    def renew(self, job_id: str) -> None:
        """Push the lease's expiry on; :class:`LeaseLost` if another replica took it."""
        etag = self._leases.get(job_id)
        if etag is None:
            raise LeaseLost(f"job {job_id} is not held here")
        try:
            self._leases[job_id] = self.objects.replace(_key(job_id, LEASE_FILE), self._lease_bytes(), etag).etag
        except (ObjectChanged, FileNotFoundError):
            self.forget(job_id)
            raise LeaseLost(f"job {job_id} was taken over by another replica") from None

    def release(self, job_id: str) -> None:
        """Hand the lease back (this server stops; the job goes on at the next start of any replica)."""
        etag = self._leases.get(job_id)
        self.forget(job_id)
        info = self.objects.head(_key(job_id, LEASE_FILE))
        if etag is not None and info is not None and info.etag == etag:
            self.objects.delete(_key(job_id, LEASE_FILE))

    def forget(self, job_id: str) -> None:
        self._leases.pop(job_id, None)
        self._checkpoints.pop(job_id, None)
        self._curves.pop(job_id, None)

    def end(self, job_id: str) -> None:
        """Delete everything ``job_id`` kept (it has ended and its record is written); the lease last."""
        self.forget(job_id)
        for name in (CHECKPOINT_FILE, INPUTS_FILE, IMAGES_FILE, *self._reservations(job_id), JOB_FILE, LEASE_FILE):
            self.objects.delete(_key(job_id, name))

    # -- inputs -------------------------------------------------------------

    def keep_inputs(self, job: Job, features: torch.Tensor, targets: torch.Tensor) -> bool:
        """Write the job's training inputs if the quota has room for them; False (and why, in the
        job's description) if not."""
        size = features.nelement() * features.element_size() + targets.nelement() * targets.element_size()
        reservation, note = self._reserve(job.id, "features", size)
        if note is not None:
            log.warning("job %s will not survive a restart: %s", job.id, note)
            self._write_job(job, inputs=note)
            return False
        try:
            data = safetensors.torch.save(
                {"features": features.contiguous(), "targets": targets.contiguous()},
                metadata={"job": job.id, "format_version": str(FORMAT_VERSION)},
            )
            self.objects.write(_key(job.id, INPUTS_FILE), data)
        finally:
            self.objects.delete(reservation)  # the file, once written, counts for itself
        self._write_job(job, inputs=KEPT)
        return True

    def _reserve(self, job_id: str, what: str, size: int) -> tuple[str, str | None]:
        """Reserve ``size`` bytes for a job's ``what`` under the quota (see the module's docstring):
        the reservation's key, and None where the write may go ahead (the caller deletes the key once
        it is written), or why it may not (the reservation is withdrawn)."""
        key = _key(job_id, f"{RESERVED}{what}-{size}")
        self.objects.write(key, b"")
        used = self.used_bytes()  # this reservation and every other replica's written before it, included
        if used <= self.quota_bytes:
            return key, None
        self.objects.delete(key)
        return key, (
            f"its {what} ({_mib(size)}) were not kept: the store held {_mib(used - size)} of running jobs' inputs "
            f"and checkpoints, and --max-kept-job-bytes is {_mib(self.quota_bytes)}"
        )

    def _reservations(self, job_id: str) -> list[str]:
        """Names of ``job_id``'s reservations left in the store (by a server that died while writing)."""
        prefix = _key(job_id, RESERVED)
        return [info.key.rsplit("/", 1)[1] for info in self.objects.list(prefix)]

    def inputs(self, job_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept features and targets; :class:`InputsGone` if they are not there (or not readable)."""
        key = _key(job_id, INPUTS_FILE)
        try:
            tensors = safetensors.torch.load(self.objects.read(key, self.quota_bytes))
            features, targets = tensors["features"], tensors["targets"]
        except FileNotFoundError:
            note = self._note(job_id)
            raise InputsGone(
                f"the server running this job stopped and its inputs are not in the store ({note}); "
                "create the job again"
            ) from None
        except (FileRefused, KeyError, ValueError, RuntimeError, safetensors.SafetensorError) as exc:
            raise InputsGone(f"the job's kept inputs cannot be read ({exc}); create the job again") from None
        if features.ndim < 2 or len(features) % max(len(targets), 1) or not len(targets):
            raise InputsGone("the job's kept inputs do not fit together; create the job again")
        return features, targets

    def keep_images(self, job: Job, examples: TrainingExamples) -> bool:
        """Write an upload's images, labels and targets (so that a job stopped before its features are
        kept can go on) if the quota has room for them; False if not (or if they are a dataset's)."""
        if examples.dataset is not None or not examples.images:
            return False
        sizes = [len(image) for image in examples.images]
        targets = examples.targets
        size = sum(sizes) + (targets.nbytes if targets is not None else 0)
        reservation, note = self._reserve(job.id, "images", size)
        if note is not None:
            log.warning("job %s: %s", job.id, note)
            self._write_job(job, inputs=note)
            return False
        header = {
            "format_version": FORMAT_VERSION,
            "job": job.id,
            "sizes": sizes,
            "labels": examples.labels,
            "targets": list(targets.shape) if targets is not None else None,
        }
        head = json.dumps(header).encode()
        parts = [len(head).to_bytes(8, "little"), head, *examples.images]
        if targets is not None:
            parts.append(np.ascontiguousarray(targets, dtype="<f4").tobytes())
        try:
            self.objects.write(_key(job.id, IMAGES_FILE), b"".join(parts))
        finally:
            self.objects.delete(reservation)
        return True

    def kept_examples(self, job_id: str) -> TrainingExamples | None:
        """A kept upload's examples, where the job's features are not kept (None: they are, or there
        are no images either)."""
        if self.objects.head(_key(job_id, INPUTS_FILE)) is not None:
            return None
        try:
            data = memoryview(self.objects.read(_key(job_id, IMAGES_FILE), self.quota_bytes))
        except FileNotFoundError:
            return None
        except FileRefused as exc:
            raise InputsGone(f"the job's kept images cannot be read ({exc}); create the job again") from None
        try:
            return _examples(data, job_id)
        except (KeyError, TypeError, ValueError, StoreEntryError) as exc:
            raise InputsGone(f"the job's kept images cannot be read ({exc}); create the job again") from None

    def has_features(self, job_id: str) -> bool:
        return self.objects.head(_key(job_id, INPUTS_FILE)) is not None

    def used_bytes(self) -> int:
        """Bytes of running jobs' inputs and checkpoints in the store, and of the writes reserved."""
        return sum(_counted_bytes(info) for info in self.objects.list(f"{LIVE_FOLDER}/") if not info.error)

    # -- checkpoints --------------------------------------------------------

    def checkpoint(self, job_id: str, state: FitState, *, write: bool = True) -> None:
        """Note the epoch's figures and, with ``write``, write the training run's state after it,
        replacing the last checkpoint only if it is still the one this process wrote
        (:class:`LeaseLost` if not). Called in the training thread."""
        curve = self._curves.setdefault(job_id, [])
        del curve[state.epoch - 1 :]
        curve.append(EpochMetrics(state.epoch, state.train_loss, state.validation_loss, state.validation_accuracy))
        if not write:
            return
        data = _checkpoint_bytes(job_id, state, curve)
        key = _key(job_id, CHECKPOINT_FILE)
        try:
            info = self._write(key, data, self._checkpoints.get(job_id))
        except (ObjectExists, ObjectChanged):
            if not self._lease_is_mine(job_id):
                self.forget(job_id)
                raise LeaseLost(f"job {job_id} was taken over by another replica") from None
            # The lease is still this process's, so the checkpoint that differs is its own last write,
            # retried by the store's client after its answer was lost (the retry's condition then fails),
            # or a former holder's late write: either way this process's state is the one to keep.
            current = self.objects.head(key)
            try:
                info = self._write(key, data, None if current is None else current.etag)
            except (ObjectExists, ObjectChanged):
                self.forget(job_id)
                raise LeaseLost(f"job {job_id} was taken over by another replica") from None
        self._checkpoints[job_id] = info.etag

    def _write(self, key: str, data: bytes, etag: str | None) -> ObjectInfo:
        """Create ``key``, or replace it only if it is still ``etag``."""
        return self.objects.create(key, data) if etag is None else self.objects.replace(key, data, etag)

    def _lease_is_mine(self, job_id: str) -> bool:
        """Whether the job's lease in the store is the one this process last wrote."""
        etag = self._leases.get(job_id)
        info = self.objects.head(_key(job_id, LEASE_FILE))
        return etag is not None and info is not None and info.etag == etag

    def resume_point(self, job_id: str) -> Resumed:
        """The checkpoint of a claimed job (read once, when it starts here)."""
        key = _key(job_id, CHECKPOINT_FILE)
        info = self.objects.head(key)
        if info is None:
            self._curves[job_id] = []
            return Resumed(None, [])
        try:
            state, curve = _read_checkpoint(self.objects.read(key, self.quota_bytes), job_id)
        except (FileNotFoundError, FileRefused, KeyError, TypeError, ValueError, RuntimeError, StoreEntryError,
                safetensors.SafetensorError) as exc:  # fmt: skip
            log.warning(
                "the checkpoint of job %s cannot be read; it starts again from its first epoch: %s", job_id, exc
            )
            state, curve = None, []
        self._checkpoints[job_id] = info.etag
        self._curves[job_id] = list(curve)
        return Resumed(state, curve)

    # -- what the pipeline asks ---------------------------------------------------

    async def kept_inputs(self, job: Job) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A resumed job's features and targets from the store (None: the job extracts its own, from
        its examples: an upload's kept images, or its dataset listed again)."""
        if job.resumed is None or job.examples is not None:
            return None
        return await asyncio.to_thread(self.inputs, job.id)

    async def keep(self, job: Job, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep a job's freshly extracted inputs, if it is kept (its images, if kept, are then deleted); a
        store that fails costs the job its survival of a restart, never the job."""
        if not job.kept:
            return
        try:
            if await asyncio.to_thread(self.keep_inputs, job, features, targets):
                job.inputs_kept = True
                await asyncio.to_thread(self.objects.delete, _key(job.id, IMAGES_FILE))
        except OSError as exc:
            log.warning(
                "the inputs of job %s cannot be kept in the store; it will not survive a restart: %s", job.id, exc
            )

    def training_hooks(self, job: Job) -> tuple[FitState | None, Callable[[FitState], None] | None]:
        """The state a resumed job's training goes on from, and what to do with each epoch's."""
        if not job.kept:
            return None, None

        written = [time.monotonic()]  # when the last checkpoint was written (or training began)

        def on_checkpoint(state: FitState) -> None:
            if not job.inputs_kept:
                return  # nothing to go on from without them
            last = state.stopped or state.epoch >= job.config.epochs  # a resume then skips the whole run
            due = last or time.monotonic() - written[0] >= self.checkpoint_s
            try:
                self.checkpoint(job.id, state, write=due)
            except OSError as exc:
                log.warning("checkpoint %d of job %s cannot be written: %s", state.epoch, job.id, exc)
            if due:
                written[0] = time.monotonic()

        resume = job.resumed.state if job.resumed is not None else None
        if job.resumed is not None:  # the training run holds the state from here
            job.resumed = Resumed(None, job.resumed.curve)
        return resume, on_checkpoint

    # -- other replicas' jobs ---------------------------------------------------

    def unheld(self) -> Iterator[str]:
        """Ids of kept jobs that no live lease holds (their holder died or stopped), oldest lease first."""
        objects: dict[str, dict[str, Any]] = {}
        for info in self.objects.list(f"{LIVE_FOLDER}/"):
            job_id, _, name = info.key.removeprefix(f"{LIVE_FOLDER}/").partition("/")
            if JOB_ID.fullmatch(job_id) and not info.error:
                objects.setdefault(job_id, {})[name] = info
        now = time.time()
        for job_id, files in objects.items():
            if job_id in self._leases or JOB_FILE not in files:
                continue
            lease = files.get(LEASE_FILE)
            if lease is None or self._expired(job_id, now):
                yield job_id

    def claim(self, job_id: str) -> bool:
        """Take ``job_id``'s lease if it is gone or expired, with a conditional write: True if this
        process holds the job now."""
        key = _key(job_id, LEASE_FILE)
        info = self.objects.head(key)
        try:
            if info is None:
                self._leases[job_id] = self.objects.create(key, self._lease_bytes()).etag
                return True
            if not self._expired(job_id, time.time()):
                return False
            self._leases[job_id] = self.objects.replace(key, self._lease_bytes(), info.etag).etag
            return True
        except (ObjectExists, ObjectChanged, FileNotFoundError):
            return False

    def read_job(self, job_id: str) -> Job:
        """The kept description of ``job_id`` (ValueError and the like if it is not one)."""
        data = parse_json(self.objects.read(_key(job_id, JOB_FILE), MAX_JSON_BYTES), f"job {job_id}")
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or data.get("id") != job_id:
            raise ValueError("not a kept job of a known format_version")
        return Job(
            id=job_id,
            config=from_dict(data["config"]),
            labels=[str(label) for label in data["labels"]],
            example_count=int(data["examples"]),
            state=JobState.RUNNING,
            created_at=float(data["created_at"]),
        )

    def kept_jobs(self) -> list[Job]:
        """Every job kept in the store that can be read (for ListJobs)."""
        ids = {
            info.key.split("/")[2]
            for info in self.objects.list(f"{LIVE_FOLDER}/")
            if not info.error and info.key.endswith(f"/{JOB_FILE}") and info.key.count("/") == 3
        }
        jobs = (self.find(job_id) for job_id in sorted(ids) if JOB_ID.fullmatch(job_id))
        return [job for job in jobs if job is not None]

    def find(self, job_id: str) -> Job | None:
        """A job kept in the store that runs elsewhere, or waits to go on (for GetJob), if any."""
        if not JOB_ID.fullmatch(job_id):
            return None  # never a kept job's name: not worth a read of the store, nor a log line
        try:
            return self.read_job(job_id)
        except FileNotFoundError:
            return None
        except (FileRefused, StoreEntryError, ConfigError, KeyError, TypeError, ValueError) as exc:
            log.warning("kept job %s cannot be read: %s", quote(job_id), exc)
            return None

    # -- internals ----------------------------------------------------------

    def _expired(self, job_id: str, now: float) -> bool:
        try:
            data = parse_json(self.objects.read(_key(job_id, LEASE_FILE), MAX_JSON_BYTES), f"lease of {job_id}")
            expires = data["expires"] if isinstance(data, dict) else None
            if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                return True  # an unreadable lease holds nothing
            return float(expires) < now
        except FileNotFoundError:
            return True
        except (FileRefused, StoreEntryError):
            return True

    def _lease_bytes(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.lease_s}).encode()

    def _write_job(self, job: Job, *, inputs: str) -> None:
        record = {
            "format_version": FORMAT_VERSION,
            "id": job.id,
            "config": to_dict(job.config),
            "labels": job.labels,
            "examples": job.example_count,
            "created_at": job.created_at,
            "inputs": inputs,  # "kept", "" (not yet), or why they were not kept
        }
        self.objects.write(_key(job.id, JOB_FILE), json.dumps(record).encode())

    def _note(self, job_id: str) -> str:
        try:
            data = parse_json(self.objects.read(_key(job_id, JOB_FILE), MAX_JSON_BYTES), f"job {job_id}")
        except (OSError, FileRefused, StoreEntryError):
            return ""
        note = data.get("inputs") if isinstance(data, dict) else None
        if note == KEPT:
            return "they were deleted from it"
        return note if isinstance(note, str) and note else "the server stopped before its features were kept"


def _examples(data: memoryview, job_id: str) -> TrainingExamples:
    """:meth:`JobKeeper.keep_images`' object read back, checked (a store is read, never trusted)."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > min(len(data) - 8, MAX_JSON_BYTES * 64):
        raise ValueError("a header larger than the object")
    header = parse_json(bytes(data[8 : 8 + size]), f"images of job {job_id}")
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION or header["job"] != job_id:
        raise ValueError("not the kept images of this job")
    sizes, labels, shape = header["sizes"], header["labels"], header["targets"]
    if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise ValueError("the images' sizes must be a list of counts")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(sizes)
                               or not all(isinstance(label, str) for label in labels)):  # fmt: skip
        raise ValueError("the labels must be one class name per image")
    images, offset = [], 8 + size
    for n in sizes:
        images.append(bytes(data[offset : offset + n]))
        offset += n
    targets = None
    if shape is not None:
        if (not isinstance(shape, list) or len(shape) != 2 or shape[0] != len(sizes)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):  # fmt: skip
            raise ValueError("the targets must be [images, values]")
        targets = np.frombuffer(data[offset : offset + 4 * shape[0] * shape[1]], dtype="<f4").reshape(shape).copy()
        offset += targets.nbytes
    if offset != len(data) or (labels is None) == (targets is None):
        raise ValueError("the images, labels and targets do not fit together")
    return TrainingExamples(images, labels=labels, targets=targets)


def _counted_bytes(info: ObjectInfo) -> int:
    """What an object of a job's folder counts against the quota: its size, or a reservation's."""
    name = info.key.rsplit("/", 1)[-1]
    if name.startswith(RESERVED):
        size = name.rsplit("-", 1)[-1]
        return int(size) if size.isdigit() and len(size) <= 18 else 0
    return info.size


def _key(job_id: str, name: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return f"{LIVE_FOLDER}/{job_id}/{name}"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# -- a checkpoint as one safetensors object: tensors by name, the rest as JSON in its metadata ----------


def _checkpoint_bytes(job_id: str, state: FitState, curve: list[EpochMetrics]) -> bytes:
    tensors: dict[str, torch.Tensor] = {"generator": state.generator, "rng": state.rng}
    tensors.update({f"model/{name}": value for name, value in state.model.items()})
    if state.best_model is not None:
        tensors.update({f"best/{name}": value for name, value in state.best_model.items()})
    values: dict[str, dict[str, object]] = {}
    for param, slots in state.optimizer["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{param}/{name}"] = value
            else:
                values.setdefault(str(param), {})[name] = _number(value)
    document = {
        "format_version": FORMAT_VERSION,
        "job": job_id,
        "epoch": state.epoch,
        "best_score": [_number(v) for v in state.best_score],
        "best_epoch": state.best_epoch,
        "has_best": state.best_model is not None,
        "stale": state.stale,
        "stopped": state.stopped,
        "figures": [_number(v) for v in (state.train_loss, state.validation_loss, state.validation_accuracy)],
        "param_groups": state.optimizer["param_groups"],
        "optimizer_values": values,
        "curve": [[p.epoch, *(_number(v) for v in (p.train_loss, p.validation_loss, p.validation_accuracy))]
                  for p in curve],
    }  # fmt: skip
    tensors = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    return safetensors.torch.save(tensors, metadata={"checkpoint": json.dumps(document)})


def _read_checkpoint(data: bytes, job_id: str) -> tuple[FitState, list[EpochMetrics]]:
    """A checkpoint read back, checked as far as its types go (the model's own load checks its names)."""
    tensors = safetensors.torch.load(data)
    header = _metadata(data)
    document = parse_json(header.get("checkpoint", "").encode(), f"checkpoint of {job_id}")
    if not isinstance(document, dict) or document.get("format_version") != FORMAT_VERSION:
        raise ValueError("not a checkpoint of a known format_version")
    if document.get("job") != job_id:
        raise ValueError("a checkpoint of another job")
    model = _prefixed(tensors, "model/")
    best = _prefixed(tensors, "best/") if document["has_best"] is True else None
    state: dict[Any, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            param, slot = name.removeprefix("optimizer/").split("/", 1)
            state.setdefault(int(param), {})[slot] = value
    values = document["optimizer_values"]
    if not isinstance(values, dict):
        raise ValueError("optimizer values must be an object")
    for param, slots in values.items():
        if not isinstance(slots, dict):
            raise ValueError("optimizer values must be objects")
        state.setdefault(int(param), {}).update({name: _value(v) for name, v in slots.items()})
    groups = document["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise ValueError("param_groups must be a list of objects")
    figures = [_float(v) for v in document["figures"]]
    score = [_float(v) for v in document["best_score"]]
    curve = [EpochMetrics(int(p[0]), *(_float(v) for v in p[1:4])) for p in document["curve"]]
    epoch, best_epoch, stale = (_integer(document[name]) for name in ("epoch", "best_epoch", "stale"))
    if not 1 <= epoch == len(curve) or not 0 <= best_epoch <= epoch or len(figures) != 3 or len(score) != 2:
        raise ValueError("a checkpoint's epochs do not fit together")
    fit = FitState(
        epoch=epoch,
        model=model,
        optimizer={"state": state, "param_groups": groups},
        generator=tensors["generator"],
        rng=tensors["rng"],
        best_score=(score[0], score[1]),
        best_epoch=best_epoch,
        best_model=best,
        stale=stale,
        stopped=document["stopped"] is True,
        train_loss=figures[0],
        validation_loss=figures[1],
        validation_accuracy=figures[2],
    )
    return fit, curve


def _metadata(data: bytes) -> dict[str, str]:
    """A safetensors object's metadata (its JSON header's ``__metadata__``)."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors object")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, MAX_JSON_BYTES * 16):
        raise ValueError("a safetensors header larger than the object")
    header = parse_json(data[8 : 8 + size], "a checkpoint's header")
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("a checkpoint's metadata must be text")
    return metadata


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)}


def _number(value: object) -> object:
    """JSON has no NaN or infinity: those travel as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _float(value: object) -> float:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}"[:100])
    return float(value)


def _value(value: object) -> float | int | None:
    """An optimizer's value that is not a tensor: a number or None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return _float(value)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {value!r}"[:100])
    return value
