"""A protocol front end's servicers: the same services as the single process's, each call handed
to the engine, which owns every model, queue, job and region. Like those, each method takes the
request and its :class:`~service.transport.call.Call`, whichever binding (gRPC or REST) brought it.

Inference goes through the hop (``service.inference.hop``); every other call is forwarded on the engine's
gRPC socket with the caller's peer (``auth.FORWARDED_PEER``) and trace context: the front end has
authorized it already. The engine's errors come back with their code and message unchanged. While
the engine is down, readiness says not ready (liveness: live, this process is) and everything else
is UNAVAILABLE, which clients retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import FineTuneLimits
from service.errors import RelayedError, VisionServeError
from service.finetune.names import LIVENESS_SERVICE
from service.frontend.decoding import FrontendDecoding
from service.frontend.engine_link import EngineLink, engine_down
from service.transport.auth import FORWARDED_PEER
from service.transport.call import Call, grpc_call
from service.transport.handlers import AioContext
from service.transport.limits import UploadPace
from service.transport.streaming import stream_call
from vision_client.protocol.calls import finish_upload
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc
from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

Resp = TypeVar("Resp")
WATCH_RETRY_S = 0.2  # between a Watch stream the engine ended and the next


class Forwarder:
    """Calls the engine's gRPC services on behalf of a caller."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link

    def metadata(self, call: Call) -> list[tuple[str, str]]:
        """What the engine needs of the caller: its peer and trace context (its token was checked here)."""
        entries = list((call.carrier or {}).items())
        if call.peer:
            entries.append((FORWARDED_PEER, call.peer))
        return entries

    def error(self, exc: grpc.aio.AioRpcError) -> VisionServeError:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and not self.link.connected.is_set():
            return engine_down()
        return RelayedError(exc.code().name, exc.details() or exc.code().name)

    async def unary(self, method: Callable[..., Awaitable[Resp]], request: Any, call: Call) -> Resp:
        """A call with one answer; ``request`` may be a stream of messages (``CreateJob``), whose
        refusal keeps the engine's status (:func:`~vision_client.protocol.calls.finish_upload`)."""
        try:
            return await finish_upload(method(request, metadata=self.metadata(call), timeout=call.time_remaining()))
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None

    async def stream(self, method: Callable[..., Any], request: Any, call: Call) -> AsyncIterator[Any]:
        stream = method(request, metadata=self.metadata(call), timeout=call.time_remaining())
        try:
            async for response in stream:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        finally:
            stream.cancel()


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

    async def ModelInfer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        return await self.infer(request, call)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], call: Call
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for response in stream_call(request_iterator, call, self.infer, max_in_flight=self._max_stream_in_flight):
            yield response

    async def infer(
        self,
        request: pb.ModelInferRequest,
        call: Call,
        *,
        method: str = "ModelInfer",
    ) -> pb.ModelInferResponse:
        carrier = call.carrier if self._tracing_enabled else None
        data = await self._decoding.infer(
            request, call.time_remaining(), local=call.local, protocol=call.protocol, method=method, carrier=carrier
        )
        return pb.ModelInferResponse.FromString(data)

    async def ServerLive(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # this process answers; the engine restarts by itself

    async def ServerReady(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        try:
            return await self._forward.unary(self._stub.ServerReady, request, call)
        except VisionServeError as exc:
            if _unavailable(exc):
                return pb.ServerReadyResponse(ready=False)
            raise

    async def ModelReady(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        try:
            return await self._forward.unary(self._stub.ModelReady, request, call)
        except VisionServeError as exc:
            if _unavailable(exc):
                return pb.ModelReadyResponse(ready=False)
            raise

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, call: Call) -> pb.ServerMetadataResponse:
        return await self._forward.unary(self._stub.ServerMetadata, request, call)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        return await self._forward.unary(self._stub.ModelMetadata, request, call)

    async def ModelConfig(self, request: pb.ModelConfigRequest, call: Call) -> pb.ModelConfigResponse:
        return await self._forward.unary(self._stub.ModelConfig, request, call)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, call: Call) -> pb.ModelStatisticsResponse:
        return await self._forward.unary(self._stub.ModelStatistics, request, call)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, call: Call) -> pb.RepositoryIndexResponse:
        return await self._forward.unary(self._stub.RepositoryIndex, request, call)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, call: Call
    ) -> pb.RepositoryModelLoadResponse:
        return await self._forward.unary(self._stub.RepositoryModelLoad, request, call)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, call: Call
    ) -> pb.RepositoryModelUnloadResponse:
        return await self._forward.unary(self._stub.RepositoryModelUnload, request, call)

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, call: Call
    ) -> pb.SystemSharedMemoryStatusResponse:
        return await self._forward.unary(self._stub.SystemSharedMemoryStatus, request, call)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, call: Call
    ) -> pb.SystemSharedMemoryRegisterResponse:
        return await self._forward.unary(self._stub.SystemSharedMemoryRegister, request, call)

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, call: Call
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        return await self._forward.unary(self._stub.SystemSharedMemoryUnregister, request, call)

    async def TraceSetting(self, request: pb.TraceSettingRequest, call: Call) -> pb.TraceSettingResponse:
        return await self._forward.unary(self._stub.TraceSetting, request, call)


