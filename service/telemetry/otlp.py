"""Spans without the SDK's span objects: recorded as plain tuples, encoded straight to OTLP.

A traced request makes eight spans. Made through OpenTelemetry's SDK, each costs a sampler call,
attribute cleaning, locks, a ``ReadableSpan`` and, in the export thread, a tree of protobuf objects
built in Python: about 600 us of CPU per request on a small machine, shared with the forward pass.
Here the request's code records each span as one :class:`SpanRecord` (ids, name, times, attributes,
links, an error), and the export thread writes the protobuf wire format of
``ExportTraceServiceRequest`` (``opentelemetry/proto/collector/trace/v1``) from those tuples
directly (:class:`Encoder`), which the OTLP exporters of :mod:`service.telemetry.otlp_exporters` send as
it is (:class:`EncodedExporter`). Any other ``SpanExporter`` gets ``ReadableSpan`` objects made
from the records (:func:`readable`).

The encoding is the one the SDK's encoder (``opentelemetry.exporter.otlp.proto.common``) makes of
the same spans, field for field: ids big-endian, the parent's tracestate on every span of its
trace, ``flags`` saying whether the parent is remote, a status only where the span failed (an unset
status is the message's default), string, bool, int and double attribute values.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

AttributeValue = str | bool | int | float
Attributes = Mapping[str, AttributeValue]

# OTLP's Span.SpanKind values.
KIND_INTERNAL, KIND_SERVER = 1, 2
_KINDS = {KIND_INTERNAL: SpanKind.INTERNAL, KIND_SERVER: SpanKind.SERVER}
# OTLP's SpanFlags: "whether the parent is remote" is known (0x100), and it is remote (0x200).
_FLAGS_LOCAL, _FLAGS_REMOTE = 0x100, 0x300
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class LinkRecord(NamedTuple):
    trace_id: int
    span_id: int
    attributes: Attributes | None


@runtime_checkable
class EncodedExporter(Protocol):
    """An exporter that sends a serialised ``ExportTraceServiceRequest`` as it is (the OTLP ones of
    :mod:`service.telemetry.otlp_exporters`, imported only where tracing is on)."""

    def export_encoded(self, payload: bytes, spans: int) -> SpanExportResult: ...


class SpanRecord(NamedTuple):
    """One ended span. ``parent_id`` 0: a root; ``error``: the status description of a failed span."""

    trace_id: int
    span_id: int
    parent_id: int
    remote_parent: bool
    trace_state: str  # W3C tracestate, as its header writes it ("" for none)
    name: str
    kind: int  # KIND_INTERNAL, KIND_SERVER
    start: int  # ns since the epoch
    end: int
    attributes: Attributes | None
    links: Sequence[LinkRecord] | None
    error: str | None


# -- the wire format ------------------------------------------------------------------------------

_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_ONE_BYTE = [bytes((n,)) for n in range(128)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _utf8(text: str) -> bytes:
    """A protobuf string's bytes: UTF-8, a lone surrogate (JSON can carry one) written as "?" rather
    than failing the export of every span in its batch."""
    return text.encode("utf-8", "replace")


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the bytes."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: object) -> bytes:
    """``AnyValue``: string_value 1, bool_value 2, int_value 3, double_value 4, array_value 5."""
    if isinstance(value, str):
        return _field(b"\x0a", _utf8(value))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    if isinstance(value, float):
        return b"\x21" + _F64.pack(value)
    if isinstance(value, (list, tuple)):  # ArrayValue (5) of AnyValue (1): a resource's sequences
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    return _field(b"\x0a", _utf8(str(value)))


class Encoder:
    """Spans into one ``ExportTraceServiceRequest`` of one resource and one instrumentation scope."""

    def __init__(self, resource: Resource, scope: str) -> None:
        self._keys: dict[str, bytes] = {}
        # Attribute items with a short string value repeat (a model's name, a device, "OK"): their encoding, kept.
        self._items: dict[tuple[str, object], bytes] = {}
        self._resource = _field(b"\x0a", self._attributes(b"\x0a", resource.attributes))  # ResourceSpans.resource
        self._resource_schema = _field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""
        self._scope = _field(b"\x0a", _field(b"\x0a", scope.encode()))  # ScopeSpans.scope, its name

    def _attributes(self, tag: bytes, attributes: Mapping[str, object]) -> bytes:
        """Repeated ``KeyValue`` (key 1, value 2) under ``tag``."""
        items, keys = self._items, self._keys
        parts = []
        for key, value in attributes.items():
            cached = isinstance(value, str) and len(value) <= 64
            part = items.get((key, value)) if cached else None
            if part is None:
                encoded_key = keys.get(key)
                if encoded_key is None:
                    encoded_key = _field(b"\x0a", _utf8(key))
                    if len(keys) < 1024:
                        keys[key] = encoded_key
                part = _field(tag, encoded_key + _field(b"\x12", _any_value(value)))
                if cached and len(items) < 4096:
                    items[(key, value)] = part
            parts.append(part)
        return b"".join(parts)

    def span(self, span: SpanRecord) -> bytes:
        """One ``Span`` message (without its tag)."""
        parts = [b"\x0a\x10", span.trace_id.to_bytes(16, "big"), b"\x12\x08", span.span_id.to_bytes(8, "big")]
        if span.trace_state:
            parts.append(_field(b"\x1a", _utf8(span.trace_state)))
        if span.parent_id:
            parts += (b"\x22\x08", span.parent_id.to_bytes(8, "big"))
        parts += (
            _field(b"\x2a", _utf8(span.name)),
            b"\x30",
            _ONE_BYTE[span.kind],
            b"\x39",
            _U64.pack(span.start),
            b"\x41",
            _U64.pack(span.end),
        )
        if span.attributes:
            parts.append(self._attributes(b"\x4a", span.attributes))
        if span.links:
            for link in span.links:
                body = b"\x0a\x10" + link.trace_id.to_bytes(16, "big") + b"\x12\x08" + link.span_id.to_bytes(8, "big")
                if link.attributes:
                    body += self._attributes(b"\x22", link.attributes)
                parts.append(_field(b"\x6a", body + b"\x35" + _U32.pack(_FLAGS_LOCAL)))
        if span.error is not None:  # Status: message 2, code 3 (STATUS_CODE_ERROR = 2)
            parts.append(_field(b"\x7a", _field(b"\x12", _utf8(span.error)) + b"\x18\x02"))
        parts += (b"\x85\x01", _U32.pack(_FLAGS_REMOTE if span.remote_parent else _FLAGS_LOCAL))
        return b"".join(parts)

    def request(self, spans: Sequence[SpanRecord]) -> bytes:
        """The serialised ``ExportTraceServiceRequest`` holding ``spans``."""
        encoded = [_field(b"\x12", self.span(span)) for span in spans]  # ScopeSpans.spans
        scope_spans = _field(b"\x12", self._scope + b"".join(encoded))  # ResourceSpans.scope_spans
        return _field(b"\x0a", self._resource + scope_spans + self._resource_schema)


# -- for other exporters ----------------------------------------------------------------------------


def readable(span: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """The SDK's span object of ``span``, for an exporter that takes those."""
    state = TraceState.from_header([span.trace_state]) if span.trace_state else None
    context = SpanContext(span.trace_id, span.span_id, is_remote=False, trace_flags=_SAMPLED, trace_state=state)
    parent = (
        SpanContext(span.trace_id, span.parent_id, is_remote=span.remote_parent, trace_flags=_SAMPLED)
        if span.parent_id
        else None
    )
    links = [
        Link(SpanContext(link.trace_id, link.span_id, is_remote=False, trace_flags=_SAMPLED), link.attributes)
        for link in span.links or ()
    ]
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=dict(span.attributes or {}),
        links=links,
        kind=_KINDS[span.kind],
        status=Status(StatusCode.ERROR, span.error) if span.error is not None else Status(StatusCode.UNSET),
        start_time=span.start,
        end_time=span.end,
        instrumentation_scope=scope,
    )
