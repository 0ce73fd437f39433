"""The SDK's OTLP exporters, sending a request :mod:`service.telemetry.otlp` encoded as it is.

Imported only where tracing is on (:meth:`service.telemetry.tracing.ExportConfig.exporter`): the exporters
bring ``requests`` and the collector's protobuf modules, which a server without ``--trace`` does
not need at start-up.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExportResult


class _Encoded(NamedTuple):
    payload: bytes
    spans: int


class OtlpHttpExporter(HttpExporter):
    """The SDK's OTLP/HTTP exporter (its endpoint, headers, certificates, compression, retries and
    timeout, from its ``OTEL_EXPORTER_OTLP_*`` variables), sending encoded requests as they are."""

    def export_encoded(self, payload: bytes, spans: int) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        # The SDK's HTTP client (opentelemetry-exporter-otlp-proto-http, pinned): compression, retries,
        # the deadline. Its export() does the same after encoding ReadableSpans.
        result = self._client.export(payload)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


class OtlpGrpcExporter(GrpcExporter):
    """The SDK's OTLP/gRPC exporter (channel, credentials, headers, compression, retries, timeout),
    sending encoded requests: its request hook parses the bytes (in C) instead of encoding spans."""

    def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
        if isinstance(data, _Encoded):
            return ExportTraceServiceRequest.FromString(data.payload)
        return super()._translate_data(data)

    def _count_data(self, data: Any) -> int:
        return data.spans if isinstance(data, _Encoded) else len(data)

    def export_encoded(self, payload: bytes, spans: int) -> SpanExportResult:
        return self._export(_Encoded(payload, spans))  # type: ignore[arg-type]
