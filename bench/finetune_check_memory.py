"""Server memory while CreateJob checks large images: peak RSS growth of the server process.

Sends one fine-tuning job of N large JPEGs (default 6 of 5000x5000) followed by one
corrupt image, so that the job is refused once every image has been checked and the
measurement covers the check alone (no feature extraction). Peak RSS is the kernel's
VmHWM, reset through /proc/PID/clear_refs before the job.

    python -m bench.finetune_check_memory                   # this tree's server
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
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent.parent


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HERE, help="checkout whose server is measured")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--side", type=int, default=5000)
    args = parser.parse_args()
    images = [big_jpeg(args.side, seed) for seed in range(args.images)]
    work = Path(tempfile.mkdtemp(prefix="check-memory-"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{args.root}:{args.root / 'clients' / 'python'}"}
    command = [
        sys.executable, "-m", "service", "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", "none",
        "--metrics-port", "0",
        "--models", "alexnet", "--weights", "random", "--model-store", str(work / "store"),
    ]  # fmt: skip
    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(command, cwd=args.root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=240)
            stub = pb_grpc.FineTuningStub(channel)
            config = pb.FineTuneConfig(base_model="alexnet", output_model="memory", epochs=1)
            for _ in range(2400):  # until the base model is loaded
                try:
                    stub.CreateJob(iter([pb.CreateJobRequest(config=config)]), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                        break
                time.sleep(0.1)
            time.sleep(2.0)
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
            before = status_kb(server.pid, "VmRSS")
            examples = [pb.Example(image=data, label=str(i % 2)) for i, data in enumerate(images)]
            examples.append(pb.Example(image=b"\xff\xd8\xff\xe0 corrupt", label="0"))
            requests = [pb.CreateJobRequest(config=config)] + [
                pb.CreateJobRequest(examples=pb.ExampleBatch(examples=[example])) for example in examples
            ]
            started = time.monotonic()
            try:
                stub.CreateJob(iter(requests), timeout=300)
                answer = "OK"
            except grpc.RpcError as exc:
                answer = f"{exc.code().name}: {exc.details()[:80]}"
            seconds = time.monotonic() - started
            peak = status_kb(server.pid, "VmHWM")
        result = {
            "root": str(args.root),
            "images": args.images,
            "side": args.side,
            "encoded_mb": round(sum(map(len, images)) / 1e6, 1),
            "answer": answer,
            "seconds": round(seconds, 2),
            "rss_before_mb": round(before / 1024, 1),
            "peak_growth_mb": round((peak - before) / 1024, 1),
        }
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
