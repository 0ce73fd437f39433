"""Prometheus metrics of the server, in a registry of their own.

Throughput per device is ``rate(vision_inference_images_total[1m])`` by
``device``. Everything is registered on a private ``CollectorRegistry`` so
that several servers (tests) can live in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.engine.precision import Agreement
from service.engine.runtime import BatchStats
from service.engine.statistics import StatisticsCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class DeviceImages:
    """Images one model has run on one device since the server started."""

    model: str
    device: str
    images: int


class ServerMetrics:
    """Every metric the server exports; the core calls its ``record_*`` methods."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vision_requests",
            "Inference requests answered, by gRPC status and by the protocol they came in by (grpc, http).",
            ["model", "status", "protocol"],
            registry=r,
        )
        self.images = Counter(
            "vision_inference_images", "Images run through a forward pass.", ["model", "device"], registry=r
        )
        self.batches = Counter("vision_batches", "Forward passes (batches) run.", ["model", "device"], registry=r)
        self.batch_size = Histogram(
            "vision_batch_size", "Images per forward pass.", ["model", "device"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "vision_queue_seconds",
            "Time a request's images waited in the model's queue.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "vision_compute_seconds",
            "Wall time of one forward pass, host copies included.",
            ["model", "device"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "vision_request_seconds",
            "Time from a request's arrival to its answer, decoding included.",
            ["model", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending_images = Gauge(
            "vision_pending_images", "Images waiting in the model's queue.", ["model"], registry=r
        )
        self.model_ready = Gauge("vision_model_ready", "1 when the model serves, else 0.", ["model"], registry=r)
        self.model_runtime = Info(
            "vision_model_runtime",
            "The runtime (torch, onnxruntime, openvino) that runs each model on each device.",
            ["model", "device"],
            registry=r,
        )
        self.finetune_jobs = Gauge("vision_finetune_jobs", "Fine-tuning jobs by state.", ["state"], registry=r)
        self.finetune_loss = Gauge(
            "vision_finetune_loss", "Training loss of the last epoch of each running job.", ["job"], registry=r
        )
        self.finetune_images = Counter(
            "vision_finetune_images", "Training examples run through a head (per epoch).", registry=r
        )
        self.store_errors = Counter(
            "vision_store_errors", "Model store entries skipped because they cannot be served.", ["reason"], registry=r
        )
        self.frontend_requests = Counter(
            "vision_frontend_requests",
            "Inference requests the engine took from each protocol front end (--frontends of 2 or more), "
            "by the front end's index (how evenly the shared ports spread clients) and by whether the front "
            "end decoded their IMAGE inputs (decoded: true) or sent them as they came.",
            ["frontend", "decoded"],
            registry=r,
        )
        self.hop_links_closed = Counter(
            "vision_hop_links_closed",
            "Front ends' links the engine ended (--frontends of 2 or more) because the front end broke the "
            "hop's rules, by reason: unread_answers (it stopped reading its answers), in_flight (too many "
            "requests at once), bad_descriptor (a slot outside its arena, a reused id), bad_hello.",
            ["reason"],
            registry=r,
        )
        self.tls_reload_errors = Counter(
            "vision_tls_reload_errors",
            "Rotated TLS files refused (the previous certificate keeps serving), by reason.",
            ["reason"],
            registry=r,
        )
        self.precision_agreement = Gauge(
            "vision_precision_agreement",
            "A model's logits in its reduced --dtype against float32's on the sample images, measured at load: "
            "min_cosine, mean_cosine, top1 (fraction of the same class), max_relative_error.",
            ["model", "dtype", "measure"],
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "vision_trace_spans_dropped",
            "Spans not delivered to the trace collector, by reason: queue_full (the export queue, "
            "OTEL_BSP_MAX_QUEUE_SIZE, was full), export_failed (the collector refused or could not be reached), "
            "shutdown.",
            ["reason"],
            registry=r,
        )
        self.trace_spans_exported = Counter(
            "vision_trace_spans_exported", "Spans delivered to the trace collector.", registry=r
        )
        self._runtime_series: set[tuple[str, str]] = set()
        self._agreement_series: dict[str, list[tuple[str, str, str]]] = {}

        # Triton's per model and version statistics (ModelStatistics), from the same events.
        self.statistics = StatisticsCollector()

    def record_frontend_request(self, frontend: int, *, decoded: bool) -> None:
        self.frontend_requests.labels(str(frontend), "true" if decoded else "false").inc()

    def record_hop_link_closed(self, reason: str) -> None:
        self.hop_links_closed.labels(reason).inc()

    def record_tls_reload_error(self, reason: str) -> None:
        self.tls_reload_errors.labels(reason).inc()

    def record_store_error(self, reason: str) -> None:
        """Count a model store entry skipped because it cannot be served (``reason``: a short label)."""
        self.store_errors.labels(reason).inc()

    def record_finetune_images(self, count: int) -> None:
        self.finetune_images.inc(count)

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        """Jobs by state, every state given (0 included)."""
        for state, count in counts.items():
            self.finetune_jobs.labels(state).set(count)

    def record_batch(self, model: str, stats: BatchStats, version: str = "1") -> None:
        self.statistics.record_batch(model, version, stats)
        self.images.labels(model, stats.device).inc(stats.images)
        self.batches.labels(model, stats.device).inc()
        self.batch_size.labels(model, stats.device).observe(stats.images)
        self.compute_seconds.labels(model, stats.device).observe(stats.compute_seconds)
        queue = self.queue_seconds.labels(model)
        for seconds in stats.queue_seconds:
            queue.observe(seconds)

    def images_by_device(self) -> list[DeviceImages]:
        """``vision_inference_images_total`` as it stands: the one source of throughput per device
        (a client takes its rate, as Prometheus does)."""
        return [
            DeviceImages(sample.labels["model"], sample.labels["device"], int(sample.value))
            for family in self.images.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        ]

    def queue_depth_recorder(self, model: str) -> Callable[[int], None]:
        """What a model's queue calls with each change in the number of images it holds."""
        return self.pending_images.labels(model).inc

    def set_model_state(self, model: str, *, ready: bool, runtimes: Mapping[str, str]) -> None:
        """``vision_model_ready`` and the runtime by device (``runtimes``: device -> runtime)
        of ``model``; a model that runs nowhere (unloaded, deleted) loses its runtime series."""
        self.model_ready.labels(model).set(1 if ready else 0)
        for labels in [labels for labels in self._runtime_series if labels[0] == model]:
            if labels[1] not in runtimes:
                self.model_runtime.remove(*labels)
                self._runtime_series.discard(labels)
        for device, runtime in runtimes.items():
            self.model_runtime.labels(model, device).info({"runtime": runtime})
            self._runtime_series.add((model, device))

    def set_precision_agreement(self, model: str, dtype: str, agreement: Agreement | None) -> None:
        """``vision_precision_agreement`` of ``model`` as last measured; none in float32."""
        for labels in self._agreement_series.pop(model, []):
            self.precision_agreement.remove(*labels)
        if agreement is None:
            return
        measures = {
            "min_cosine": agreement.min_cosine,
            "mean_cosine": agreement.mean_cosine,
            "top1": agreement.top1,
            "max_relative_error": agreement.max_relative_error,
        }
        for measure, value in measures.items():
            self.precision_agreement.labels(model, dtype, measure).set(value)
        self._agreement_series[model] = [(model, dtype, measure) for measure in measures]

    def record_request(
        self,
        model: str,
        status: str,
        seconds: float,
        version: str = "1",
        protocol: str = "grpc",
        *,
        trace_id: str | None = None,
    ) -> None:
        """``trace_id``: the request's trace, the latency's exemplar (shown to OpenMetrics scrapes)."""
        if model:
            self.statistics.record_request(model, version, status == "OK", seconds)
        self.requests.labels(model, status, protocol).inc()
        exemplar = None if trace_id is None else {"trace_id": trace_id}
        self.request_seconds.labels(model, protocol).observe(seconds, exemplar)

    def record_spans_dropped(self, reason: str, count: int) -> None:
        self.trace_spans_dropped.labels(reason).inc(count)

    def record_spans_exported(self, count: int) -> None:
        self.trace_spans_exported.inc(count)

    def set_job_loss(self, job_id: str, loss: float) -> None:
        self.finetune_loss.labels(job_id).set(loss)

    def clear_job_loss(self, job_id: str) -> None:
        """Drop a finished job's series so that only running jobs are exported."""
        with contextlib.suppress(KeyError):
            self.finetune_loss.remove(job_id)

    def watch_cuda_memory(self, devices: Iterable[torch.device]) -> None:
        cuda = [d for d in devices if d.type == "cuda"]
        if cuda:
            self.registry.register(_CudaMemoryCollector(cuda))


class _CudaMemoryCollector(Collector):
    """Device memory gauges, read at scrape time."""

    def __init__(self, devices: list[torch.device]) -> None:
        self._devices = devices

    def collect(self) -> Iterator[GaugeMetricFamily]:
        allocated = GaugeMetricFamily(
            "vision_device_memory_allocated_bytes", "Device memory held by tensors.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "vision_device_memory_reserved_bytes", "Device memory reserved by the caching allocator.", labels=["device"]
        )
        total = GaugeMetricFamily("vision_device_memory_total_bytes", "Device memory in all.", labels=["device"])
        for device in self._devices:
            label = f"cuda:{device.index or 0}"
            allocated.add_metric([label], torch.cuda.memory_allocated(device))
            reserved.add_metric([label], torch.cuda.memory_reserved(device))
            total.add_metric([label], torch.cuda.get_device_properties(device).total_memory)
        yield from (allocated, reserved, total)
