"""Traces: OpenTelemetry spans of every inference request, exported over OTLP.

Off by default, and then free: no tracer exists, :meth:`Tracing.start_request` answers ``None``
before it looks at a header, and every later step only tests that ``None`` (no span object, no
context, no clock read is made for an untraced request).

With ``--trace`` a request gets these spans (Triton's timestamp names)::

    ModelInfer (or ModelStreamInfer)        the request, on either port (SERVER)
    ├── decode                              IMAGE inputs decoded and preprocessed
    ├── queue                               a work item waiting for its batch
    └── compute  (link to) batch            the batch's forward pass, as this request saw it
        ├── compute_input                   gathering (and copying) the batch's inputs
        ├── infer                           the forward pass
        └── compute_output                  outputs to the host

A fine-tuning job gets ``job`` (from when it was accepted; its id, models and end state), with
``features``, one ``epoch`` per epoch (its losses and accuracy) and ``publish`` under it
(:meth:`Tracing.start_job`), continuing CreateJob's caller as a request does. The model store's
operations within a job's phase are ``store.<operation>`` spans under it (:meth:`Tracing.store`).

``batch`` is a span of its own, in a trace of its own, with its size, device and model: every
request that ran in it links to it. The caller's W3C ``traceparent``/``tracestate`` (gRPC metadata,
HTTP headers) is continued and its sampled flag honoured: a parent that is not sampled gets no
spans at all. Without a parent, Triton's ``trace_rate`` (every N-th request) and then the sampler
of ``OTEL_TRACES_SAMPLER`` decide.

**What a traced request costs.** A request's spans are not the SDK's span objects: the request
(:class:`RequestTrace`, on the event loop) and the batch's worker (:func:`record_batch`) record
each span as one tuple when it ends (:class:`service.telemetry.otlp.SpanRecord`: ids, name, two times,
attributes), with no sampler call, context object or lock per span; the request's spans go to the
export queue together when it finishes, a batch's in one group. The export thread writes the OTLP
protobuf from those tuples (:class:`service.telemetry.otlp.Encoder`) and the SDK's OTLP exporters send it.
The sampling rules are the SDK's (:class:`RequestSampler`), the W3C parsing the propagator's
(:func:`_traceparent`). Fine-tuning jobs and store operations, a few spans each, stay SDK spans.

**Where a request crosses processes.** What a work item carries (:class:`ItemTrace`) is the
request span's context, which is all the worker needs to hang its spans under it: a trace id, a
span id and the caller's tracestate. It has a W3C form (:attr:`ItemTrace.traceparent` with
:attr:`ItemTrace.trace_state`, :meth:`ItemTrace.from_traceparent`), so once front ends and engines
are separate processes, serialising those strings with the work item keeps one trace across the hop.

**Export.** OTLP over HTTP (``http/protobuf``, the default) or gRPC, configured by the standard
``OTEL_*`` variables. Spans wait in a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048 spans) and
go out in batches from one thread; a collector that is down or slow never slows a request: what
the queue cannot hold, and what an export fails to deliver, is dropped and counted
(``vision_trace_spans_dropped_total{reason}``).

**Run-time settings.** Triton's trace extension (``TraceSetting``): ``trace_level`` (OFF or
TIMESTAMPS), ``trace_rate`` and ``trace_count``, for the server or one model
(:meth:`Tracing.update`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from random import getrandbits
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.errors import FailedPreconditionError, InvalidInputError, quote
from service.storage.objects import ObjectStore
from service.storage.traced import TracedObjects
from service.telemetry.otlp import (
    KIND_INTERNAL,
    KIND_SERVER,
    EncodedExporter,
    Encoder,
    LinkRecord,
    SpanRecord,
    readable,
)

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BATCH_SPAN = "batch"
JOB_SPAN, EPOCH_SPAN = "job", "epoch"
LEVELS = ("OFF", "TIMESTAMPS")
PROTOCOLS = ("http/protobuf", "grpc")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
# Triton's TraceSetting keys this server answers and takes.
LEVEL, RATE, COUNT, MODE = "trace_level", "trace_rate", "trace_count", "trace_mode"
SETTING_KEYS = (LEVEL, RATE, COUNT)

SCOPE = "vision-serving"  # the instrumentation scope of every span
DroppedCallback = Callable[[str, int], None]  # (reason, spans)
_TRACE_ID_LIMIT = (1 << 64) - 1  # the bits of a trace id a ratio sampler reads
_PROPAGATOR = TraceContextTextMapPropagator()


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportConfig:
    """Where and how spans go, from the standard ``OTEL_*`` variables (:meth:`from_environ`)."""

    protocol: str = "http/protobuf"
    endpoint: str = "http://localhost:4318/v1/traces"
    service_name: str = "vision-serving"
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    schedule_delay_s: float = 5.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    export_timeout_s: float = 10.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ExportConfig:
        """The config the variables describe; a value that makes no sense is refused, naming it."""

        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        protocol = (
            get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or get("OTEL_EXPORTER_OTLP_PROTOCOL") or cls.protocol
        ).lower()
        if protocol not in PROTOCOLS:
            raise _bad("OTEL_EXPORTER_OTLP_PROTOCOL", protocol, f"one of {', '.join(PROTOCOLS)}")
        endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if endpoint is None:
            base = get("OTEL_EXPORTER_OTLP_ENDPOINT")
            if protocol == "grpc":
                endpoint = base or "http://localhost:4317"
            else:  # the signal's path is appended to the general endpoint (the specification's rule)
                endpoint = (base or "http://localhost:4318").rstrip("/") + "/v1/traces"
        sampler = (get("OTEL_TRACES_SAMPLER") or cls.sampler).lower()
        if sampler not in SAMPLERS:
            raise _bad("OTEL_TRACES_SAMPLER", sampler, f"one of {', '.join(SAMPLERS)}")
        sampler_arg = _number(get("OTEL_TRACES_SAMPLER_ARG"), "OTEL_TRACES_SAMPLER_ARG", 1.0, 0.0, 1.0)
        return cls(
            protocol=protocol,
            endpoint=endpoint,
            service_name=get("OTEL_SERVICE_NAME") or cls.service_name,
            sampler=sampler,
            sampler_arg=sampler_arg,
            schedule_delay_s=_number(get("OTEL_BSP_SCHEDULE_DELAY"), "OTEL_BSP_SCHEDULE_DELAY", 5000, 1, 3.6e6) / 1e3,
            max_queue_size=int(_number(get("OTEL_BSP_MAX_QUEUE_SIZE"), "OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1, 1e6)),
            max_export_batch_size=int(
                _number(get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1, 1e6)
            ),
            export_timeout_s=_number(
                get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or get("OTEL_EXPORTER_OTLP_TIMEOUT"),
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                10000,
                1,
                3.6e6,
            )
            / 1e3,
        )

    def exporter(self) -> SpanExporter:
        """The OTLP exporter of :attr:`protocol` (headers, certificates and compression: its own
        ``OTEL_EXPORTER_OTLP_*`` variables), sending the requests :mod:`service.telemetry.otlp` encodes."""
        from service.telemetry.otlp_exporters import OtlpGrpcExporter, OtlpHttpExporter

        if self.protocol == "grpc":
            return OtlpGrpcExporter(
                endpoint=self.endpoint, insecure=self.endpoint.startswith("http://"), timeout=self.export_timeout_s
            )
        return OtlpHttpExporter(endpoint=self.endpoint, timeout=self.export_timeout_s)

    def base_sampler(self) -> Sampler:
        ratio = TraceIdRatioBased(self.sampler_arg)
        return {
            "always_on": ALWAYS_ON,
            "always_off": ALWAYS_OFF,
            "traceidratio": ratio,
            "parentbased_always_on": ParentBased(ALWAYS_ON),
            "parentbased_always_off": ParentBased(ALWAYS_OFF),
            "parentbased_traceidratio": ParentBased(ratio),
        }[self.sampler]


def _bad(name: str, value: str, wanted: str) -> FailedPreconditionError:
    return FailedPreconditionError(f"{name}={quote(value)} is not understood: give {wanted}")


def _number(text: str | None, name: str, default: float, low: float, high: float) -> float:
    if text is None:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        raise _bad(name, text, f"a number from {low:g} to {high:g}") from None
    if not low <= value <= high:
        raise _bad(name, text, f"a number from {low:g} to {high:g}")
    return value


class _Sampler(Sampler):
    """The configured sampler for requests; a batch span (a root that requests link to) is always
    kept: it exists only because a sampled request ran in the batch."""

    def __init__(self, base: Sampler) -> None:
        self._base = base

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if name == BATCH_SPAN:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._base.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"VisionServe{{{self._base.get_description()}}}"


class RequestSampler:
    """The configured sampler's decision for a request, made without the SDK's span machinery: the
    same rules as ``ParentBased``, ``ALWAYS_ON``, ``ALWAYS_OFF`` and ``TraceIdRatioBased`` (the 64
    low-order bits of the trace id under the rate's bound). Only a sampled parent reaches it: a
    parent that is not sampled has already meant no spans."""

    def __init__(self, config: ExportConfig) -> None:
        self._parent_based = config.sampler.startswith("parentbased_")
        root = config.sampler.removeprefix("parentbased_")
        self._bound = {
            "always_on": _TRACE_ID_LIMIT + 1,
            "always_off": 0,
            "traceidratio": TraceIdRatioBased.get_bound_for_rate(config.sampler_arg),
        }[root]

    def sampled(self, trace_id: int, parent: bool) -> bool:
        if parent and self._parent_based:
            return True
        return trace_id & _TRACE_ID_LIMIT < self._bound


# -- export ------------------------------------------------------------------------------------


class BoundedExportProcessor(SpanProcessor):
    """Ended spans into a bounded queue, exported in batches by one daemon thread.

    Two kinds of span arrive: the SDK's (a job's, the store's: :meth:`on_end`) and a request's or a
    batch's recorded spans (:meth:`add`, a group at a time: one lock, one append). The export thread
    encodes both into one OTLP request (:class:`service.telemetry.otlp.Encoder` for the records) and sends it
    as it is where the exporter can (:class:`service.telemetry.otlp.EncodedExporter`); any other exporter gets
    ``ReadableSpan`` objects.

    OpenTelemetry's BatchSpanProcessor does the same for the SDK's spans but logs a warning for
    every span it drops and counts nothing we can read: with a collector that is down, that is a
    line per span. Here what the queue cannot hold is dropped and counted (``queue_full``); an
    export that fails counts its spans (``export_failed``). Nothing here blocks the
    thread that ends a span.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        on_dropped: DroppedCallback,
        max_queue_size: int = 2048,
        schedule_delay_s: float = 5.0,
        max_export_batch_size: int = 512,
        on_exported: Callable[[int], None] = lambda count: None,
        resource: Resource | None = None,
    ) -> None:
        self._exporter = exporter
        self._encoded = exporter if isinstance(exporter, EncodedExporter) else None
        self._on_dropped = on_dropped
        self._on_exported = on_exported
        self._max_queue = max_queue_size
        self._batch = min(max_export_batch_size, max_queue_size)
        self._delay = schedule_delay_s
        self._resource = resource if resource is not None else Resource.create({})
        self._scope = InstrumentationScope(SCOPE)
        self._encoder = Encoder(self._resource, SCOPE)
        # An SDK span, or a group of recorded spans; ``_spans``: how many spans wait, in all.
        self._queue: deque[ReadableSpan | Sequence[SpanRecord]] = deque()
        self._spans = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopped = False
        self._failing = False  # the last export failed (said once, not per batch)
        self._thread = threading.Thread(target=self._run, name="trace-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        self._put(span, 1)

    def add(self, spans: Sequence[SpanRecord]) -> None:
        """Queue a group of ended spans (a request's, a batch's): as many as the queue has room for."""
        self._put(spans, len(spans))

    def _put(self, entry: ReadableSpan | Sequence[SpanRecord], count: int) -> None:
        with self._lock:
            room = 0 if self._stopped else self._max_queue - self._spans
            if count <= room:
                taken = count
            elif room > 0 and not isinstance(entry, ReadableSpan):
                entry, taken = entry[:room], room  # a group's first spans (a batch's own span among them)
            else:
                taken = 0
            if taken:
                self._queue.append(entry)
                self._spans += taken
                if self._spans >= self._batch and not self._wake.is_set():
                    self._wake.set()
        if taken < count:
            self._on_dropped("queue_full", count - taken)

    @property
    def queued(self) -> int:
        return self._spans

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._export_all()

    def _take(self) -> tuple[list[ReadableSpan | Sequence[SpanRecord]], int]:
        """The oldest entries, up to a batch of spans (a group is never split)."""
        entries: list[ReadableSpan | Sequence[SpanRecord]] = []
        count = 0
        with self._lock:
            queue = self._queue
            while queue and count < self._batch:
                entry = queue.popleft()
                entries.append(entry)
                count += 1 if isinstance(entry, ReadableSpan) else len(entry)
            self._spans -= count
        return entries, count

    def _send(self, entries: list[ReadableSpan | Sequence[SpanRecord]], count: int) -> SpanExportResult:
        if self._encoded is not None:
            records = [span for entry in entries if not isinstance(entry, ReadableSpan) for span in entry]
            sdk_spans = [entry for entry in entries if isinstance(entry, ReadableSpan)]
            payload = self._encoder.request(records) if records else b""
            if sdk_spans:  # two serialised requests, concatenated, are one with both lists of spans
                from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

                payload += encode_spans(sdk_spans).SerializeToString()
            return self._encoded.export_encoded(payload, count)
        spans: list[ReadableSpan] = []
        for entry in entries:
            if isinstance(entry, ReadableSpan):
                spans.append(entry)
            else:
                spans += (readable(record, self._resource, self._scope) for record in entry)
        return self._exporter.export(spans)

    def _export_all(self, *, until_failure: bool = False) -> None:
        """Export what is queued, batch by batch; ``until_failure``: stop at the first batch that
        fails (at shutdown, a dead collector costs one export's timeout, not one per batch)."""
        with self._export_lock:
            while True:
                entries, count = self._take()
                if not entries:
                    return
                try:
                    result = self._send(entries, count)
                except Exception as exc:  # an exporter's bug must not end the thread
                    log.warning("exporting %d spans failed: %s", count, type(exc).__name__)
                    result = SpanExportResult.FAILURE
                if result is SpanExportResult.SUCCESS:
                    self._on_exported(count)
                    if self._failing:
                        self._failing = False
                        log.info("trace export works again")
                else:
                    self._on_dropped("export_failed", count)
                    if until_failure:
                        return
                    if not self._failing:
                        self._failing = True
                        log.warning(
                            "cannot export spans to the trace collector; they are dropped and counted in "
                            "vision_trace_spans_dropped_total until it answers (check OTEL_EXPORTER_OTLP_ENDPOINT)"
                        )

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._stopped:
            return False
        self._export_all()
        return True

    def shutdown(self) -> None:
        """Export what is queued (until an export fails: at most one exporter's timeout), then stop."""
        with self._lock:
            if self._stopped:
                return
        self._export_all(until_failure=True)
        with self._lock:
            self._stopped = True
            dropped = self._spans
            self._queue.clear()
            self._spans = 0
        if dropped:
            self._on_dropped("shutdown", dropped)
        self._wake.set()
        self._thread.join(1.0)
        self._exporter.shutdown()


# -- run-time settings (Triton's TraceSetting) ---------------------------------------------------


@dataclass(frozen=True)
class TraceSettings:
    level: str = "TIMESTAMPS"
    rate: int = 1  # trace one request in ``rate`` of those without a parent
    count: int = -1  # traces still to start (-1: no limit)

    def as_strings(self) -> dict[str, list[str]]:
        return {LEVEL: [self.level], RATE: [str(self.rate)], COUNT: [str(self.count)], MODE: ["opentelemetry"]}


def _parse_change(key: str, value: Sequence[str]) -> Any:
    if key == LEVEL:
        levels = {v.strip().upper() for v in value}
        if "TENSORS" in levels:
            raise InvalidInputError("trace_level TENSORS is not supported: this server traces TIMESTAMPS only")
        if not levels or not levels <= set(LEVELS) or len(levels) != 1:
            raise InvalidInputError(f"trace_level must be one of {', '.join(LEVELS)}, got {list(value)}")
        return levels.pop()
    if len(value) != 1:
        raise InvalidInputError(f"{key} takes one value, got {list(value)}")
    try:
        number = int(value[0])
    except ValueError:
        raise InvalidInputError(f"{key} must be an integer, got {quote(value[0])}") from None
    if key == RATE and number < 1:
        raise InvalidInputError(f"trace_rate must be at least 1 (trace one request in N), got {number}")
    if key == COUNT and number < -1:
        raise InvalidInputError(f"trace_count must be -1 (no limit) or more, got {number}")
    return number


class _Knobs:
    """One scope's settings (the server's, or one model's overrides) and its request counter."""

    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        self.seen = 0


# -- the server's tracing ------------------------------------------------------------------------


class Tracing:
    """The server's tracer (or none, when tracing is off) and Triton's run-time trace settings."""

    def __init__(
        self,
        provider: TracerProvider | None,
        processor: BoundedExportProcessor | None = None,
        sampler: RequestSampler | None = None,
    ) -> None:
        self._provider = provider
        self._processor = processor
        self._sampler = sampler or RequestSampler(ExportConfig())
        self._tracer = provider.get_tracer(SCOPE) if provider is not None else None
        self._server = _Knobs(TraceSettings() if provider is not None else TraceSettings(level="OFF"))
        self._defaults = self._server.settings
        self._models: dict[str, dict[str, Any]] = {}  # model -> its overridden fields
        self._model_knobs: dict[str, _Knobs] = {}
        self._lock = threading.Lock()

    @classmethod
    def off(cls) -> Tracing:
        return cls(None)

    @classmethod
    def create(
        cls,
        config: ExportConfig,
        *,
        on_dropped: DroppedCallback,
        on_exported: Callable[[int], None] = lambda count: None,
        version: str = "",
        exporter: SpanExporter | None = None,
    ) -> Tracing:
        resource = Resource.create({"service.name": config.service_name, "service.version": version})
        processor = BoundedExportProcessor(
            exporter or config.exporter(),
            on_dropped=on_dropped,
            on_exported=on_exported,
            max_queue_size=config.max_queue_size,
            schedule_delay_s=config.schedule_delay_s,
            max_export_batch_size=config.max_export_batch_size,
            resource=resource,
        )
        # The exporters log an error for every batch they fail to send: with a collector that is down
        # that is a line every few seconds. This processor says it once, and the metric counts.
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
        provider = TracerProvider(resource=resource, sampler=_Sampler(config.base_sampler()))
        provider.add_span_processor(processor)
        log.info(
            "tracing on: OTLP %s to %s, sampler %s%s",
            config.protocol,
            config.endpoint,
            config.sampler,
            f" ({config.sampler_arg:g})" if "ratio" in config.sampler else "",
        )
        return cls(provider, processor, RequestSampler(config))

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()

    @property
    def queued_spans(self) -> int:
        """Spans waiting for export (at most OTEL_BSP_MAX_QUEUE_SIZE)."""
        return self._processor.queued if self._processor is not None else 0

    def force_flush(self) -> None:
        if self._processor is not None:
            self._processor.force_flush()

    # -- settings --

    def settings(self, model: str = "") -> dict[str, list[str]]:
        """The settings that apply to ``model`` (the server's where it overrides none)."""
        return self._effective(model).settings.as_strings()

    def update(self, model: str, changes: Mapping[str, Sequence[str] | None]) -> dict[str, list[str]]:
        """Apply Triton's ``TraceSetting`` changes: a value sets a key, ``None`` (or an empty list)
        clears it (a model's key then follows the server's; the server's returns to its start value)."""
        unknown = sorted(set(changes) - set(SETTING_KEYS))
        if unknown:
            raise InvalidInputError(
                f"trace settings {', '.join(map(quote, unknown))} are not supported; this server takes "
                f"{', '.join(SETTING_KEYS)} (spans go to the OTLP endpoint of the OTEL_* variables)"
            )
        parsed: dict[str, Any] = {}
        cleared: list[str] = []
        for key, value in changes.items():
            if not value:
                cleared.append(key)
            else:
                parsed[key] = _parse_change(key, value)
        if parsed.get(LEVEL) == "TIMESTAMPS" and not self.enabled:
            raise FailedPreconditionError(
                "tracing is off: start the server with --trace (VISION_SERVE_TRACE=1) and an OTLP endpoint "
                "(OTEL_EXPORTER_OTLP_ENDPOINT) to record traces"
            )
        fields = {LEVEL: "level", RATE: "rate", COUNT: "count"}
        with self._lock:
            if model:
                overrides = self._models.setdefault(model, {})
                for key in cleared:
                    overrides.pop(fields[key], None)
                overrides.update({fields[key]: value for key, value in parsed.items()})
                if overrides:
                    knobs = self._model_knobs.setdefault(model, _Knobs(self._defaults))
                    knobs.settings = replace(self._server.settings, **overrides)
                else:
                    self._models.pop(model, None)
                    self._model_knobs.pop(model, None)
            else:
                restored = {fields[key]: getattr(self._defaults, fields[key]) for key in cleared}
                self._server.settings = replace(
                    self._server.settings, **restored, **{fields[k]: v for k, v in parsed.items()}
                )
                for name, overrides in self._models.items():  # models follow the server where they do not override
                    self._model_knobs[name].settings = replace(self._server.settings, **overrides)
        log.info("trace settings%s now %s", f" of {quote(model)}" if model else "", self.settings(model))
        return self.settings(model)

    def _effective(self, model: str) -> _Knobs:
        return self._model_knobs.get(model, self._server) if model else self._server

    # -- requests --

    def start_request(
        self, method: str, model: str, carrier: Mapping[str, str] | None, *, protocol: str
    ) -> RequestTrace | None:
        """The trace of one request, or None when it is not traced (see the module docstring)."""
        recorder = self._processor
        if recorder is None:
            return None
        knobs = self._effective(model)
        settings = knobs.settings
        if settings.level == "OFF" or settings.count == 0:
            return None
        parent = _traceparent(carrier)
        if parent is NOT_SAMPLED:
            return None  # the caller's decision: no spans
        if parent is None:
            knobs.seen += 1
            if (knobs.seen - 1) % settings.rate:
                return None
            trace_id = _new_trace_id()
        else:
            assert isinstance(parent, _Caller)
            trace_id = parent.trace_id
        if not self._sampler.sampled(trace_id, parent is not None):
            return None
        if settings.count > 0:
            with self._lock:
                knobs.settings = replace(knobs.settings, count=max(0, knobs.settings.count - 1))
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.method": method,
            "vision.protocol": protocol,
            "vision.model": model,
        }
        return RequestTrace(recorder, trace_id, parent, method, attributes)

    # -- fine-tuning jobs --

    def start_job(
        self, carrier: Mapping[str, str] | None, *, job_id: str, base_model: str, output_model: str, queued_at: float
    ) -> JobTrace | None:
        """The trace of a fine-tuning job as it starts running, or None when it is not traced.

        Its span starts at ``queued_at`` (``time.time()`` seconds: when the job was accepted). The
        caller's context (CreateJob's ``carrier``) is continued and its sampled flag honoured, as for
        requests; without one the sampler decides (``trace_rate`` and ``trace_count`` count inference
        requests, not jobs); the server's ``trace_level`` OFF turns job spans off too.
        """
        tracer = self._tracer
        if tracer is None or self._server.settings.level == "OFF":
            return None
        parent = _parent(carrier)
        if isinstance(parent, _NotSampled):
            return None
        span = tracer.start_span(
            JOB_SPAN,
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=int(queued_at * 1e9),
            attributes={"vision.job.id": job_id, "vision.base_model": base_model, "vision.output_model": output_model},
        )
        if not span.is_recording():
            return None
        return JobTrace(tracer, span)

    # -- the model store --

    def store(self, objects: ObjectStore) -> ObjectStore:
        """``objects`` with a ``store.<operation>`` span per operation under the current span
        (:mod:`service.storage.traced`); with tracing off, ``objects`` itself."""
        return objects if self._tracer is None else TracedObjects(objects, self._tracer)


