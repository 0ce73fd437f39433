"""One protocol front end: the public gRPC and HTTP ports (shared with the other front ends), their
limits, TLS and authorization, and servicers that hand every call to the engine
(``service.frontend.remote``).

A front end holds no model and no state of the server's: what one front end changes (a model
loaded, a region registered, a job started) is the engine's, so every front end sees it at once.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from service.config import ServeConfig
from service.frontend.decoding import FrontendDecoding
from service.frontend.engine_link import EngineLink
from service.frontend.remote import Forwarder, RemoteFineTuning, RemoteHealth, RemoteInference, RemoteModels
from service.host.ports import Listener, bind_error, bracketed
from service.transport.auth import AuthorizationInterceptor, policy_from
from service.transport.errors import ErrorMappingInterceptor
from service.transport.limits import server_options
from service.transport.parsing import inference_parsing_interceptor
from service.transport.registration import add_services
from service.transport.requests import RequestReadingInterceptor
from service.transport.rest.port import start_rest_port
from service.transport.rest.server import RestServer
from service.transport.tls import CertificateFiles, TlsFiles

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
ARENA_MIN_BYTES = 256 * 1024 * 1024  # backed only as used: the most requests in flight may hold at once


class FrontendServer:
    def __init__(self, config: ServeConfig, run_dir: Path, index: int) -> None:
        self.config = config
        self.index = index
        self.link = EngineLink(
            run_dir,
            index,
            arena_bytes=max(ARENA_MIN_BYTES, 4 * config.max_message_bytes),
            max_message_bytes=config.max_message_bytes,
        )
        forwarder = Forwarder(self.link)
        self._decode_pool = ThreadPoolExecutor(max_workers=config.decode_thread_count, thread_name_prefix="decode")
        self.inference = RemoteInference(
            forwarder,
            FrontendDecoding(self.link, config, self._decode_pool),
            tracing_enabled=config.trace,
            max_stream_in_flight=config.max_stream_in_flight,
        )
        self.models = RemoteModels(forwarder)
        self.fine_tuning = RemoteFineTuning(forwarder, config.fine_tuning)
        self.health = RemoteHealth(forwarder)
        self._access = policy_from(config.auth_token_file, config.auth_scope, config.allowed_hosts)
        tls_files = TlsFiles.from_options(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
        self._tls = CertificateFiles(tls_files) if tls_files is not None else None
        self._grpc: grpc.aio.Server | None = None
        self._rest: RestServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    async def start(self) -> None:
        self.link.start()
        self._grpc = grpc.aio.server(
            interceptors=[
                ErrorMappingInterceptor(),
                AuthorizationInterceptor(self._access),
                RequestReadingInterceptor(self.config.first_message_timeout_s),
                inference_parsing_interceptor(self.config.request_images_limit),
            ],
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                *server_options(share_port=True),
            ],
        )
        add_services(self._grpc, self.inference, self.models, self.fine_tuning, self.health)
        host = bracketed(self.config.host)
        address = f"{host}:{self.config.grpc_port}"
        try:
            if self._tls is None:
                self.grpc_port = self._grpc.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc.add_secure_port(address, self._tls.credentials())
        except RuntimeError as exc:
            raise bind_error(Listener("--grpc-port", self.config.host, self.config.grpc_port), exc) from None
        await self._grpc.start()
        if self.config.http_port is not None:
            self._rest = await start_rest_port(
                self.config, self._access, self._tls, self.inference, self.models, self.fine_tuning, share_port=True
            )
            self.http_port = self._rest.port
        log.info("front end %d serving gRPC on port %d and HTTP on port %s", self.index, self.grpc_port, self.http_port)

    async def stop(self) -> None:
        """Drain: stop taking connections, answer what is in flight (the engine still runs), stop."""
        self.health.drain()  # before the ports close: watchers hear NOT_SERVING and go elsewhere
        if self._rest is not None:
            await self._rest.stop(self.config.drain_seconds)
        if self._grpc is not None:
            await self._grpc.stop(grace=self.config.drain_seconds)
        await self.link.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        log.info("front end %d stopped", self.index)

    async def wait_for_termination(self) -> None:
        assert self._grpc is not None
        await self._grpc.wait_for_termination()


async def serve_frontend(config: ServeConfig, run_dir: Path, index: int) -> int:
    """Run one front end until SIGTERM, then drain."""
    import signal

    server = FrontendServer(config, run_dir, index)
    await server.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await server.stop()
    return 0
