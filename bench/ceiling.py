#!/usr/bin/env python3
"""The protocol's own ceiling: requests/s and server CPU per request where the model costs nothing.

The server serves ``tiny`` (``service.models.tiny``: a forward pass of microseconds, as Triton's
identity models are used), so what is measured is the protocol: connections, parsing, the hop
between processes, batching, answers. For each ``--frontends`` value (default 1 and 2), input
(``pixels-shm``: one [1,3,224,224] image through system shared memory; ``small``: a [1,3,32,32]
PIXELS tensor in the message) and C closed-loop ``tritonclient.grpc`` clients (threads of this
process), one window each, one after the other. Printed per point: requests/s, server CPU per
request (the supervisor, engine and front ends together) in ms, the forward passes' share of the
window, the clients' CPU (same machine, same cores), and each server process's cores.

    .venv/bin/python -m bench.ceiling                       # 1 and 2 front ends, C = 1, 8, 32
    .venv/bin/python -m bench.ceiling --frontends 2 --concurrency 32 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frontends", default="1,2", help="--frontends values to compare [default: 1,2]")
    p.add_argument("--inputs", default="pixels-shm,small", help="pixels-shm and/or small [default: both]")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop clients [default: 1,8,32]")
    p.add_argument("--seconds", type=float, default=6.0, help="each window [default: 6]")
    p.add_argument("--warmup-seconds", type=float, default=2.0, help="before each window [default: 2]")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "ceiling.json",
                   help="JSON output [default: bench/results/ceiling.json]")  # fmt: skip
    return p


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _role(pid: int) -> str:
    """What a server process is, from its command line: supervisor, engine, frontend<i>, or server."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    if b"service.engine" in words:
        return "engine"
    if b"service.frontend" in words:
        return "frontend" + words[words.index(b"service.frontend") + 2].decode()
    return "supervisor/server"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench import load, servers, throughput
    from bench.machine import machine_info, own_cpu_seconds, process_tree
    from bench.records import write_document

    inputs = [name.strip() for name in args.inputs.split(",") if name.strip()]
    if not set(inputs) <= {"pixels-shm", "small"}:
        raise SystemExit("ceiling.py: error: --inputs are pixels-shm and small")
    rng = np.random.default_rng(0)
    payloads = {
        "pixels-shm": [rng.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(4)],
        "small": [rng.standard_normal((1, 3, 64, 64), dtype=np.float32) for _ in range(4)],
    }
    mode = {"pixels-shm": "pixels-shm", "small": "pixels"}
    points: list[dict[str, object]] = []
    print(f"# {MODEL}: requests/s and server CPU per request; {os.cpu_count()} cores on this machine", flush=True)
    print(f"{'frontends':>9} {'input':>10} {'C':>3} {'req/s':>8} {'server ms/req':>13} {'outside fwd':>11} "
          f"{'clients':>8}  server processes (cores)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vision-ceiling-") as logs:
        for frontends in _numbers(args.frontends):
            options = throughput.resolve_args(
                ["--models", MODEL, "--server-args", f"--frontends {frontends} --max-batch-size 32 --runtime-threads 1"]
            )
            server = servers.start(options, MODEL, "auto", dict(os.environ), Path(logs) / str(frontends))
            try:
                for name in inputs:
                    for concurrency in _numbers(args.concurrency):
                        pids = process_tree(server.target.pid)
                        before = {pid: own_cpu_seconds(pid) for pid in pids}
                        started = time.perf_counter()
                        result = load.measure_service(server.target, MODEL, mode[name], concurrency, payloads[name],
                                                      window_s=args.seconds, warmup_s=args.warmup_seconds,
                                                      client="threads")  # fmt: skip
                        elapsed = time.perf_counter() - started
                        cores = {_role(pid): (own_cpu_seconds(pid) - before[pid]) / elapsed for pid in pids}
                        per_request = result.server_cpu_seconds_per_image
                        forward = (
                            result.server_compute_busy_fraction
                            * args.seconds
                            / max(1.0, result.images_per_s * args.seconds)
                        )
                        outside = None if per_request is None else per_request - forward
                        point = {
                            "frontends": frontends,
                            "input": name,
                            "concurrency": concurrency,
                            "requests_per_s": result.images_per_s,
                            "server_cpu_ms_per_request": None if per_request is None else 1000 * per_request,
                            "server_cpu_ms_per_request_outside_forward": None if outside is None else 1000 * outside,
                            "forward_busy_fraction": result.server_compute_busy_fraction,
                            "client_cpu_cores": result.client_cpu_cores_used,
                            "server_process_cores": {role: round(value, 3) for role, value in cores.items()},
                            "errors": result.errors,
                            "result": result,
                        }
                        points.append(point)
                        shown = " ".join(f"{role} {value:.2f}" for role, value in sorted(cores.items()))
                        print(f"{frontends:>9} {name:>10} {concurrency:>3} {result.images_per_s:8.0f} "
                              f"{1000 * (per_request or float('nan')):13.3f} {1000 * (outside or float('nan')):11.3f} "
                              f"{result.client_cpu_cores_used:8.2f}  "
                              f"{shown}" + (f"  ({result.errors} errors)" if result.errors else ""),
                              flush=True)  # fmt: skip
            finally:
                server.process.stop()
    document = {"machine": machine_info(), "command": sys.argv, "points": points}
    write_document(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
