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

**Where a request crosses processes.** What a work item carries (:class:`ItemTrace`) is the
request span's context, which is all the worker needs to hang its spans under it; it has a W3C
``traceparent`` form (:attr:`ItemTrace.traceparent`, :meth:`ItemTrace.from_traceparent`), so once
front ends and engines are separate processes, serialising that string with the work item keeps
one trace across the hop.

**Export.** OTLP over HTTP (``http/protobuf``, the default) or gRPC, configured by the standard
``OTEL_*`` variables. Spans wait in a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048) and go out
in batches from one thread; a collector that is down or slow never slows a request: what the queue
cannot hold, and what an export fails to deliver, is dropped and counted
(``vision_trace_spans_dropped_total{reason}``).

**Run-time settings.** Triton's trace extension (``TraceSetting``): ``trace_level`` (OFF or
TIMESTAMPS), ``trace_rate`` and ``trace_count``, for the server or one model
(:meth:`Tracing.update`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

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
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.errors import FailedPreconditionError, InvalidInputError, quote
from service.storage.objects import ObjectStore
from service.storage.traced import TracedObjects

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

DroppedCallback = Callable[[str, int], None]  # (reason, spans)
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
        ``OTEL_EXPORTER_OTLP_*`` variables)."""
        if self.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter(
                endpoint=self.endpoint, insecure=self.endpoint.startswith("http://"), timeout=self.export_timeout_s
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=self.endpoint, timeout=self.export_timeout_s)

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


# -- export ------------------------------------------------------------------------------------


class BoundedExportProcessor(SpanProcessor):
    """Ended spans into a bounded queue, exported in batches by one daemon thread.

    OpenTelemetry's BatchSpanProcessor does the same but logs a warning for every span it drops
    and counts nothing we can read: with a collector that is down, that is a line per span. Here
    a full queue drops the span and counts it (``queue_full``); an export that fails counts its
    spans (``export_failed``). Nothing here blocks the thread that ends a span.
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
    ) -> None:
        self._exporter = exporter
        self._on_dropped = on_dropped
        self._on_exported = on_exported
        self._max_queue = max_queue_size
        self._batch = min(max_export_batch_size, max_queue_size)
        self._delay = schedule_delay_s
        self._queue: deque[ReadableSpan] = deque()
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
        with self._lock:
            if self._stopped or len(self._queue) >= self._max_queue:
                full = True
            else:
                full = False
                self._queue.append(span)
                if len(self._queue) >= self._batch:
                    self._wake.set()
        if full:
            self._on_dropped("queue_full", 1)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._export_all()

    def _export_all(self, *, until_failure: bool = False) -> None:
        """Export what is queued, batch by batch; ``until_failure``: stop at the first batch that
        fails (at shutdown, a dead collector costs one export's timeout, not one per batch)."""
        with self._export_lock:
            while True:
                with self._lock:
                    count = min(self._batch, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(count)]
                if not batch:
                    return
                try:
                    result = self._exporter.export(batch)
                except Exception as exc:  # an exporter's bug must not end the thread
                    log.warning("exporting %d spans failed: %s", len(batch), type(exc).__name__)
                    result = SpanExportResult.FAILURE
                if result is SpanExportResult.SUCCESS:
                    self._on_exported(len(batch))
                    if self._failing:
                        self._failing = False
                        log.info("trace export works again")
                else:
                    self._on_dropped("export_failed", len(batch))
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
            dropped = len(self._queue)
            self._queue.clear()
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

    def __init__(self, provider: TracerProvider | None, processor: BoundedExportProcessor | None = None) -> None:
        self._provider = provider
        self._processor = processor
        self._tracer = provider.get_tracer("vision-serving") if provider is not None else None
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
        processor = BoundedExportProcessor(
            exporter or config.exporter(),
            on_dropped=on_dropped,
            on_exported=on_exported,
            max_queue_size=config.max_queue_size,
            schedule_delay_s=config.schedule_delay_s,
            max_export_batch_size=config.max_export_batch_size,
        )
        # The exporters log an error for every batch they fail to send: with a collector that is down
        # that is a line every few seconds. This processor says it once, and the metric counts.
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
        resource = Resource.create({"service.name": config.service_name, "service.version": version})
        provider = TracerProvider(resource=resource, sampler=_Sampler(config.base_sampler()))
        provider.add_span_processor(processor)
        log.info(
            "tracing on: OTLP %s to %s, sampler %s%s",
            config.protocol,
            config.endpoint,
            config.sampler,
            f" ({config.sampler_arg:g})" if "ratio" in config.sampler else "",
        )
        return cls(provider, processor)

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
        tracer = self._tracer
        if tracer is None:
            return None
        knobs = self._effective(model)
        settings = knobs.settings
        if settings.level == "OFF" or settings.count == 0:
            return None
        parent = _parent(carrier)
        if isinstance(parent, _NotSampled):
            return None  # the caller's decision: no spans
        if parent is None:
            knobs.seen += 1
            if (knobs.seen - 1) % settings.rate:
                return None
        span = tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": method, "vision.protocol": protocol, "vision.model": model},
        )
        if not span.is_recording():
            return None
        if settings.count > 0:
            with self._lock:
                knobs.settings = replace(knobs.settings, count=max(0, knobs.settings.count - 1))
        return RequestTrace(tracer, span)

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


