"""The HTTP port over a set of services: its routes, the console's pages, its bounds, TLS and
authorization, bound to ``--host:--http-port``. One assembly for the single process and for each
protocol front end (which shares the port with the others)."""

from __future__ import annotations

from service.config import ServeConfig
from service.host.ports import Listener, bind_error, bracketed
from service.transport.auth import AccessPolicy
from service.transport.rest.console import console_routes
from service.transport.rest.routes import routes
from service.transport.rest.server import RestServer
from service.transport.rest.vision_routes import vision_routes
from service.transport.services import FineTuningService, InferenceService, ModelsService
from service.transport.tls import CertificateFiles


async def start_rest_port(
    config: ServeConfig,
    access: AccessPolicy,
    tls: CertificateFiles | None,
    inference: InferenceService,
    models: ModelsService,
    fine_tuning: FineTuningService,
    *,
    share_port: bool = False,
) -> RestServer:
    """A started REST server (``.port`` is the port it bound); FailedPreconditionError if it cannot bind."""
    rest_routes = routes(inference) + vision_routes(
        models,
        fine_tuning,
        max_part_bytes=config.max_message_bytes,
        read_timeout_s=config.first_message_timeout_s,
    )
    server = RestServer(
        rest_routes,
        access,
        max_body_bytes=config.max_message_bytes,
        body_timeout_s=config.first_message_timeout_s,
        tls=tls,
        pages=console_routes(limits=config.fine_tuning),
    )
    assert config.http_port is not None
    try:
        await server.start(bracketed(config.host), config.http_port, share_port=share_port)
    except OSError as exc:
        raise bind_error(Listener("--http-port", config.host, config.http_port), exc) from None
    return server
