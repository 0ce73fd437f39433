"""A dataset in the store against an upload of the same images: the server's peak memory.

20,000 small JPEGs (96x96, about 3.5 KB each: 70 MB) in ten classes go to moto's S3 server on
loopback, under ``s3://<bucket>/sets/big/<class>/``. Then, each on a fresh ``vision-serve`` child
process (the tiny model, ``--weights random``, the model store and ``--dataset-roots`` on the
same moto):

- ``dataset``: a job that names ``s3://<bucket>/sets/big/``: the server lists it and reads the
  images a chunk at a time while it extracts their features;
- ``upload``: a job that streams the same images in its CreateJob call (as today), which the server
  holds until their features are in.

Peak RSS is the kernel's VmHWM of the server process, reset through /proc/PID/clear_refs once the
server is warm, just before the job is sent; growth is measured from VmRSS at that moment. Last, a
prefix of 200 images of which one is corrupt (``sets/broken/``): the job fails and names the file.

    python -m bench.dataset_memory                      # 20,000 images, prints a table and JSON
    python -m bench.dataset_memory --images 2000 --json bench/results/dataset_memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from bench.machine import machine_info
from tests.support.servers import MotoServer, ServerProcess, start_server
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

CLASSES = 10
PER_MESSAGE = 200  # examples per CreateJob message of the upload
BROKEN_IMAGES = 200


def jpeg(seed: int, side: int = 96) -> bytes:
    """A smooth colour field with some texture, as a small photograph compresses."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def put_all(client: Any, bucket: str, objects: Iterator[tuple[str, bytes]]) -> None:
    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(client.put_object, Bucket=bucket, Key=key, Body=body) for key, body in objects]:
            future.result()


def serve(work: Path, bucket: str, env: dict[str, str]) -> ServerProcess:
    server = start_server(
        work, "--models", "tiny", "--weights", "random", "--runtime", "torch", "--http-port", "none",
        "--model-store", f"s3://{bucket}/models", "--dataset-roots", f"s3://{bucket}/sets", env=env,
    )  # fmt: skip
    server.wait_serving("tiny")
    return server


def run_job(server: ServerProcess, requests: Iterator[pb.CreateJobRequest]) -> dict[str, Any]:
    """Send one job, follow it to its end; the server's memory meanwhile."""
    pid = server.process.pid
    time.sleep(2.0)  # let start-up's last allocations settle before the baseline
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from the current RSS
    before = kb(pid, "VmRSS")
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append(kb(pid, "VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    end, message = "", ""
    options = [("grpc.max_send_message_length", 64 << 20)]
    try:
        with grpc.insecure_channel(server.target, options=options) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            job = stub.CreateJob(requests, timeout=1800)
            for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=3600):
                end, message = event.kind, event.message
    except grpc.RpcError as exc:
        end, message = exc.code().name, exc.details() or ""
    seconds = time.monotonic() - started
    time.sleep(3.0)  # the job's last references go when its task has unwound
    stop.set()
    sampler.join()
    peak, final = kb(pid, "VmHWM"), kb(pid, "VmRSS")
    return {
        "end": end,
        "message": message[:300],
        "seconds": round(seconds, 1),
        "rss_before_mb": round(before / 1024, 1),
        "peak_growth_mb": round((peak - before) / 1024, 1),
        "final_growth_mb": round((final - before) / 1024, 1),
        "rss_course_mb": [round(value / 1024) for value in samples[:: max(1, -(-len(samples) // 20))]],
    }


def config(name: str, dataset: str = "") -> pb.FineTuneConfig:
    return pb.FineTuneConfig(base_model="tiny", output_model=name, epochs=2, dataset=dataset)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=96, help="side of the JPEGs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dataset-memory-"))
    moto = MotoServer(work).start()
    env = moto.environment()
    os.environ.update(env)
    try:
        client, bucket = moto.client(), moto.new_bucket()
        labels = [f"class-{i % CLASSES}" for i in range(args.images)]
        started = time.monotonic()
        put_all(client, bucket, ((f"sets/big/{labels[i]}/{i:06d}.jpg", jpeg(i, args.side)) for i in range(args.images)))
        broken = ((f"sets/broken/class-{i % 2}/{i:06d}.jpg", jpeg(i, args.side)) for i in range(BROKEN_IMAGES))
        put_all(client, bucket, broken)
        client.put_object(Bucket=bucket, Key="sets/broken/class-1/scan 0042.jpg", Body=b"\xff\xd8\xff\xe0 cut short")
        encoded = sum(len(jpeg(i, args.side)) for i in range(args.images))
        print(
            f"{args.images} images ({encoded / 1e6:.1f} MB) put in {time.monotonic() - started:.0f}s", file=sys.stderr
        )

        results: dict[str, Any] = {"machine": machine_info(), "images": args.images, "encoded_mb": encoded / 1e6}
        server = serve(work, bucket, env)
        try:
            results["dataset"] = run_job(
                server, iter([pb.CreateJobRequest(config=config("big", f"s3://{bucket}/sets/big/"))])
            )
            results["bad_image"] = run_job(
                server, iter([pb.CreateJobRequest(config=config("broken", f"s3://{bucket}/sets/broken/"))])
            )
        finally:
            server.stop()

        def upload() -> Iterator[pb.CreateJobRequest]:
            yield pb.CreateJobRequest(config=config("big-upload"))
            for start in range(0, args.images, PER_MESSAGE):
                batch = [
                    pb.Example(image=jpeg(i, args.side), label=labels[i])
                    for i in range(start, min(start + PER_MESSAGE, args.images))
                ]
                yield pb.CreateJobRequest(examples=pb.ExampleBatch(examples=batch))

        server = serve(work, bucket, env)
        try:
            results["upload"] = run_job(server, upload())
        finally:
            server.stop()
    finally:
        moto.stop()
    print(f"{'job':<10} {'end':<10} {'seconds':>8} {'peak growth MB':>15} {'final growth MB':>16}")
    for name in ("dataset", "upload", "bad_image"):
        row = results[name]
        print(
            f"{name:<10} {row['end']:<10} {row['seconds']:>8} {row['peak_growth_mb']:>15} {row['final_growth_mb']:>16}"
        )
    print(f"the bad image: {results['bad_image']['message']}")
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
