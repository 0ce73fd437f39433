"""Typed records of what the benchmark measured; written to JSON with :func:`to_json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EAGER = "eager"  # the raw baseline every run has: torchvision in eager PyTorch


@dataclass
class RawResult:
    """torchvision (or the same exported network) in the benchmark's own process."""

    baseline: str  # "eager", or the runtime it ran in ("onnxruntime", "openvino")
    batch_size: int
    batches: int
    images: int
    seconds: float
    images_per_s: float
    batch_ms_p50: float
    batch_ms_mean: float
    preprocess_ms_per_batch_mean: float
    forward_ms_per_batch_mean: float
    cpu_cores_used: float
    server_idle_cpu_cores: float  # the idle servers, waiting for their turn
    other_processes_cpu_cores: float  # other work on the machine meanwhile


@dataclass
class ServiceResult:
    """C closed-loop clients against one server, over one window."""

    runtime: str  # what the server ran the model in
    concurrency: int
    client: str
    warmup_s: float
    seconds: float
    requests: int
    images_per_s: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_mean: float
    errors: int
    error_examples: list[str]
    server_cpu_cores_used: float
    server_cpu_seconds_per_image: float | None  # server CPU time over images served in the window
    client_cpu_cores_used: float
    other_processes_cpu_cores: float
    server_batches: float  # from the server's own /metrics over the same window
    server_batch_size_mean: float | None
    server_compute_busy_fraction: float
    server_compute_ms_per_batch_mean: float | None
    server_queue_ms_mean: float | None
    server_request_ms_mean: float | None


@dataclass
class Point:
    """One model, mode and concurrency: every raw baseline and every server, best of the repeats."""

    model: str
    mode: str
    concurrency: int
    raw: dict[str, RawResult] = field(default_factory=dict)  # by baseline
    service: dict[str, ServiceResult] = field(default_factory=dict)  # by the server's --runtime
    raw_runs: dict[str, list[RawResult]] = field(default_factory=dict)
    service_runs: dict[str, list[ServiceResult]] = field(default_factory=dict)

    def same_runtime_baseline(self, server: str) -> RawResult:
        """Raw in the runtime that ``server`` ran the model in (eager for torch)."""
        runtime = self.service[server].runtime
        return self.raw.get(runtime, self.raw[EAGER])

    def ratios(self, server: str) -> dict[str, float]:
        service = self.service[server].images_per_s
        return {
            "service_over_raw_eager": service / self.raw[EAGER].images_per_s,
            "service_over_raw_same_runtime": service / self.same_runtime_baseline(server).images_per_s,
        }

    def disturbed(self, threshold: float) -> bool:
        others = [r.other_processes_cpu_cores for r in self.raw.values()]
        others += [s.other_processes_cpu_cores for s in self.service.values()]
        return max(others) > threshold


@dataclass
class ServerRecord:
    """One server the run started: how, how long it took to become ready, whether it agrees with raw."""

    model: str
    runtime_option: str
    runtime: str
    command: str
    log: str
    ready_seconds: float
    agreement: dict[str, float]


def to_json(document: dict[str, Any]) -> str:
    """JSON of a document holding records (dataclasses) anywhere inside it."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out = {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, Point):
                out["ratios"] = {server: value.ratios(server) for server in value.service}
            return out
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return json.dumps(convert(document), indent=2) + "\n"


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Write a benchmark's JSON ``document`` to ``path`` (its folder made if need be) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(document))
    print(f"wrote {path}")
