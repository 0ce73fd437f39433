"""Restart and SIGTERM probe: what status codes clients see while a replica stops and restarts.

Each cycle starts ``vision-serve`` (AlexNet, random weights) on a store holding one
fine-tuned model, lets clients hammer ``ModelInfer`` for the built-in model and for
the fine-tuned one (retrying on UNAVAILABLE, as a client behind a Service would),
sends SIGTERM, and restarts the server on the same port. It counts every status code
the clients saw, split into "around SIGTERM" (from the signal until the process has
exited) and "around start-up" (from the restart until the clients stop).

A correct server answers only OK or UNAVAILABLE: never CANCELLED (a request it will not
run) and never NOT_FOUND for the fine-tuned model (a model the store holds).

    python -m bench.restart_probe --cycles 10 --clients 4
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

FINETUNED = "probe-head"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_store(store: Path) -> None:
    """Write one fine-tuned AlexNet head into ``store`` with the server's own store code."""
    import torch

    from service.finetune.heads import build_standardized_head
    from service.finetune.store import ModelStore
    from vision_client.protocol import HeadConfig

    torch.manual_seed(0)
    head = build_standardized_head(HeadConfig(), 4096, 3)
    ModelStore(store).save(
        name=FINETUNED, base_model="alexnet", head_spec=HeadConfig(), head=head,
        labels=["a", "b", "c"], loss="cross_entropy", job_id="probe",
    )  # fmt: skip


def request(model: str) -> pb.ModelInferRequest:
    pixels = np.zeros((1, 3, 64, 64), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="FP32", shape=list(pixels.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[pixels.tobytes()])


class Clients:
    """Threads that call ModelInfer in a loop and count status codes per phase."""

    def __init__(self, target: str, count: int) -> None:
        self.target = target
        self.phase = "idle"
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.unexpected: collections.Counter[str] = collections.Counter()  # status details of the bad answers
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _loop(self, index: int) -> None:
        model = FINETUNED if index % 2 else "alexnet"
        while not self._stop.is_set():
            with grpc.insecure_channel(self.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                while not self._stop.is_set():
                    phase = self.phase
                    try:
                        stub.ModelInfer(request(model), timeout=10)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                        if code not in ("OK", "UNAVAILABLE"):
                            with self._lock:
                                self.unexpected[f"{phase} {code}: {exc.details()}"] += 1
                    with self._lock:
                        self.counts[phase][f"{model.split('-')[0]}:{code}"] += 1
                    if code != "OK":
                        time.sleep(0.02)
                        if code == "UNAVAILABLE":
                            break  # a new channel, as a client would reconnect


def start(port: int, store: Path, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "service", "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", "none",
        "--metrics-port", "0", "--models", "alexnet", "--weights", "random",
        "--model-store", str(store), "--store-poll-seconds", "1", "--drain-seconds", "5",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_ready(target: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{target} not ready after {timeout}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steady-seconds", type=float, default=1.5)
    parser.add_argument("--json", type=Path, default=None, help="write the counts here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="restart-probe-"))
    store, log = work / "store", work / "server.log"
    seed_store(store)
    port = free_port()
    target = f"127.0.0.1:{port}"
    process = start(port, store, log)
    wait_ready(target)
    clients = Clients(target, args.clients)
    clients.start()
    try:
        for cycle in range(args.cycles):
            clients.phase = "steady"
            time.sleep(args.steady_seconds)
            clients.phase = "sigterm"
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(60)
            clients.phase = "startup"
            process = start(port, store, log)
            wait_ready(target)
            print(f"cycle {cycle + 1}: exit {exit_code}", flush=True)
        clients.phase = "steady"
        time.sleep(args.steady_seconds)
    finally:
        clients.stop()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    result = {phase: dict(sorted(counter.items())) for phase, counter in clients.counts.items()}
    print(json.dumps(result, indent=2))
    for details, count in clients.unexpected.most_common():
        print(f"{count:6d}  {details}")
    print(f"server log: {log}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    bad = sum(
        n
        for counter in clients.counts.values()
        for key, n in counter.items()
        if not key.endswith(("OK", "UNAVAILABLE"))
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
