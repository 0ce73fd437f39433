"""A real ``vision-serve`` child process on loopback ports, and a real S3-compatible server
(moto), for the tests and ``bench/`` alike.

It lives with the tests, outside the shipped package: the server never imports it. Tests use it
where a process boundary is the point (signals, restarts, replicas, the CLI, RSS); elsewhere
``tests/inprocess.py`` is faster. No pytest here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/support/servers.py
STARTUP_TIMEOUT_S = 240.0


_PORT_BLOCK = 2000  # ports per test worker
_FIRST_PORT = 20000
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and that nothing else in this test run will be given.

    Binding port 0 gives a port that is free only until that socket closes: an in-process
    server of another test worker, binding port 0 itself, can get it before the child
    process that was meant to. So ports come from below the kernel's ephemeral range
    (where port-0 binds land), from a block of each pytest-xdist worker's own, and each
    is handed out once per process.
    """
    ephemeral_low = _ephemeral_range_start()
    if ephemeral_low < _FIRST_PORT + _PORT_BLOCK:  # no room below it: let the kernel choose
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    blocks = max(1, (ephemeral_low - _FIRST_PORT) // _PORT_BLOCK)
    first = _FIRST_PORT + (int(worker) if worker.isdigit() else 0) % blocks * _PORT_BLOCK
    for port in range(first, min(first + _PORT_BLOCK, ephemeral_low)):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {first}-{first + _PORT_BLOCK - 1}")


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
]
"""Channel options for a client that polls a server still starting: gRPC's default backoff after a
refused connection grows from 1 s by 1.6 times a try, so a server that came up between two tries
would be seen seconds late."""


@dataclass
class ServerProcess:
    """A ``vision-serve`` child process and how to reach it."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)
    http_port: int | None = None  # when start_server chose it

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

    def assert_no_traceback(self) -> None:
        """Fail, showing the first traceback whole (the log around it), when the log has one."""
        log = self.log()
        at = log.find("Traceback")
        assert at < 0, log[max(0, log.rfind("\n", 0, max(0, at - 400))) : at + 5000]

    def wait_serving(self, service: str = "", timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until the health service reports ``service`` SERVING."""
        import grpc  # here, so that importing this module (conftest) needs no gRPC: GPU-only hosts
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
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
    tmp_dir: Path, *args: str, env: dict[str, str] | None = None, grpc_port: int | None = None, root: Path = ROOT
) -> ServerProcess:
    """Start ``vision-serve`` with ``args`` on free loopback ports (not yet waiting for it).

    ``grpc_port``: listen there rather than on a fresh port (one a client already targets).
    ``root``: the checkout whose ``service`` package runs (another commit's worktree, for an A/B).
    """
    grpc_port, metrics_port = grpc_port or free_port(), free_port()
    http_port = None
    if "--http-port" not in args:  # never the default 8000, which another server may hold
        http_port = free_port()
        args = (*args, "--http-port", str(http_port))
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
            command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, **(env or {})}
        )
    return ServerProcess(process, grpc_port, metrics_port, log_path, list(args), http_port)


# -- an S3-compatible server ------------------------------------------------------------------

MOTO_REGION = "us-east-1"


class MotoServer:
    """moto's S3-compatible server in a child process on loopback (tests, bench/store_poll.py).

    moto 5.2.5 answers a create-only write on an existing key (``If-None-Match: *``) and an
    ``If-Match`` with a stale ETag ``412 Precondition Failed``, as S3 does (5.2.0 answered 500).
    """

    def __init__(self, folder: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.log = folder / f"moto-{self.port}.log"
        self.tls = tls  # (certificate, key) in PEM: the server speaks HTTPS
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """The standard AWS variables for a client of this server: no file of HOME is read."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test-key-id",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": MOTO_REGION,
            "AWS_CONFIG_FILE": str(self.folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.folder / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> MotoServer:
        env = {**os.environ, "HOME": str(self.folder), **self.environment()}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port),
                 *(["-c", str(self.tls[0]), "-k", str(self.tls[1])] if self.tls else [])],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def client(self) -> Any:
        import boto3  # here: importing this module needs no boto3

        env = self.environment()
        return boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=MOTO_REGION,
        ).client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = f"models-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped (SIGSTOP): connections are accepted by the kernel and never answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
