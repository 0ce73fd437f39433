"""A real server in the test process: ``VisionServer`` on its own event loop in a thread.

Use it wherever no process boundary is the point of the test (signals, restarts and the
CLI still need :func:`tests.conftest.start_server`). The server binds port 0 for gRPC and
metrics; clients reach it over loopback exactly as they would reach a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from service.config import RuntimeConfig, ServeConfig
from service.engine.server import VisionServer, create_server
from tests.conftest import session_runtime_cache

T = TypeVar("T")


LOAD_TIMEOUT_S = 240.0


class InProcessServer:
    """Start with :meth:`start`, stop with :meth:`stop` (or use it as a context manager)."""

    def __init__(self, config: ServeConfig) -> None:
        http_port = None if config.http_port is None else 0
        self.config = replace(config, host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=http_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server-loop", daemon=True)
        self.server: VisionServer | None = None

    def start(self, *, wait_loaded: bool = True) -> InProcessServer:
        self._thread.start()
        self.server = self.call(create_server(self.config))
        if wait_loaded:
            self.call(self.server.wait_loaded(), timeout=LOAD_TIMEOUT_S)
        return self

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coroutine`` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start ``coroutine`` on the server's event loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    @property
    def grpc_port(self) -> int:
        assert self.server is not None
        return self.server.grpc_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        assert self.server is not None and self.server.http_port, "no HTTP port"
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def metrics_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self) -> None:
        if self._loop.is_closed():
            return  # stopped already
        if self.server is not None:
            server = self.server

            async def stop() -> None:
                await server.request_stop()

            self.call(stop(), timeout=120.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30.0)
        self._loop.close()

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def alexnet_config(store: Path | None, weights_dir: Path, **overrides: Any) -> ServeConfig:
    """The tests' usual server: AlexNet with the session's state dicts, the session's runtime
    cache, a model store of the test's own; keyword arguments override ``ServeConfig`` fields."""
    settings: dict[str, Any] = {
        "models": ("alexnet",),
        "weights": str(weights_dir),
        "model_store": store,
        "drain_seconds": 5.0,
        "runtime": RuntimeConfig(cache_dir=session_runtime_cache()),
    }
    settings.update(overrides)
    return ServeConfig(**settings)


def tiny_config(store: Path | None, **overrides: Any) -> ServeConfig:
    """A server of the tiny test network (random weights, eager torch) with a health port and a
    model store of the test's own; keyword arguments override ``ServeConfig`` fields."""
    from tests.tiny import TINY

    settings: dict[str, Any] = {
        "models": (TINY,),
        "weights": "random",
        "runtime": RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        "model_store": store,
        "health_port": 0,
        "drain_seconds": 5.0,
    }
    settings.update(overrides)
    return ServeConfig(**settings)


@contextlib.contextmanager
def running(config: ServeConfig, *, grpc_port: int = 0, wait_loaded: bool = True) -> Iterator[InProcessServer]:
    """An :class:`InProcessServer` of ``config``, started (on ``grpc_port``: 0 for any), then stopped."""
    server = InProcessServer(config)
    server.config = replace(server.config, grpc_port=grpc_port)
    try:
        yield server.start(wait_loaded=wait_loaded)
    finally:
        server.stop()
