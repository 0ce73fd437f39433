"""Shared fixtures: real servers (tests.support.servers, tests.inprocess), real images, one runtime
cache per session."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.servers import ROOT, STARTUP_TIMEOUT_S, ServerProcess, free_port, start_server

__all__ = ["ROOT", "STARTUP_TIMEOUT_S", "ServerProcess", "free_port", "start_server"]

RUNTIME_CACHE_ENV = "VISION_SERVE_RUNTIME_CACHE"


HOME_ENV = ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR")
TEST_HOME_ENV = "VISION_TEST_HOME"


def pytest_configure(config: pytest.Config) -> None:
    """A home of the session's own, and one runtime cache (exported networks) for the whole
    session, shared by in-process and child servers, so that each model and weights is exported
    once per session.

    The home: servers, their defaults (runtime cache and model store under XDG directories) and
    the libraries they load (matplotlib, OpenVINO's and ONNX Runtime's telemetry files) write
    under HOME. A test run writes nothing in the user's own (tests/test_home.py checks it)."""
    if TEST_HOME_ENV not in os.environ:  # once per run: xdist workers inherit it
        home = tempfile.mkdtemp(prefix="vision-test-home-")
        os.environ[TEST_HOME_ENV] = home
        os.environ["HOME"] = home
        os.environ["XDG_CACHE_HOME"] = os.path.join(home, ".cache")
        os.environ["XDG_DATA_HOME"] = os.path.join(home, ".local", "share")
        os.environ["XDG_CONFIG_HOME"] = os.path.join(home, ".config")
        os.environ["MPLCONFIGDIR"] = os.path.join(home, ".config", "matplotlib")
        config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    if RUNTIME_CACHE_ENV not in os.environ:
        directory = tempfile.mkdtemp(prefix="vision-runtime-cache-")
        os.environ[RUNTIME_CACHE_ENV] = directory
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    share_cores_among_workers()


def share_cores_among_workers() -> None:
    """A pytest-xdist worker's own torch computations (references, the trainer's tests) on its share
    of the cores. Each worker is a process whose torch team of intra-op threads is as wide as the
    machine: on two cores, two such teams and the servers under test leave each OpenMP barrier
    waiting for a thread that is not running, and a small head trained 15 times slower than on one
    thread. What the servers compute is not changed: their threads set their own counts
    (service.host.cpus.use_torch_threads), and child servers are processes of their own."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from service.host.cpus import usable_cores

        torch.set_num_threads(max(1, usable_cores() // workers))


# The end-to-end tier (`pytest -m e2e`; `-m "not e2e"` is the fast tier): tests that start a server
# (in-process or a child), a browser-less Prometheus, a child pytest, pip or kubectl. Marked here,
# by the fixtures a test uses and by module for those that start servers in their bodies, so that
# a new test is classified without marking it by hand.
SERVER_FIXTURES = frozenset(
    {
        "server", "token_server", "serve_inprocess", "default_server", "second_server", "slow_server",
        "store_server", "tiny_server", "replicas", "prometheus", "kserve_python", "built", "workload",
        "shm_server", "console_server", "browser",
    }
)  # fmt: skip
E2E_MODULES = frozenset(
    {
        "test_admission", "test_cli", "test_client", "test_client_finetune", "test_client_install",
        "test_dashboard", "test_deploy", "test_deploy_security", "test_finetune", "test_home", "test_kserve",
        "test_metrics", "test_overload", "test_replicas", "test_rest", "test_restart_readiness",
    }
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if isinstance(item, pytest.Function) else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in E2E_MODULES or fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.e2e)


def session_runtime_cache() -> Path:
    return Path(os.environ[RUNTIME_CACHE_ENV])


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """State dicts of seeded random AlexNet and ResNet101 (nothing can be downloaded here)."""
    import torch
    from torchvision import models

    directory = tmp_path_factory.mktemp("weights")
    for name, builder in (("alexnet", models.alexnet), ("resnet101", models.resnet101)):
        torch.manual_seed(1234)
        torch.save(builder(weights=None).state_dict(), directory / f"{name}.pth")
    return directory


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory):  # -> tests.support.servers.MotoServer
    """An S3-compatible server (moto) for this test worker, started when a test first needs it."""
    from tests.support.servers import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_store(moto_server, monkeypatch: pytest.MonkeyPatch):  # -> service.storage.S3Location
    """``s3://<a new bucket>/models`` on the worker's moto server, with the AWS environment set for it."""
    from service.storage import S3Location

    for variable, value in moto_server.environment().items():
        monkeypatch.setenv(variable, value)
    return S3Location(moto_server.new_bucket(), "models")


def load_reference(weights_dir: Path, name: str):  # -> torch.nn.Module
    """The torchvision model with the very weights the server was given, in eval mode."""
    import torch
    from torchvision import models

    model = getattr(models, name)(weights=None)
    model.load_state_dict(torch.load(weights_dir / f"{name}.pth", weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[ServerProcess]:
    """One AlexNet child server for the whole session: batches of up to 16, a 50 ms window (so that
    concurrent requests batch)."""
    proc = start_server(
        tmp_path_factory.mktemp("server"),
        "--models",
        "alexnet",
        "--weights",
        str(weights_dir),
        "--max-batch-size",
        "16",
        "--max-queue-delay-ms",
        "50",
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


TOKEN = "s3cret-token"


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[ServerProcess]:
    """An AlexNet server that fine-tunes into a model store, and wants ``Bearer TOKEN`` for it."""
    directory = tmp_path_factory.mktemp("token-server")
    (directory / "token").write_text(TOKEN + "\n")
    proc = start_server(
        directory,
        "--models",
        "alexnet",
        "--weights",
        str(weights_dir),
        "--model-store",
        str(directory / "store"),
        "--auth-token-file",
        str(directory / "token"),
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photographs, JPEG-encoded: the two that scikit-learn ships, plus crops of them."""
    from sklearn.datasets import load_sample_images

    images = {}
    for name, pixels in zip(("china", "flower"), load_sample_images().images, strict=True):
        full = Image.fromarray(pixels)
        images[name] = encode(full, "JPEG", quality=92)
        images[f"{name}-crop"] = encode(full.crop((100, 50, 400, 350)), "JPEG", quality=85)
    return images


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def system_tool():
    """Path of a system tool the test needs; under CI its absence is a failure, not a skip."""

    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            message = f"{name} is not installed (make test installs Debian's package)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        return path

    return find


def store_server_args(weights_dir: Path, store: Path, *extra: str) -> tuple[str, ...]:
    """Options of an AlexNet server that fine-tunes into ``store`` and polls it every second."""
    return (
        "--models", "alexnet", "--weights", str(weights_dir),
        "--model-store", str(store), "--store-poll-seconds", "1", *extra,
    )  # fmt: skip


@pytest.fixture
def serve_inprocess(tmp_path: Path, weights_dir: Path):  # -> Callable[..., InProcessServer]
    """Factory of in-process servers (AlexNet, the test's weights, a store of the test's own),
    each stopped after the test. Keyword arguments override ``ServeConfig`` fields."""
    from tests.inprocess import InProcessServer, alexnet_config

    started: list[InProcessServer] = []

    def start(*, wait_loaded: bool = True, **overrides: object) -> InProcessServer:
        config = alexnet_config(tmp_path / f"store-{len(started)}", weights_dir, **overrides)
        server = InProcessServer(config)
        started.append(server)
        return server.start(wait_loaded=wait_loaded)

    yield start
    for server in reversed(started):
        server.stop()
