#!/usr/bin/env python3
"""What tracing costs one request, without a server: the spans of a traced request (its own,
decode, queue, compute, compute_input, infer, compute_output, and a batch of its own) made, ended,
encoded and exported, and the check an untraced request pays when tracing is off.

    .venv/bin/python -m bench.otlp_sink --port 4318 &
    .venv/bin/python -m bench.trace_cost --endpoint http://127.0.0.1:4318/v1/traces
    .venv/bin/python -m bench.trace_cost            # encoded as for OTLP, then sent nowhere

Two CPU figures: the request's side (the thread that makes the spans: in a server, the event loop
and the batch's worker thread), and the whole process (the export thread's encoding and sending
too). Compare them with a server's CPU ms per image (``bench/ab.py`` prints it) for the share
tracing takes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from service.telemetry.tracing import ExportConfig, TracedItem, Tracing, record_batch

PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


class _Nowhere(SpanExporter):
    """An OTLP exporter without a network: the export thread encodes each batch, and drops it."""

    def __init__(self) -> None:
        self.bytes = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def export_encoded(self, payload: bytes, spans: int) -> SpanExportResult:
        self.bytes += len(payload)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def traced_request(tracing: Tracing) -> None:
    trace = tracing.start_request("ModelInfer", "alexnet", PARENT, protocol="grpc")
    assert trace is not None
    with trace.phase("decode"):
        pass
    now = time.monotonic()
    record_batch(
        [TracedItem(trace.item(), now - 0.01, 1)],
        started=now - 0.005,
        finished=now,
        phases=(0.001, 0.003, 0.001),
        model="alexnet",
        device="cpu",
        images=1,
        requests=1,
    )
    trace.set("vision.model_version", "1")
    trace.finish("OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", help="an OTLP/HTTP endpoint (default: encoded, then sent nowhere)")
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    dropped: list[int] = []
    config = ExportConfig(schedule_delay_s=0.05, max_queue_size=1 << 16, endpoint=args.endpoint or "")
    tracing = Tracing.create(
        config, on_dropped=lambda reason, count: dropped.append(count), exporter=None if args.endpoint else _Nowhere()
    )
    for _ in range(500):
        traced_request(tracing)
    tracing.force_flush()
    cpu, own, wall = time.process_time(), time.thread_time(), time.perf_counter()
    for _ in range(args.requests):
        traced_request(tracing)
    own = time.thread_time() - own
    tracing.force_flush()  # every span exported (or dropped) before the clocks stop
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"traced request (8 spans): {own / args.requests * 1e6:.0f} us CPU making them, "
        f"{cpu / args.requests * 1e6:.0f} us CPU in all (export included), "
        f"{wall / args.requests * 1e6:.0f} us wall; spans dropped {sum(dropped)}"
    )
    off = Tracing.off()
    checks = args.requests * 20
    started = time.perf_counter()
    for _ in range(checks):
        if off.enabled:
            off.start_request("ModelInfer", "alexnet", None, protocol="grpc")
    print(f"tracing off: {(time.perf_counter() - started) / checks * 1e9:.0f} ns per request")
    tracing.shutdown()


if __name__ == "__main__":
    main()
