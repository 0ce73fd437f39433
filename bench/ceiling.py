#!/usr/bin/env python3
"""The protocol's own ceiling: requests/s and server CPU per request where the model costs nothing.

The server serves ``tiny`` (``service.models.tiny``: a forward pass of microseconds, as Triton's
identity models are used), so what is measured is the protocol: connections, parsing, the hop
between processes, batching, answers. For each ``--frontends`` value (default 1 and 2), input
(``pixels-shm``: one [1,3,224,224] image through system shared memory; ``small``: a [1,3,64,64]
PIXELS tensor in the message) and C closed-loop ``tritonclient.grpc`` clients (threads of this
process), one window each, one after the other. Printed per point: requests/s, server CPU per
request (the supervisor, engine and front ends together) in ms; the part of it outside the forward
passes, estimated two ways: "outside fwd" subtracts the forward passes' wall time (from the
server's metrics; on busy cores that includes waiting, so it understates the protocol), "protocol"
subtracts the CPU of the model workers' threads (gathering a batch, its forward pass, handing out
its answers; where the server names them for the system, ``service.engine.runtime.name_os_thread``);
then the clients' CPU (same machine, same cores) and each server process's cores.

    .venv/bin/python -m bench.ceiling                       # 1 and 2 front ends, C = 1, 8, 32
    .venv/bin/python -m bench.ceiling --frontends 2 --concurrency 32 --seconds 5

With ``--before PATH`` (another checkout, e.g. ``git worktree add /tmp/before <commit>``) both
trees' servers run at once and every point is measured in alternating windows, ``--rounds`` of
each (the order flips every round), the median of each tree printed with their ratio: CPU per
request is robust to other work on the machine, but the machine's speed drifts over minutes, and
windows side by side see the same drift.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    p.add_argument("--before", type=Path, default=None,
                   help="another checkout to compare with, window by window [default: none]")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="windows per point and tree [default: 1]")
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


def _worker_cpu_seconds(pid: int) -> float:
    """CPU seconds of the model workers' threads of process ``pid`` (named ``infer-*`` where the
    server names its threads for the system: ``service.engine.runtime.name_os_thread``): the forward
    passes, gathering their batches and handing out their answers. 0 where none is named so."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            if not Path(f"/proc/{pid}/task/{task}/comm").read_text().startswith("infer-"):
                continue
            fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _measure(
    args: argparse.Namespace, server: Any, name: str, mode: str, concurrency: int, payloads: list[np.ndarray]
) -> dict[str, Any]:
    """One window of ``concurrency`` clients on ``server``: requests/s, CPU per request, cores per process."""
    from bench import load
    from bench.machine import own_cpu_seconds, process_tree

    pids = process_tree(server.target.pid)
    before = {pid: own_cpu_seconds(pid) for pid in pids}
    workers_before = sum(_worker_cpu_seconds(pid) for pid in pids)
    started = time.perf_counter()
    result = load.measure_service(server.target, MODEL, mode, concurrency, payloads,
                                  window_s=args.seconds, warmup_s=args.warmup_seconds, client="threads")  # fmt: skip
    elapsed = time.perf_counter() - started
    cores = {_role(pid): (own_cpu_seconds(pid) - before[pid]) / elapsed for pid in pids}
    workers = sum(_worker_cpu_seconds(pid) for pid in pids) - workers_before
    per_request = result.server_cpu_seconds_per_image
    forward = result.server_compute_busy_fraction * args.seconds / max(1.0, result.images_per_s * args.seconds)
    outside = None if per_request is None else per_request - forward
    # The workers' share of the server's CPU over the span (warm-up and window), applied to the window's.
    total = sum(cores.values()) * elapsed
    protocol = None if not workers or not total or per_request is None else per_request * (1 - workers / total)
    return {
        "concurrency": concurrency,
        "requests_per_s": result.images_per_s,
        "server_cpu_ms_per_request": None if per_request is None else 1000 * per_request,
        "server_cpu_ms_per_request_outside_forward": None if outside is None else 1000 * outside,
        "server_cpu_ms_per_request_outside_workers": None if protocol is None else 1000 * protocol,
        "forward_busy_fraction": result.server_compute_busy_fraction,
        "client_cpu_cores": result.client_cpu_cores_used,
        "server_process_cores": {role: round(value, 3) for role, value in cores.items()},
        "errors": result.errors,
        "result": result,
    }


