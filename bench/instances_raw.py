#!/usr/bin/env python3
"""ONNX Runtime alone, in this process: one forward pass at a time on every core, against several
at once on fewer threads each (what ``--instances`` does), for one model's cached export.

Each configuration runs ``--seconds`` of back-to-back forward passes on random pixels; a line
per configuration and round, and JSON to ``--output``:

    .venv/bin/python -m bench.instances_raw --model alexnet --batches 1,8,32 --rounds 2

The export must be in ``--runtime-cache`` already (start the server once, or run
``bench.throughput``). Sessions are built by the server's own backend code.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from service.runtimes.export import default_cache_dir
from service.runtimes.onnxruntime_backend import OnnxRuntimeBackend


def _images_per_second(backends: list[OnnxRuntimeBackend], batch: int, seconds: float) -> float:
    """Each backend in a thread of its own, running batches of ``batch`` for ``seconds``: images/s together."""
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32))
    counts = [0] * len(backends)

    def run(index: int) -> None:
        backend = backends[index]
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            backend.run(pixels, "logits")
            counts[index] += batch

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(backends))]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated images per request load")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime-cache", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=Path("bench/results/instances_raw.json"))
    args = parser.parse_args()
    cache = args.runtime_cache or default_cache_dir()
    found = sorted((cache / args.model).glob("*/model.onnx"))
    if not found:
        raise SystemExit(f"no export of {args.model} under {cache}: start the server once with this cache")
    path = found[-1]
    cores = os.cpu_count() or 1
    cpu = torch.device("cpu")
    every_core = OnnxRuntimeBackend.load(path, cpu, threads=cores)
    one_thread = OnnxRuntimeBackend.load(path, cpu, threads=1)
    rows = []
    for round_ in range(args.rounds):
        for batch in (int(b) for b in args.batches.split(",")):
            half = max(1, batch // cores)
            row = {
                "round": round_,
                "batch": batch,
                f"one pass of {batch} on {cores} threads": _images_per_second([every_core], batch, args.seconds),
                f"{cores} passes of {half} on 1 thread each": _images_per_second(
                    [one_thread] * cores, half, args.seconds
                ),
                f"{cores} passes of {half} on one {cores}-thread session": _images_per_second(
                    [every_core] * cores, half, args.seconds
                ),
            }
            rows.append(row)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": args.model, "cores": cores, "onnx": str(path), "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
