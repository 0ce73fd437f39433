"""The model store on S3-compatible storage (moto's server on loopback): what a poll costs, and how
long a head trained on one replica takes to be served by another.

1. Poll cost: a bucket with N fine-tuned models (linear heads on AlexNet's 4,096 features, 10
   classes, 160 KB of weights each) and 100 job records; a replica's first pass (reads every
   model) and a steady pass (nothing changed: the pass a replica makes every
   ``--store-poll-seconds``), counted as S3 requests and response body bytes.
2. Visibility: two ``vision-serve`` processes (AlexNet, seeded random weights) on one bucket; a
   job on the first, then the time from the job's end (its last event at the client) until the
   second's health service says the new model is SERVING.

    .venv/bin/python -m bench.store_poll --models 1,200 --jobs 5 --poll-seconds 1,5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench.machine import machine_info
from service.finetune.heads import build_standardized_head
from service.finetune.store import ModelStore
from service.finetune.trainer import TrainMetrics
from service.storage import S3Location
from tests.support.servers import MotoServer, start_server
from vision_client import Client, FineTuneConfig, HeadConfig

ROOT = Path(__file__).resolve().parent.parent


class Counter:
    """S3 requests and response body bytes of one boto3 client."""

    def __init__(self, store: ModelStore) -> None:
        self.requests = 0
        self.bytes = 0
        client = store.objects._client  # type: ignore[attr-defined]
        client.meta.events.register("after-call.s3", self._count)

    def _count(self, http_response: Any = None, **_: Any) -> None:
        self.requests += 1
        if http_response is not None:  # the header: reading .content would consume a GetObject's body
            self.bytes += int(http_response.headers.get("content-length") or 0)

    def reset(self) -> tuple[int, int]:
        seen = (self.requests, self.bytes)
        self.requests = self.bytes = 0
        return seen


def fill(location: S3Location, models: int) -> None:
    writer = ModelStore(location)
    head = build_standardized_head(HeadConfig(), 4096, 10)
    for i in range(models):
        manifest = writer.stage(
            name=f"model-{i:04d}", base_model="alexnet", head_spec=HeadConfig(), head=head,
            labels=[f"class-{c}" for c in range(10)], loss="cross_entropy", metrics=TrainMetrics(), job_id="bench",
        )  # fmt: skip
        writer.commit(manifest, replace=False)
    for i in range(100):
        record = {"format_version": 1, "id": f"{i:012x}", "state": "succeeded"}
        writer.objects.write(f".jobs/{1_700_000_000_000 + i:013d}-{i:012x}.json", json.dumps(record).encode())


def poll_cost(moto: MotoServer, models: int) -> dict[str, Any]:
    location = S3Location(moto.new_bucket(), "serving")
    fill(location, models)
    replica = ModelStore(location)
    counter = Counter(replica)
    listing, _ = replica.listing()
    for name in listing:  # the first pass reads every model
        replica.load(name)
    first = counter.reset()
    steady = []
    for _ in range(5):
        listing, _ = replica.listing()
        replica.collect_orphans(listing)
        steady.append(counter.reset())
    requests, body = steady[-1]
    return {
        "models": models,
        "first_pass_requests": first[0],
        "first_pass_bytes": first[1],
        "steady_pass_requests": requests,
        "steady_pass_bytes": body,
    }


def examples() -> list[tuple[bytes, str]]:
    out = []
    for i in range(16):
        label = ("dark", "light")[i % 2]
        shade = 30 + i if label == "dark" else 220 - i
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (shade, shade, shade)).save(buffer, format="PNG")
        out.append((buffer.getvalue(), label))
    return out


def serving(health: health_pb2_grpc.HealthStub, name: str) -> bool:
    try:
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:  # not known yet
            return False
        raise
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def visibility(moto: MotoServer, folder: Path, poll_seconds: float, jobs: int) -> dict[str, Any]:
    location = S3Location(moto.new_bucket(), "serving")
    env = moto.environment()
    args = ("--models", "alexnet", "--weights", "random", "--model-store", str(location),
            "--store-poll-seconds", str(poll_seconds), "--runtime-cache", str(folder / "runtimes"))  # fmt: skip
    first, second = start_server(folder, *args, env=env), start_server(folder, *args, env=env)
    delays = []
    try:
        first.wait_serving()
        second.wait_serving()
        with Client(first.target) as sdk, grpc.insecure_channel(second.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for i in range(jobs):
                name = f"visible-{i}"
                config = FineTuneConfig(base_model="alexnet", output_model=name, epochs=2, seed=i)
                result = sdk.fine_tune(config, examples(), timeout=300)
                ended = time.monotonic()
                assert result.state == "succeeded", result.error
                while not serving(health, name):
                    time.sleep(0.01)
                delays.append(time.monotonic() - ended)
    finally:
        first.stop()
        second.stop()
    return {
        "poll_seconds": poll_seconds,
        "jobs": jobs,
        "delay_s_min": min(delays),
        "delay_s_median": statistics.median(delays),
        "delay_s_max": max(delays),
        "delays_s": delays,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1,200", help="fine-tuned models in the bucket, comma-separated")
    parser.add_argument("--jobs", type=int, default=5, help="jobs per poll interval for the visibility figure")
    parser.add_argument("--poll-seconds", default="1,5", help="--store-poll-seconds of the replicas, comma-separated")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "store_poll.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        moto = MotoServer(folder).start()
        os.environ.update(moto.environment())
        try:
            costs = [poll_cost(moto, int(n)) for n in args.models.split(",")]
            print("models  first pass: requests  bytes    steady pass: requests  bytes")
            for c in costs:
                print(f"{c['models']:>6}  {c['first_pass_requests']:>20}  {c['first_pass_bytes']:>9,}"
                      f"  {c['steady_pass_requests']:>21}  {c['steady_pass_bytes']:>7,}")  # fmt: skip
            seen = []
            for poll_seconds in (float(p) for p in args.poll_seconds.split(",") if p):
                if args.jobs:
                    seen.append(visibility(moto, folder, poll_seconds, args.jobs))
                    v = seen[-1]
                    print(f"poll every {poll_seconds:g} s: job end -> served on the other replica "
                          f"min {v['delay_s_min']:.2f} s, median {v['delay_s_median']:.2f} s, "
                          f"max {v['delay_s_max']:.2f} s ({v['jobs']} jobs)")  # fmt: skip
        finally:
            moto.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine_info(), "poll_cost": costs, "visibility": seen}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