class RemoteModels:
    """``vision.v1.Models``, answered by the engine."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forward = forwarder
        self._stub = models_pb2_grpc.ModelsStub(forwarder.link.channel)  # type: ignore[no-untyped-call]

    async def ListModels(self, request: models_pb2.ListModelsRequest, call: Call) -> models_pb2.ListModelsResponse:
        return await self._forward.unary(self._stub.ListModels, request, call)

    async def GetModel(self, request: models_pb2.GetModelRequest, call: Call) -> models_pb2.ModelInfo:
        return await self._forward.unary(self._stub.GetModel, request, call)

    async def GetThroughput(self, request: models_pb2.GetThroughputRequest, call: Call) -> models_pb2.Throughput:
        return await self._forward.unary(self._stub.GetThroughput, request, call)

    async def RollbackModel(self, request: models_pb2.RollbackModelRequest, call: Call) -> models_pb2.ModelInfo:
        return await self._forward.unary(self._stub.RollbackModel, request, call)


class RemoteFineTuning:
    """``vision.v1.FineTuning``, run by the engine: a job started through one front end is the
    engine's, so any front end watches or cancels it."""

    def __init__(self, forwarder: Forwarder, limits: FineTuneLimits) -> None:
        self._forward = forwarder
        self._stub = ft_grpc.FineTuningStub(forwarder.link.channel)  # type: ignore[no-untyped-call]
        self._limits = limits

    def upload_pace(self) -> UploadPace:
        return UploadPace(self._limits.upload_idle_s, self._limits.max_upload_s)

    async def CreateJob(self, request_iterator: AsyncIterator[ft_pb.CreateJobRequest], call: Call) -> ft_pb.Job:
        # The engine paces the upload and counts it against the caller's address.
        return await self._forward.unary(self._stub.CreateJob, request_iterator, call)

    async def create_job(self, messages: AsyncIterator[ft_pb.CreateJobRequest], call: Call) -> ft_pb.Job:
        """CreateJob of messages the REST binding reads (and paces) itself."""
        return await self._forward.unary(self._stub.CreateJob, messages, call)

    def WatchJob(self, request: ft_pb.WatchJobRequest, call: Call) -> AsyncIterator[ft_pb.JobEvent]:
        return self._forward.stream(self._stub.WatchJob, request, call)

    async def GetJob(self, request: ft_pb.GetJobRequest, call: Call) -> ft_pb.Job:
        return await self._forward.unary(self._stub.GetJob, request, call)

    async def ListJobs(self, request: ft_pb.ListJobsRequest, call: Call) -> ft_pb.ListJobsResponse:
        return await self._forward.unary(self._stub.ListJobs, request, call)

    async def CancelJob(self, request: ft_pb.CancelJobRequest, call: Call) -> ft_pb.Job:
        return await self._forward.unary(self._stub.CancelJob, request, call)

    async def DeleteModel(self, request: ft_pb.DeleteModelRequest, call: Call) -> ft_pb.DeleteModelResponse:
        return await self._forward.unary(self._stub.DeleteModel, request, call)


class RemoteHealth:
    """``grpc.health.v1.Health`` as the engine tells it; while the engine is down, or once this front
    end drains, every service but liveness is NOT_SERVING, and a Watch stream says so (and follows
    the engine once it is back; a draining front end's Watch streams end after saying it, so that
    their clients watch again through a front end that stays)."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forward = forwarder
        self._link = forwarder.link
        self._stub = health_pb2_grpc.HealthStub(forwarder.link.channel)
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """This front end is stopping: NOT_SERVING from now on, to Check and every Watch."""
        self._draining.set()

    def _while_down(self, service: str) -> health_pb2.HealthCheckResponse:
        serving = service == LIVENESS_SERVICE
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # gRPC's own servicer (health is never served over REST): it reads its call from the gRPC context.

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: AioContext
    ) -> health_pb2.HealthCheckResponse:
        if self._draining.is_set():
            return self._while_down(request.service)
        try:
            return await self._forward.unary(self._stub.Check, request, grpc_call(context))
        except VisionServeError as exc:
            if _unavailable(exc):
                return self._while_down(request.service)
            raise

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: AioContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        statuses: asyncio.Queue[health_pb2.HealthCheckResponse] = asyncio.Queue()
        following = asyncio.create_task(self._follow(request.service, grpc_call(context), statuses))
        draining = asyncio.create_task(self._draining.wait())
        last: int | None = None
        getting: asyncio.Task[health_pb2.HealthCheckResponse] | None = None
        try:
            while True:
                getting = asyncio.create_task(statuses.get())
                done, _ = await asyncio.wait({getting, following, draining}, return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:
                    getting.cancel()
                if draining in done:
                    down = self._while_down(request.service)
                    if down.status != last:
                        yield down
                    return
                if following in done:
                    following.result()  # the engine's error that is not its absence
                response = getting.result()
                if response.status != last:
                    last = response.status
                    yield response
        finally:
            for task in (getting, following, draining):
                if task is not None:
                    task.cancel()

    async def _follow(self, service: str, call: Call, statuses: asyncio.Queue[health_pb2.HealthCheckResponse]) -> None:
        """Every status of ``service`` the engine tells, and NOT_SERVING whenever it is gone."""
        request = health_pb2.HealthCheckRequest(service=service)
        while True:
            try:
                async for response in self._forward.stream(self._stub.Watch, request, call):
                    statuses.put_nowait(response)
            except VisionServeError as exc:
                if not _unavailable(exc):
                    raise
            statuses.put_nowait(self._while_down(service))
            await asyncio.sleep(WATCH_RETRY_S)
            await self._link.connected.wait()
