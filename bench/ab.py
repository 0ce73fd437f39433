#!/usr/bin/env python3
"""Two server configurations in alternating windows on one machine: which serves more (an A/B).

On a shared machine a server's figures move by 10-25% from one minute to the next. Here both
servers start first, then A and B are measured in turn, round after round, under the same C
closed-loop ``tritonclient.grpc`` clients (the idle one waits, its threads asleep): each round's
B/A compares two windows a few seconds apart, and the rounds show how steady that ratio is.

    .venv/bin/python -m bench.ab --model alexnet --mode pixels-shm --concurrency 8 \\
        --a-args="--instances 1" --b-args="--instances 2" --rounds 3 --seconds 10
    # A from another commit:  git worktree add /tmp/before <commit>  and  --a-root /tmp/before

Options of the server not given in --a-args/--b-args are those of ``bench/throughput.py``
(``--weights random``, ``--runtime auto``, ``--max-batch-size 32``, its runtime cache).
Per-round figures and the command go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="alexnet", help="model served by both [default: alexnet]")
    p.add_argument("--mode", choices=("image", "pixels", "pixels-shm"), default="pixels-shm",
                   help="what each request carries [default: pixels-shm]")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients [default: 8]")
    p.add_argument("--seconds", type=float, default=10.0, help="each window [default: 10]")
    p.add_argument("--warmup-seconds", type=float, default=2.0, help="before each window [default: 2]")
    p.add_argument("--rounds", type=int, default=3, help="A then B, this many times [default: 3]")
    p.add_argument("--a-args", default="", help="vision-serve options of server A")
    p.add_argument("--b-args", default="", help="vision-serve options of server B")
    p.add_argument("--a-root", type=Path, default=ROOT, help="checkout that server A runs [default: this one]")
    p.add_argument("--b-root", type=Path, default=ROOT, help="checkout that server B runs [default: this one]")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "ab.json",
                   help="JSON output [default: bench/results/ab.json]")  # fmt: skip
    return p


def pixels_of(model: str, jpegs: list[bytes]) -> list[object]:
    """Each photograph as the server itself preprocesses it (what a PIXELS client sends)."""
    import torch

    from service.config import ServeConfig
    from service.inference.preprocess import ImageDecoder
    from service.models import get_model_spec
    from service.models.preprocessing import preprocessing_of

    transform = get_model_spec(model).transforms()
    decode = ImageDecoder(preprocessing_of(transform), max_pixels=ServeConfig().max_image_pixels)
    return [torch.from_numpy(decode(data)) for data in jpegs]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.rounds < 1 or args.seconds <= 0:
        raise SystemExit("ab.py: error: --concurrency and --rounds must be at least 1, --seconds above 0")
    from bench import load, servers, throughput
    from bench.inputs import photographs, request_payloads
    from bench.machine import machine_info
    from bench.records import write_document

    variants = {"A": (args.a_args, args.a_root), "B": (args.b_args, args.b_root)}
    jpegs = [data for _, data in photographs()]
    payloads = request_payloads(args.mode, jpegs, pixels_of(args.model, jpegs))
    running: dict[str, servers.BenchServer] = {}
    rounds: list[dict[str, object]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="vision-ab-") as logs:
            for name, (server_args, root) in variants.items():
                options = throughput.resolve_args(["--models", args.model, "--server-args", server_args])
                running[name] = servers.start(options, args.model, "auto", dict(os.environ), Path(logs) / name, root)
            print(f"# {args.model} {args.mode} C={args.concurrency}; A: {args.a_args!r} ({args.a_root}); "
                  f"B: {args.b_args!r} ({args.b_root})", flush=True)  # fmt: skip
            for index in range(args.rounds):
                measured = {}
                for name, server in running.items():
                    result = load.measure_service(server.target, args.model, args.mode, args.concurrency, payloads,
                                                  window_s=args.seconds, warmup_s=args.warmup_seconds,
                                                  client="threads")  # fmt: skip
                    measured[name] = result
                    print(f"round {index} {name}: {result.images_per_s:7.1f} img/s  p50 {result.latency_ms_p50:6.0f} "
                          f"p99 {result.latency_ms_p99:6.0f} ms  batch {result.server_batch_size_mean:4.1f}  server "
                          f"{1000 * result.server_cpu_seconds_per_image:5.1f} CPU ms/img  "
                          f"others {result.other_processes_cpu_cores:.2f} cores", flush=True)  # fmt: skip
                ratio = measured["B"].images_per_s / measured["A"].images_per_s
                print(f"round {index} B/A: {ratio:.3f}", flush=True)
                rounds.append({"A": measured["A"], "B": measured["B"], "b_over_a": ratio})
    finally:
        for server in running.values():
            server.process.stop()
    ratios = [float(r["b_over_a"]) for r in rounds]  # type: ignore[arg-type]
    print(f"B/A per round {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    document = {"machine": machine_info(), "command": sys.argv, "args": settings, "rounds": rounds}
    write_document(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
