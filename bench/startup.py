#!/usr/bin/env python3
"""Time to ready and resident memory of ``vision-serve`` under each runtime.

For each ``--runtimes`` entry a server with ``--models`` starts (a child process through the
tests' harness) and is timed until its health service says SERVING; then one IMAGE request of
``--batch`` images per model runs (32, the default largest batch: memory as under load), and
its RSS (VmRSS) and peak RSS (VmHWM) are read from /proc. Runtimes that
export (everything but ``torch``) start twice: from an empty ``--runtime-cache`` (the first
start on a new machine or after an upgrade: exports included) and from the cache that start
filled (every later start).

    .venv/bin/python -m bench.startup                                   # all three models
    .venv/bin/python -m bench.startup --models alexnet --runtimes auto  # quick
    .venv/bin/python -m bench.startup --runtimes auto --server-args="--instances 2"
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.inputs import infer_input, photographs
from bench.machine import machine_info, process_memory_mib
from tests.support.servers import start_server

ROOT = Path(__file__).resolve().parent.parent


def measure(
    models: list[str], runtime: str, cache: Path, weights: str, log_dir: Path, batch: int, extra: list[str]
) -> dict[str, object]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    started = time.monotonic()
    server = start_server(
        log_dir,
        *("--models", ",".join(models), "--weights", weights, "--runtime", runtime, "--runtime-cache", str(cache)),
        *extra,
    )
    try:
        server.wait_serving("", timeout=1800)
        ready = time.monotonic() - started
        after_ready = process_memory_mib(server.process.pid)
        jpeg = photographs()[0][1]
        with grpcclient.InferenceServerClient(server.target) as client:
            for model in models:
                payload = np.array([jpeg] * batch, dtype=np.object_)
                client.infer(model, [infer_input(grpcclient, "image", payload)]).as_numpy("LOGITS")
        memory = process_memory_mib(server.process.pid)
    finally:
        server.stop()
    return {
        "runtime": runtime,
        "server_args": extra,
        "images_per_model": batch,
        "ready_seconds": round(ready, 1),
        "rss_mib_ready": round(after_ready.get("VmRSS", float("nan"))),
        "rss_mib_after_requests": round(memory.get("VmRSS", float("nan"))),
        "peak_rss_mib": round(memory.get("VmHWM", float("nan"))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="alexnet,vgg16,resnet101")
    parser.add_argument("--runtimes", default="torch,auto")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--batch", type=int, default=32, help="images in the one request per model [default: 32]")
    parser.add_argument("--server-args", default="", help='more vision-serve options, e.g. "--instances 2"')
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    extra = shlex.split(args.server_args)
    work = Path(tempfile.mkdtemp(prefix="vision-startup-"))
    rows = []
    try:
        for runtime in [r for r in args.runtimes.split(",") if r]:
            cache = work / f"cache-{runtime}"
            starts = ["no cache"] if runtime == "torch" else ["empty cache", "warm cache"]
            for cache_state in starts:
                log_dir = work / f"{runtime}-{cache_state.replace(' ', '-')}"
                log_dir.mkdir()
                measured = measure(models, runtime, cache, args.weights, log_dir, args.batch, extra)
                row = {"cache": cache_state, **measured}
                rows.append(row)
                print(
                    f"{row['runtime']:<8} {cache_state:<12} ready in {row['ready_seconds']:>6.1f} s   "
                    f"RSS {row['rss_mib_ready']:>6} MiB at ready, {row['rss_mib_after_requests']:>6} MiB after "
                    f"{args.batch} images per model, peak {row['peak_rss_mib']:>6} MiB",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine_info(), "models": models, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