def _show(point: dict[str, Any]) -> None:
    cores = point["server_process_cores"]
    shown = " ".join(f"{role} {value:.2f}" for role, value in sorted(cores.items()) if value >= 0.005)
    per_request, outside = point["server_cpu_ms_per_request"], point["server_cpu_ms_per_request_outside_forward"]
    protocol = point["server_cpu_ms_per_request_outside_workers"]
    print(f"{point['tree']:>6} {point['frontends']:>9} {point['input']:>10} {point['concurrency']:>3} "
          f"{point['requests_per_s']:8.0f} {per_request or float('nan'):13.3f} {outside or float('nan'):11.3f} "
          f"{protocol or float('nan'):11.3f} "
          f"{point['client_cpu_cores']:8.2f}  {shown}" + (f"  ({point['errors']} errors)" if point["errors"] else ""),
          flush=True)  # fmt: skip


def _summary(frontends: int, name: str, concurrency: int, measured: dict[str, list[dict[str, Any]]]) -> None:
    """The median of each tree's windows, and now / before where both ran."""
    medians = {}
    for tree, points in measured.items():
        medians[tree] = {
            key: statistics.median([float(p[key]) for p in points if p[key] is not None] or [math.nan])
            for key in (
                "requests_per_s",
                "server_cpu_ms_per_request",
                "server_cpu_ms_per_request_outside_forward",
                "server_cpu_ms_per_request_outside_workers",
            )
        }
        m = medians[tree]
        print(f"median {tree:>6} {frontends:>2} {name:>10} C={concurrency:<3} {m['requests_per_s']:8.0f} req/s "
              f"{m['server_cpu_ms_per_request']:7.3f} ms/req, {m['server_cpu_ms_per_request_outside_forward']:.3f} "
              f"outside the forward pass, {m['server_cpu_ms_per_request_outside_workers']:.3f} outside the workers",
              flush=True)  # fmt: skip
    if "before" in medians and "now" in medians:
        a, b = medians["before"], medians["now"]
        print(f"now/before {frontends:>2} {name:>10} C={concurrency:<3} req/s "
              f"{b['requests_per_s'] / a['requests_per_s']:.3f}, CPU per request "
              f"{b['server_cpu_ms_per_request'] / a['server_cpu_ms_per_request']:.3f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench import servers, throughput
    from bench.machine import machine_info
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
    print(f"{'tree':>6} {'frontends':>9} {'input':>10} {'C':>3} {'req/s':>8} {'server ms/req':>13} {'outside fwd':>11} "
          f"{'protocol':>11} "
          f"{'clients':>8}  server processes (cores)", flush=True)  # fmt: skip
    trees = {"now": ROOT} if args.before is None else {"before": args.before.resolve(), "now": ROOT}
    with tempfile.TemporaryDirectory(prefix="vision-ceiling-") as logs:
        for frontends in _numbers(args.frontends):
            options = throughput.resolve_args(
                ["--models", MODEL, "--server-args", f"--frontends {frontends} --max-batch-size 32 --runtime-threads 1"]
            )
            started: dict[str, servers.BenchServer] = {}
            try:
                for tree, root in trees.items():
                    started[tree] = servers.start(
                        options, MODEL, "auto", dict(os.environ), Path(logs) / f"{tree}-{frontends}", root=root
                    )
                for name in inputs:
                    for concurrency in _numbers(args.concurrency):
                        measured: dict[str, list[dict[str, object]]] = {tree: [] for tree in trees}
                        for round_ in range(args.rounds):
                            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                            for tree in order:
                                point = _measure(args, started[tree], name, mode[name], concurrency, payloads[name])
                                point.update(frontends=frontends, input=name, tree=tree, round=round_)
                                points.append(point)
                                measured[tree].append(point)
                                _show(point)
                        if args.rounds > 1 or len(trees) > 1:
                            _summary(frontends, name, concurrency, measured)
            finally:
                for server in started.values():
                    server.process.stop()
    document = {
        "machine": machine_info(),
        "command": sys.argv,
        "trees": {tree: str(root) for tree, root in trees.items()},
        "points": points,
    }
    write_document(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
