"""Fine-tuning jobs: collected examples, a queue with one job per device, events, cancellation.

A job runs in three steps: the base model's features of every example are
computed once, through the same batched path inference uses (an internal
feature-extractor model sharing the backbone's weights); a head trains on
them in a worker thread; the head is written to the store and served.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from service.dataplane import DataPlane, InferenceInput
from service.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
    UnavailableError,
    VisionServeError,
)
from service.finetune.spec import FineTuneSpec, Limits, validate_spec
from service.finetune.store import ModelStore
from service.finetune.trainer import EpochReport, JobCancelled, TrainResult, train_head
from service.metrics import ServerMetrics
from service.repository import ModelRepository

log = logging.getLogger(__name__)

FEATURE_CHUNK = 32  # images per feature-extraction request
FEATURE_SHARE = 0.3  # share of a job's progress given to feature extraction


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class TrainingExamples:
    images: list[bytes]
    labels: list[str] | None = None  # class name per example (cross_entropy)
    targets: np.ndarray | None = None  # [N, T] float32 (mse)

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    state: JobState
    kind: str  # queued, features, epoch, succeeded, failed, cancelled
    epoch: int = 0
    epochs: int = 0
    train_loss: float = math.nan
    validation_loss: float = math.nan
    validation_accuracy: float = math.nan
    eta_seconds: float = 0.0
    progress: float = 0.0
    message: str = ""


@dataclass
class Job:
    id: str
    spec: FineTuneSpec
    examples: TrainingExamples
    labels: list[str]  # output names: class names, or target_0..T-1 for regression
    state: JobState = JobState.QUEUED
    error: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[JobEvent] = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class ExampleCollector:
    """Accumulates streamed examples, enforcing the limits as they arrive."""

    def __init__(self, spec: FineTuneSpec, limits: Limits) -> None:
        self._spec = spec
        self._limits = limits
        self._images: list[bytes] = []
        self._labels: list[str] = []
        self._targets: list[list[float]] = []
        self._bytes = 0

    def add(self, image: bytes, label: str, target: Sequence[float]) -> None:
        index = len(self._images)
        if index >= self._limits.max_examples:
            raise InvalidInputError(f"a job takes at most {self._limits.max_examples} examples")
        if not image:
            raise InvalidInputError(f"example {index} has no image bytes")
        self._bytes += len(image)
        if self._bytes > self._limits.max_total_bytes:
            raise InvalidInputError(
                f"the examples exceed {self._limits.max_total_bytes} bytes in all; send fewer or smaller images"
            )
        if self._spec.loss == "cross_entropy":
            if not label:
                raise InvalidInputError(f"example {index} has no label; cross_entropy needs a class name per example")
            self._labels.append(label)
        else:
            if not target:
                raise InvalidInputError(f"example {index} has no target; mse needs a vector of floats per example")
            if len(target) > self._limits.max_target_size:
                raise InvalidInputError(f"example {index}'s target is longer than {self._limits.max_target_size}")
            if self._targets and len(target) != len(self._targets[0]):
                raise InvalidInputError(
                    f"example {index}'s target has {len(target)} values but earlier ones have {len(self._targets[0])}"
                )
            if not all(math.isfinite(v) for v in target):
                raise InvalidInputError(f"example {index}'s target has a value that is not finite")
            self._targets.append(list(target))
        self._images.append(image)

    def finish(self) -> tuple[TrainingExamples, list[str]]:
        """The examples and the output names (sorted class names, or target_i)."""
        if len(self._images) < 2:
            raise InvalidInputError(f"a job needs at least 2 examples, got {len(self._images)}")
        if self._spec.loss == "cross_entropy":
            classes = sorted(set(self._labels))
            if len(classes) < 2:
                raise InvalidInputError(
                    f"all examples have the label {classes[0]!r}; a classifier needs at least 2 classes"
                )
            return TrainingExamples(self._images, labels=self._labels), classes
        targets = np.asarray(self._targets, dtype=np.float32)
        return TrainingExamples(self._images, targets=targets), [f"target_{i}" for i in range(targets.shape[1])]


class JobManager:
    def __init__(
        self,
        dataplane: DataPlane,
        repository: ModelRepository,
        store: ModelStore | None,
        metrics: ServerMetrics,
        limits: Limits | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._repository = repository
        self._store = store
        self._metrics = metrics
        self.limits = limits or Limits()
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._devices: asyncio.Queue[torch.device] = asyncio.Queue()
        for device in repository.devices:
            self._devices.put_nowait(device)
        self._update_state_gauge()

    # -- creating --------------------------------------------------------

    def check_spec(self, spec: FineTuneSpec) -> FineTuneSpec:
        """Refuse a job before its examples are streamed, where the config alone says it is bad."""
        if self._store is None:
            raise FailedPreconditionError("fine-tuning is off: start the server with --model-store DIR")
        validate_spec(spec, self.limits)
        base = self._repository.get(spec.base_model)  # NOT_FOUND for unknown models
        if base.base_model is not None:
            raise InvalidInputError(
                f"base_model {spec.base_model!r} is itself fine-tuned; build on one of "
                f"{', '.join(self._repository.builtin_names())}"
            )
        if spec.output_model in self._repository.builtin_names():
            raise InvalidInputError(
                f"output_model {spec.output_model!r} is the name of a built-in model; choose another name"
            )
        clash = spec.output_model in self._repository or any(
            j.spec.output_model == spec.output_model and not j.state.terminal for j in self._jobs.values()
        )
        if clash and not spec.replace:
            raise AlreadyExistsError(
                f"a model or running job named {spec.output_model!r} exists; pick another name or set replace"
            )
        return spec

    def collector(self, spec: FineTuneSpec) -> ExampleCollector:
        return ExampleCollector(spec, self.limits)

    async def submit(self, spec: FineTuneSpec, collector: ExampleCollector) -> Job:
        """Queue a job; fails at once with INVALID_ARGUMENT if an example is not a decodable image."""
        self.check_spec(spec)  # again: the name may have been taken while the examples streamed
        examples, labels = collector.finish()
        if self._dataplane.draining:
            raise UnavailableError("the server is shutting down and takes no new jobs")
        await self._check_images(spec.base_model, examples.images)
        job = Job(id=uuid.uuid4().hex[:12], spec=spec, examples=examples, labels=labels)
        self._jobs[job.id] = job
        await self._emit(job, JobEvent(job.id, JobState.QUEUED, "queued", epochs=spec.epochs))
        task = asyncio.create_task(self._run(job), name=f"finetune-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _check_images(self, base: str, images: list[bytes]) -> None:
        """Decode every example once, so that a bad image fails CreateJob itself.

        Feature extraction decodes them again through the batched path; keeping the decoded
        pixels instead would hold ~600 KB per example in memory for the job's whole life.
        """
        decoder = self._repository.get(base).decoder
        loop = asyncio.get_running_loop()
        pool = self._dataplane.decode_pool
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, decoder.decode, data, i) for i, data in enumerate(images)),
            return_exceptions=True,
        )
        for i, result in enumerate(results):
            if isinstance(result, InvalidInputError):
                raise InvalidInputError(f"example {i}: {result.message}") from result
            if isinstance(result, BaseException):
                raise result

    # -- reading ---------------------------------------------------------

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise ModelNotFoundError(f"no fine-tuning job {job_id!r}") from None

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Every event of the job so far, then each new one until it ends."""
        job = self.get(job_id)
        sent = 0
        while True:
            async with job.changed:
                await job.changed.wait_for(lambda sent=sent: len(job.events) > sent)
                fresh = job.events[sent:]
            for event in fresh:
                yield event
            sent += len(fresh)
            if fresh[-1].state.terminal:
                return

    # -- cancelling --------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.state.terminal:
            job.cancel_requested.set()
            if job.state is JobState.QUEUED:
                await self._finish(job, JobState.CANCELLED, "cancelled before it started")
        return job

    async def shutdown(self) -> None:
        """Cancel every job that has not ended and wait for them to stop."""
        for job in list(self._jobs.values()):
            if not job.state.terminal:
                await self.cancel(job.id)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def delete_model(self, name: str) -> None:
        if name in self._repository.builtin_names():
            raise InvalidInputError(f"{name!r} is a built-in model; only fine-tuned models can be deleted")
        if self._store is None:
            raise FailedPreconditionError("fine-tuning is off: start the server with --model-store DIR")
        self._store.delete(name)
        if name in self._repository:
            self._repository.remove_finetuned(name)

    # -- running -----------------------------------------------------------

    async def _run(self, job: Job) -> None:
        device = await self._devices.get()
        try:
            if job.state.terminal:
                return
            job.state = JobState.RUNNING
            job.started_at = time.time()
            self._update_state_gauge()
            features = await self._extract_features(job)
            result = await self._train(job, features, device)
            await self._publish(job, result)
        except JobCancelled:
            await self._finish(job, JobState.CANCELLED, "cancelled")
        except VisionServeError as exc:
            await self._finish(job, JobState.FAILED, exc.message)
        except Exception as exc:
            log.exception("fine-tuning job %s failed", job.id)
            await self._finish(job, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._devices.put_nowait(device)
            self._metrics.clear_job_loss(job.id)

    async def _extract_features(self, job: Job) -> torch.Tensor:
        model = self._repository.features_model(job.spec.base_model)
        images = job.examples.images
        chunks: list[np.ndarray] = []
        started = time.monotonic()
        for start in range(0, len(images), FEATURE_CHUNK):
            if job.cancel_requested.is_set():
                raise JobCancelled("cancelled")
            chunk = images[start : start + FEATURE_CHUNK]
            try:
                chunks.append(await self._dataplane.infer_model(model, InferenceInput(images=chunk)))
            except InvalidInputError as exc:
                raise InvalidInputError(f"examples {start}-{start + len(chunk) - 1}: {exc.message}") from exc
            done = start + len(chunk)
            elapsed = time.monotonic() - started
            await self._emit(
                job,
                JobEvent(
                    job.id,
                    JobState.RUNNING,
                    "features",
                    epochs=job.spec.epochs,
                    progress=FEATURE_SHARE * done / len(images),
                    eta_seconds=elapsed / done * (len(images) - done),
                    message=f"features of {done}/{len(images)} examples",
                ),
            )
        return torch.from_numpy(np.concatenate(chunks)).float()

    async def _train(self, job: Job, features: torch.Tensor, device: torch.device) -> TrainResult:
        loop = asyncio.get_running_loop()
        if job.examples.labels is not None:
            index = {name: i for i, name in enumerate(job.labels)}
            targets = torch.tensor([index[label] for label in job.examples.labels], dtype=torch.long)
        else:
            assert job.examples.targets is not None
            targets = torch.from_numpy(job.examples.targets)

        def on_epoch(report: EpochReport) -> None:
            self._metrics.finetune_images.inc(report.images_seen)
            self._metrics.set_job_loss(job.id, report.train_loss)
            event = JobEvent(
                job.id,
                JobState.RUNNING,
                "epoch",
                epoch=report.epoch,
                epochs=report.epochs,
                train_loss=report.train_loss,
                validation_loss=report.validation_loss,
                validation_accuracy=report.validation_accuracy,
                eta_seconds=report.eta_seconds,
                progress=FEATURE_SHARE + (1 - FEATURE_SHARE) * report.epoch / report.epochs,
            )
            asyncio.run_coroutine_threadsafe(self._emit(job, event), loop)

        return await asyncio.to_thread(
            train_head,
            features,
            targets,
            job.spec,
            num_outputs=len(job.labels),
            device=device,
            on_epoch=on_epoch,
            cancelled=job.cancel_requested.is_set,
        )

    async def _publish(self, job: Job, result: TrainResult) -> None:
        if job.cancel_requested.is_set():
            raise JobCancelled("cancelled")
        job.metrics = {
            "train_loss": result.train_loss,
            "validation_loss": result.validation_loss,
            "validation_accuracy": result.validation_accuracy,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "train_examples": result.train_examples,
            "validation_examples": result.validation_examples,
            "train_seconds": result.train_seconds,
        }
        spec = job.spec
        assert self._store is not None
        manifest = await asyncio.to_thread(
            self._store.save,
            name=spec.output_model,
            base_model=spec.base_model,
            head_spec=spec.head,
            head=result.head,
            labels=job.labels,
            loss=spec.loss,
            metrics={k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in job.metrics.items()},
            job_id=job.id,
        )
        model = await asyncio.to_thread(
            self._repository.install_finetuned,
            spec.output_model,
            spec.base_model,
            result.head,
            job.labels,
            manifest.version,
        )
        self._repository.activate(model)
        await self._finish(job, JobState.SUCCEEDED, f"serving {spec.output_model}")

    async def _finish(self, job: Job, state: JobState, message: str) -> None:
        job.state = state
        job.finished_at = time.time()
        if state is JobState.FAILED:
            job.error = message
        self._update_state_gauge()
        last = job.events[-1] if job.events else None
        await self._emit(
            job,
            JobEvent(
                job.id,
                state,
                state.value,
                epoch=last.epoch if last else 0,
                epochs=job.spec.epochs,
                train_loss=job.metrics.get("train_loss", math.nan),
                validation_loss=job.metrics.get("validation_loss", math.nan),
                validation_accuracy=job.metrics.get("validation_accuracy", math.nan),
                progress=1.0 if state is JobState.SUCCEEDED else (last.progress if last else 0.0),
                message=message,
            ),
        )

    async def _emit(self, job: Job, event: JobEvent) -> None:
        async with job.changed:
            job.events.append(event)
            job.changed.notify_all()

    def _update_state_gauge(self) -> None:
        counts = {state: 0 for state in JobState}
        for job in self._jobs.values():
            counts[job.state] += 1
        for state, count in counts.items():
            self._metrics.finetune_jobs.labels(state.value).set(count)
