"""``vision.v1.Models``: what a client needs to know about each model."""

from __future__ import annotations

import grpc

from service.dataplane import DataPlane
from service.repository import ServedModel
from service.transport.inference import require_model_name
from vision_client.protocol.stubs.vision.v1 import models_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import models_pb2_grpc as pb_grpc


class ModelsServicer(pb_grpc.ModelsServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        models = self._dataplane.repository.all()
        return pb.ListModelsResponse(models=[model_info(m, labels=not request.without_labels) for m in models])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[pb.GetModelRequest, pb.ModelInfo]
    ) -> pb.ModelInfo:
        return model_info(self._dataplane.repository.get(require_model_name(request.name)), labels=True)


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
    )