def _parent(carrier: Mapping[str, str] | None) -> Context | _NotSampled | None:
    """The caller's context from W3C ``traceparent``/``tracestate``: None without one (or with a
    malformed one: the sampler decides, as without one), :data:`NOT_SAMPLED` where its flag says so."""
    if not carrier or TRACEPARENT not in carrier:
        return None
    parent = _PROPAGATOR.extract(carrier)
    span_context = trace.get_current_span(parent).get_span_context()
    if not span_context.is_valid:
        return None
    if not span_context.trace_flags.sampled:
        return NOT_SAMPLED
    return parent


class RequestTrace:
    """The spans of one request: its own, and the phases under it."""

    current_phases = False  # a phase's span is not made the current span (nothing below looks for one)

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
        """A child span around the block; an exception marks it failed."""
        span = self._tracer.start_span(name, context=self._context, attributes=attributes)
        try:
            if self.current_phases:
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    yield
            else:
                yield
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def item(self) -> ItemTrace:
        """What a work item of this request carries to the worker."""
        return ItemTrace(self._tracer, self.span.get_span_context())

    def set(self, key: str, value: str | int) -> None:
        self.span.set_attribute(key, value)

    def finish(self, status: str) -> None:
        self.span.set_attribute("rpc.grpc.status", status)
        if status != "OK":
            self.span.set_status(Status(StatusCode.ERROR, status))
        self.span.end()


class JobTrace(RequestTrace):
    """The spans of one fine-tuning job: its own (``job``), and ``features``, each ``epoch`` and
    ``publish`` under it."""

    # A job's phases are current spans within their blocks: the store operations of ``publish`` (on the
    # worker threads ``asyncio.to_thread`` starts, which carry the context) hang under it.
    current_phases = True

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


@dataclass(frozen=True)
class ItemTrace:
    """A work item's trace context: the request span it belongs under, and the tracer (of the
    process that runs it) that records its queue and compute spans."""

    tracer: trace.Tracer
    parent: SpanContext

    @property
    def traceparent(self) -> str:
        """The W3C form, what crosses a process boundary with the work item."""
        c = self.parent
        return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"

    @classmethod
    def from_traceparent(cls, tracer: trace.Tracer, traceparent: str) -> ItemTrace | None:
        context = trace.get_current_span(_PROPAGATOR.extract({TRACEPARENT: traceparent})).get_span_context()
        return cls(tracer, context) if context.is_valid else None


@dataclass(frozen=True)
class TracedItem:
    trace: ItemTrace
    enqueued_at: float  # monotonic seconds
    images: int


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
    item's queue and compute spans with the compute phases. Times are monotonic seconds."""
    offset = time.time_ns() - time.monotonic_ns()

    def ns(seconds: float) -> int:
        return int(seconds * 1e9) + offset

    tracer = items[0].trace.tracer
    batch = tracer.start_span(
        BATCH_SPAN,
        context=Context(),  # a root: the batch belongs to all of its requests
        kind=SpanKind.INTERNAL,
        start_time=ns(started),
        attributes={
            "vision.batch.size": images,
            "vision.batch.requests": requests,
            "vision.model": model,
            "vision.device": device,
        },
    )
    batch.end(end_time=ns(finished))
    link = Link(batch.get_span_context(), {"vision.batch.size": images})
    for item in items:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(item.trace.parent))
        queue = item.trace.tracer.start_span("queue", context=parent, start_time=ns(item.enqueued_at))
        queue.end(end_time=ns(started))
        compute = item.trace.tracer.start_span(
            "compute",
            context=parent,
            start_time=ns(started),
            links=[link],
            attributes={"vision.batch.size": images, "vision.images": item.images, "vision.device": device},
        )
        if phases is not None:
            inner = trace.set_span_in_context(compute)
            at = started
            for name, seconds in zip(("compute_input", "infer", "compute_output"), phases, strict=True):
                span = item.trace.tracer.start_span(name, context=inner, start_time=ns(at))
                at += seconds
                span.end(end_time=ns(at))
        compute.end(end_time=ns(finished))
