"""The asyncio HTTP servers the field uses, side by side on what the HTTP port does most: a POST of
one image as Triton's binary tensor data (a JSON header and 150 KB of bytes), answered with a
small binary body. Each server runs in a child process with one event loop (as ``vision-serve``
runs its HTTP port); C client threads post for ``--seconds``; the figures are requests/s, p50/p99
latency and the server's resident memory after the run.

    python -m bench.http_servers --servers aiohttp,uvicorn   # uvicorn and starlette must be installed

The servers: aiohttp's web server (``aiohttp.web``), and Starlette on uvicorn (with httptools
when installed). The body is read whole and its length answered, nothing else, so that only the
servers differ.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

BODY = os.urandom(150 * 1024)
ANSWER = b"x" * 4096

AIOHTTP = """
import asyncio, sys
from aiohttp import web
ANSWER = b"x" * 4096
async def infer(request):
    body = await request.read()
    return web.Response(body=ANSWER, headers={"X-Length": str(len(body))})
app = web.Application(client_max_size=64 << 20)
app.router.add_post("/v2/models/m/infer", infer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

UVICORN = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
ANSWER = b"x" * 4096
async def infer(request):
    body = await request.body()
    return Response(ANSWER, headers={"X-Length": str(len(body))})
app = Starlette(routes=[Route("/v2/models/m/infer", infer, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

SERVERS = {"aiohttp": AIOHTTP, "uvicorn": UVICORN}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load(port: int, concurrency: int, seconds: float) -> list[float]:
    headers = {"Inference-Header-Content-Length": "120", "Content-Type": "application/octet-stream"}
    spans: list[list[float]] = [[] for _ in range(concurrency)]
    stop_at = time.perf_counter() + 1.0 + seconds
    measure_from = time.perf_counter() + 1.0

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while (began := time.perf_counter()) < stop_at:
            connection.request("POST", "/v2/models/m/infer", body=BODY, headers=headers)
            response = connection.getresponse()
            response.read()
            if began >= measure_from:
                spans[index].append(time.perf_counter() - began)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(span for client_spans in spans for span in client_spans)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="aiohttp,uvicorn")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    results = []
    for name in args.servers.split(","):
        port = free_port()
        process = subprocess.Popen([sys.executable, "-c", SERVERS[name], str(port)])
        try:
            wait_listening(port)
            idle = rss_mib(process.pid)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                latencies = load(port, concurrency, args.seconds)
                point = {
                    "server": name,
                    "concurrency": concurrency,
                    "requests_per_s": round(len(latencies) / args.seconds, 1),
                    "p50_ms": round(1000 * statistics.median(latencies), 2),
                    "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
                    "rss_idle_mib": round(idle, 1),
                    "rss_after_mib": round(rss_mib(process.pid), 1),
                }
                results.append(point)
                print(json.dumps(point), flush=True)
        finally:
            process.terminate()
            process.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
