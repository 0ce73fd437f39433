"""A job's work: extract the base model's features, train a head on them, publish it.

Features are computed once, through the same batched path inference uses (an internal
feature-extractor model sharing the backbone's weights); the job's images are released
as soon as that is done. The head trains in a worker thread; the result is written to
the store and served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import torch

from service.dataplane import DataPlane, InferenceInput
from service.errors import InvalidInputError, StoreWriteError, UnavailableError, VisionServeError, quote
from service.finetune.job import Job, JobEvent, JobState
from service.finetune.store import Manifest, ModelStore
from service.finetune.trainer import EpochReport, JobCancelled, TrainResult, train_head
from service.metrics import ServerMetrics
from service.repository import ModelRepository

FEATURE_CHUNK = 32  # images per feature-extraction request
FEATURE_SHARE = 0.3  # share of a job's progress given to feature extraction

Emit = Callable[[Job, JobEvent], Coroutine[Any, Any, None]]


class JobPipeline:
    def __init__(
        self,
        dataplane: DataPlane,
        repository: ModelRepository,
        store: ModelStore,
        metrics: ServerMetrics,
        emit: Emit,
    ) -> None:
        self._dataplane = dataplane
        self._repository = repository
        self._store = store
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
        model = self._repository.features_model(job.config.base_model)
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

        return await asyncio.to_thread(
            train_head,
            features,
            targets,
            job.config,
            num_outputs=len(job.labels),
            device=device,
            on_epoch=on_epoch,
            cancelled=job.cancel_requested.is_set,
        )

    async def publish(self, job: Job, result: TrainResult) -> Manifest:
        """Write the head to the store (claiming the name unless ``replace``) and serve it.

        What is in the store and whose base model is served, is served; a job that fails leaves
        nothing behind. So the base must be served before anything is written; a base unloaded
        after the write makes the job fail and takes a new name's entry out again (a replaced
        one stays: the store's sync serves it once the base is back); a model deleted or
        unloaded while this ran stays so.
        """
        if job.cancel_requested.is_set():
            raise JobCancelled("cancelled")
        job.metrics = result.metrics
        config = job.config
        name = config.output_model
        self._require_base(config.base_model)
        withdrawals = self._repository.withdrawals(name)
        try:
            manifest = await asyncio.to_thread(
                self._store.save,
                name=name,
                base_model=config.base_model,
                head_spec=config.head,
                head=result.head,
                labels=job.labels,
                loss=config.loss,
                metrics=result.metrics,
                job_id=job.id,
                replace=config.replace,
            )
        except OSError as exc:
            raise StoreWriteError(self._store.root, exc) from exc
        try:
            self._require_base(config.base_model)
            model = await asyncio.to_thread(
                self._repository.install_finetuned, name, config.base_model, result.head, job.labels, manifest.version
            )
        except VisionServeError:
            if not config.replace:
                with contextlib.suppress(VisionServeError, OSError):
                    await asyncio.to_thread(self._store.delete, name)
            raise
        if self._repository.withdrawals(name) != withdrawals:  # DeleteModel or an unload came first
            self._repository.discard(model)
            raise UnavailableError(f"{quote(name)} was deleted or unloaded while the job published it")
        self._repository.activate(model)
        return manifest

    def _require_base(self, base: str) -> None:
        if not self._repository.get(base).ready:
            raise UnavailableError(
                f"the base model {quote(base)} was unloaded while the job ran, so its head cannot be served; "
                f"load {quote(base)} (RepositoryModelLoad) and run the job again"
            )
