"""Start-up: ports that are taken and weights that are missing are reported before anything loads,
in one line that names every one of them, without a traceback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli import build_serve_parser, config_from_args
from service.config import ServeConfig
from service.engine.server import create_server
from service.errors import FailedPreconditionError
from service.host.ports import Listener, check_ports
from tests.support.servers import ROOT, free_port
from tests.tiny import TINY

HOLDER = """
import socket, sys
held = []
for port in map(int, sys.argv[1:]):
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    held.append(sock)
print("holding", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def hold_ports() -> Iterator[object]:
    """Another process that listens on the ports given: ``hold(port, ...)``."""
    holders: list[subprocess.Popen[str]] = []

    def hold(*ports: int) -> None:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *map(str, ports)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "holding"

    yield hold
    for process in holders:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(30)


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--model-store", "none", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def tiny_config(*argv: str) -> ServeConfig:
    """The tiny test model with random weights, on loopback, without a store."""
    base = ["--host", "127.0.0.1", "--models", TINY, "--weights", "random", "--model-store", "none"]
    return config_from_args(build_serve_parser({}).parse_args([*base, *argv]))


def test_every_taken_port_is_named_in_one_line_before_anything_loads(hold_ports) -> None:
    grpc, http, metrics, health = (free_port() for _ in range(4))
    hold_ports(grpc, http, metrics, health)
    result = run_server(
        "--models", "alexnet", "--weights", "random",
        "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
        "--health-port", str(health),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for option, port in (("--grpc-port", grpc), ("--http-port", http), ("--metrics-port", metrics)):
        assert f"{option} {port} (on 127.0.0.1) is in use by another process" in lines[0]
    assert f"--health-port {health}" in lines[0]
    assert lines[0].startswith("vision-serve: error: cannot listen:")
    assert "RANDOM WEIGHTS" not in result.stderr  # no model was built


def test_one_taken_port_among_free_ones(hold_ports) -> None:
    http = free_port()
    hold_ports(http)
    result = run_server(
        "--models", "alexnet", "--weights", "random",
        "--grpc-port", str(free_port()), "--http-port", str(http), "--metrics-port", str(free_port()),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"--http-port {http} (on 127.0.0.1)" in result.stderr
    assert "--grpc-port" not in result.stderr and "--metrics-port" not in result.stderr


def test_two_options_on_one_port_are_refused() -> None:
    port = free_port()
    with pytest.raises(FailedPreconditionError, match=rf"--metrics-port {port} is also --grpc-port's port"):
        check_ports([Listener("--grpc-port", "127.0.0.1", port), Listener("--metrics-port", "127.0.0.1", port)])
    check_ports([Listener("--grpc-port", "127.0.0.1", 0), Listener("--metrics-port", "127.0.0.1", 0)])  # port 0


def test_a_port_taken_after_the_check_is_refused_by_the_bind_and_nothing_is_left_running(hold_ports) -> None:
    """The server's own binds say the same thing (no traceback, no gRPC server left to a closed loop)."""
    http = free_port()
    hold_ports(http)
    config = tiny_config("--grpc-port", "0", "--metrics-port", "0", "--http-port", str(http))

    async def start() -> None:
        await create_server(config)

    with pytest.raises(FailedPreconditionError, match=rf"--http-port {http} \(on 127.0.0.1\) is in use"):
        asyncio.run(start())


def test_port_zero_still_binds_a_free_port() -> None:
    config = tiny_config("--grpc-port", "0", "--metrics-port", "0", "--http-port", "0")

    async def start_and_stop() -> tuple[int, int, int]:
        server = await create_server(config)
        try:
            return server.grpc_port, server.http_port, server.metrics_port
        finally:
            await server.stop()

    ports = asyncio.run(start_and_stop())
    assert all(port > 0 for port in ports) and len(set(ports)) == 3


def offline_env(torch_home: Path) -> dict[str, str]:
    """An empty TORCH_HOME, and a proxy on a closed loopback port: a download fails at once."""
    return {
        **os.environ,
        "TORCH_HOME": str(torch_home),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }


ALL_MODELS = "alexnet,vgg16,resnet101"


def test_offline_the_weights_error_names_every_missing_model_and_one_command_for_all(tmp_path: Path) -> None:
    """Offline with an empty TORCH_HOME: one error, every model named, one command that pre-seeds
    them all; the server exits before building any model, without a traceback."""
    result = run_server(
        "--models", ALL_MODELS, "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
        env=offline_env(tmp_path / "torch"),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "cannot get pretrained weights for alexnet, vgg16, resnet101" in result.stderr
    assert f"`vision-serve fetch-weights --models {ALL_MODELS}`" in result.stderr
    for file in ("alexnet-owt-7be5be79.pth", "vgg16-397923af.pth", "resnet101-cd907fc2.pth"):
        assert file in result.stderr
    assert str(tmp_path / "torch") in result.stderr and "--weights random" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "torch" / "hub" / "checkpoints").exists() or not any(
        path.suffix == ".pth" for path in (tmp_path / "torch" / "hub" / "checkpoints").iterdir()
    )  # nothing half-downloaded is left as if it were weights


def test_models_already_seeded_are_not_named_again(tmp_path: Path) -> None:
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"seeded")  # as a user who copied it would
    result = subprocess.run(
        [sys.executable, "-m", "service", "fetch-weights", "--models", ALL_MODELS],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=offline_env(tmp_path / "torch"),
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot get pretrained weights for vgg16, resnet101 (" in result.stderr
    assert "`vision-serve fetch-weights --models vgg16,resnet101`" in result.stderr
    assert "alexnet" not in result.stderr and "Traceback" not in result.stderr
    assert (checkpoints / "alexnet-owt-7be5be79.pth").read_bytes() == b"seeded"