def trace_carrier(pairs: Iterable[tuple[str, object]]) -> dict[str, str]:
    """The caller's W3C trace context (``traceparent``, ``tracestate``) from gRPC metadata or HTTP
    headers (``context.invocation_metadata()``, ``request.headers.items()``)."""
    carrier: dict[str, str] = {}
    for key, value in pairs:
        name = key.lower()
        if name in (TRACEPARENT, TRACESTATE) and isinstance(value, str):
            carrier[name] = value
    return carrier


class _NotSampled:
    """The caller's trace context says: do not record."""


NOT_SAMPLED = _NotSampled()


class _Caller(NamedTuple):
    """The caller's span, from its ``traceparent`` (sampled) and ``tracestate``."""

    trace_id: int
    span_id: int
    trace_state: str  # as the OTLP encoding writes it: "k=v,k2=v2" ("" for none)


# W3C trace context, as opentelemetry's TraceContextTextMapPropagator reads it.
_TRACEPARENT_RE = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$")
_TRACEPARENT_MAX = 512
_TRACESTATE_MAX = 8192


def _traceparent(carrier: Mapping[str, str] | None) -> _Caller | _NotSampled | None:
    """The caller's span from W3C ``traceparent``/``tracestate`` by the propagator's rules (without
    its Context objects): None without one (or with a malformed one: the sampler decides, as
    without one), :data:`NOT_SAMPLED` where its flag says so."""
    if not carrier:
        return None
    header = carrier.get(TRACEPARENT)
    if not header or len(header) > _TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT_RE.match(header)
    if match is None:
        return None
    version, trace_hex, span_hex, flags, rest = match.groups()
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id or version == "ff" or (version == "00" and rest):
        return None
    if not int(flags, 16) & TraceFlags.SAMPLED:
        return NOT_SAMPLED
    state = carrier.get(TRACESTATE)
    trace_state = ""
    if state and len(state) <= _TRACESTATE_MAX:
        trace_state = ",".join(f"{key}={value}" for key, value in TraceState.from_header([state]).items())
    return _Caller(trace_id, span_id, trace_state)


