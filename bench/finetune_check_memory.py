"""Server memory while fine-tuning jobs are checked and run: peak and final RSS of the server process.

Scenarios (``--scenario``):

- ``check``: one job of N large JPEGs (default 6 of 5000x5000) followed by one corrupt image, so
  that the job is refused once every image has been checked and the measurement covers the check
  alone (no feature extraction).
- ``pixels``: one job of N one-pixel PNGs (default 20,000, the most a job takes), run to its end.
- ``photos``: one job of N full-size JPEGs (default 2,000 of 1024x768), run to its end.
- ``cancel``: the ``pixels`` job, cancelled half-way through its feature extraction.

The server is a real ``vision-serve`` child process (alexnet, ``--weights random``). Peak RSS is
the kernel's VmHWM, reset through /proc/PID/clear_refs before the job is sent; "final" is VmRSS
once the job has ended (its end event seen). Growth is measured from VmRSS just before the job.

    python -m bench.finetune_check_memory --scenario pixels
    python -m bench.finetune_check_memory --scenario photos
    python -m bench.finetune_check_memory --scenario pixels --env MALLOC_ARENA_MAX=2   # server env
    python -m bench.finetune_check_memory --root OTHER_TREE # another checkout, for before/after
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = {"check": 6, "pixels": 20_000, "photos": 2_000, "cancel": 20_000}
PER_MESSAGE = 200  # examples per CreateJob message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def big_jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 50, side // 50, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def one_pixel(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (seed * 37 % 256, seed * 11 % 256, seed % 2 * 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(seed: int, width: int = 1024, height: int = 768) -> bytes:
    """A 1024x768 JPEG with the smooth gradients and edges of a photograph (not noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Sampler(threading.Thread):
    """Reads the server's VmRSS while a job runs, to report its course (peaks come from VmHWM)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopped.wait(0.5):
            try:
                self.samples.append((time.monotonic() - started, status_kb(self.pid, "VmRSS")))
            except (OSError, KeyError):
                return


def requests(config: pb.FineTuneConfig, examples: list[pb.Example]) -> Iterator[pb.CreateJobRequest]:
    yield pb.CreateJobRequest(config=config)
    for start in range(0, len(examples), PER_MESSAGE):
        yield pb.CreateJobRequest(examples=pb.ExampleBatch(examples=examples[start : start + PER_MESSAGE]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HERE, help="checkout whose server is measured")
    parser.add_argument("--scenario", choices=sorted(DEFAULT_IMAGES), default="check")
    parser.add_argument("--images", type=int, default=0, help="examples in the job (default: the scenario's)")
    parser.add_argument("--side", type=int, default=5000, help="side of the check scenario's JPEGs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server's environment")
    parser.add_argument("--server-arg", action="append", default=[], help="one more vision-serve option")
    args = parser.parse_args()
    count = args.images or DEFAULT_IMAGES[args.scenario]
    if args.scenario == "check":
        images = [big_jpeg(args.side, seed) for seed in range(count)]
    elif args.scenario == "photos":
        images = [photo(seed) for seed in range(count)]
    else:
        images = [one_pixel(seed) for seed in range(count)]
    work = Path(tempfile.mkdtemp(prefix="check-memory-"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{args.root}:{args.root / 'clients' / 'python'}"}
    env.update(dict(item.split("=", 1) for item in args.env))
    command = [
        sys.executable, "-m", "service", "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", "none",
        "--metrics-port", "0",
        "--models", "alexnet", "--weights", "random", "--model-store", str(work / "store"), *args.server_arg,
    ]  # fmt: skip
    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(command, cwd=args.root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            grpc.channel_ready_future(channel).result(timeout=240)
            stub = pb_grpc.FineTuningStub(channel)
            config = pb.FineTuneConfig(base_model="alexnet", output_model="memory", epochs=args.epochs)
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(2400):  # until the base model is loaded and warm
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service="alexnet"), timeout=10)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
            time.sleep(2.0)
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
            before = status_kb(server.pid, "VmRSS")
            examples = [pb.Example(image=data, label=str(i % 2)) for i, data in enumerate(images)]
            if args.scenario == "check":
                examples.append(pb.Example(image=b"\xff\xd8\xff\xe0 corrupt", label="0"))
            sampler = Sampler(server.pid)
            sampler.start()
            started = time.monotonic()
            final_state = ""
            try:
                job = stub.CreateJob(requests(config, examples), timeout=600)
                answer = "OK"
                for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=3600):
                    if args.scenario == "cancel" and event.kind == "features" and event.progress >= 0.15:
                        stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=60)
                    final_state = event.kind
                    final_message = event.message
            except grpc.RpcError as exc:
                answer = f"{exc.code().name}: {exc.details()[:80]}"
            seconds = time.monotonic() - started
            time.sleep(3.0)  # the job's last references go when its task has unwound
            peak = status_kb(server.pid, "VmHWM")
            final = status_kb(server.pid, "VmRSS")
            sampler.stopped.set()
            sampler.join()
        result = {
            "root": str(args.root),
            "scenario": args.scenario,
            "env": args.env,
            "images": count,
            "encoded_mb": round(sum(map(len, images)) / 1e6, 1),
            "answer": answer,
            "end": final_state and f"{final_state}: {final_message[:60]}",
            "seconds": round(seconds, 1),
            "rss_before_mb": round(before / 1024, 1),
            "peak_growth_mb": round((peak - before) / 1024, 1),
            "final_growth_mb": round((final - before) / 1024, 1),
            "rss_course_mb": [round(kb / 1024) for _, kb in sampler.samples[:: max(1, -(-len(sampler.samples) // 20))]],
        }
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
