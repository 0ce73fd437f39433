"""The Grafana dashboard: importable JSON, wired into the overlays, and every query evaluated
by a real Prometheus server scraping a real server under load (inference and a fine-tuning job).

Set ``VISION_DASHBOARD_PNG=path`` to also draw the panels (docs/deployment.md's picture) and
``VISION_DASHBOARD_SECONDS`` to run the load for longer than the test needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image

from service.config import BatchingConfig
from tests.conftest import ROOT, encode, free_port
from tests.support.finetune_data import digits
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

_spec = importlib.util.spec_from_file_location("dashboard", ROOT / "deploy" / "dashboard.py")
assert _spec is not None and _spec.loader is not None
dashboard = importlib.util.module_from_spec(_spec)
sys.modules["dashboard"] = dashboard  # dataclasses look their module up there
_spec.loader.exec_module(dashboard)

RATE_INTERVAL = "5s"  # what $__rate_interval stands for here: 20 scrapes at 250 ms
CUDA_METRIC = "vision_device_memory_"


def is_cuda_panel(query) -> bool:
    return CUDA_METRIC in query.expr


def test_dashboard_is_importable_grafana_json() -> None:
    board = dashboard.load()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    (variable,) = board["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()
    titles = " | ".join(p["title"] for p in board["panels"])
    for wanted in (
        "Images/s",
        "status",
        "p50 / p99",
        "batch size",
        "Queue depth",
        "Compute time",
        "jobs",
        "loss",
        "CUDA",
    ):
        assert wanted in titles, wanted


def test_dashboard_is_a_configmap_for_grafanas_sidecar() -> None:
    import json

    from tests.test_deploy import _build, _kustomize_commands

    commands = _kustomize_commands()
    if not commands:
        if os.environ.get("CI"):
            pytest.fail("needs kubectl >= 1.24 or kustomize to build deploy/overlays (make k8s-test-tools)")
        pytest.skip("needs kubectl >= 1.24 or kustomize to build deploy/overlays (make k8s-test-tools)")
    for overlay in ("cpu", "gpu"):
        objects = _build(commands[0], overlay)
        (config_map,) = [
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
        ]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"]["vision-serving.json"]) == dashboard.load()


@pytest.fixture
def prometheus(system_tool, tmp_path: Path) -> Iterator:
    """Starts a Prometheus server on loopback scraping a metrics port; returns its URL."""
    binary = system_tool("prometheus")
    started: list[tuple[subprocess.Popen, object]] = []

    def start(metrics_port: int) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: vision-serving\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed after the test
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((process, log))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), 120, "Prometheus to be ready")  # it answers 503 until then
        return url

    yield start
    for process, log in started:
        process.terminate()
        process.wait(30)
        log.close()  # type: ignore[attr-defined]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def keep_inferring(target: str, stop: threading.Event, errors: list[BaseException], seed: int) -> None:
    """One closed-loop client: requests of 1 to 3 images, and now and then a bad one."""
    rng = np.random.default_rng(seed)
    images = [encode(Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)), "JPEG") for _ in range(3)]
    try:
        with triton.InferenceServerClient(target) as client:
            sent = 0
            while not stop.is_set():
                count = 1 + sent % 3
                tensor = triton.InferInput("IMAGE", [count], "BYTES")
                tensor.set_data_from_numpy(np.array(images[:count], dtype=np.object_))
                client.infer("alexnet", [tensor])
                if sent % 10 == seed:
                    bad = triton.InferInput("IMAGE", [1], "BYTES")
                    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
                    with contextlib.suppress(triton.InferenceServerException):
                        client.infer("alexnet", [bad])
                sent += 1
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_panel_query_returns_data_from_a_real_prometheus(serve_inprocess, prometheus) -> None:
    server = serve_inprocess(batching=BatchingConfig(max_batch_size=8, max_queue_delay_ms=10))
    url = prometheus(server.server.metrics_port)
    cuda = any(d.type == "cuda" for d in server.server.devices)
    board = dashboard.load()
    started = time.time()

    stop = threading.Event()
    errors: list[BaseException] = []
    clients = [
        threading.Thread(target=keep_inferring, args=(server.target, stop, errors, seed), daemon=True)
        for seed in range(4)
    ]
    for client in clients:
        client.start()
    try:
        # A fine-tuning job that runs until Prometheus has seen its loss, then is cancelled.
        images, targets = digits()
        chosen = [i for i in range(200) if targets[i] in (0, 1)][:40]
        with grpc.insecure_channel(server.target) as channel:
            stub = ft_grpc.FineTuningStub(channel)

            def requests():
                yield ft.CreateJobRequest(
                    config=ft.FineTuneConfig(
                        base_model="alexnet",
                        output_model="dash",
                        epochs=1000,
                        batch_size=2,
                        validation_fraction=0.25,
                        seed=0,
                    )
                )
                examples = [ft.Example(image=images[i], label=str(targets[i])) for i in chosen]
                yield ft.CreateJobRequest(examples=ft.ExampleBatch(examples=examples))

            job = stub.CreateJob(requests(), timeout=300)

            def loss_seen() -> bool:
                try:
                    found = dashboard.query_range(url, "vision_finetune_loss", started, time.time(), 1)
                except OSError:
                    return False  # Prometheus still starting
                return dashboard.has_data(found)

            wait_for(loss_seen, 240, "Prometheus to scrape a fine-tuning loss")
            stub.CancelJob(ft.CancelJobRequest(job_id=job.id), timeout=60)
        # Enough load for every rate window, longer if a picture is wanted.
        time.sleep(max(float(RATE_INTERVAL[:-1]) * 2, float(os.environ.get("VISION_DASHBOARD_SECONDS", "0"))))
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    assert not errors, errors
    time.sleep(1)  # one more scrape after the load
    end = time.time()

    with pytest.raises(dashboard.QueryError):  # a query that does not parse is an error, not "no data"
        dashboard.query_range(url, "sum by (model) (rate(vision_requests_total[5s])", started, end, 1)
    checked = 0
    for query in dashboard.queries(board):
        expr = dashboard.substitute(query.expr, RATE_INTERVAL)
        series = dashboard.query_range(url, expr, started, end, 1)  # raises on a PromQL error
        if is_cuda_panel(query) and not cuda:
            assert series == [], f"{query.panel}: CUDA memory on a CPU-only server?"
            continue
        assert dashboard.has_data(series), f"{query.panel}: no data for {expr}"
        checked += 1
    assert checked >= 12

    statuses = {
        s.labels["status"]
        for s in dashboard.query_range(url, "sum by (status) (vision_requests_total)", started, end, 1)
    }
    assert {"OK", "INVALID_ARGUMENT"} <= statuses
    states = {s.labels["state"] for s in dashboard.query_range(url, "vision_finetune_jobs > 0", started, end, 1)}
    assert {"running", "cancelled"} <= {state.lower() for state in states}, states

    picture = os.environ.get("VISION_DASHBOARD_PNG")
    if picture:
        dashboard.render(
            board, url, started, end, Path(picture), rate_interval=RATE_INTERVAL,
            note=f"\nalexnet on {server.server.devices[0]}, {end - started:.0f} s of load and one fine-tuning job",
        )  # fmt: skip
