"""A protocol front end's servicers: the same services as the single process's, each call handed
to the engine, which owns every model, queue, job and region.

Inference goes through the hop (``service.hop``); every other call is forwarded on the engine's
gRPC socket with the caller's peer (``auth.FORWARDED_PEER``) and trace context: the front end has
authorized it already. The engine's errors come back with their code and message unchanged. While
the engine is down, readiness says not ready (liveness: live, this process is) and everything else
is UNAVAILABLE, which clients retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import FineTuneLimits
from service.errors import RelayedError, VisionServeError
from service.finetune.names import LIVENESS_SERVICE
from service.frontend.decoding import FrontendDecoding
from service.frontend.engine_link import EngineLink, engine_down
from service.tracing import trace_carrier
from service.transport.auth import FORWARDED_PEER, is_loopback_peer
from service.transport.limits import UploadPace
from service.transport.streaming import stream_call
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc
from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

Resp = TypeVar("Resp")
WATCH_RETRY_S = 0.2  # between a Watch stream the engine ended and the next
_TRACE_KEYS = ("traceparent", "tracestate")


class Forwarder:
    """Calls the engine's gRPC services on behalf of a caller."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link

    def metadata(self, context: Any, peer: str | None = None) -> list[tuple[str, str]]:
        """What the engine needs of the caller: its peer and trace context (its token was checked here)."""
        entries: list[tuple[str, str]] = []
        if context is not None:
            peer = peer or str(context.peer())
            for key, value in context.invocation_metadata() or ():
                if key in _TRACE_KEYS:
                    entries.append((key, value if isinstance(value, str) else value.decode("latin-1")))
        if peer:
            entries.append((FORWARDED_PEER, peer))
        return entries

    def error(self, exc: grpc.aio.AioRpcError) -> VisionServeError:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and not self.link.connected.is_set():
            return engine_down()
        return RelayedError(exc.code().name, exc.details() or exc.code().name)

    async def unary(
        self, method: Callable[..., Awaitable[Resp]], request: Any, context: Any, *, peer: str | None = None
    ) -> Resp:
        timeout = context.time_remaining() if context is not None else None
        try:
            return await method(request, metadata=self.metadata(context, peer), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None

    async def stream(self, method: Callable[..., Any], request: Any, context: Any) -> AsyncIterator[Any]:
        timeout = context.time_remaining() if context is not None else None
        call = method(request, metadata=self.metadata(context), timeout=timeout)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        finally:
            call.cancel()


def _unavailable(exc: VisionServeError) -> bool:
    return exc.status == "UNAVAILABLE"


class RemoteInference:
    """``inference.GRPCInferenceService``, run by the engine."""

    def __init__(
        self, forwarder: Forwarder, decoding: FrontendDecoding, *, tracing_enabled: bool, max_stream_in_flight: int
    ) -> None:
        self._forward = forwarder
        self._decoding = decoding
        self._stub = pb_grpc.GRPCInferenceServiceStub(forwarder.link.channel)  # type: ignore[no-untyped-call]
        self._tracing_enabled = tracing_enabled
        self._max_stream_in_flight = max_stream_in_flight

    @property
    def tracing_enabled(self) -> bool:
        return self._tracing_enabled

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        carrier = trace_carrier(context.invocation_metadata() or ()) if self._tracing_enabled else None
        return await self.infer(
            request, context.time_remaining(), local=is_loopback_peer(context.peer()), carrier=carrier
        )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for response in stream_call(
            request_iterator,
            context,
            self.infer,
            tracing=self._tracing_enabled,
            max_in_flight=self._max_stream_in_flight,
        ):
            yield response

    async def infer(
        self,
        request: pb.ModelInferRequest,
        timeout: float | None,
        *,
        local: bool,
        protocol: str = "grpc",
        carrier: Mapping[str, str] | None = None,
        method: str = "ModelInfer",
    ) -> pb.ModelInferResponse:
        data = await self._decoding.infer(
            request, timeout, local=local, protocol=protocol, method=method, carrier=carrier
        )
        return pb.ModelInferResponse.FromString(data)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # this process answers; the engine restarts by itself

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        try:
            return await self._forward.unary(self._stub.ServerReady, request, context)
        except VisionServeError as exc:
            if _unavailable(exc):
                return pb.ServerReadyResponse(ready=False)
            raise

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            return await self._forward.unary(self._stub.ModelReady, request, context)
        except VisionServeError as exc:
            if _unavailable(exc):
                return pb.ModelReadyResponse(ready=False)
            raise

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return await self._forward.unary(self._stub.ServerMetadata, request, context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return await self._forward.unary(self._stub.ModelMetadata, request, context)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return await self._forward.unary(self._stub.ModelConfig, request, context)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        return await self._forward.unary(self._stub.ModelStatistics, request, context)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return await self._forward.unary(self._stub.RepositoryIndex, request, context)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        return await self._forward.unary(self._stub.RepositoryModelLoad, request, context)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        return await self._forward.unary(self._stub.RepositoryModelUnload, request, context)

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        return await self._forward.unary(self._stub.SystemSharedMemoryStatus, request, context)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        return await self._forward.unary(self._stub.SystemSharedMemoryRegister, request, context)

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        return await self._forward.unary(self._stub.SystemSharedMemoryUnregister, request, context)

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        return await self._forward.unary(self._stub.TraceSetting, request, context)


class RemoteModels:
    """``vision.v1.Models``, answered by the engine."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forward = forwarder
        self._stub = models_pb2_grpc.ModelsStub(forwarder.link.channel)  # type: ignore[no-untyped-call]

    async def ListModels(self, request: models_pb2.ListModelsRequest, context: Any) -> models_pb2.ListModelsResponse:
        return await self._forward.unary(self._stub.ListModels, request, context)

    async def GetModel(self, request: models_pb2.GetModelRequest, context: Any) -> models_pb2.ModelInfo:
        return await self._forward.unary(self._stub.GetModel, request, context)

    async def GetThroughput(self, request: models_pb2.GetThroughputRequest, context: Any) -> models_pb2.Throughput:
        return await self._forward.unary(self._stub.GetThroughput, request, context)

    async def RollbackModel(self, request: models_pb2.RollbackModelRequest, context: Any) -> models_pb2.ModelInfo:
        return await self._forward.unary(self._stub.RollbackModel, request, context)


class RemoteFineTuning:
    """``vision.v1.FineTuning``, run by the engine: a job started through one front end is the
    engine's, so any front end watches or cancels it."""

    def __init__(self, forwarder: Forwarder, limits: FineTuneLimits, *, tracing_enabled: bool) -> None:
        self._forward = forwarder
        self._stub = ft_grpc.FineTuningStub(forwarder.link.channel)  # type: ignore[no-untyped-call]
        self._limits = limits
        self._tracing_enabled = tracing_enabled

    @property
    def tracing_enabled(self) -> bool:
        return self._tracing_enabled

    def upload_pace(self) -> UploadPace:
        return UploadPace(self._limits.upload_idle_s, self._limits.max_upload_s)

    async def CreateJob(self, request_iterator: AsyncIterator[ft_pb.CreateJobRequest], context: Any) -> ft_pb.Job:
        # The engine paces the upload and counts it against the caller's address.
        return await self._forward.unary(self._stub.CreateJob, request_iterator, context)

    async def create_job(
        self, messages: AsyncIterator[ft_pb.CreateJobRequest], peer: str, *, carrier: dict[str, str] | None = None
    ) -> ft_pb.Job:
        metadata = [*(carrier or {}).items(), (FORWARDED_PEER, peer)]
        try:
            return await self._stub.CreateJob(messages, metadata=metadata)  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as exc:
            raise self._forward.error(exc) from None

    def WatchJob(self, request: ft_pb.WatchJobRequest, context: Any) -> AsyncIterator[ft_pb.JobEvent]:
        return self._forward.stream(self._stub.WatchJob, request, context)

    async def GetJob(self, request: ft_pb.GetJobRequest, context: Any) -> ft_pb.Job:
        return await self._forward.unary(self._stub.GetJob, request, context)

    async def ListJobs(self, request: ft_pb.ListJobsRequest, context: Any) -> ft_pb.ListJobsResponse:
        return await self._forward.unary(self._stub.ListJobs, request, context)

    async def CancelJob(self, request: ft_pb.CancelJobRequest, context: Any) -> ft_pb.Job:
        return await self._forward.unary(self._stub.CancelJob, request, context)

    async def DeleteModel(self, request: ft_pb.DeleteModelRequest, context: Any) -> ft_pb.DeleteModelResponse:
        return await self._forward.unary(self._stub.DeleteModel, request, context)


class RemoteHealth:
    """``grpc.health.v1.Health`` as the engine tells it; while the engine is down, every service but
    liveness is NOT_SERVING, and a Watch stream says so and follows the engine once it is back."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forward = forwarder
        self._link = forwarder.link
        self._stub = health_pb2_grpc.HealthStub(forwarder.link.channel)

    def _while_down(self, service: str) -> health_pb2.HealthCheckResponse:
        serving = service == LIVENESS_SERVICE
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        try:
            return await self._forward.unary(self._stub.Check, request, context)
        except VisionServeError as exc:
            if _unavailable(exc):
                return self._while_down(request.service)
            raise

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = None
        while True:
            try:
                async for response in self._forward.stream(self._stub.Watch, request, context):
                    if response.status != last:
                        last = response.status
                        yield response
            except VisionServeError as exc:
                if not _unavailable(exc):
                    raise
            down = self._while_down(request.service)
            if down.status != last:
                last = down.status
                yield down
            await asyncio.sleep(WATCH_RETRY_S)
            await self._link.connected.wait()
