"""``vision.v1.Models``: what a client needs to know about each model, how busy each is, and the
rollback of a fine-tuned model to a version its store keeps."""

from __future__ import annotations

import time

from service.engine.dataplane import DataPlane
from service.engine.metrics import ServerMetrics
from service.engine.precision import Agreement
from service.engine.repository import ServedModel
from service.errors import InvalidInputError, quote
from service.finetune.catalog import FineTunedModels
from service.transport.call import Call
from service.transport.inference import require_model_name
from vision_client.protocol.stubs.vision.v1 import models_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import models_pb2_grpc as pb_grpc


class ModelsServicer(pb_grpc.ModelsServicer):
    def __init__(self, dataplane: DataPlane, metrics: ServerMetrics, finetuned: FineTunedModels) -> None:
        self._dataplane = dataplane
        self._metrics = metrics
        self._finetuned = finetuned

    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        call: Call,
    ) -> pb.ListModelsResponse:
        models = self._dataplane.repository.all()
        return pb.ListModelsResponse(models=[model_info(m, labels=not request.without_labels) for m in models])

    async def GetModel(self, request: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        name = require_model_name(request.name)
        if request.version:  # that version itself (another kept one loads, as a request naming it would)
            model = self._dataplane.model(name, request.version)
            if model.version != request.version:
                model = await self._dataplane.model_version(name, request.version)
            return model_info(model, labels=True)
        return model_info(self._dataplane.repository.get(name), labels=True)

    async def GetThroughput(
        self,
        request: pb.GetThroughputRequest,
        call: Call,
    ) -> pb.Throughput:
        now = time.time()
        images = [
            pb.DeviceImages(model=count.model, device=count.device, images=count.images)
            for count in sorted(self._metrics.images_by_device(), key=lambda c: (c.model, c.device))
        ]
        queues = [
            pb.QueueDepth(model=model.name, pending_images=model.queue.pending_images)
            for model in self._dataplane.repository.all()
        ]
        return pb.Throughput(time=now, images=images, queues=queues)

    async def RollbackModel(self, request: pb.RollbackModelRequest, call: Call) -> pb.ModelInfo:
        name = require_model_name(request.name)
        if not request.version:
            raise InvalidInputError(
                f"name the version of {quote(name)} to roll back to (GetModel's versions list those kept)"
            )
        return model_info(await self._finetuned.rollback(name, request.version), labels=True)


def model_info(model: ServedModel, *, labels: bool) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=model.name,
        state=model.state.value,
        reason=model.reason,
        platform=model.platform,
        base_model=model.base_model or "",
        input_size=model.input_size,
        num_outputs=model.num_outputs,
        labels=model.labels if labels else [],
        min_height=model.min_size[0],
        min_width=model.min_size[1],
        runtime=model.runtime,
        version=model.version,
        versions=model.available_versions,
        devices=list(model.runtimes),
        pending_images=model.queue.pending_images,
        precision=model.precision.dtype,
        precision_agreement=_agreement(model.precision.agreement),
    )


def _agreement(agreement: Agreement | None) -> pb.PrecisionAgreement | None:
    if agreement is None:
        return None
    return pb.PrecisionAgreement(
        images=agreement.images,
        images_source=agreement.images_source,
        min_cosine=agreement.min_cosine,
        mean_cosine=agreement.mean_cosine,
        top1=agreement.top1,
        max_relative_error=agreement.max_relative_error,
    )
