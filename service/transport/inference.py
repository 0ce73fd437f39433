"""``inference.GRPCInferenceService``: the Open Inference Protocol servicer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import service
from service.config import BatchingConfig
from service.engine.dataplane import DataPlane
from service.engine.model_control import ModelControl
from service.engine.repository import ServedModel
from service.engine.statistics import StatisticsCollector
from service.errors import InvalidInputError, ModelNotFoundError, PermissionDeniedError, VisionServeError, quote
from service.inference.shared_memory import RegionLeases, SharedMemoryRegions
from service.telemetry.logs import RequestIds, access, new_request_id, request_ids
from service.telemetry.tracing import RequestTrace, Tracing
from service.transport.auth import host_only_message
from service.transport.call import Call
from service.transport.codec import (
    InferCall,
    build_infer_response,
    parse_infer_request,
    shared_input_bytes,
    uses_shared_memory,
)
from service.transport.model_config import (
    input_specs,
    model_config,
    model_statistics,
    output_specs,
    tensor_metadata,
)
from service.transport.streaming import stream_call
from vision_client.protocol import CLASSIFICATION
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

SERVER_NAME = "vision-serving"
EXTENSIONS = (CLASSIFICATION, "model_configuration", "statistics", "model_repository", "trace")
SYSTEM_SHARED_MEMORY = "system_shared_memory"  # listed as Triton lists it, when --max-shared-memory-regions > 0
# Inputs of up to this many bytes in shared memory are read on the event loop: a copy from a tmpfs
# page cache (60-100 us for a [1,3,224,224] FP32 image) costs less than handing the read to a
# thread and its result back, which took a pool thread's wake-up, two futures and a wake-up of the
# loop for every request (bench/README.md, "The protocol's own ceiling"). Larger reads go to a thread.
INLINE_SHARED_READ_BYTES = 1024 * 1024


class InferenceServicer:
    """``inference.GRPCInferenceService`` for any binding: each method takes the request and the call's
    :class:`~service.transport.call.Call` (the gRPC port's :class:`~service.transport.call.GrpcAdapter`
    builds it from the gRPC context, the REST routes from the HTTP request)."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        batching: BatchingConfig,
        statistics: StatisticsCollector,
        control: ModelControl,
        regions: SharedMemoryRegions,
        tracing: Tracing | None = None,
        request_log_ids: bool = False,
        access_log: bool = False,
    ) -> None:
        """``request_log_ids``: lines logged about a request carry its ids (``--log-format json``);
        ``access_log``: one access log line per inference request (``--access-log``)."""
        self._dataplane = dataplane
        self._tracing = tracing or Tracing.off()
        self._request_log_ids = request_log_ids or access_log
        self._access_log = access_log
        self._batching = batching
        self._statistics = statistics
        self._control = control
        self._regions = regions
        self._extensions = EXTENSIONS + ((SYSTEM_SHARED_MEMORY,) if regions.enabled else ())

    @property
    def tracing_enabled(self) -> bool:
        return self._tracing.enabled

    async def ServerLive(
        self,
        request: pb.ServerLiveRequest,
        call: Call,
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dataplane.live())

    async def ServerReady(
        self,
        request: pb.ServerReadyRequest,
        call: Call,
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    async def ModelReady(
        self,
        request: pb.ModelReadyRequest,
        call: Call,
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._dataplane.model_ready(require_model_name(request.name)))

    async def ServerMetadata(
        self,
        request: pb.ServerMetadataRequest,
        call: Call,
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=service.__version__, extensions=self._extensions)

    async def ModelMetadata(
        self,
        request: pb.ModelMetadataRequest,
        call: Call,
    ) -> pb.ModelMetadataResponse:
        model = await self._model_version(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=model.available_versions,
            platform=model.platform,
            inputs=[tensor_metadata(spec) for spec in input_specs(model)],
            outputs=[tensor_metadata(spec) for spec in output_specs(model)],
        )

    async def ModelConfig(
        self,
        request: pb.ModelConfigRequest,
        call: Call,
    ) -> pb.ModelConfigResponse:
        model = await self._model_version(request.name, request.version)
        config = model_config(
            model, self._batching, self._dataplane.repository.devices, self._dataplane.config.runtime.instances
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self,
        request: pb.ModelStatisticsRequest,
        call: Call,
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [self._model(request.name, request.version)]
        else:
            models = [m for m in self._dataplane.repository.all() if request.version in ("", m.version)]
        return pb.ModelStatisticsResponse(
            model_stats=[model_statistics(self._statistics.get(m.name, request.version or m.version)) for m in models]
        )

    async def RepositoryIndex(
        self,
        request: pb.RepositoryIndexRequest,
        call: Call,
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for model in self._dataplane.repository.all():
            if request.ready and not model.ready:
                continue
            response.models.add(name=model.name, version=model.version, state=model.state.value, reason=model.reason)
        return response

    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        call: Call,
    ) -> pb.RepositoryModelLoadResponse:
        await self._control.load(_control_target(request))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        call: Call,
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control.unload(_control_target(request))
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(
        self,
        request: pb.SystemSharedMemoryStatusRequest,
        call: Call,
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._regions.status(request.name):
            entry = response.regions[region.name]
            entry.name, entry.key, entry.offset, entry.byte_size = (
                region.name,
                region.key,
                region.offset,
                region.byte_size,
            )
        return response

    async def SystemSharedMemoryRegister(
        self,
        request: pb.SystemSharedMemoryRegisterRequest,
        call: Call,
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._regions.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self,
        request: pb.SystemSharedMemoryUnregisterRequest,
        call: Call,
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._regions.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def TraceSetting(
        self,
        request: pb.TraceSettingRequest,
        call: Call,
    ) -> pb.TraceSettingResponse:
        """Triton's trace extension: the settings of the server or of one model, after any change."""
        if request.model_name:
            self._dataplane.model(request.model_name)  # NOT_FOUND for a model this server does not know
        changes = {key: list(value.value) for key, value in request.settings.items()}
        if changes:
            settings = self._tracing.update(request.model_name, changes)
        else:
            settings = self._tracing.settings(request.model_name)
        response = pb.TraceSettingResponse()
        for key, values in settings.items():
            response.settings[key].value.extend(values)
        return response

    async def ModelInfer(
        self,
        request: pb.ModelInferRequest,
        call: Call,
    ) -> pb.ModelInferResponse:
        return await self.infer(request, call)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        call: Call,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming inference (:func:`~service.transport.streaming.stream_call`)."""
        async for response in stream_call(
            request_iterator, call, self.infer, max_in_flight=self._dataplane.config.max_stream_in_flight
        ):
            yield response

    async def infer(
        self,
        request: pb.ModelInferRequest,
        call: Call,
        *,
        method: str = "ModelInfer",
        received_ns: int = 0,
        decoded_ns: tuple[int, int] | None = None,
    ) -> pb.ModelInferResponse:
        """One inference, whichever binding brought it (``call.protocol``): counted, run, answered.

        ``call.local``: whether the caller is on this host, the only callers whose requests may
        name system shared memory regions: the regions are files of this host, and a remote caller
        could only read or overwrite another client's. ``call.carrier``: the caller's
        ``traceparent`` and ``tracestate`` (gRPC metadata or HTTP headers), read when tracing is on.
        ``received_ns`` and ``decoded_ns``: from the protocol front end that sent the request (its
        arrival, and when its images were decoded there), for the request's trace.
        """
        protocol, local = call.protocol, call.local
        timeout = call.time_remaining()
        trace = (
            self._tracing.start_request(method, request.model_name, call.carrier, protocol=protocol)
            if self._tracing.enabled
            else None
        )
        if trace is not None:
            if received_ns:
                trace.began_at(received_ns)
            if decoded_ns is not None:
                trace.ran("decode", *decoded_ns)
        if not self._request_log_ids:
            if trace is not None and request.id:
                trace.set("vision.request_id", request.id)
            return await self._infer(request, timeout, local, protocol, trace)
        ids = RequestIds(
            request.id or new_request_id(),
            trace.trace_id if trace is not None else "",
            trace.span_id if trace is not None else "",
        )
        if trace is not None:
            trace.set("vision.request_id", ids.request_id)
        started = time.monotonic()
        status, response = "OK", None
        with request_ids(ids):
            try:
                response = await self._infer(request, timeout, local, protocol, trace)
                return response
            except VisionServeError as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except Exception:
                status = "INTERNAL"
                raise
            finally:
                if self._access_log:
                    access(
                        method=method,
                        protocol=protocol,
                        model=request.model_name,
                        version=response.model_version if response is not None else request.model_version,
                        status=status,
                        seconds=time.monotonic() - started,
                        bytes_in=request.ByteSize(),
                        bytes_out=response.ByteSize() if response is not None else 0,
                    )

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        timeout: float | None,
        local: bool,
        protocol: str,
        trace: RequestTrace | None,
    ) -> pb.ModelInferResponse:
        async with self._dataplane.track(request.model_name, protocol, trace) as record:
            with self._regions.leases() as shared:  # held until the response is built
                if uses_shared_memory(request):
                    if not local:
                        raise PermissionDeniedError(host_only_message("requests that use system shared memory"))
                    size = shared_input_bytes(request)
                    if size is not None and size <= INLINE_SHARED_READ_BYTES:
                        call = self._parse(request, shared)  # reads the region, briefly
                    else:
                        call = await asyncio.to_thread(self._parse, request, shared)  # reads the region
                else:
                    call = self._parse(request, None)
                if call.timeout_s is not None:  # the request's timeout parameter, beside the call's deadline
                    timeout = call.timeout_s if timeout is None else min(timeout, call.timeout_s)
                result = await self._dataplane.infer(
                    call.model_name, call.inputs, version=call.model_version, timeout=timeout, trace=trace
                )
                return build_infer_response(call, record.ran(result), shared)

    def _parse(self, request: pb.ModelInferRequest, shared: RegionLeases | None) -> InferCall:
        return parse_infer_request(
            request,
            max_images=self._dataplane.max_request_images,
            shared=shared if self._regions.enabled else None,
            max_shared_bytes=self._dataplane.config.max_message_bytes,
        )

    def _model(self, name: str, version: str) -> ServedModel:
        return self._dataplane.model(require_model_name(name), version)

    async def _model_version(self, name: str, version: str) -> ServedModel:
        """The model of ``version`` itself: another kept version of a fine-tuned model loads (as a
        request naming it would), so that what is described is what would run."""
        model = self._model(name, version)
        if version and model.version != version:
            model = await self._dataplane.model_version(model.name, version)
        return model


def _control_target(request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> str:
    """The model a load or unload request names, after refusing what this server does not do."""
    if request.repository_name:
        raise ModelNotFoundError(
            f"no model repository named {quote(request.repository_name)}; "
            "this server has one: leave repository_name empty"
        )
    # tritonclient always sends `unload_dependents`; fine-tuned models on a built-in model share
    # its backbone and are unloaded with it whatever its value. Configs and files are not taken.
    unsupported = sorted(set(request.parameters) - {"unload_dependents"})
    if unsupported:
        raise InvalidInputError(
            f"load and unload parameters are not supported (got {', '.join(unsupported)}); send the model name alone"
        )
    if not request.model_name:
        raise InvalidInputError("model_name is empty: name the model to load or unload, e.g. 'resnet101'")
    return request.model_name


def require_model_name(name: str) -> str:
    if not name:
        raise InvalidInputError("name is empty: name a model, e.g. 'resnet101'")
    return name
