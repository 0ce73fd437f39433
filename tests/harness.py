"""A real ``vision-serve`` child process on loopback ports: the tests' and the benchmark's harness.

Use it where a process boundary is the point (signals, restarts, replicas, the CLI, RSS);
elsewhere :mod:`tests.inprocess` is faster. No pytest here, so that ``bench/`` can use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``vision-serve`` child process and how to reach it."""

    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_serving(self, service: str = "", timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until the health service reports ``service`` SERVING."""
        import grpc  # here, so that importing the harness (conftest) needs no gRPC: GPU-only hosts
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"vision-serve exited with {self.process.returncode}:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"vision-serve not SERVING {service!r} after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    tmp_dir: Path, *args: str, env: dict[str, str] | None = None, grpc_port: int | None = None
) -> ServerProcess:
    """Start ``vision-serve`` with ``args`` on free loopback ports (not yet waiting for it).

    ``grpc_port``: listen there rather than on a fresh port (one a client already targets).
    """
    grpc_port, metrics_port = grpc_port or free_port(), free_port()
    log_path = tmp_dir / f"server-{grpc_port}.log"
    if "--model-store" not in args:  # never the user's default store
        args = (*args, "--model-store", str(tmp_dir / f"store-{grpc_port}"))
    command = [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    return ServerProcess(process, grpc_port, metrics_port, log_path, list(args))