def _parent(carrier: Mapping[str, str] | None) -> Context | _NotSampled | None:
    """The caller's context (for the SDK's spans: a job's) from W3C ``traceparent``/``tracestate``:
    None without one (or with a malformed one), :data:`NOT_SAMPLED` where its flag says so."""
    if not carrier or TRACEPARENT not in carrier:
        return None
    parent = _PROPAGATOR.extract(carrier)
    span_context = trace.get_current_span(parent).get_span_context()
    if not span_context.is_valid:
        return None
    if not span_context.trace_flags.sampled:
        return NOT_SAMPLED
    return parent


def _new_trace_id() -> int:
    """A random trace id, as the SDK's RandomIdGenerator makes one (never 0, the invalid id)."""
    while True:
        trace_id = getrandbits(128)
        if trace_id:
            return trace_id


def _new_span_id() -> int:
    while True:
        span_id = getrandbits(64)
        if span_id:
            return span_id


class RequestTrace:
    """The spans of one request: its own, and the phases under it.

    Used on the event loop only. Each phase is recorded as it ends (two clock reads and a tuple);
    the request's span and its phases go to the export queue together when it finishes, and are
    encoded, off the event loop, by the export thread (:mod:`service.telemetry.otlp`).
    """

    __slots__ = ("_attributes", "_caller", "_done", "_name", "_recorder", "_span_id", "_spans", "_start", "_trace_id")

    def __init__(
        self,
        recorder: BoundedExportProcessor,
        trace_id: int,
        caller: _Caller | None,
        name: str,
        attributes: dict[str, str | int],
    ) -> None:
        self._recorder = recorder
        self._trace_id = trace_id
        self._span_id = _new_span_id()
        self._caller = caller
        self._name = name
        self._attributes = attributes
        self._spans: list[SpanRecord] = []
        self._done = False
        self._start = time.time_ns()

    @property
    def trace_id(self) -> str:
        return f"{self._trace_id:032x}"

    @property
    def span_id(self) -> str:
        return f"{self._span_id:016x}"

    @property
    def _trace_state(self) -> str:
        return self._caller.trace_state if self._caller is not None else ""

    def phase(self, name: str, attributes: Mapping[str, str | int] | None = None) -> _Phase:
        """A child span around the block (``with trace.phase("decode"): ...``); an exception marks it failed."""
        return _Phase(self, name, attributes)

    def began_at(self, time_ns: int) -> None:
        """Start the request's span earlier: when another process of the server (a protocol front
        end, whose clock is this host's) received the request."""
        self._start = min(self._start, time_ns)

    def ran(self, name: str, start_ns: int, end_ns: int) -> None:
        """A phase that ran elsewhere (a front end's ``decode``), from its clock readings."""
        self._ended(
            SpanRecord(
                self._trace_id,
                _new_span_id(),
                self._span_id,
                False,
                self._trace_state,
                name,
                KIND_INTERNAL,
                start_ns,
                end_ns,
                None,
                None,
                None,
            )
        )

    def _ended(self, span: SpanRecord) -> None:
        if self._done:  # a phase that outlived its request goes out on its own
            self._recorder.add((span,))
        else:
            self._spans.append(span)

    def item(self) -> ItemTrace:
        """What a work item of this request carries to the worker."""
        return ItemTrace(self._recorder, self._trace_id, self._span_id, self._trace_state)

    def set(self, key: str, value: str | int) -> None:
        self._attributes[key] = value

    def finish(self, status: str) -> None:
        """End the request's span with its status (the first call only), and queue its spans for export."""
        if self._done:
            return
        self._done = True
        self._attributes["rpc.grpc.status"] = status
        caller = self._caller
        spans = self._spans
        spans.append(
            SpanRecord(
                self._trace_id,
                self._span_id,
                caller.span_id if caller is not None else 0,
                caller is not None,
                caller.trace_state if caller is not None else "",
                self._name,
                KIND_SERVER,
                self._start,
                time.time_ns(),
                self._attributes,
                None,
                None if status == "OK" else status,
            )
        )
        self._recorder.add(spans)


