"""Metrics: batching seen through the counters, promtool, and a real Prometheus server scraping us."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from PIL import Image

from tests.conftest import encode, free_port
from tests.metrics_util import sample_value, scrape

REQUIRED = {
    "vision_requests": "counter",
    "vision_inference_images": "counter",
    "vision_batches": "counter",
    "vision_batch_size": "histogram",
    "vision_queue_seconds": "histogram",
    "vision_compute_seconds": "histogram",
    "vision_request_seconds": "histogram",
    "vision_pending_images": "gauge",
}


def one_image_input(seed: int) -> triton.InferInput:
    rng = np.random.default_rng(seed)
    data = encode(Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)), "JPEG")
    tensor = triton.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return tensor


def test_concurrent_requests_are_batched(server) -> None:
    """48 concurrent single-image requests, --max-batch-size 16 --max-queue-delay-ms 50."""
    before = scrape(server.metrics_url)

    async def burst() -> list:
        async with triton_aio.InferenceServerClient(server.target) as client:
            return await asyncio.gather(*(client.infer("alexnet", [one_image_input(i)]) for i in range(48)))

    results = asyncio.run(burst())
    assert all(r.as_numpy("LOGITS").shape == (1, 1000) for r in results)
    after = scrape(server.metrics_url)
    images = sample_value(after, "vision_inference_images_total", model="alexnet", device="cpu") - sample_value(
        before, "vision_inference_images_total", model="alexnet", device="cpu"
    )
    batches = sample_value(after, "vision_batches_total", model="alexnet", device="cpu") - sample_value(
        before, "vision_batches_total", model="alexnet", device="cpu"
    )
    ok = sample_value(after, "vision_requests_total", model="alexnet", status="OK") - sample_value(
        before, "vision_requests_total", model="alexnet", status="OK"
    )
    assert images == 48 and ok == 48
    assert images / batches >= 3, f"{images} images in {batches} batches"


def test_metric_names_types_and_labels(server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(scrape(server.metrics_url))}
    for name, kind in REQUIRED.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind
    devices = {s.labels.get("device") for s in families["vision_inference_images"].samples}
    assert devices == {"cpu"}
    assert {s.labels["model"] for s in families["vision_pending_images"].samples} == {"alexnet"}


def test_promtool_check_metrics_is_clean(server, system_tool) -> None:
    promtool = system_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(server.metrics_url), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def _query(port: int, expression: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_real_prometheus_sees_throughput_per_device(server, system_tool, tmp_path) -> None:
    prometheus = system_tool("prometheus")
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: vision\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        expression = 'sum by (device) (rate(vision_inference_images_total{model="alexnet"}[20s]))'
        seen: list[dict] = []
        with triton.InferenceServerClient(server.target) as client:
            for attempt in range(120):  # bounded: at most ~2 minutes of light traffic
                client.infer("alexnet", [one_image_input(attempt)])
                time.sleep(0.25)
                if attempt % 8 == 7:
                    try:
                        seen = _query(web_port, expression)
                    except OSError:
                        continue  # Prometheus still starting
                    if seen and float(seen[0]["value"][1]) > 0:
                        break
        assert seen, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert seen[0]["metric"] == {"device": "cpu"}
        assert float(seen[0]["value"][1]) > 0
    finally:
        process.terminate()
        process.wait(30)
        log.close()
