#!/usr/bin/env python3
"""A trace collector for benchmarks: OTLP/HTTP on ``/v1/traces`` that decodes each export
(opentelemetry-proto), counts its spans and answers success, so that a server with ``--trace``
pays the whole cost of exporting.

    .venv/bin/python -m bench.otlp_sink --port 4318 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 .venv/bin/python -m bench.ab ... --b-args="--trace"

It prints the spans received so far every ``--report-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


async def serve(port: int, report_s: float) -> None:
    spans = 0

    async def traces(request: web.Request) -> web.Response:
        nonlocal spans
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        spans += sum(len(scope.spans) for rs in message.resource_spans for scope in rs.scope_spans)
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"OTLP/HTTP sink on http://127.0.0.1:{port}/v1/traces", flush=True)
    while True:
        await asyncio.sleep(report_s)
        print(f"spans received: {spans}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--report-seconds", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.report_seconds))


if __name__ == "__main__":
    main()