class _Phase:
    """One phase of a request, as a context manager: recorded when the block ends."""

    __slots__ = ("_attributes", "_name", "_start", "_trace")

    def __init__(self, trace: RequestTrace, name: str, attributes: Mapping[str, str | int] | None) -> None:
        self._trace = trace
        self._name = name
        self._attributes = attributes

    def __enter__(self) -> None:
        self._start = time.time_ns()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        parent = self._trace
        parent._ended(
            SpanRecord(
                parent._trace_id,
                _new_span_id(),
                parent._span_id,
                False,
                parent._trace_state,
                self._name,
                KIND_INTERNAL,
                self._start,
                time.time_ns(),
                self._attributes,
                None,
                None if kind is None else kind.__name__,
            )
        )


class JobTrace:
    """The spans of one fine-tuning job (the SDK's: few, and the store's spans hang under them):
    its own (``job``), and ``features``, each ``epoch`` and ``publish`` under it."""

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context = trace.set_span_in_context(span)

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    @property
    def span_id(self) -> str:
        return f"{self.span.get_span_context().span_id:016x}"

    @contextlib.contextmanager
    def phase(self, name: str, attributes: Mapping[str, str | int] | None = None) -> Iterator[None]:
        """A child span around the block, current within it: the store operations of ``publish`` (on
        the worker threads ``asyncio.to_thread`` starts, which carry the context) hang under it. An
        exception marks it failed."""
        span = self._tracer.start_span(name, context=self._context, attributes=attributes)
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                yield
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def set(self, key: str, value: str | int) -> None:
        self.span.set_attribute(key, value)

    def epoch(
        self,
        number: int,
        *,
        started_ns: int,
        ended_ns: int,
        train_loss: float,
        validation_loss: float,
        validation_accuracy: float,
    ) -> None:
        """One epoch's span, after it ran, with its times (``time.time_ns()``); callable from the
        training thread. Figures not measured (NaN: no validation split, a regression) are left out."""
        figures = {
            "vision.epoch": number,
            "vision.train_loss": train_loss,
            "vision.validation_loss": validation_loss,
            "vision.validation_accuracy": validation_accuracy,
        }
        span = self._tracer.start_span(
            EPOCH_SPAN,
            context=self._context,
            start_time=started_ns,
            attributes={key: value for key, value in figures.items() if value == value},  # not NaN
        )
        span.end(end_time=ended_ns)

    def end(self, state: str) -> None:
        """End the job's span with the state the job ended in (succeeded, failed, cancelled)."""
        self.span.set_attribute("vision.job.state", state)
        if state == "failed":
            self.span.set_status(Status(StatusCode.ERROR, state))
        self.span.end()


