"""Assembles the server: gRPC services, health, reflection, metrics, models; runs and drains it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

import service
from service.config import ServeConfig
from service.engine.dataplane import DataPlane
from service.engine.devices import resolve_devices
from service.engine.factory import ModelFactory
from service.engine.hop_server import HopServer
from service.engine.loader import BuiltinModels
from service.engine.metrics import ServerMetrics
from service.engine.metrics_http import MetricsHttpServer
from service.engine.model_control import ModelControl
from service.engine.repository import ModelRepository, ServedModel
from service.finetune.catalog import FineTunedModels
from service.finetune.manager import JobManager
from service.finetune.names import LIVENESS_SERVICE, SERVER_SERVICE
from service.finetune.store import ModelStore
from service.finetune.sync import StoreSync
from service.host.cpus import use_torch_threads
from service.host.ports import Listener, bind_error, bracketed, check_ports, listeners
from service.inference import hop
from service.inference.shared_memory import SharedMemoryRegions
from service.models import WeightsSource
from service.storage import open_objects
from service.telemetry.tracing import ExportConfig, Tracing
from service.transport.auth import AuthorizationInterceptor, policy_from, trust_forwarded_peers
from service.transport.call import Call
from service.transport.errors import ErrorMappingInterceptor
from service.transport.fine_tuning import FineTuningServicer
from service.transport.health import NOT_SERVING, SERVING, HealthServicer
from service.transport.inference import InferenceServicer
from service.transport.limits import server_options
from service.transport.models import ModelsServicer
from service.transport.parsing import inference_parsing_interceptor
from service.transport.registration import add_services
from service.transport.requests import RequestReadingInterceptor
from service.transport.rest.port import start_rest_port
from service.transport.rest.server import RestServer
from service.transport.tls import CertificateFiles, TlsFiles
from vision_client.protocol.stubs.inference import grpc_service_pb2

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # for calls still open once the data plane has drained
REGIONS_JOURNAL = "regions.json"  # in the engine's run directory: its shared memory registrations


class VisionServer:
    """One server process's worth of state. ``await start()``, then ``await stop()``."""

    def __init__(
        self, config: ServeConfig, *, environ: Mapping[str, str] | None = None, run_dir: Path | None = None
    ) -> None:
        """``environ``: where the ``OTEL_*`` variables are read with ``config.trace`` (the process's).

        ``run_dir``: run as the engine behind protocol front ends (``--frontends`` of 2 or more): the
        gRPC services listen on a Unix socket there (``service.inference.hop.ENGINE_SOCKET``) for the front ends, which
        have authorized each call and forward its peer; inference comes through the hop
        (``service.inference.hop.HOP_SOCKET``); no HTTP port (the front ends serve REST over the same
        services). The metrics and health-only ports stay here, one for the whole server."""
        self.config = config
        self.run_dir = run_dir
        self.metrics = ServerMetrics()
        self.tracing = _tracing(config, os.environ if environ is None else environ, self.metrics)
        self.weights = WeightsSource.parse(config.weights)
        self.devices = resolve_devices(config.device)
        self.metrics.watch_cuda_memory(self.devices)
        self.factory = factory = ModelFactory(config, self.devices, self.metrics)
        self.repository = ModelRepository(self.metrics, self.devices)
        self.builtin = BuiltinModels(factory, self.repository, self.weights)
        limits = config.fine_tuning
        store = self.tracing.store(open_objects(config.model_store)) if config.model_store is not None else None
        self.store = ModelStore(store, limits) if store is not None else None
        self.finetuned = FineTunedModels(self.store, self.repository, factory, self.metrics)
        self._decode_pool = ThreadPoolExecutor(
            max_workers=config.decode_thread_count,
            thread_name_prefix="decode",
            initializer=_single_threaded_torch,
        )
        # Ready only after the first full pass over the store: a restarted replica then serves
        # every fine-tuned model it can before it takes traffic (see StoreSync).
        self.dataplane = DataPlane(
            config, self.repository, self.metrics, self._decode_pool, models_known=lambda: self.finetuned.store_read
        )
        self.shared_memory = SharedMemoryRegions(
            max_regions=config.max_shared_memory_regions,
            max_bytes=config.max_shared_memory_bytes,
            journal=None if run_dir is None else run_dir / REGIONS_JOURNAL,
        )
        self.jobs = JobManager(
            self.dataplane,
            self.repository,
            self.builtin,
            self.finetuned,
            self.metrics,
            limits,
            tracing=self.tracing,
            max_image_bytes=config.max_message_bytes,
        )
        self._access = policy_from(config.auth_token_file, config.auth_scope, config.allowed_hosts)
        tls_files = TlsFiles.from_options(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
        self._tls = (
            CertificateFiles(tls_files, on_rejected=self.metrics.record_tls_reload_error)
            if tls_files is not None
            else None
        )
        self._health_grpc: grpc.aio.Server | None = None
        self.health_port = 0
        self._rest: RestServer | None = None
        self.http_port = 0
        self._sync_task: asyncio.Task[None] | None = None
        self._store_read = asyncio.Event()
        self.store_sync = (
            StoreSync(
                self.finetuned,
                self.repository,
                interval_s=config.store_poll_seconds,
                on_first_pass=self._on_store_read,
            )
            if self.store is not None
            else None
        )
        self.health = HealthServicer()
        self.grpc_port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = MetricsHttpServer(self.metrics.registry)
        self._loading: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.load_error: BaseException | None = None
        self._hop: HopServer | None = None

    async def start(self) -> None:
        """Bind the ports and begin loading the models in the background."""
        self.builtin.declare(list(self.config.models))
        self.repository.add_listener(self._on_model_state)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ErrorMappingInterceptor(),
            AuthorizationInterceptor(self._access),  # inside: its refusals get mapped
            # Reads requests (first-message deadline, parsing) once the caller is let in.
            RequestReadingInterceptor(self.config.first_message_timeout_s),
            inference_parsing_interceptor(self.config.request_images_limit),  # innermost
        ]
        if self.run_dir is not None:
            del interceptors[1]  # the front ends authorized every call they forward
            trust_forwarded_peers()
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                *server_options(),
            ],
        )
        inference = self._inference = InferenceServicer(
            self.dataplane,
            batching=self.config.batching,
            statistics=self.metrics.statistics,
            control=ModelControl(self.repository, self.builtin, self.finetuned),
            regions=self.shared_memory,
            tracing=self.tracing,
            request_log_ids=self.config.log_format == "json",
            access_log=self.config.access_log,
        )
        self._models = ModelsServicer(self.dataplane, self.metrics, self.finetuned)
        self._fine_tuning = FineTuningServicer(self.jobs)
        add_services(self._grpc, inference, self._models, self._fine_tuning, self.health)
        address = f"{bracketed(self.config.host)}:{self.config.grpc_port}"
        try:
            if self.run_dir is not None:
                self._grpc.add_insecure_port(f"unix:{self.run_dir / hop.ENGINE_SOCKET}")
                os.chmod(self.run_dir / hop.ENGINE_SOCKET, 0o600)
            elif self._tls is None:
                self.grpc_port = self._grpc.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc.add_secure_port(address, self._tls.credentials())
        except RuntimeError as exc:  # grpc's "Failed to bind to address"
            raise bind_error(Listener("--grpc-port", self.config.host, self.config.grpc_port), exc) from None
        await self._grpc.start()
        if self.run_dir is not None:
            self.shared_memory.restore()  # what clients registered with an engine that died
            self._hop = HopServer(
                self.run_dir / hop.HOP_SOCKET,
                self._hop_infer,
                self._preprocessing_of,
                self.metrics.record_hop_link_closed,
            )
            await self._hop.start()
        if self.config.health_port is not None:
            await self._start_health_port(self.config.health_port)
        if self.run_dir is None:
            await self._start_http_port()
        self.health.set(LIVENESS_SERVICE, SERVING)
        self.health.set(SERVER_SERVICE, NOT_SERVING)
        for model in self.repository.all():
            self.health.set(model.name, NOT_SERVING)
        metrics_host = self.config.metrics_host or self.config.host
        try:
            self.metrics_port = await self._metrics_http.start(metrics_host, self.config.metrics_port)
        except OSError as exc:
            raise bind_error(Listener("--metrics-port", metrics_host, self.config.metrics_port), exc) from None
        where = (
            f"the front ends (run directory {self.run_dir})"
            if self.run_dir is not None
            else f"gRPC ({self._tls_kind}) on {self.config.host}:{self.grpc_port}"
        )
        log.info(
            "serving %s and metrics on http://%s:%d/metrics; loading %s on %s",
            where,
            metrics_host,
            self.metrics_port,
            ", ".join(self.config.models),
            ", ".join(str(d) for d in self.devices),
        )
        self._loading = asyncio.create_task(self._load())

    @property
    def _tls_kind(self) -> str:
        return "plaintext" if self._tls is None else "mutual TLS" if self._tls.mutual else "TLS"

    async def _hop_infer(self, data: memoryview, infer: hop.Infer, frontend: int) -> bytes:
        """One inference a front end sent through the hop, as a call on the gRPC port runs it."""
        self.metrics.record_frontend_request(frontend, decoded=bool(infer.preprocessing))
        request = grpc_service_pb2.ModelInferRequest.FromString(data)  # type: ignore[arg-type]  # any buffer parses
        if infer.preprocessing and request.model_name in self.repository:
            current = hop.preprocessing_key(self.repository.get(request.model_name).decoder.preprocessing)
            if current != infer.preprocessing:
                raise hop.StalePreprocessing(f"{request.model_name} preprocesses differently now")
        call = Call(
            "http" if infer.protocol == "http" else "grpc",
            local=infer.local,
            deadline=Call.deadline_in(infer.timeout),
            carrier=infer.carrier,
        )
        response = await self._inference.infer(
            request,
            call,
            method=infer.method,
            received_ns=infer.received_ns,
            decoded_ns=(infer.decode_start_ns, infer.decode_end_ns) if infer.decode_start_ns else None,
        )
        return response.SerializeToString()

    def _preprocessing_of(self, name: str) -> bytes:
        """How ``name`` decodes its images, for a front end that decodes them (``hop.Describe``)."""
        model = self.repository.get(name)  # NOT_FOUND for a model this server does not know
        return json.dumps(model.decoder.preprocessing.to_dict()).encode()

    async def _start_http_port(self) -> None:
        """The REST binding, over the same servicer, data plane and access policy as gRPC."""
        if self.config.http_port is None:
            return
        self._rest = await start_rest_port(
            self.config, self._access, self._tls, self._inference, self._models, self._fine_tuning
        )
        self.http_port = self._rest.port
        log.info(
            "serving %s on %s:%d", "HTTP/REST" if self._tls is None else "HTTPS/REST", self.config.host, self.http_port
        )

    async def _start_health_port(self, port: int) -> None:
        """A second, plaintext port that serves grpc.health.v1 and nothing else: kubelet's gRPC
        probes cannot speak TLS. It shares the health servicer, so it tells the same story."""
        self._health_grpc = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor(), RequestReadingInterceptor(self.config.first_message_timeout_s)],
            options=server_options(),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        try:
            self.health_port = self._health_grpc.add_insecure_port(f"{bracketed(self.config.host)}:{port}")
        except RuntimeError as exc:
            raise bind_error(Listener("--health-port", self.config.host, port), exc) from None
        await self._health_grpc.start()
        log.info("serving health checks only, in plaintext, on %s:%d", self.config.host, self.health_port)

    async def wait_loaded(self) -> None:
        """Wait until every model has loaded; raises what failed, if anything did."""
        assert self._loading is not None
        await asyncio.shield(self._loading)
        if self.load_error is not None:
            raise self.load_error
        if self.store is not None:
            await self._store_read.wait()

    async def _load(self) -> None:
        try:
            await self.builtin.load_all()
        except Exception as exc:
            log.error("cannot start: %s", exc)
            self.load_error = exc
            return
        if self.store_sync is not None:
            self._sync_task = asyncio.create_task(self.store_sync.run_forever())
        else:
            self._update_server_health()

    def _on_store_read(self) -> None:
        self.finetuned.mark_store_read()
        self._store_read.set()
        self._update_server_health()
        self.jobs.resume_jobs()  # jobs that servers which stopped left in the store go on (finetune/durable.py)

    def _on_model_state(self, model: ServedModel) -> None:
        status = SERVING if model.ready and not self.dataplane.draining else NOT_SERVING
        self.health.set(model.name, status)
        self._update_server_health()

    def _update_server_health(self) -> None:
        """Health ``""`` says what ServerReady says (``DataPlane.ready``)."""
        self.health.set(SERVER_SERVICE, SERVING if self.dataplane.ready() else NOT_SERVING)

    def request_stop(self) -> asyncio.Task[None]:
        """Start draining (idempotent); the returned task ends when the server has stopped."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())
        return self._stopping

    async def stop(self) -> None:
        """Drain: refuse new work, answer what is in flight, then shut everything down."""
        self.dataplane.start_draining()
        self.health.set(SERVER_SERVICE, NOT_SERVING)
        for model in self.repository.all():
            self.health.set(model.name, NOT_SERVING)
        if self._sync_task is not None:
            self._sync_task.cancel()
        await self.jobs.shutdown()
        drained = await self.dataplane.wait_idle(self.config.drain_seconds)
        if not drained:
            stopped = self.dataplane.abandon_in_flight()
            log.warning(
                "drain timed out after %.0fs; answering the %d requests left UNAVAILABLE",
                self.config.drain_seconds,
                stopped,
            )
            await self.dataplane.wait_idle(STOP_GRACE_S)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        self.health.close()  # Watch streams end now, within the grace below, not cancelled after it
        if self._grpc is not None:
            # Calls that reached gRPC but not yet our handlers (a busy event loop) still get
            # their UNAVAILABLE from them within the grace; only what is left after it is
            # cancelled. stop() returns as soon as no call is left.
            await self._grpc.stop(grace=STOP_GRACE_S)
        if self._rest is not None:
            await self._rest.stop(STOP_GRACE_S)
        if self._hop is not None:
            await self._hop.stop()
        if self._health_grpc is not None:
            await self._health_grpc.stop(grace=None)
        await self.repository.stop()
        self.factory.close()  # its leases on the runtime cache
        self.shared_memory.unregister("")  # closes the regions' files (requests holding one close it at their end)
        await self._metrics_http.stop()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.tracing.shutdown)  # the last spans, within the exporter's timeout
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._grpc is not None
        await self._grpc.wait_for_termination()


async def create_server(config: ServeConfig) -> VisionServer:
    """Start a server (port 0 binds a free port; read ``server.grpc_port``).

    A port that cannot be bound raises FailedPreconditionError, with what had started stopped."""
    server = VisionServer(config)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    return server


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain; the process's exit code.

    Every port is checked first, before any model or device is touched (FailedPreconditionError
    names each one that is taken)."""
    check_ports(listeners(config))
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


def _tracing(config: ServeConfig, environ: Mapping[str, str], metrics: ServerMetrics) -> Tracing:
    """The server's tracing: off unless ``--trace`` (and ``OTEL_SDK_DISABLED`` is not true)."""
    if not config.trace or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Tracing.off()
    return Tracing.create(
        ExportConfig.from_environ(environ),
        on_dropped=metrics.record_spans_dropped,
        on_exported=metrics.record_spans_exported,
        version=service.__version__,
    )


def _single_threaded_torch() -> None:
    """Preprocessing one image needs no intra-op parallelism: keep decode threads from
    starting OpenMP thread teams of their own, which would compete with the forward passes."""
    use_torch_threads(1)
