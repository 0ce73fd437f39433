#!/usr/bin/env python3
"""Throughput of ``vision-serve`` against torchvision in-process, in one run on one machine.

For each model, input mode (IMAGE: encoded JPEG; PIXELS: preprocessed FP32) and client
concurrency C, two measurements run one after the other, never at the same time:

raw
    torchvision in this process with the very weights the server uses: batches of
    ``min(C, max batch size)`` images; IMAGE decodes each JPEG with Pillow and applies the
    model's ``weights.transforms()``, then one forward pass under ``torch.inference_mode()``;
    PIXELS is the forward pass alone on already preprocessed tensors.
service
    a real ``vision-serve`` subprocess driven by C closed-loop ``tritonclient.grpc`` clients,
    each sending single-image requests (IMAGE: one JPEG; PIXELS: one [1,3,224,224] tensor).

The server runs once per model and is stopped before the next model loads. Raw and server use
the same torch intra-op thread count (torch's default unless ``--torch-threads``). Inputs are
the two photographs scikit-learn ships, JPEG-encoded at quality 90, plus crops of them.

    .venv/bin/python bench/throughput.py                      # full run (a few minutes on CPU)
    .venv/bin/python bench/throughput.py --quick --models alexnet   # smoke test
    make bench BENCH_ARGS="--models alexnet --server-args='--decode-threads 1'"

Figures, machine information and the command line go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `service` (for the seeded weights rule) when not installed

import numpy as np
from PIL import Image

torch: Any = None  # imported by main() once OMP_WAIT_POLICY is settled, before libgomp reads it

STARTUP_TIMEOUT_S = 600.0
DISTURBED_CORES = 0.25  # CPU cores used by other processes above which a point is flagged
WARMUP_CAP_S = 600.0  # a point whose clients cannot all finish two requests by then is an error


# --------------------------------------------------------------------------- options


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one value")
    return items


def _csv_ints(value: str) -> list[int]:
    try:
        numbers = [int(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if any(n < 1 for n in numbers):
        raise argparse.ArgumentTypeError("every value must be at least 1")
    return numbers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Throughput and latency of vision-serve against torchvision in-process, same machine, one run.",
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
        "--modes", type=_csv, default=["image", "pixels"], help="comma-separated: image, pixels [default: both]"
    )
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per point [default: 10; quick: 2]")
    p.add_argument("--warmup-seconds", type=float, default=None, help="warm-up per point [default: 2; quick: 1]")
    p.add_argument(
        "--min-batches",
        type=int,
        default=None,
        help="each measured window lasts at least this many raw batch latencies, so that slow models "
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
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="server --max-queue-delay-ms [default: 5]")
    p.add_argument(
        "--weights",
        default="random",
        help="'random' (seeded, the server's rule) or a directory of <model>.pth [default: random]",
    )
    p.add_argument(
        "--device", default="auto", help="server --device; raw runs on the first device it resolves to [default: auto]"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads for raw AND server (OMP_NUM_THREADS for the server) [default: torch's]",
    )
    p.add_argument(
        "--server-args",
        default="",
        help='extra vision-serve options, e.g. "--decode-threads 1" (raw is unaffected)',
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the server only (repeatable), e.g. OMP_NUM_THREADS=1 (raw is unaffected)",
    )
    p.add_argument("--client", choices=("threads", "aio"), default="threads", help="threads: one sync client per "
                   "thread; aio: tritonclient.grpc.aio, C tasks on one event loop [default: threads]")  # fmt: skip
    p.add_argument(
        "--raw-thread",
        choices=("worker", "main"),
        default="worker",
        help="where raw runs: a dedicated thread, as the server's forward passes do, or the main thread "
        "(with libgomp's default spin-waiting the main thread's team can waste a core when the CPUs are "
        "contended; see bench/README.md) [default: worker]",
    )
    p.add_argument(
        "--omp-wait-policy",
        choices=("inherit", "passive", "active"),
        default="inherit",
        help="OMP_WAIT_POLICY for raw AND server. inherit: leave the environment alone, i.e. libgomp's "
        "spin-then-sleep default, fastest on a quiet machine; passive: waiting OpenMP threads sleep at once, "
        "which keeps raw usable when other processes load the CPUs (see bench/README.md) [default: inherit]",
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
    bad = [m for m in args.modes if m not in ("image", "pixels")]
    if bad:
        raise SystemExit(f"throughput.py: error: unknown mode {bad[0]!r}; modes are image and pixels")
    for item in args.server_env:
        if "=" not in item:
            raise SystemExit(f"throughput.py: error: --server-env {item!r} is not KEY=VALUE")
    return args


# --------------------------------------------------------------------------- inputs


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photographs() -> list[tuple[str, bytes]]:
    """Real photographs, JPEG quality 90: scikit-learn's two (427x640) and a few crops of each."""
    from sklearn.datasets import load_sample_images

    photos = []
    for name, pixels in zip(("china", "flower"), load_sample_images().images):
        full = Image.fromarray(pixels)
        w, h = full.size
        photos.append((name, encode_jpeg(full)))
        photos.append(
            (f"{name}-center", encode_jpeg(full.crop((w // 2 - 180, h // 2 - 150, w // 2 + 180, h // 2 + 150))))
        )
        photos.append((f"{name}-left", encode_jpeg(full.crop((0, 0, 400, 380)))))
        photos.append(
            (f"{name}-right", encode_jpeg(full.crop((w - 320, h - 300, w, h)).transpose(Image.FLIP_LEFT_RIGHT)))
        )
    return photos


# --------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def server_torch_threads(env: dict[str, str]) -> int:
    """torch's intra-op thread count in a fresh process with the server's environment."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return int(out.stdout.strip())


def machine_info(args: argparse.Namespace, server_env: dict[str, str], raw_device: torch.device) -> dict[str, Any]:
    mem_kb = next(
        (int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), 0
    )
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(mem_kb / 2**20, 1),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "grpcio": _version("grpcio"),
        "tritonclient": _version("tritonclient"),
        "pillow": _version("pillow"),
        "numpy": np.__version__,
        "torch_threads_raw": on_raw_thread(torch.get_num_threads),
        "torch_interop_threads_raw": torch.get_num_interop_threads(),
        "torch_threads_server": server_torch_threads(server_env),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.is_available(),
        "raw_device": str(raw_device),
    }
    if raw_device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(raw_device)
    return info


def system_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy (not idle, not waiting on IO) since boot."""
    fields = [int(v) for v in _read("/proc/stat").splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) from /proc."""
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    if len(fields) < 13:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path
    command: list[str]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_serving(self, model: str, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Block until health says SERVING for the server ("") and ``model``; the seconds it took."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        started = time.monotonic()
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", model):
                while True:
                    if not self.alive():
                        raise RuntimeError(f"vision-serve exited with {self.process.returncode}:\n{self.log_tail()}")
                    if time.monotonic() - started > timeout:
                        raise TimeoutError(
                            f"vision-serve not SERVING {service!r} after {timeout:.0f}s:\n{self.log_tail()}"
                        )
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    time.sleep(0.2)
        return time.monotonic() - started

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def metrics(self, model: str) -> dict[str, float]:
        """Sums and counts of the server's batch and latency histograms for ``model``."""
        from prometheus_client.parser import text_string_to_metric_families

        wanted = {
            "vision_batch_size": "batch_size",
            "vision_compute_seconds": "compute_seconds",
            "vision_queue_seconds": "queue_seconds",
            "vision_request_seconds": "request_seconds",
        }
        out: dict[str, float] = {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return out
        for family in text_string_to_metric_families(text):
            key = wanted.get(family.name)
            if key is None:
                continue
            for sample in family.samples:
                if sample.labels.get("model") != model:
                    continue
                if sample.name.endswith("_sum"):
                    out[key + "_sum"] = out.get(key + "_sum", 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    out[key + "_count"] = out.get(key + "_count", 0.0) + sample.value
        return out


def start_server(args: argparse.Namespace, model: str, env: dict[str, str], log_dir: Path) -> Server:
    grpc_port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "service",
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--models", model, "--weights", args.weights, "--device", args.device,
        "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
        *shlex.split(args.server_args),
    ]  # fmt: skip
    log_path = log_dir / f"server-{model}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return Server(process, grpc_port, metrics_port, log_path, command)


# --------------------------------------------------------------------------- raw


@dataclass
class RawModel:
    name: str
    module: torch.nn.Module
    transforms: Any
    device: torch.device

    def preprocess(self, jpeg: bytes) -> torch.Tensor:
        return self.transforms(Image.open(io.BytesIO(jpeg)).convert("RGB"))

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.module(batch.to(self.device)).float().cpu().numpy()


def preprocess_all(model: RawModel, jpegs: list[bytes]) -> list[torch.Tensor]:
    return [model.preprocess(jpeg) for jpeg in jpegs]


def load_raw_model(name: str, weights: str, device: torch.device) -> RawModel:
    # The server's own rule for `--weights random` (seeded by the model's name) or a directory,
    # so that raw and service compute with identical parameters (checked by `agreement`).
    import logging

    from service.models import WeightsSource, build_model, get_model_spec

    # The server logs its loud random-weights warning; the benchmark's copy would only break the table.
    logging.getLogger("service.models.weights").setLevel(logging.ERROR)
    spec = get_model_spec(name)
    module = build_model(spec, WeightsSource.parse(weights)).to(device).eval()
    return RawModel(name, module, spec.transforms(), device)


def measure_raw(
    model: RawModel,
    mode: str,
    batch_size: int,
    jpegs: list[bytes],
    pixels: list[torch.Tensor],
    args: argparse.Namespace,
    server: Server,
) -> dict[str, Any]:
    """Images/s and per-batch latency of torchvision in-process at ``batch_size``."""
    cursor = 0

    def one_batch() -> tuple[float, float]:
        nonlocal cursor
        indices = [(cursor + i) % len(jpegs) for i in range(batch_size)]
        cursor += batch_size
        started = time.perf_counter()
        if mode == "image":
            batch = torch.stack([model.preprocess(jpegs[i]) for i in indices])
        else:
            batch = torch.stack([pixels[i] for i in indices])  # preprocessed ahead: forward only
        prepared = time.perf_counter()
        model.forward(batch)
        finished = time.perf_counter()
        return finished - started, prepared - started

    # Warm-up: at least two batches (oneDNN primes each new shape) and --warmup-seconds.
    started = time.perf_counter()
    warm = 0
    while warm < 2 or time.perf_counter() - started < args.warmup_seconds:
        _check_stop()
        one_batch()
        warm += 1

    latencies: list[float] = []
    preprocess: list[float] = []
    busy0, server0, cpu0, t0 = system_busy_seconds(), server.cpu_seconds(), time.process_time(), time.perf_counter()
    while len(latencies) < args.min_batches or time.perf_counter() - t0 < args.seconds:
        _check_stop()
        total, prep = one_batch()
        latencies.append(total)
        preprocess.append(prep)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    server_idle = server.cpu_seconds() - server0
    others = system_busy_seconds() - busy0 - cpu - server_idle
    return {
        "batch_size": batch_size,
        "batches": len(latencies),
        "images": len(latencies) * batch_size,
        "seconds": elapsed,
        "images_per_s": len(latencies) * batch_size / elapsed,
        "batch_ms_p50": 1000 * statistics.median(latencies),
        "batch_ms_mean": 1000 * statistics.fmean(latencies),
        "preprocess_ms_per_batch_mean": 1000 * statistics.fmean(preprocess),
        "forward_ms_per_batch_mean": 1000 * (statistics.fmean(latencies) - statistics.fmean(preprocess)),
        "cpu_cores_used": cpu / elapsed,
        "server_idle_cpu_cores": server_idle / elapsed,  # the idle server, waiting for the next point
        "other_processes_cpu_cores": max(0.0, others / elapsed),  # other work on the machine meanwhile
    }


# --------------------------------------------------------------------------- service


@dataclass
class ClientLog:
    """What one closed-loop client saw: (start, end) of each answered request, and failures."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Clock:
    """Shared between the clients and the conductor: when to stop, how far warm-up has got."""

    def __init__(self, clients: int) -> None:
        self.stop_at = float("inf")
        self.done = [0] * clients


def request_payloads(mode: str, jpegs: list[bytes], pixels: list[torch.Tensor]) -> list[np.ndarray]:
    if mode == "image":
        return [np.array([jpeg], dtype=np.object_) for jpeg in jpegs]
    return [tensor.unsqueeze(0).numpy().astype(np.float32, copy=False) for tensor in pixels]


def _infer_input(module: Any, mode: str, payload: np.ndarray) -> Any:
    if mode == "image":
        tensor = module.InferInput("IMAGE", [1], "BYTES")
    else:
        tensor = module.InferInput("PIXELS", list(payload.shape), "FP32")
    tensor.set_data_from_numpy(payload)
    return tensor


def run_threads_client(index: int, url: str, model: str, mode: str, payloads: list[np.ndarray], clock: Clock,
                       log: ClientLog, ready: threading.Barrier) -> None:  # fmt: skip
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inputs = [_infer_input(grpcclient, mode, p) for p in payloads]  # built once, reused
    try:
        ready.wait()
        i = index
        while True:
            start = time.perf_counter()
            if start >= clock.stop_at:
                break
            try:
                result = client.infer(model, [inputs[i % len(inputs)]])
                result.as_numpy("LOGITS")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                log.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.01)
            else:
                log.spans.append((start, time.perf_counter()))
                clock.done[index] += 1
            i += 1
    finally:
        client.close()


async def run_aio_clients(url: str, model: str, mode: str, payloads: list[np.ndarray], clock: Clock,
                          logs: list[ClientLog], go: threading.Event) -> None:  # fmt: skip
    import tritonclient.grpc.aio as aioclient

    async def one(index: int) -> None:
        client = aioclient.InferenceServerClient(url)
        inputs = [_infer_input(aioclient, mode, p) for p in payloads]
        try:
            i = index
            while True:
                start = time.perf_counter()
                if start >= clock.stop_at:
                    break
                try:
                    result = await client.infer(model, [inputs[i % len(inputs)]])
                    result.as_numpy("LOGITS")
                except Exception as exc:  # noqa: BLE001
                    logs[index].errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    await asyncio.sleep(0.01)
                else:
                    logs[index].spans.append((start, time.perf_counter()))
                    clock.done[index] += 1
                i += 1
        finally:
            await client.close()

    await asyncio.to_thread(go.wait)
    await asyncio.gather(*(one(i) for i in range(len(logs))))


def measure_service(server: Server, model: str, mode: str, concurrency: int, payloads: list[np.ndarray],
                    window_s: float, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """C closed-loop clients; images/s and latency over a window after warm-up."""
    clock = Clock(concurrency)
    logs = [ClientLog() for _ in range(concurrency)]
    if args.client == "threads":
        barrier = threading.Barrier(concurrency + 1)
        workers = [
            threading.Thread(
                target=run_threads_client,
                args=(i, server.url, model, mode, payloads, clock, logs[i], barrier),
                daemon=True,
            )
            for i in range(concurrency)
        ]
        for worker in workers:
            worker.start()
        barrier.wait()
    else:
        go = threading.Event()
        workers = [
            threading.Thread(
                target=lambda: asyncio.run(run_aio_clients(server.url, model, mode, payloads, clock, logs, go)),
                daemon=True,
            )
        ]
        workers[0].start()
        time.sleep(0.2)  # let the loop create its channels before the clock starts
        go.set()

    try:
        # Warm-up: --warmup-seconds, and until every client has had two answers (the first batches
        # of each size are slow while oneDNN primes them; slow models need seconds per batch).
        begun = time.perf_counter()
        while time.perf_counter() - begun < args.warmup_seconds or min(clock.done) < 2:
            if time.perf_counter() - begun > WARMUP_CAP_S:
                errors = [e for log in logs for e in log.errors]
                raise RuntimeError(
                    f"warm-up did not finish in {WARMUP_CAP_S:.0f}s; errors: {errors[:3]}\n{server.log_tail()}"
                )
            if not server.alive():
                raise RuntimeError(f"vision-serve died:\n{server.log_tail()}")
            time.sleep(0.05)
        warmup_s = time.perf_counter() - begun

        metrics0 = server.metrics(model)
        busy0, cpu_server0, cpu_client0 = system_busy_seconds(), server.cpu_seconds(), time.process_time()
        t0 = time.perf_counter()
        t1 = t0 + window_s
        clock.stop_at = t1
        time.sleep(max(0.0, t1 - time.perf_counter()))
        busy1, cpu_server1, cpu_client1 = system_busy_seconds(), server.cpu_seconds(), time.process_time()
        metrics1 = server.metrics(model)
    except BaseException:
        clock.stop_at = 0.0  # clients stop after their current request
        raise
    for worker in workers:
        worker.join()  # in-flight requests finish; they end after t1 and are not counted

    ended = [(s, e) for log in logs for (s, e) in log.spans if t0 <= e <= t1]
    latencies_ms = np.array([1000 * (e - s) for s, e in ended]) if ended else np.array([float("nan")])
    errors = [e for log in logs for e in log.errors]
    delta = {k: metrics1.get(k, 0.0) - metrics0.get(k, 0.0) for k in metrics1}
    batches = delta.get("batch_size_count", 0.0)
    requests = delta.get("request_seconds_count", 0.0)
    return {
        "concurrency": concurrency,
        "client": args.client,
        "warmup_s": warmup_s,
        "seconds": window_s,
        "requests": len(ended),
        "images_per_s": len(ended) / window_s,
        "latency_ms_p50": float(np.percentile(latencies_ms, 50)),
        "latency_ms_p90": float(np.percentile(latencies_ms, 90)),
        "latency_ms_p99": float(np.percentile(latencies_ms, 99)),
        "latency_ms_mean": float(latencies_ms.mean()),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "server_cpu_cores_used": (cpu_server1 - cpu_server0) / window_s,
        "client_cpu_cores_used": (cpu_client1 - cpu_client0) / window_s,
        "other_processes_cpu_cores": max(
            0.0, (busy1 - busy0 - (cpu_server1 - cpu_server0) - (cpu_client1 - cpu_client0)) / window_s
        ),
        # From the server's own metrics over the same window:
        "server_batches": batches,
        "server_batch_size_mean": delta.get("batch_size_sum", 0.0) / batches if batches else None,
        "server_compute_busy_fraction": delta.get("compute_seconds_sum", 0.0) / window_s,
        "server_compute_ms_per_batch_mean": 1000 * delta.get("compute_seconds_sum", 0.0) / batches if batches else None,
        "server_queue_ms_mean": (
            1000 * delta.get("queue_seconds_sum", 0.0) / delta["queue_seconds_count"]
            if delta.get("queue_seconds_count")
            else None
        ),
        "server_request_ms_mean": 1000 * delta.get("request_seconds_sum", 0.0) / requests if requests else None,
    }


def agreement(server: Server, model: RawModel, jpegs: list[bytes], pixels: list[torch.Tensor]) -> dict[str, float]:
    """Compare the service's logits with raw's for one JPEG and one PIXELS tensor (same work, same weights)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        out: dict[str, float] = {}
        for mode, payload, reference in (
            ("image", np.array([jpegs[0]], dtype=np.object_), on_raw_thread(model.forward, pixels[0].unsqueeze(0))),
            ("pixels", pixels[0].unsqueeze(0).numpy(), on_raw_thread(model.forward, pixels[0].unsqueeze(0))),
        ):
            got = client.infer(model.name, [_infer_input(grpcclient, mode, payload)]).as_numpy("LOGITS")
            a, b = got.ravel().astype(np.float64), reference.ravel().astype(np.float64)
            out[f"{mode}_max_abs_diff"] = float(np.abs(a - b).max())
            out[f"{mode}_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        return out
    finally:
        client.close()


# --------------------------------------------------------------------------- report

COLUMNS = (
    ("model", "{:<10}"),
    ("mode", "{:<6}"),
    ("conc", "{:>4}"),
    ("raw img/s", "{:>9}"),
    ("svc img/s", "{:>9}"),
    ("svc/raw", "{:>7}"),
    ("p50 ms", "{:>8}"),
    ("p99 ms", "{:>8}"),
    ("raw batch ms", "{:>12}"),
    ("svc batch", "{:>9}"),
    ("srv cores", "{:>9}"),
    ("cli cores", "{:>9}"),
    ("others", "{:>9}"),
)


def header() -> str:
    line = "  ".join(fmt.format(name) for name, fmt in COLUMNS)
    return line + "\n" + "-" * len(line)


def row(point: dict[str, Any]) -> str:
    raw, svc = point["raw"], point["service"]
    batch = svc["server_batch_size_mean"]
    values = (
        point["model"],
        point["mode"],
        point["concurrency"],
        f"{raw['images_per_s']:.1f}",
        f"{svc['images_per_s']:.1f}",
        f"{point['ratio']:.2f}",
        f"{svc['latency_ms_p50']:.1f}",
        f"{svc['latency_ms_p99']:.1f}",
        f"{raw['batch_ms_p50']:.1f} (b{raw['batch_size']})",
        "-" if batch is None else f"{batch:.1f}",
        f"{svc['server_cpu_cores_used']:.2f}",
        f"{svc['client_cpu_cores_used']:.2f}",
        f"{raw['other_processes_cpu_cores']:.1f}/{svc['other_processes_cpu_cores']:.1f}",
    )
    line = "  ".join(fmt.format(v) for (_, fmt), v in zip(COLUMNS, values))
    return line + (f"  !{svc['errors']} errors" if svc["errors"] else "")


# --------------------------------------------------------------------------- main


_RAW_THREAD: ThreadPoolExecutor | None = None
_STOP = threading.Event()  # set when the run is aborted: raw stops at its next batch


def _check_stop() -> None:
    if _STOP.is_set():
        raise RuntimeError("benchmark aborted")


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the server subprocess is stopped


def on_raw_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` where raw work runs: one long-lived thread (``--raw-thread worker``) or here."""
    if _RAW_THREAD is None:
        return fn(*args)
    return _RAW_THREAD.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    finally:
        _STOP.set()
        if _RAW_THREAD is not None:
            _RAW_THREAD.shutdown(wait=False, cancel_futures=True)


def run(args: argparse.Namespace) -> int:
    global _RAW_THREAD, torch
    if args.omp_wait_policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # before torch (libgomp) loads
    import torch

    if args.raw_thread == "worker":
        _RAW_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        on_raw_thread(torch.set_num_threads, args.torch_threads)
    server_env = dict(os.environ)
    if args.torch_threads:
        server_env["OMP_NUM_THREADS"] = str(args.torch_threads)
    server_env.update(item.split("=", 1) for item in args.server_env)

    from service.devices import resolve_devices

    raw_device = resolve_devices(args.device)[0]
    info = machine_info(args, server_env, raw_device)
    photos = photographs()
    jpegs = [data for _, data in photos]
    print(
        f"# {info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']} "
        f"threads raw={info['torch_threads_raw']} server={info['torch_threads_server']}, "
        f"OMP_WAIT_POLICY={info['omp_wait_policy_env'] or 'unset'}, raw on {raw_device} ({args.raw_thread} thread); "
        f"{len(jpegs)} JPEGs of {min(map(len, jpegs)) // 1024}-{max(map(len, jpegs)) // 1024} KiB; "
        f"weights {args.weights}; server: --max-batch-size {args.max_batch_size} "
        f"--max-queue-delay-ms {args.max_queue_delay_ms} {args.server_args}".rstrip(),
        flush=True,
    )
    if info["torch_threads_raw"] != info["torch_threads_server"]:
        print(
            f"# note: raw uses {info['torch_threads_raw']} torch threads, the server "
            f"{info['torch_threads_server']} (--server-env)",
            flush=True,
        )
    results: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    log_dir = Path(tempfile.mkdtemp(prefix="vision-bench-"))
    print(header(), flush=True)
    for name in args.models:
        model = load_raw_model(name, args.weights, raw_device)
        pixels = on_raw_thread(preprocess_all, model, jpegs)
        server = start_server(args, name, server_env, log_dir)
        try:
            ready_s = server.wait_serving(name)
            check = agreement(server, model, jpegs, pixels)
            servers.append(
                {
                    "model": name,
                    "command": shlex.join(server.command),
                    "log": str(server.log_path),
                    "ready_seconds": ready_s,
                    "agreement": check,
                }
            )
            if min(check["image_cosine"], check["pixels_cosine"]) < 0.9999:
                print(
                    f"# WARNING {name}: service and raw logits differ ({check}); the comparison is unfair", flush=True
                )
            for mode in args.modes:
                payloads = request_payloads(mode, jpegs, pixels)
                for concurrency in args.concurrency:
                    batch_size = min(concurrency, args.max_batch_size)
                    raws: list[dict[str, Any]] = []
                    services: list[dict[str, Any]] = []
                    for _ in range(args.repeats):  # raw, service, raw, service, ...: never both at once
                        raws.append(on_raw_thread(measure_raw, model, mode, batch_size, jpegs, pixels, args, server))
                        window = max(args.seconds, args.min_batches * raws[0]["batch_ms_p50"] / 1000)
                        services.append(measure_service(server, name, mode, concurrency, payloads, window, args))
                    raw = max(raws, key=lambda r: r["images_per_s"])
                    service = max(services, key=lambda r: r["images_per_s"])
                    point = {
                        "model": name,
                        "mode": mode,
                        "concurrency": concurrency,
                        "raw": raw,
                        "service": service,
                        "ratio": service["images_per_s"] / raw["images_per_s"],
                        "raw_runs": raws if args.repeats > 1 else None,
                        "service_runs": services if args.repeats > 1 else None,
                    }
                    results.append(point)
                    print(row(point), flush=True)
        finally:
            server.stop()

    info["loadavg_end"] = os.getloadavg()
    print(
        "\nraw batch ms: p50 per batch (decode+preprocess+forward for image, forward for pixels) at batch size b; "
        "svc batch: mean images per server forward pass;\nsrv/cli cores: CPU cores busy in the server / in this "
        "client process over the window; others: cores busy with other processes during raw/service "
        f"(above {DISTURBED_CORES} the point is flagged)."
    )
    disturbed = [
        f"{p['model']}/{p['mode']}/C={p['concurrency']}"
        for p in results
        if max(p["raw"]["other_processes_cpu_cores"], p["service"]["other_processes_cpu_cores"]) > DISTURBED_CORES
    ]
    if disturbed:
        print(
            f"\nWARNING: other processes used more than {DISTURBED_CORES} cores during {len(disturbed)} point(s) "
            f"({', '.join(disturbed)}); their figures are not comparable: rerun on a quiet machine or with --repeats 3."
        )
    document = {
        "disturbed_points": disturbed,
        "machine": info,
        "settings": {
            "models": args.models,
            "modes": args.modes,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "min_batches": args.min_batches,
            "repeats": args.repeats,
            "quick": args.quick,
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "weights": args.weights,
            "device": args.device,
            "torch_threads": args.torch_threads,
            "server_args": args.server_args,
            "server_env": args.server_env,
            "client": args.client,
            "raw_thread": args.raw_thread,
            "omp_wait_policy": args.omp_wait_policy,
            "inputs": [{"name": n, "bytes": len(d), "size": list(Image.open(io.BytesIO(d)).size)} for n, d in photos],
        },
        "servers": servers,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
