#!/usr/bin/env python3
"""Throughput of ``vision-serve`` against the same work in-process, in one run on one machine.

For each model, input mode (IMAGE: encoded JPEG; PIXELS: preprocessed FP32) and client
concurrency C, these measurements run one after the other, never at the same time:

raw baselines (``bench/raw.py``)
    ``eager``: torchvision in this process with the very weights the server uses, batches of
    ``min(C, max batch size)`` images; IMAGE decodes each JPEG with Pillow and applies the
    model's ``weights.transforms()``, then one forward pass; PIXELS is the forward pass alone.
    Plus the same exported network in the runtime each server runs (``onnxruntime``...).
service (``bench/load.py``)
    one real ``vision-serve`` subprocess per ``--runtimes`` entry, driven by C closed-loop
    ``tritonclient.grpc`` clients, each sending single-image requests.

Servers start once per model (all of that model's servers, one after the other) and are
stopped before the next model loads. Inputs are the two photographs scikit-learn ships,
JPEG-encoded at quality 90, plus crops of them.

    .venv/bin/python -m bench.throughput                             # full run
    .venv/bin/python -m bench.throughput --quick --models alexnet    # smoke test
    make bench BENCH_ARGS="--models alexnet --runtimes auto --server-args='--decode-threads 1'"

Figures, machine information and the command line go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

DISTURBED_CORES = 0.25  # CPU cores used by other processes above which a point is flagged


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one value")
    return items


def _csv_ints(value: str, minimum: int = 1) -> list[int]:
    try:
        numbers = [int(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if any(n < minimum for n in numbers):
        raise argparse.ArgumentTypeError(f"every value must be at least {minimum}")
    return numbers


def _cpu_numbers(value: str) -> list[int]:
    return _csv_ints(value, minimum=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Throughput and latency of vision-serve against the same work in-process, same machine, one run.",
    )
    p.add_argument(
        "--models",
        type=_csv,
        default=["alexnet", "resnet101"],
        help="comma-separated models [default: alexnet,resnet101]",
    )
    p.add_argument(
        "--concurrency",
        type=_csv_ints,
        default=None,
        help="comma-separated client counts [default: 1,8,32; quick: 1,8]",
    )
    p.add_argument(
        "--modes",
        type=_csv,
        default=["image", "pixels", "pixels-shm"],
        help="comma-separated: image, pixels (in the message), pixels-shm (PIXELS in and LOGITS out through "
        "Triton's system shared memory) [default: all three]",
    )
    p.add_argument(
        "--runtimes",
        type=_csv,
        default=["auto", "torch"],
        help="one server per entry, started with --runtime ENTRY; raw baselines: eager, plus each runtime a "
        "server ends up running (e.g. onnxruntime for auto on a CPU) [default: auto,torch]",
    )
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per point [default: 10; quick: 2]")
    p.add_argument("--warmup-seconds", type=float, default=None, help="warm-up per point [default: 2; quick: 1]")
    p.add_argument(
        "--min-batches",
        type=int,
        default=None,
        help="each measured window lasts at least this many raw eager batch latencies, so that slow models "
        "(seconds per batch) are not measured on one or two batches [default: 5; quick: 2]",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate raw and service this many times per point and keep the best of each "
        "(robust to other work on a shared machine) [default: 1]",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s per point, concurrency 1,8")
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="server --max-batch-size; raw batches min(C, this) [default: 32]"
    )
    p.add_argument(
        "--max-queue-delay-ms", type=float, default=None, help="server --max-queue-delay-ms [default: the server's]"
    )
    p.add_argument(
        "--weights",
        default="random",
        help="'random' (seeded, the server's rule) or a directory of <model>.pth [default: random]",
    )
    p.add_argument(
        "--device", default="auto", help="server --device; raw runs on the first device it resolves to [default: auto]"
    )
    p.add_argument(
        "--runtime-cache",
        type=Path,
        default=None,
        help="server --runtime-cache, also where raw runtime baselines load the export from "
        "[default: the server's default, under the user's cache directory]",
    )
    p.add_argument(
        "--runtime-threads",
        type=int,
        default=0,
        help="server --runtime-threads and raw runtime baselines' threads (0: one per core) [default: 0]",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="raw eager's torch intra-op threads (the servers' torch runs on --runtime-threads, as every "
        "runtime there) [default: torch's]",
    )
    p.add_argument(
        "--server-args", default="", help='extra vision-serve options, e.g. "--decode-threads 1" (raw is unaffected)'
    )
    p.add_argument(
        "--server-cpus",
        type=_cpu_numbers,
        default=None,
        help="pin the server to these CPUs, as taskset or a container's cpuset would, e.g. 0 (raw and the "
        "clients are not pinned) [default: not pinned]",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the server only (repeatable), e.g. OMP_WAIT_POLICY=passive (raw is unaffected)",
    )
    p.add_argument("--client", choices=("threads", "aio"), default="threads", help="threads: one sync client per "
                   "thread; aio: tritonclient.grpc.aio, C tasks on one event loop [default: threads]")  # fmt: skip
    p.add_argument(
        "--raw-thread",
        choices=("worker", "main"),
        default="worker",
        help="where raw runs: a dedicated thread, as the server's forward passes do, or the main thread "
        "[default: worker]",
    )
    p.add_argument(
        "--omp-wait-policy",
        choices=("inherit", "passive", "active"),
        default="inherit",
        help="OMP_WAIT_POLICY for raw AND server. inherit: leave the environment alone (libgomp's "
        "spin-then-sleep default, fastest on a quiet machine); passive: keeps raw usable when other "
        "processes load the CPUs (see bench/README.md) [default: inherit]",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=ROOT / "bench" / "results" / "throughput.json",
        help="JSON output [default: bench/results/throughput.json]",
    )
    return p


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    quick = args.quick
    if args.concurrency is None:
        args.concurrency = [1, 8] if quick else [1, 8, 32]
    if args.seconds is None:
        args.seconds = 2.0 if quick else 10.0
    if args.warmup_seconds is None:
        args.warmup_seconds = 1.0 if quick else 2.0
    if args.min_batches is None:
        args.min_batches = 2 if quick else 5
    bad = [m for m in args.modes if m not in ("image", "pixels", "pixels-shm")]
    if bad:
        raise SystemExit(f"throughput.py: error: unknown mode {bad[0]!r}; modes are image, pixels and pixels-shm")
    for item in args.server_env:
        if "=" not in item:
            raise SystemExit(f"throughput.py: error: --server-env {item!r} is not KEY=VALUE")
    if args.runtime_cache is None:
        from service.runtimes.export import default_cache_dir

        args.runtime_cache = default_cache_dir()
    return args


COLUMNS = (
    ("model", "{:<10}"),
    ("mode", "{:<10}"),
    ("conc", "{:>4}"),
    ("server", "{:<12}"),
    ("eager img/s", "{:>11}"),
    ("same img/s", "{:>10}"),
    ("svc img/s", "{:>9}"),
    ("/eager", "{:>6}"),
    ("/same", "{:>5}"),
    ("p50 ms", "{:>8}"),
    ("p99 ms", "{:>8}"),
    ("svc batch", "{:>9}"),
    ("srv cores", "{:>9}"),
    ("cpu ms/img", "{:>10}"),
    ("others", "{:>9}"),
)


def header() -> str:
    line = "  ".join(fmt.format(name) for name, fmt in COLUMNS)
    return line + "\n" + "-" * len(line)


def rows(point: Any) -> list[str]:
    lines = []
    for server, svc in point.service.items():
        eager, same = point.raw["eager"], point.same_runtime_baseline(server)
        ratios = point.ratios(server)
        others = max([r.other_processes_cpu_cores for r in point.raw.values()])
        values = (
            point.model,
            point.mode,
            point.concurrency,
            f"{server}={svc.runtime}" if server != svc.runtime else server,
            f"{eager.images_per_s:.1f}",
            f"{same.images_per_s:.1f}",
            f"{svc.images_per_s:.1f}",
            f"{ratios['service_over_raw_eager']:.2f}",
            f"{ratios['service_over_raw_same_runtime']:.2f}",
            f"{svc.latency_ms_p50:.1f}",
            f"{svc.latency_ms_p99:.1f}",
            "-" if svc.server_batch_size_mean is None else f"{svc.server_batch_size_mean:.1f}",
            f"{svc.server_cpu_cores_used:.2f}",
            f"{1000 * svc.server_cpu_cores_used / svc.images_per_s:.1f}" if svc.images_per_s else "-",
            f"{others:.1f}/{svc.other_processes_cpu_cores:.1f}",
        )
        line = "  ".join(fmt.format(v) for (_, fmt), v in zip(COLUMNS, values, strict=True))
        lines.append(line + (f"  !{svc.errors} errors" if svc.errors else ""))
    return lines


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the server subprocesses are stopped


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.omp_wait_policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # before torch (libgomp) loads
    return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    from bench.raw import RawThread

    raw_thread = RawThread(dedicated=args.raw_thread == "worker")
    try:
        return _run(args, raw_thread, torch)
    finally:
        raw_thread.close()


def _run(args: argparse.Namespace, raw_thread: Any, torch: Any) -> int:
    from bench import servers as bench_servers
    from bench.inputs import photographs, request_payloads
    from bench.load import measure_service
    from bench.machine import machine_info
    from bench.raw import RawWindow, load_raw_models, measure_raw
    from bench.records import EAGER, Point, to_json
    from service.engine.devices import resolve_devices

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        raw_thread.call(torch.set_num_threads, args.torch_threads)
    server_env = dict(os.environ)
    server_env.update(item.split("=", 1) for item in args.server_env)

    raw_device = resolve_devices(args.device)[0]
    info = machine_info(
        torch_threads_raw=raw_thread.call(torch.get_num_threads),
        server_runtime_threads=args.runtime_threads,
        mkldnn=torch.backends.mkldnn.is_available(),
        cuda=torch.cuda.is_available(),
        raw_device=str(raw_device),
    )
    photos = photographs()
    jpegs = [data for _, data in photos]
    delay = "" if args.max_queue_delay_ms is None else f" --max-queue-delay-ms {args.max_queue_delay_ms}"
    print(
        f"# {info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']} "
        f"threads raw={info['torch_threads_raw']}, "
        f"onnxruntime {info['onnxruntime']}, openvino {info['openvino']}, "
        f"OMP_WAIT_POLICY={info['omp_wait_policy_env'] or 'unset'}, raw on {raw_device} ({args.raw_thread} thread); "
        f"{len(jpegs)} JPEGs of {min(map(len, jpegs)) // 1024}-{max(map(len, jpegs)) // 1024} KiB; "
        f"weights {args.weights}; servers: --runtime {'|'.join(args.runtimes)} "
        f"--max-batch-size {args.max_batch_size} --runtime-threads {args.runtime_threads}{delay} "
        f"{args.server_args}".rstrip()
        + (f", pinned to CPUs {','.join(map(str, args.server_cpus))}" if args.server_cpus else ""),
        flush=True,
    )
    results: list[Point] = []
    server_records = []
    log_dir = Path(tempfile.mkdtemp(prefix="vision-bench-"))
    window = RawWindow(args.warmup_seconds, args.seconds, args.min_batches)
    print(header(), flush=True)
    for name in args.models:
        running: dict[str, bench_servers.BenchServer] = {}
        try:
            for runtime in args.runtimes:
                running[runtime] = bench_servers.start(args, name, runtime, server_env, log_dir)
            baselines = [
                EAGER,
                *dict.fromkeys(s.target.runtime for s in running.values() if s.target.runtime != "torch"),
            ]
            raws = load_raw_models(
                name, args.weights, raw_device, baselines, cache_dir=args.runtime_cache, threads=args.runtime_threads
            )
            pixels = raw_thread.call(lambda eager=raws[EAGER]: [eager.preprocess(j) for j in jpegs])
            for runtime, server in running.items():
                server_records.append(bench_servers.record(server, name, runtime, raws, jpegs, pixels, raw_thread))
            pids = [s.process.process.pid for s in running.values()]
            for mode in args.modes:
                payloads = request_payloads(mode, jpegs, pixels)
                for concurrency in args.concurrency:
                    batch_size = min(concurrency, args.max_batch_size)
                    point = Point(name, mode, concurrency)
                    for _ in range(args.repeats):  # raw, service, raw, service, ...: never two at once
                        for baseline, model in raws.items():
                            result = raw_thread.call(
                                measure_raw, model, mode, batch_size, jpegs, pixels, window, pids, raw_thread
                            )
                            point.raw_runs.setdefault(baseline, []).append(result)
                        seconds = max(args.seconds, args.min_batches * point.raw_runs[EAGER][0].batch_ms_p50 / 1000)
                        for runtime, server in running.items():
                            result = measure_service(
                                server.target, name, mode, concurrency, payloads,
                                window_s=seconds, warmup_s=args.warmup_seconds, client=args.client,
                            )  # fmt: skip
                            point.service_runs.setdefault(runtime, []).append(result)
                    point.raw = {k: max(v, key=lambda r: r.images_per_s) for k, v in point.raw_runs.items()}
                    point.service = {k: max(v, key=lambda r: r.images_per_s) for k, v in point.service_runs.items()}
                    if args.repeats == 1:
                        point.raw_runs, point.service_runs = {}, {}
                    results.append(point)
                    for line in rows(point):
                        print(line, flush=True)
        finally:
            for server in running.values():
                server.process.stop()

    info["loadavg_end"] = os.getloadavg()
    print(
        "\neager/same img/s: raw in-process throughput in eager PyTorch / in the runtime the server ran "
        "(decode+preprocess+forward for image, forward for pixels) at batch min(C, max batch);\n/eager, /same: "
        "service over those; svc batch: mean images per server forward pass; srv cores: CPU cores busy in the "
        "server; cpu ms/img: server CPU time per image served; others: cores busy with other processes during "
        "raw/service "
        f"(above {DISTURBED_CORES} the point is flagged)."
    )
    disturbed = [f"{p.model}/{p.mode}/C={p.concurrency}" for p in results if p.disturbed(DISTURBED_CORES)]
    if disturbed:
        print(
            f"\nWARNING: other processes used more than {DISTURBED_CORES} cores during {len(disturbed)} point(s) "
            f"({', '.join(disturbed)}); their figures are not comparable: rerun on a quiet machine or with --repeats 3."
        )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["inputs"] = [{"name": n, "bytes": len(d)} for n, d in photos]
    document = {
        "disturbed_points": disturbed,
        "machine": info,
        "settings": settings,
        "servers": server_records,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_json(document))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"# {time.monotonic() - started:.0f}s")
    sys.exit(code)
