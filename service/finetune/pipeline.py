"""A job's work: extract the base model's features, train a head on them, publish it.

Features are computed once, through the same batched path inference uses (an internal
feature-extractor model sharing the backbone's weights); the job's images are released
as soon as that is done. The head trains in a worker thread; the result is written to
the store and served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import torch

from service.cpus import usable_cores, use_torch_threads
from service.dataplane import DataPlane, InferenceInput
from service.errors import InvalidInputError
from service.finetune.catalog import FineTunedModels
from service.finetune.job import Job, JobEvent, JobState
from service.finetune.store import Manifest
from service.finetune.trainer import EpochReport, JobCancelled, TrainResult, train_head
from service.loader import BuiltinModels
from service.metrics import ServerMetrics

FEATURE_CHUNK = 32  # images per feature-extraction request
FEATURE_SHARE = 0.3  # share of a job's progress given to feature extraction

Emit = Callable[[Job, JobEvent], Coroutine[Any, Any, None]]


class JobPipeline:
    def __init__(
        self,
        dataplane: DataPlane,
        builtin: BuiltinModels,
        catalog: FineTunedModels,
        metrics: ServerMetrics,
        emit: Emit,
    ) -> None:
        self._dataplane = dataplane
        self._builtin = builtin
        self._catalog = catalog
        self._metrics = metrics
        self._emit = emit

    async def run(self, job: Job, device: torch.device) -> None:
        """Run ``job`` to its published head; raises JobCancelled or a VisionServeError to end it otherwise."""
        features, targets = await self.extract_features(job)
        result = await self.train(job, features, targets, device)
        await self.publish(job, result)

    async def extract_features(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, D] and training targets; the job's images are released afterwards."""
        examples = job.examples
        assert examples is not None, "a job's examples are extracted once"
        model = self._builtin.features_model(job.config.base_model)
        images = examples.images
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
                    epochs=job.config.epochs,
                    progress=FEATURE_SHARE * done / len(images),
                    eta_seconds=elapsed / done * (len(images) - done),
                    message=f"features of {done}/{len(images)} examples",
                ),
            )
        if examples.labels is not None:
            index = {name: i for i, name in enumerate(job.labels)}
            targets = torch.tensor([index[label] for label in examples.labels], dtype=torch.long)
        else:
            assert examples.targets is not None
            targets = torch.from_numpy(examples.targets)
        job.examples = None  # the images are not needed any more: let them go
        return torch.from_numpy(np.concatenate(chunks)).float(), targets

    async def train(self, job: Job, features: torch.Tensor, targets: torch.Tensor, device: torch.device) -> TrainResult:
        loop = asyncio.get_running_loop()

        def on_epoch(report: EpochReport) -> None:
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

        def train() -> TrainResult:
            use_torch_threads(usable_cores())  # this pool thread's own count (see use_torch_threads)
            return train_head(
                features,
                targets,
                job.config,
                num_outputs=len(job.labels),
                device=device,
                on_epoch=on_epoch,
                cancelled=stop,
            )

        try:
            return await asyncio.to_thread(train)
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
