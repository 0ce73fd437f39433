"""The job manager: admits jobs within the caps, queues them (one per device), runs their
pipeline, streams their events, cancels them, and keeps a bounded history of finished ones.

Caps (``FineTuneLimits``), each answered at once:

- ``max_uploads`` CreateJob streams receiving examples at the same time (RESOURCE_EXHAUSTED);
- ``max_queued_jobs`` jobs queued or running, since each holds its images until their
  features are extracted (RESOURCE_EXHAUSTED);
- per job: examples, bytes (images, labels and targets), classes, label length, head
  parameters, every number of the config (INVALID_ARGUMENT).

A finished job keeps no images. Its record goes to the store (:mod:`.history`), so that
GetJob and ListJobs answer after a restart and on every replica sharing the store; the
last ``max_finished_jobs`` finished jobs also stay in memory with their events.

A running job survives a restart (:mod:`.durable`): it is kept in the store with a lease this
server renews; on SIGTERM a job whose features are kept stops after its current batch (event
``suspended``) and hands its lease back; every server sharing the store claims jobs whose lease
is gone or expired (at start and then every third of ``job_lease_s``) and goes on with them from
their last checkpoint (event ``resumed``), or ends them ``failed`` where their inputs are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from functools import partial
from typing import TypeVar

import torch

from service.config import FineTuneLimits, ServeConfig
from service.engine.dataplane import DataPlane
from service.engine.loader import BuiltinModels
from service.engine.metrics import ServerMetrics
from service.engine.repository import ModelRepository
from service.errors import (
    AlreadyExistsError,
    BuiltinModelError,
    InvalidInputError,
    ModelNotFoundError,
    QueueFullError,
    UnavailableError,
    VisionServeError,
    quote,
)
from service.finetune.catalog import READ_TIMEOUT_S, FineTunedModels
from service.finetune.datasets import check_name, list_dataset
from service.finetune.durable import InputsGone, JobKeeper, LeaseLost
from service.finetune.examples import ExampleCollector, TrainingExamples, check_images
from service.finetune.history import JOBS_FOLDER, JobHistory
from service.finetune.job import EpochMetrics, Job, JobEvent, JobState
from service.finetune.pipeline import JobPipeline
from service.finetune.spec import check_head, check_limits
from service.finetune.trainer import JobCancelled
from service.host.files import TimedOut, call_with_timeout
from service.models import get_model_spec
from service.telemetry.tracing import Tracing
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol import FineTuneConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
CHECKPOINT_READ_S = 300.0  # a checkpoint holds about four copies of a head (up to --max-head-parameters)


class JobManager:
    def __init__(
        self,
        dataplane: DataPlane,
        repository: ModelRepository,
        builtin: BuiltinModels,
        catalog: FineTunedModels,
        metrics: ServerMetrics,
        limits: FineTuneLimits | None = None,
        tracing: Tracing | None = None,
        max_image_bytes: int = ServeConfig.max_message_bytes,  # one image of a dataset (an upload's: one message)
    ) -> None:
        self._max_image_bytes = max_image_bytes
        self._dataplane = dataplane
        self._repository = repository
        self._catalog = catalog
        self._store = store = catalog.store
        self._metrics = metrics
        self.limits = limits or FineTuneLimits()
        self._live: dict[str, Job] = {}  # queued or running
        self._finished: OrderedDict[str, Job] = OrderedDict()  # the most recent, with their events
        self._history = JobHistory(store.objects, self.limits.max_finished_jobs) if store is not None else None
        self._tracing = tracing or Tracing.off()
        self._keeper = (
            JobKeeper(
                store.objects,
                quota_bytes=self.limits.max_kept_job_bytes,
                lease_s=self.limits.job_lease_s,
                checkpoint_s=self.limits.job_checkpoint_s,
            )
            if store is not None and self.limits.max_kept_job_bytes > 0
            else None
        )
        self._pipeline = (
            JobPipeline(dataplane, builtin, catalog, metrics, self._emit, self._tracing, keeper=self._keeper)
            if store is not None
            else None
        )
        self._keeping: list[asyncio.Task[None]] = []  # renewing leases; claiming jobs other servers left
        self._stopping = False
        self._uploads = 0
        self._watchers: dict[str, int] = {}  # job id -> its watchers now (see watch)
        self._tasks: set[asyncio.Task[None]] = set()
        self._devices: asyncio.Queue[torch.device] = asyncio.Queue()
        for device in repository.devices:
            self._devices.put_nowait(device)
        self._update_state_gauge()

    # -- creating --------------------------------------------------------

    @property
    def tracing_enabled(self) -> bool:
        """Whether a CreateJob caller's trace context is worth reading (``submit``'s ``carrier``)."""
        return self._tracing.enabled

    @contextlib.contextmanager
    def upload(self) -> Iterator[None]:
        """Hold one of ``max_uploads`` slots for a CreateJob stream while it receives examples."""
        if self._uploads >= self.limits.max_uploads:
            raise QueueFullError(
                f"{self._uploads} fine-tuning jobs are being uploaded already, the most this server takes at "
                "once (--max-job-uploads); retry when one is done"
            )
        self._uploads += 1
        try:
            yield
        finally:
            self._uploads -= 1

    def check_config(self, config: FineTuneConfig, *, outputs: int = 2) -> FineTuneConfig:
        """Refuse a job before its examples are streamed, where the config alone says it is bad."""
        self._catalog.require_store()
        check_limits(config, self.limits)
        if config.dataset:
            check_name(config.dataset, self.limits.dataset_roots)  # before anything is read
        base = self._repository.get(config.base_model)  # NOT_FOUND for unknown models
        if base.base_model is not None:
            raise InvalidInputError(
                f"base_model {quote(config.base_model)} is itself fine-tuned; build on one of "
                f"{', '.join(self._repository.builtin_names())}"
            )
        check_head(config.head, get_model_spec(config.base_model).feature_dim, outputs, self.limits)
        if config.output_model in self._repository.builtin_names():
            raise BuiltinModelError(config.output_model, "the output of a fine-tuning job")
        clash = config.output_model in self._repository or any(
            j.config.output_model == config.output_model for j in self._live.values()
        )
        if clash and not config.replace:
            raise AlreadyExistsError(
                f"a model or running job named {quote(config.output_model)} exists; pick another name or set replace"
            )
        self._check_queue()
        return config

    def collector(self, config: FineTuneConfig) -> ExampleCollector:
        return ExampleCollector(config, self.limits)

    async def submit(
        self, config: FineTuneConfig, collector: ExampleCollector, *, carrier: Mapping[str, str] | None = None
    ) -> Job:
        """Queue a job; fails at once with INVALID_ARGUMENT if an example is not a decodable image.
        ``carrier``: the caller's W3C trace context, which the job's spans continue."""
        examples, labels = (
            await list_dataset(config, collector, self.limits, self._max_image_bytes)
            if config.dataset
            else collector.finish()
        )
        self.check_config(config, outputs=len(labels))  # again: the name may have been taken meanwhile
        if self._dataplane.draining:
            raise UnavailableError("the server is shutting down and takes no new jobs")
        assert self._store is not None
        exists = partial(self._store.exists, config.output_model)
        if not config.replace and await self._ask_store(exists, "look up a name in"):
            raise AlreadyExistsError(
                f"the model store already holds a model named {quote(config.output_model)}; "
                "pick another name or set replace"
            )
        # The store must take writes now: a job accepted into a store it cannot write to would
        # fail only after its training.
        await self._ask_store(self._probe_store, "write to")
        decoder = self._repository.get(config.base_model).decoder
        await check_images(decoder, examples.images, self._dataplane.decode_pool)
        self._check_queue()  # again: other jobs may have been queued while the images were checked
        job = Job(
            id=uuid.uuid4().hex[:12], config=config, labels=labels, example_count=len(examples), examples=examples
        )
        if self._keeper is not None:
            try:
                await self._ask_store(partial(self._keeper.begin, job), "keep a job in")
                job.kept = True
                # Until its features are kept: an upload's images (a dataset is listed again).
                job.inputs_kept = examples.dataset is not None or await self._ask_store(
                    partial(self._keeper.keep_images, job, examples), "keep a job's images in", CHECKPOINT_READ_S
                )
            except UnavailableError as exc:  # the job runs; it will not survive a restart
                log.warning("job %s is not kept in the store and will not survive a restart: %s", job.id, exc)
        self._live[job.id] = job
        await self._emit(job, JobEvent(job.id, JobState.QUEUED, "queued", epochs=config.epochs))
        self._update_state_gauge()
        self._start(job, carrier)
        return job

    def _start(self, job: Job, carrier: Mapping[str, str] | None = None) -> None:
        task = asyncio.create_task(self._run(job, carrier), name=f"finetune-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_queue(self) -> None:
        if len(self._live) >= self.limits.max_queued_jobs:
            raise QueueFullError(
                f"{len(self._live)} fine-tuning jobs are queued or running, the most this server holds "
                "(--max-queued-jobs); retry when one has finished"
            )

    # -- reading ---------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        job = self._live.get(job_id) or self._finished.get(job_id)
        if job is None and self._history is not None:
            job = await self._ask_store(partial(self._history.get, job_id), "read the job history of")
        if job is None and self._keeper is not None:  # running on another replica, or waiting to go on
            job = await self._ask_store(partial(self._keeper.find, job_id), "read the jobs kept in")
        if job is None:
            raise ModelNotFoundError(f"no fine-tuning job {quote(job_id)} (finished jobs are kept up to a limit)")
        return job

    async def list(self) -> list[Job]:
        """Jobs running here, finished jobs of every replica sharing the store, and the jobs kept in
        the store that run on another replica or wait to go on (``running``)."""
        stored: list[Job] = []
        if self._history is not None:
            try:
                stored = await self._ask_store(self._history.recent, "read the job history of")
            except UnavailableError as exc:  # the jobs this server knows are still worth listing
                log.warning("listing jobs without the store's history: %s", exc)
        if self._keeper is not None:
            try:
                stored[:0] = await self._ask_store(self._keeper.kept_jobs, "read the jobs kept in")  # records win
            except UnavailableError as exc:
                log.warning("listing jobs without those kept in the store: %s", exc)
        jobs = {job.id: job for job in stored}
        jobs.update(self._finished)
        jobs.update(self._live)
        return sorted(jobs.values(), key=lambda j: j.created_at)

    async def _ask_store(self, question: Callable[[], T], action: str, timeout: float = READ_TIMEOUT_S) -> T:
        """``question()`` in a thread with the store's read time limit; UNAVAILABLE if the store fails it."""
        assert self._store is not None
        try:
            return await call_with_timeout(question, timeout, "store-jobs")
        except TimedOut as exc:
            raise UnavailableError(
                f"cannot {action} the model store {self._store.location}: no answer within {timeout:g}s; retry"
            ) from exc
        except OSError as exc:
            raise UnavailableError(f"cannot {action} the model store {self._store.location}: {exc}; retry") from exc

    def _probe_store(self) -> None:
        """Write and delete a small object in the store's job records (blocking)."""
        assert self._store is not None
        key = f"{JOBS_FOLDER}/.probe-{uuid.uuid4().hex}"
        self._store.objects.write(key, b"")
        self._store.objects.delete(key)

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Every event of the job so far, then each new one until it ends."""
        job = await self.get(job_id)
        if job.state.terminal and not job.events:  # a record from the store: only its end is known
            yield job.final_event()
            return
        job = self._live.get(job.id) or self._finished.get(job.id) or job  # claimed while the store was read
        if not job.state.terminal and job.id not in self._live:
            raise UnavailableError(
                f"job {quote(job_id)} runs on another server sharing the model store, or waits to go on there or "
                "here after its server stopped; watch it through that server, or retry"
            )
        with self._watching(job.id):
            async for event in self._follow(job):
                yield event

    @contextlib.contextmanager
    def _watching(self, job_id: str) -> Iterator[None]:
        """Count a watcher of ``job_id`` within the caps. Each watcher reads the job's event list at
        its own pace (a slow one gets what it missed in one go), so the job's cost per event is a
        wake-up per watcher; the caps bound that, and the event-loop time watchers take."""
        limits = self.limits
        if self._watchers.get(job_id, 0) >= limits.max_watchers_per_job:
            raise QueueFullError(
                f"job {quote(job_id)} has {limits.max_watchers_per_job} watchers already, the most one job takes "
                "(--max-job-watchers); watch it from one place, or poll GetJob"
            )
        if sum(self._watchers.values()) >= limits.max_watchers:
            raise QueueFullError(
                f"{limits.max_watchers} job watchers are open already, the most this server takes "
                "(--max-watchers); retry when one has closed, or poll GetJob"
            )
        self._watchers[job_id] = self._watchers.get(job_id, 0) + 1
        try:
            yield
        finally:
            self._watchers[job_id] -= 1
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    async def _follow(self, job: Job) -> AsyncIterator[JobEvent]:
        sent = 0
        while True:
            async with job.changed:

                def grown(sent: int = sent) -> bool:
                    return len(job.events) > sent

                await job.changed.wait_for(grown)
                fresh = job.events[sent:]
            for event in fresh:
                yield event
            sent += len(fresh)
            if fresh[-1].state.terminal or fresh[-1].kind == "suspended":
                return

    # -- cancelling --------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if not job.state.terminal:
            job.cancel_requested.set()
            if job.state is JobState.QUEUED:
                await self._finish(job, JobState.CANCELLED, "cancelled before it started")
        return job

    async def shutdown(self) -> None:
        """Stop every job that has not ended and wait for them: a job whose inputs are kept in the
        store stops after its current batch and goes on at the next start of a server sharing the
        store; any other is cancelled."""
        self._stopping = True
        for task in self._keeping:
            task.cancel()
        for job in list(self._live.values()):
            if job.state.terminal:
                continue
            if job.kept and job.inputs_kept:
                job.suspending = True
                job.cancel_requested.set()
            else:
                await self.cancel(job.id)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- surviving a restart ------------------------------------------------

    def resume_jobs(self) -> None:
        """Start keeping jobs: renew this server's leases, and claim the jobs that servers which
        stopped or died left in the store (call once the base models are loaded; idempotent)."""
        if self._keeper is not None and not self._keeping and not self._stopping:
            # Two loops: a slow claim (a large checkpoint read) never holds up the renewals.
            self._keeping = [
                asyncio.create_task(self._renew_leases(self._keeper), name="finetune-leases"),
                asyncio.create_task(self._claim_forever(self._keeper), name="finetune-claims"),
            ]

    async def _renew_leases(self, keeper: JobKeeper) -> None:
        while not self._stopping:
            for job in list(self._live.values()):
                if job.kept and keeper.holds(job.id) and not job.state.terminal:
                    try:
                        await self._ask_store(partial(keeper.renew, job.id), "renew a job's lease in")
                    except LeaseLost:
                        log.warning("job %s was taken over by another server; it stops here", job.id)
                        job.lost = True
                        job.cancel_requested.set()
                    except UnavailableError as exc:
                        log.warning("cannot renew the lease of job %s: %s", job.id, exc)
                    except Exception:  # the next round tries again: this loop must outlive any one job
                        log.exception("renewing the lease of job %s failed", job.id)
            await asyncio.sleep(keeper.lease_s / 3)

    async def _claim_forever(self, keeper: JobKeeper) -> None:
        while not self._stopping:
            try:
                await self.claim_jobs()
            except UnavailableError as exc:
                log.warning("cannot look for jobs to go on with: %s", exc)
            except Exception:  # the next round tries again: this loop must outlive any one job
                log.exception("looking for jobs to go on with failed")
            await asyncio.sleep(keeper.lease_s / 3)

    async def claim_jobs(self) -> tuple[Job, ...]:
        """Claim every job of the store that no live server holds, within this server's queue, and go
        on with it; the jobs claimed."""
        keeper = self._keeper
        if keeper is None:
            return ()
        claimed: tuple[Job, ...] = ()
        for job_id in await self._ask_store(lambda: list(keeper.unheld()), "look for jobs in"):
            if self._stopping or len(self._live) >= self.limits.max_queued_jobs:
                break
            if job_id in self._live or not await self._ask_store(partial(keeper.claim, job_id), "claim a job in"):
                continue
            try:
                job = await self._ask_store(partial(keeper.read_job, job_id), "read a kept job from")
            except (ConfigError, KeyError, TypeError, ValueError, OverflowError, VisionServeError, OSError) as exc:
                log.error("kept job %s cannot be read; deleting what it kept: %s", job_id, exc)
                await self._ask_store(partial(keeper.end, job_id), "delete a kept job from")
                continue
            base = job.config.base_model
            if base not in self._repository or not self._catalog.base_served(base):
                log.info("job %s builds on %s, which this server does not serve; leaving it to another", job_id, base)
                await self._ask_store(partial(keeper.release, job_id), "release a job in")
                continue
            job.state, job.kept, job.inputs_kept = JobState.QUEUED, True, True
            refused = ""
            try:
                job.examples = await self._examples_again(keeper, job)
            except VisionServeError as exc:
                refused = exc.message
            job.resumed = resumed = await self._ask_store(
                partial(keeper.resume_point, job_id), "read a checkpoint from", CHECKPOINT_READ_S
            )
            self._live[job.id] = job
            await self._emit(job, JobEvent(job.id, JobState.QUEUED, "queued", epochs=job.config.epochs))
            for point in resumed.curve:
                await self._emit(
                    job,
                    JobEvent(
                        job.id,
                        JobState.QUEUED,
                        "epoch",
                        epoch=point.epoch,
                        epochs=job.config.epochs,
                        train_loss=point.train_loss,
                        validation_loss=point.validation_loss,
                        validation_accuracy=point.validation_accuracy,
                    ),
                )
            after = f"after epoch {resumed.curve[-1].epoch}" if resumed.curve else "from its first epoch"
            log.info("job %s goes on here %s (its server stopped)", job.id, after)
            await self._emit(
                job,
                JobEvent(
                    job.id,
                    JobState.QUEUED,
                    "resumed",
                    epoch=len(resumed.curve),
                    epochs=job.config.epochs,
                    message=f"its server stopped; it goes on here {after}",
                ),
            )
            self._update_state_gauge()
            if refused:
                await self._finish(job, JobState.FAILED, refused)
            else:
                self._start(job)
            claimed += (job,)
        return claimed

    async def _examples_again(self, keeper: JobKeeper, job: Job) -> TrainingExamples | None:
        """A claimed job's examples, to extract its features from again where they are not kept (None:
        they are): its dataset listed again, or an upload's kept images."""
        if await self._ask_store(partial(keeper.has_features, job.id), "read a kept job from"):
            return None
        if job.config.dataset:
            examples, labels = await list_dataset(
                job.config, self.collector(job.config), self.limits, self._max_image_bytes
            )
            if labels != job.labels:
                raise InputsGone(
                    f"its dataset's classes changed after it began ({len(job.labels)} then, {len(labels)} now); "
                    "create the job again"
                )
            return examples
        return await self._ask_store(
            partial(keeper.kept_examples, job.id), "read a job's images from", CHECKPOINT_READ_S
        )

    async def _suspend(self, job: Job, message: str) -> None:
        """Let ``job`` go without ending it: what it kept stays in the store for a server to go on with."""
        self._live.pop(job.id, None)
        job.resumed = None
        self._update_state_gauge()
        last = job.events[-1] if job.events else None
        await self._emit(
            job,
            JobEvent(
                job.id,
                job.state,
                "suspended",
                epoch=last.epoch if last else 0,
                epochs=job.config.epochs,
                progress=last.progress if last else 0.0,
                message=message,
            ),
        )
        if self._keeper is not None and not job.lost:
            try:
                await asyncio.to_thread(self._keeper.release, job.id)
            except OSError as exc:  # it goes on once its lease expires
                log.warning("cannot hand back the lease of job %s: %s", job.id, exc)

    def delete_model(self, name: str) -> None:
        self._catalog.delete(name)

    # -- running -----------------------------------------------------------

    async def _run(self, job: Job, carrier: Mapping[str, str] | None = None) -> None:
        device = await self._devices.get()
        try:
            if job.state.terminal:
                return
            if job.suspending:
                raise JobCancelled("the server is stopping")
            job.state = JobState.RUNNING
            job.started_at = time.time()
            self._update_state_gauge()
            assert self._pipeline is not None
            await self._pipeline.run(job, device, carrier)
            await self._finish(job, JobState.SUCCEEDED, f"serving {job.config.output_model}")
        except LeaseLost as exc:
            log.warning("job %s stops here: %s", job.id, exc)
            job.lost = True
            await self._suspend(job, "another server took this job over; it goes on there")
        except JobCancelled:
            if job.lost:
                await self._suspend(job, "another server took this job over; it goes on there")
            elif job.suspending:
                await self._suspend(
                    job, "the server stopped; the job goes on at the next start of a server sharing the store"
                )
            else:
                await self._finish(job, JobState.CANCELLED, "cancelled")
        except VisionServeError as exc:
            await self._finish(job, JobState.FAILED, exc.message)
        except Exception as exc:
            log.exception("fine-tuning job %s failed", job.id)
            await self._finish(job, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._devices.put_nowait(device)
            self._metrics.clear_job_loss(job.id)

    async def _finish(self, job: Job, state: JobState, message: str) -> None:
        if job.state.terminal:
            return
        job.state = state
        job.finished_at = time.time()
        job.examples = None
        job.resumed = None  # a checkpoint's tensors
        if state is JobState.FAILED:
            job.error = message
        self._live.pop(job.id, None)
        self._finished[job.id] = job
        while len(self._finished) > self.limits.max_finished_jobs:
            self._finished.popitem(last=False)
        self._update_state_gauge()
        last = job.events[-1] if job.events else None
        await self._emit(
            job,
            JobEvent(
                job.id,
                state,
                state.value,
                epoch=last.epoch if last else 0,
                epochs=job.config.epochs,
                train_loss=job.metrics.train_loss,
                validation_loss=job.metrics.validation_loss,
                validation_accuracy=job.metrics.validation_accuracy,
                progress=1.0 if state is JobState.SUCCEEDED else (last.progress if last else 0.0),
                message=message,
            ),
        )
        if self._history is not None:
            try:
                await asyncio.to_thread(self._history.save, job)
            except OSError as exc:
                log.error("cannot write the record of job %s to the store: %s", job.id, exc)
        if job.kept and self._keeper is not None:
            try:
                await asyncio.to_thread(self._keeper.end, job.id)
            except OSError as exc:
                log.error("cannot delete what job %s kept in the store: %s", job.id, exc)

    async def _emit(self, job: Job, event: JobEvent) -> None:
        async with job.changed:
            job.events.append(event)
            if event.kind == "epoch":
                job.curve.append(EpochMetrics.of(event))
            job.changed.notify_all()

    def _update_state_gauge(self) -> None:
        counts = {state.value: 0 for state in JobState}
        for job in [*self._live.values(), *self._finished.values()]:
            counts[job.state.value] += 1
        self._metrics.set_job_counts(counts)
