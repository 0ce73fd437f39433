"""Raw baselines: the same work in the benchmark's own process, no server, no protocol.

``eager`` is torchvision in eager PyTorch; a runtime baseline (``onnxruntime``, ``openvino``)
runs the very network the server exported, loaded from the same ``--runtime-cache`` through
the server's own backend code with the same thread count (its intra-op threads busy-wait for
work, ONNX Runtime's default and its fastest alone; the server's stop spinning when a forward
pass returns, see ``--runtime-spin``). Both use the server's weights rule, so raw and service compute with
identical parameters (checked by ``agreement``).
"""

from __future__ import annotations

import io
import logging
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from bench.machine import process_cpu_seconds, system_busy_seconds
from bench.records import EAGER, RawResult

T = TypeVar("T")


@dataclass
class RawModel:
    """One model in one baseline: its preprocessing and a batched forward pass."""

    name: str
    baseline: str
    transforms: Any
    forward_fn: Callable[[torch.Tensor], np.ndarray]

    def preprocess(self, jpeg: bytes) -> torch.Tensor:
        return self.transforms(Image.open(io.BytesIO(jpeg)).convert("RGB"))

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        return self.forward_fn(batch)


def load_raw_models(
    name: str, weights: str, device: torch.device, baselines: list[str], *, cache_dir: Path, threads: int
) -> dict[str, RawModel]:
    """``name`` in each of ``baselines`` (``eager`` or a runtime), from one build of its weights."""
    from service.engine.runtime import ModelInstance
    from service.models import WeightsSource, build_model, get_model_spec
    from service.runtimes.select import BackendLoader, RuntimeOptions

    # The server logs its loud random-weights warning; the benchmark's copy would only break the table.
    logging.getLogger("service.models.weights").setLevel(logging.ERROR)
    spec = get_model_spec(name)
    net = build_model(spec, WeightsSource.parse(weights)).eval()
    models: dict[str, RawModel] = {}
    for baseline in baselines:
        if baseline == EAGER:
            module = net.to(device)

            def eager(batch: torch.Tensor, module: torch.nn.Module = module) -> np.ndarray:
                with torch.inference_mode():
                    return module(batch.to(device)).float().cpu().numpy()

            models[baseline] = RawModel(name, baseline, spec.transforms(), eager)
        else:
            options = RuntimeOptions(runtime=baseline, cache_dir=cache_dir, threads=threads)
            instance = ModelInstance(BackendLoader(spec, net, options).load(baseline, device, torch.float32))
            models[baseline] = RawModel(name, baseline, spec.transforms(), lambda b, i=instance: i.forward([b]))
    return models


class RawThread:
    """Where raw work runs: one long-lived thread, as the server's forward passes do
    (``--raw-thread worker``), or the caller's thread (``main``)."""

    def __init__(self, dedicated: bool) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw") if dedicated else None
        self.stopped = threading.Event()  # set when the run is aborted: raw stops at its next batch

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def check(self) -> None:
        if self.stopped.is_set():
            raise RuntimeError("benchmark aborted")

    def close(self) -> None:
        self.stopped.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class RawWindow:
    """How long a raw measurement lasts."""

    warmup_seconds: float
    seconds: float
    min_batches: int


def measure_raw(
    model: RawModel,
    mode: str,
    batch_size: int,
    jpegs: list[bytes],
    pixels: list[torch.Tensor],
    window: RawWindow,
    idle_server_pids: list[int],
    stop: RawThread,
) -> RawResult:
    """Images/s and per-batch latency of ``model`` in-process at ``batch_size`` (run on the raw thread)."""
    cursor = 0

    def one_batch() -> tuple[float, float]:
        nonlocal cursor
        indices = [(cursor + i) % len(jpegs) for i in range(batch_size)]
        cursor += batch_size
        started = time.perf_counter()
        if mode == "image":
            batch = torch.stack([model.preprocess(jpegs[i]) for i in indices])
        else:
            batch = torch.stack([pixels[i] for i in indices])  # preprocessed ahead: forward only
        prepared = time.perf_counter()
        model.forward(batch)
        finished = time.perf_counter()
        return finished - started, prepared - started

    # Warm-up: at least two batches (oneDNN and the runtimes prime each new shape) and --warmup-seconds.
    started = time.perf_counter()
    warm = 0
    while warm < 2 or time.perf_counter() - started < window.warmup_seconds:
        stop.check()
        one_batch()
        warm += 1

    def servers_cpu() -> float:
        return sum(process_cpu_seconds(pid) for pid in idle_server_pids)

    latencies: list[float] = []
    preprocess: list[float] = []
    busy0, server0, cpu0, t0 = system_busy_seconds(), servers_cpu(), time.process_time(), time.perf_counter()
    while len(latencies) < window.min_batches or time.perf_counter() - t0 < window.seconds:
        stop.check()
        total, prep = one_batch()
        latencies.append(total)
        preprocess.append(prep)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    server_idle = servers_cpu() - server0
    others = system_busy_seconds() - busy0 - cpu - server_idle
    return RawResult(
        baseline=model.baseline,
        batch_size=batch_size,
        batches=len(latencies),
        images=len(latencies) * batch_size,
        seconds=elapsed,
        images_per_s=len(latencies) * batch_size / elapsed,
        batch_ms_p50=1000 * statistics.median(latencies),
        batch_ms_mean=1000 * statistics.fmean(latencies),
        preprocess_ms_per_batch_mean=1000 * statistics.fmean(preprocess),
        forward_ms_per_batch_mean=1000 * (statistics.fmean(latencies) - statistics.fmean(preprocess)),
        cpu_cores_used=cpu / elapsed,
        server_idle_cpu_cores=server_idle / elapsed,
        other_processes_cpu_cores=max(0.0, others / elapsed),
    )
