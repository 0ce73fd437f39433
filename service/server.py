"""Assembles the server: gRPC services, health, reflection, metrics, models; runs and drains it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import start_http_server

from service.config import ServeConfig
from service.dataplane import DataPlane
from service.devices import resolve_devices
from service.factory import ModelFactory
from service.finetune.jobs import JobManager
from service.finetune.store import ModelStore
from service.finetune.sync import StoreSync
from service.metrics import ServerMetrics
from service.models import WeightsSource
from service.repository import ModelRepository, ServedModel
from service.transport.auth import BearerTokenInterceptor, read_token
from service.transport.errors import ErrorMappingInterceptor
from service.transport.fine_tuning import FineTuningServicer
from service.transport.inference import InferenceServicer
from service.transport.models import ModelsServicer
from vision_client._proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from vision_client._proto.vision.v1 import fine_tuning_pb2, fine_tuning_pb2_grpc, models_pb2, models_pb2_grpc

log = logging.getLogger(__name__)

# Health service names besides "" (the whole server) and one per model.
LIVENESS_SERVICE = "liveness"  # SERVING for as long as the process runs; for liveness probes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class VisionServer:
    """One server process's worth of state. ``await start()``, then ``await stop()``."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.weights = WeightsSource.parse(config.weights)
        self.devices = resolve_devices(config.device)
        self.metrics.watch_cuda_memory(self.devices)
        self.repository = ModelRepository(ModelFactory(config, self.devices, self.metrics), self.metrics)
        self._decode_pool = ThreadPoolExecutor(
            max_workers=config.decode_threads or os.cpu_count() or 1,
            thread_name_prefix="decode",
            initializer=_single_threaded_torch,
        )
        self.dataplane = DataPlane(config, self.repository, self.metrics, self._decode_pool)
        self.store = ModelStore(config.model_store) if config.model_store is not None else None
        self.jobs = JobManager(self.dataplane, self.repository, self.store, self.metrics)
        self._token = read_token(config.auth_token_file) if config.auth_token_file is not None else None
        self._sync_task: asyncio.Task[None] | None = None
        self.health = HealthServicer()
        self.grpc_port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = None
        self._loading: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.load_error: BaseException | None = None

    async def start(self) -> None:
        """Bind the ports and begin loading the models in the background."""
        self.repository.declare_builtin(list(self.config.models))
        self.repository.add_listener(self._on_model_state)
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorMappingInterceptor()]
        if self._token is not None:
            interceptors.append(BearerTokenInterceptor(self._token))  # inside: its refusals get mapped
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.dataplane), self._grpc)
        models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(self.dataplane), self._grpc)
        fine_tuning_pb2_grpc.add_FineTuningServicer_to_server(FineTuningServicer(self.jobs), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            [
                grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                models_pb2.DESCRIPTOR.services_by_name["Models"].full_name,
                fine_tuning_pb2.DESCRIPTOR.services_by_name["FineTuning"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._grpc,
            pool=_reflection_pool(),
        )
        self.grpc_port = self._grpc.add_insecure_port(f"{_host(self.config.host)}:{self.config.grpc_port}")
        await self._grpc.start()
        await self.health.set(LIVENESS_SERVICE, SERVING)
        await self.health.set("", NOT_SERVING)
        for model in self.repository.all():
            await self.health.set(model.name, NOT_SERVING)
        self._metrics_http, _ = start_http_server(
            self.config.metrics_port, addr=self.config.host, registry=self.metrics.registry
        )
        self.metrics_port = self._metrics_http.server_port
        log.info(
            "serving gRPC on %s:%d and metrics on http://%s:%d/metrics; loading %s on %s",
            self.config.host,
            self.grpc_port,
            self.config.host,
            self.metrics_port,
            ", ".join(self.config.models),
            ", ".join(str(d) for d in self.devices),
        )
        self._loading = asyncio.create_task(self._load())

    async def wait_loaded(self) -> None:
        """Wait until every model has loaded; raises what failed, if anything did."""
        assert self._loading is not None
        await asyncio.shield(self._loading)
        if self.load_error is not None:
            raise self.load_error

    async def _load(self) -> None:
        try:
            await self.repository.load_builtin(self.weights)
        except Exception as exc:
            log.error("cannot start: %s", exc)
            self.load_error = exc
            return
        if self.store is not None:
            sync = StoreSync(self.store, self.repository, interval_s=self.config.store_poll_seconds)
            await sync.sync_once()
            self._sync_task = asyncio.create_task(sync.run_forever())
        await self._update_server_health()

    def _on_model_state(self, model: ServedModel) -> None:
        status = SERVING if model.ready and not self.dataplane.draining else NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(model.name, status))

    async def _update_server_health(self) -> None:
        await self.health.set("", SERVING if self.dataplane.ready() else NOT_SERVING)

    def request_stop(self) -> asyncio.Task[None]:
        """Start draining (idempotent); the returned task ends when the server has stopped."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())
        return self._stopping

    async def stop(self) -> None:
        """Drain: refuse new work, answer what is in flight, then shut everything down."""
        self.dataplane.start_draining()
        await self.health.set("", NOT_SERVING)
        for model in self.repository.all():
            await self.health.set(model.name, NOT_SERVING)
        if self._sync_task is not None:
            self._sync_task.cancel()
        await self.jobs.shutdown()
        drained = await self.dataplane.wait_idle(self.config.drain_seconds)
        if not drained:
            log.warning("drain timed out after %.0fs; cancelling what is left", self.config.drain_seconds)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self.repository.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._grpc is not None
        await self._grpc.wait_for_termination()


async def create_server(config: ServeConfig) -> VisionServer:
    """Start a server (port 0 binds a free port; read ``server.grpc_port``)."""
    server = VisionServer(config)
    await server.start()
    return server


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain; the process's exit code."""
    server = await create_server(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    loading = asyncio.ensure_future(server.wait_loaded())
    termination = asyncio.ensure_future(server.wait_for_termination())
    await asyncio.wait({loading, termination}, return_when=asyncio.FIRST_COMPLETED)
    failed = loading.done() and not loading.cancelled() and loading.exception() is not None
    if failed:
        await server.request_stop()
    await termination
    await server.request_stop()  # already running when a signal ended the server: waits for it
    return 1 if failed else 0


def _single_threaded_torch() -> None:
    """Preprocessing one image needs no intra-op parallelism: keep decode threads from
    starting OpenMP thread teams of their own, which would compete with the forward passes."""
    torch.set_num_threads(1)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Descriptors of every service we expose, for reflection clients (grpcurl)."""
    pool = descriptor_pool.DescriptorPool()
    files = (
        grpc_service_pb2.DESCRIPTOR,
        models_pb2.DESCRIPTOR,
        fine_tuning_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    )
    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool
