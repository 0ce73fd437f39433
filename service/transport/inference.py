"""``inference.GRPCInferenceService``: the Open Inference Protocol servicer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

import service
from service.dataplane import DataPlane
from service.errors import InvalidInputError
from service.transport.codec import IMAGE, LOGITS, PIXELS, build_infer_response, parse_infer_request
from service.transport.errors import status_for
from service.transport.parsing import FIELDS_BESIDES_IMAGES, INFER_REQUEST_SCHEMA, ScreenedParsingInterceptor
from vision_client._proto.inference import grpc_service_pb2 as pb
from vision_client._proto.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "vision-serving"
EXTENSIONS = ("classification",)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._dataplane.model_ready(require_model_name(request.name)))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=service.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._dataplane.repository.get(require_model_name(request.name))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=model.platform,
            inputs=[
                tensor(name=IMAGE, datatype="BYTES", shape=[-1]),
                tensor(name=PIXELS, datatype="FP32", shape=[-1, 3, -1, -1]),
            ],
            outputs=[tensor(name=LOGITS, datatype="FP32", shape=[-1, model.num_outputs])],
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for model in self._dataplane.repository.all():
            if request.ready and not model.ready:
                continue
            response.models.add(name=model.name, version=model.version, state=model.state.value, reason=model.reason)
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Run each streamed request as it arrives; answer in completion order, with its id.

        At most ``max_stream_in_flight`` requests of a stream are being worked on or waiting
        to be sent back; while that many are, the stream is not read further, so a client
        that sends faster than it is answered (or stops reading) meets gRPC flow control
        instead of growing the server's queues.
        """
        slots = asyncio.Semaphore(self._dataplane.config.max_stream_in_flight)
        # Each response holds a slot until it is sent: the queue never holds more than the bound.
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                result = await self._infer(request, context.time_remaining())
                responses.put_nowait(pb.ModelStreamInferResponse(infer_response=result))
            except Exception as exc:
                _, message = status_for(exc)
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                responses.put_nowait(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))

        async def read() -> None:
            try:
                while True:
                    await slots.acquire()
                    try:
                        request = await request_iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
                slots.release()
            await reader  # re-raise what ended the request stream, if anything
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, timeout: float | None) -> pb.ModelInferResponse:
        async with self._dataplane.track(request.model_name):
            call = parse_infer_request(request, max_images=self._dataplane.max_request_images)
            result = await self._dataplane.infer(
                call.model_name, call.inputs, version=call.model_version, timeout=timeout
            )
            return build_infer_response(call, result)


def inference_parsing_interceptor(max_request_images: int) -> ScreenedParsingInterceptor:
    """Screens inference requests' wire bytes before parsing them (see :mod:`service.transport.parsing`)."""
    service_name = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    return ScreenedParsingInterceptor(
        {
            f"/{service_name}/ModelInfer": pb.ModelInferRequest.FromString,
            f"/{service_name}/ModelStreamInfer": pb.ModelInferRequest.FromString,
        },
        schema=INFER_REQUEST_SCHEMA,
        max_fields=max_request_images + FIELDS_BESIDES_IMAGES,
    )


def require_model_name(name: str) -> str:
    if not name:
        raise InvalidInputError("name is empty: name a model, e.g. 'resnet101'")
    return name