@dataclass(frozen=True, slots=True)
class ItemTrace:
    """A work item's trace context: the request span it belongs under (its trace and span ids, the
    caller's tracestate), and the recorder (of the process that runs it) that takes its queue and
    compute spans."""

    recorder: BoundedExportProcessor
    trace_id: int
    span_id: int
    trace_state: str = ""

    @property
    def traceparent(self) -> str:
        """The W3C form (with :attr:`trace_state`, what crosses a process boundary with the work item)."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-01"

    @classmethod
    def from_traceparent(
        cls, recorder: BoundedExportProcessor, traceparent: str, tracestate: str = ""
    ) -> ItemTrace | None:
        """The context a ``traceparent`` (and ``tracestate``) carries, or None where it is not a valid,
        sampled one."""
        caller = _traceparent({TRACEPARENT: traceparent, TRACESTATE: tracestate})
        if not isinstance(caller, _Caller):
            return None
        return cls(recorder, caller.trace_id, caller.span_id, caller.trace_state)


@dataclass(frozen=True)
class TracedItem:
    trace: ItemTrace
    enqueued_at: float  # monotonic seconds
    images: int


_PHASES = ("compute_input", "infer", "compute_output")


def record_batch(
    items: Sequence[TracedItem],
    *,
    started: float,
    finished: float,
    phases: tuple[float, float, float] | None,
    model: str,
    device: str,
    images: int,
    requests: int,
) -> None:
    """The spans of one batch, after it ran (on the worker thread): the batch's own, and each traced
    item's queue and compute spans with the compute phases, queued for export as one group. Times
    are monotonic seconds."""
    offset = time.time_ns() - time.monotonic_ns()
    start, end = int(started * 1e9) + offset, int(finished * 1e9) + offset
    batch_trace, batch_span = _new_trace_id(), _new_span_id()
    spans = [
        SpanRecord(
            batch_trace,
            batch_span,
            0,  # a root, in a trace of its own: the batch belongs to all of its requests
            False,
            "",
            BATCH_SPAN,
            KIND_INTERNAL,
            start,
            end,
            {
                "vision.batch.size": images,
                "vision.batch.requests": requests,
                "vision.model": model,
                "vision.device": device,
            },
            None,
            None,
        )
    ]
    links = (LinkRecord(batch_trace, batch_span, {"vision.batch.size": images}),)
    bounds: list[tuple[str, int, int]] = []
    if phases is not None:
        at = started
        for name, seconds in zip(_PHASES, phases, strict=True):
            bounds.append((name, int(at * 1e9) + offset, int((at + seconds) * 1e9) + offset))
            at += seconds
    for item in items:
        context = item.trace
        trace_id, state = context.trace_id, context.trace_state
        spans.append(
            SpanRecord(
                trace_id,
                _new_span_id(),
                context.span_id,
                False,
                state,
                "queue",
                KIND_INTERNAL,
                int(item.enqueued_at * 1e9) + offset,
                start,
                None,
                None,
                None,
            )
        )
        compute = _new_span_id()
        spans.append(
            SpanRecord(
                trace_id,
                compute,
                context.span_id,
                False,
                state,
                "compute",
                KIND_INTERNAL,
                start,
                end,
                {"vision.batch.size": images, "vision.images": item.images, "vision.device": device},
                links,
                None,
            )
        )
        for name, begun, ended in bounds:
            spans.append(
                SpanRecord(
                    trace_id, _new_span_id(), compute, False, state, name, KIND_INTERNAL, begun, ended, None, None, None
                )
            )
    items[0].trace.recorder.add(spans)
