"""A job's work: extract the base model's features, train a head on them, publish it.

Features are computed once, through the same batched path inference uses (an internal
feature-extractor model sharing the backbone's weights), a chunk of images at a time;
each chunk's images are let go as soon as its features are in, and the job keeps only
what training needs (features and targets). The head trains in a worker thread; the
result is written to the store and served. When the job ends, however it ends, its
memory is handed back (:func:`service.host.memory.release_memory`).

With tracing on, a job has a ``job`` span with ``features``, one ``epoch`` per epoch and
``publish`` under it (:meth:`service.telemetry.tracing.Tracing.start_job`). An epoch's span is recorded by
the training thread once the epoch is done, from two clock reads (when the previous one ended, or
training began, and now): training waits for no exporter and no event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from service.engine.dataplane import DataPlane
from service.engine.loader import BuiltinModels
from service.engine.metrics import ServerMetrics
from service.engine.served import ServedModel
from service.errors import InvalidInputError
from service.finetune.augment import ViewMaker
from service.finetune.backbone import activations_limit_message, max_examples_at_cut, trained_part
from service.finetune.catalog import FineTunedModels
from service.finetune.durable import JobKeeper
from service.finetune.examples import TrainingExamples
from service.finetune.job import Job, JobEvent, JobState
from service.finetune.store import Manifest
from service.finetune.trainer import EpochReport, JobCancelled, TrainResult, train_head
from service.host.cpus import usable_cores, use_torch_threads
from service.host.memory import release_memory
from service.inference.inference_io import InferenceInput
from service.models import get_model_spec
from service.storage import store_kind
from service.telemetry.tracing import JobTrace, Tracing

FEATURE_CHUNK = 32  # images per feature-extraction request
FEATURE_SHARE = 0.3  # share of a job's progress given to feature extraction
# How a job keeps its features until its head is trained: as float32 up to FEATURE_EXACT_BYTES (8,192
# examples of a 4096-feature base), beyond that as float16, which halves them (20,000 such examples
# hold 164 MB, not 328 MB) and rounds each by at most 0.05% (11 significant bits); the head itself
# trains and serves in float32. A base whose features leave float16's range (|x| > 65504: random
# weights can) keeps float32 after all, from the first chunk that does on (see put_rows).
FEATURE_EXACT_BYTES = 128 * 1024 * 1024
FEATURE_DTYPE = torch.float16

Emit = Callable[[Job, JobEvent], Coroutine[Any, Any, None]]


class JobPipeline:
    def __init__(
        self,
        dataplane: DataPlane,
        builtin: BuiltinModels,
        catalog: FineTunedModels,
        metrics: ServerMetrics,
        emit: Emit,
        tracing: Tracing | None = None,
        keeper: JobKeeper | None = None,
    ) -> None:
        self._keeper = keeper  # keeps jobs in the store so that they survive a restart
        self._dataplane = dataplane
        self._builtin = builtin
        self._catalog = catalog
        self._metrics = metrics
        self._emit = emit
        self._tracing = tracing or Tracing.off()
        self._blocks: dict[str, nn.Module] = {}  # by job: backbone blocks to train, from extraction to training

    async def run(self, job: Job, device: torch.device, carrier: Mapping[str, str] | None = None) -> None:
        """Run ``job`` to its published head; raises JobCancelled or a VisionServeError to end it otherwise.

        However it ends, the job's features are let go and the allocator's free pages handed back
        before this returns (an exception's frames would otherwise keep them until it is dropped).
        ``carrier``: the W3C trace context CreateJob's caller sent, which the job's trace continues.
        """
        spans = (
            self._tracing.start_job(
                carrier,
                job_id=job.id,
                base_model=job.config.base_model,
                output_model=job.config.output_model,
                queued_at=job.created_at,
            )
            if self._tracing.enabled
            else None
        )
        state = JobState.FAILED
        try:
            kept = await self._keeper.kept_inputs(job) if self._keeper is not None else None  # a resumed job's
            if kept is None:
                with _phase(spans, "features", {"vision.examples": job.example_count}):
                    features, targets = await self.extract_features(job)
                if self._keeper is not None:
                    await self._keeper.keep(job, features, targets)
            else:
                features, targets = kept
                del kept
            try:
                result = await self.train(job, features, targets, device, spans)
            finally:
                del features, targets
            with _phase(spans, "publish", {"vision.store.kind": self._store_kind()}):
                await self.publish(job, result)
            state = JobState.SUCCEEDED
        except BaseException as exc:
            if isinstance(exc, (JobCancelled, asyncio.CancelledError)):
                state = JobState.CANCELLED
            traceback.clear_frames(exc.__traceback__)  # the frames keep their lines, not their tensors
            raise
        finally:
            job.examples = None
            self._blocks.pop(job.id, None)
            if spans is not None:
                spans.end(state.value)
            await release_memory()

    def _store_kind(self) -> str:
        store = self._catalog.store
        return store_kind(store.objects) if store is not None else "directory"

    async def extract_features(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's features of the job's examples (:meth:`_extract`), or, where the job trains
        the last blocks of its backbone, the activations those blocks take (:meth:`_extract_activations`)."""
        if job.config.train_backbone_blocks:
            return await self._extract_activations(job)
        return await self._extract(job, self._builtin.features_model(job.config.base_model))

    async def _extract_activations(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_extract` of the frozen prefix's activations [R * N, ...] at the cut before the job's
        trained blocks (:mod:`service.finetune.backbone`): the prefix runs in inference mode, once per
        image and view, as an internal model of this job's (the same batched path as features), which
        is stopped once they are in. The blocks to train are kept for :meth:`train`. A job whose
        activations would pass :data:`~service.finetune.backbone.MAX_ACTIVATION_BYTES` is refused
        before any image is decoded."""
        limit = max_examples_at_cut(job.config)
        if limit is not None and job.example_count > limit:
            raise InvalidInputError(activations_limit_message(job.config))
        prefix, blocks = await asyncio.to_thread(self._split, job)
        self._blocks[job.id] = blocks
        model = await asyncio.to_thread(self._builtin.start_activations, job.config.base_model, prefix)
        del prefix
        try:
            return await self._extract(job, model)
        finally:
            model.queue.close()
            for worker in model.workers:
                await asyncio.to_thread(worker.join)

    def _split(self, job: Job) -> tuple[nn.Module, nn.Module]:
        """(frozen prefix, blocks to train) of a new copy of the job's base network (blocking: seconds)."""
        return trained_part(job.config, self._builtin.network(job.config.base_model))

    async def _extract(self, job: Job, model: ServedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs of ``model`` [R * N, D] (float32, or :data:`FEATURE_DTYPE` past :data:`FEATURE_EXACT_BYTES`) and
        training targets, and nothing else of the examples. R is 1, or with augmentation 1 + its
        views: rows ``v * N`` to ``(v + 1) * N`` hold view ``v`` of every example, view 0 the image
        itself (the layout :func:`~service.finetune.trainer.train_head` reads).

        The images are taken from the job and preprocessed one chunk at a time, through the
        batched path; each chunk's features go straight into their rows of one tensor made
        up front, and each chunk's images are let go once its features are in. Augmented views
        go through the same batched path as PIXELS, made in the decode pool a group of at most
        :data:`FEATURE_CHUNK` views at a time (each image decoded once for all its views), the
        next group made while the backbone runs the current one. So the job holds, at most, its
        encoded images, the features and two groups' pixels, whatever its example count.
        """
        examples = job.examples
        assert examples is not None, "a job's examples are extracted once"
        job.examples = None  # from here the images are the extraction's, and go chunk by chunk
        count = len(examples)
        images = examples.source()  # an upload's images, let go chunk by chunk; or a dataset's, read so
        targets = _targets(examples, job.labels)
        del examples
        augmentation = job.config.augmentation
        views = augmentation.views
        maker = (
            ViewMaker.of(augmentation, job.config.seed, get_model_spec(job.config.base_model).transforms())
            if views
            else None
        )
        features: torch.Tensor | None = None  # [R * N, D], made once the first chunk says D
        started = time.monotonic()
        done = 0
        total = count * (1 + views)
        async for chunk in images.chunks(FEATURE_CHUNK):
            if job.cancel_requested.is_set():
                raise JobCancelled("cancelled")
            try:
                rows = await self._dataplane.infer_model(model, InferenceInput(images=chunk))
            except InvalidInputError as exc:  # the source names the image (a dataset's by its file)
                raise await images.refused(done, chunk, exc, model.decoder, self._dataplane.decode_pool) from exc
            if features is None:  # (activations at a cut have more dimensions than features)
                exact = total * rows[0].size * 4 <= FEATURE_EXACT_BYTES
                features = torch.empty((total, *rows.shape[1:]), dtype=torch.float32 if exact else FEATURE_DTYPE)
            features = put_rows(features, done, torch.from_numpy(rows))
            del rows
            if maker is not None:
                features = await self._view_features(job, model, maker, chunk, done, count, features)
            done += len(chunk)
            del chunk
            elapsed = time.monotonic() - started
            await self._emit(
                job,
                JobEvent(
                    job.id,
                    JobState.RUNNING,
                    "features",
                    epochs=job.config.epochs,
                    progress=FEATURE_SHARE * done / count,
                    eta_seconds=elapsed / done * (count - done),
                    message=f"features of {done}/{count} examples" + (f" and {views} views of each" if views else ""),
                ),
            )
        assert features is not None
        return features, targets

    async def _view_features(
        self,
        job: Job,
        model: ServedModel,
        maker: ViewMaker,
        chunk: list[bytes],
        first: int,
        count: int,
        features: torch.Tensor,
    ) -> torch.Tensor:
        """The features of views 1..V of ``chunk`` (examples ``first``...) into their rows of ``features``."""
        views = maker.augmentation.views
        group = max(1, FEATURE_CHUNK // views)  # images whose views make one request of at most FEATURE_CHUNK
        starts = list(range(0, len(chunk), group))
        loop = asyncio.get_running_loop()
        side = maker.side

        def make(start: int) -> asyncio.Future[np.ndarray]:
            images = chunk[start : start + group]
            pixels = np.empty((len(images) * views, 3, side, side), dtype=np.float32)
            work = partial(maker.views_into, model.decoder, images, first + start, pixels)
            return loop.run_in_executor(self._dataplane.decode_pool, _filled, work, pixels)

        upcoming = make(starts[0])
        try:
            for index, start in enumerate(starts):
                if job.cancel_requested.is_set():
                    raise JobCancelled("cancelled")
                n = min(group, len(chunk) - start)
                try:
                    pixels = await upcoming
                except InvalidInputError as exc:
                    where = f"examples {first + start}-{first + start + n - 1}"
                    raise InvalidInputError(f"{where} (augmented views): {exc.message}") from exc
                if index + 1 < len(starts):
                    upcoming = make(starts[index + 1])  # made while the backbone runs this group
                rows = torch.from_numpy(await self._dataplane.infer_model(model, InferenceInput(pixels=pixels)))
                del pixels
                for v in range(views):
                    block = rows[v * n : (v + 1) * n]
                    features = put_rows(features, (v + 1) * count + first + start, block)
                del rows
        finally:
            if not upcoming.done():
                upcoming.cancel()
            elif not upcoming.cancelled():
                upcoming.exception()  # read: a failure of views never used is not logged as unretrieved
        return features

    async def train(
        self,
        job: Job,
        features: torch.Tensor,
        targets: torch.Tensor,
        device: torch.device,
        spans: JobTrace | None = None,
    ) -> TrainResult:
        loop = asyncio.get_running_loop()
        epoch_started = [0]  # time.time_ns() when the next epoch began (training thread only)

        def on_epoch(report: EpochReport) -> None:
            if spans is not None:
                now = time.time_ns()
                spans.epoch(
                    report.epoch,
                    started_ns=epoch_started[0],
                    ended_ns=now,
                    train_loss=report.train_loss,
                    validation_loss=report.validation_loss,
                    validation_accuracy=report.validation_accuracy,
                )
                epoch_started[0] = now
            self._metrics.record_finetune_images(report.images_seen)
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

        base = job.config.base_model

        def stop() -> bool:
            # A base model unloaded meanwhile ends the job at the next batch: its head could not be served.
            return job.cancel_requested.is_set() or not self._catalog.base_served(base)

        # The features travel in a list the thread empties, not in a closure's cells (they would live
        # on with the function) nor as arguments (the pool's work item keeps those a moment after
        # the result is in): when the job ends, nothing but its frames holds them, and run clears those.
        def train(inputs: list[torch.Tensor]) -> TrainResult:
            features, targets = inputs
            inputs.clear()
            trunk = trained.pop() if trained else None
            use_torch_threads(usable_cores())  # this pool thread's own count (see use_torch_threads)
            if spans is not None:
                epoch_started[0] = time.time_ns()  # the first epoch's span includes the split and statistics
            resume, on_checkpoint = self._keeper.training_hooks(job) if self._keeper is not None else (None, None)
            return train_head(
                features,
                targets,
                job.config,
                num_outputs=len(job.labels),
                labels=job.labels,
                device=device,
                on_epoch=on_epoch,
                cancelled=stop,
                resume=resume,
                on_checkpoint=on_checkpoint,
                trunk=trunk,
            )

        trained: list[nn.Module] = []  # the backbone blocks the job trains, if any (emptied as the inputs are)
        if job.config.train_backbone_blocks:  # kept by the extraction; a resumed job's are made again
            kept = self._blocks.pop(job.id) if job.id in self._blocks else None
            trained.append(kept if kept is not None else (await asyncio.to_thread(self._split, job))[1])
        try:
            return await asyncio.to_thread(train, [features, targets])
        except JobCancelled:
            if not job.cancel_requested.is_set():
                self._catalog.require_base(base)  # raises: the base was unloaded
            raise

    async def publish(self, job: Job, result: TrainResult) -> Manifest:
        """Hand the trained head to the catalog, which writes it to the store and serves it."""
        if job.cancel_requested.is_set():
            raise JobCancelled("cancelled")
        job.metrics = result.metrics
        return await self._catalog.publish(job.config, result.head, job.labels, result.metrics, job.id)


def _phase(
    spans: JobTrace | None, name: str, attributes: Mapping[str, str | int]
) -> contextlib.AbstractContextManager[None]:
    return spans.phase(name, attributes) if spans is not None else contextlib.nullcontext()


def put_rows(features: torch.Tensor, start: int, block: torch.Tensor) -> torch.Tensor:
    """``block`` written into ``features`` from row ``start``: ``features``, or a float32 copy of it
    when ``block`` has a value beyond the range of ``features``' narrower type."""
    if features.dtype != torch.float32 and bool(block.abs().max() > torch.finfo(features.dtype).max):
        features = features.float()  # these features need float32's range: all of them from here
    features[start : start + len(block)] = block
    return features


def _filled(work: Callable[[], None], pixels: np.ndarray) -> np.ndarray:
    work()
    return pixels


def _targets(examples: TrainingExamples, labels: list[str]) -> torch.Tensor:
    """Class ids [N] (cross_entropy) or target values [N, T] (mse) of ``examples``."""
    if examples.labels is not None:
        index = {name: i for i, name in enumerate(labels)}
        return torch.tensor([index[label] for label in examples.labels], dtype=torch.long)
    assert examples.targets is not None
    return torch.from_numpy(examples.targets)
