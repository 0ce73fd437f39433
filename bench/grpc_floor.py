#!/usr/bin/env python3
"""The floor under the protocol's cost: what Python's gRPC alone costs a server per ModelInfer.

A bare server answers every ``ModelInfer`` with a fixed LOGITS [1, 1000] and does nothing else: no
parsing of the inputs, no region read, no batching, no model. Its CPU per request is what any server
written on ``grpcio`` in Python pays before its own code runs. Measured here for ``grpc.aio`` (what
``vision-serve`` runs on) and for the thread-pool server (``grpc.server``), beside ``vision-serve``
itself serving ``tiny`` with one process (``--frontends 1``), with the same clients in one run:
C closed-loop ``tritonclient.grpc`` clients (threads of this process, a connection each) sending
the requests of ``bench/ceiling.py``: one [1,3,224,224] image through system shared memory
(``pixels-shm``; the bare servers never read the region) or a [1,3,64,64] PIXELS tensor in the
message (``small``). Printed per point: requests/s, the server's CPU per request (from ``/proc``,
every thread), its cores, and the clients' CPU per request.

    .venv/bin/python -m bench.grpc_floor
    .venv/bin/python -m bench.grpc_floor --servers aio,vision-serve --inputs pixels-shm --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("aio", "sync", "vision-serve")
INPUT_SHAPES = {"pixels-shm": (1, 3, 224, 224), "small": (1, 3, 64, 64)}
CLASSES = 1000  # tiny answers ImageNet's 1,000 classes: the bare servers answer as many


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"of {', '.join(SERVERS)} [default: all]")
    parser.add_argument("--inputs", default="pixels-shm,small", help="pixels-shm and/or small [default: both]")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop clients [default: 1,8,32]")
    parser.add_argument("--seconds", type=float, default=6.0, help="each window [default: 6]")
    parser.add_argument("--warmup-seconds", type=float, default=2.0, help="before each window [default: 2]")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "grpc_floor.json", help="JSON")
    return parser


# -- the bare servers (child processes: their CPU is theirs alone) ---------------------------------


def _fixed_response(request: Any) -> Any:
    from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    response.outputs.add(name="LOGITS", datatype="FP32", shape=[1, CLASSES])
    response.raw_output_contents.append(bytes(4 * CLASSES))
    return response


def _serve_bare(kind: str, ports: Any) -> None:
    import grpc

    from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc

    if kind == "sync":
        from concurrent import futures

        class Blocking(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
            def ModelInfer(self, request: Any, context: Any) -> Any:
                return _fixed_response(request)

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Blocking(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        server.wait_for_termination()
        return

    class Async(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ModelInfer(self, request: Any, context: Any) -> Any:
            return _fixed_response(request)

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Async(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


class Bare:
    """A bare server in a child process."""

    registers_regions = False

    def __init__(self, kind: str) -> None:
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        self.process = context.Process(target=_serve_bare, args=(kind, ports), daemon=True)
        self.process.start()
        self.target = f"127.0.0.1:{ports.get(timeout=60)}"
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.kill()
        self.process.join(10)


class VisionServe:
    """``vision-serve`` serving ``tiny`` with one process."""

    registers_regions = True

    def __init__(self, logs: Path) -> None:
        from tests.support.servers import start_server

        self._process = start_server(
            logs, "--models", "tiny", "--weights", "random", "--frontends", "1", "--max-batch-size", "32",
            "--runtime-threads", "1",
        )  # fmt: skip
        self._process.wait_serving()
        self.target = self._process.target
        self.pid = self._process.process.pid

    def stop(self) -> None:
        self._process.stop()


# -- the clients ----------------------------------------------------------------------------------


def _client_loop(server: Any, name: str, index: int, stop: threading.Event, counts: list[int]) -> None:
    import tritonclient.grpc as triton
    import tritonclient.utils.shared_memory as shm

    client = triton.InferenceServerClient(server.target, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    pixels = np.random.default_rng(index).standard_normal(INPUT_SHAPES[name], dtype=np.float32)
    tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
    region = None
    region_name = f"floor-{os.getpid()}-{index}"
    if name == "pixels-shm":
        region = shm.create_shared_memory_region(region_name, f"/{region_name}", pixels.nbytes)
        shm.set_shared_memory_region(region, [pixels])
        if server.registers_regions:
            client.register_system_shared_memory(region_name, f"/{region_name}", pixels.nbytes)
        tensor.set_shared_memory(region_name, pixels.nbytes)
    else:
        tensor.set_data_from_numpy(pixels)
    try:
        while not stop.is_set():
            client.infer("tiny", [tensor], client_timeout=60)
            counts[index] += 1
    finally:
        if region is not None:
            if server.registers_regions:
                client.unregister_system_shared_memory(region_name)
            shm.destroy_shared_memory_region(region)
        client.close()


def measure(server: Any, name: str, concurrency: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    from bench.machine import own_cpu_seconds, process_tree

    stop = threading.Event()
    counts = [0] * concurrency
    threads = [
        threading.Thread(target=_client_loop, args=(server, name, i, stop, counts), daemon=True)
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    pids = process_tree(server.pid)
    server_before = sum(own_cpu_seconds(pid) for pid in pids)
    clients_before = time.process_time()  # this process: the clients
    done_before, started = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, elapsed = sum(counts) - done_before, time.perf_counter() - started
    server_cpu = sum(own_cpu_seconds(pid) for pid in pids) - server_before
    clients_cpu = time.process_time() - clients_before
    stop.set()
    for thread in threads:
        thread.join(60)
    return {
        "concurrency": concurrency,
        "requests_per_s": done / elapsed,
        "server_cpu_ms_per_request": 1000 * server_cpu / max(1, done),
        "server_cores": server_cpu / elapsed,
        "client_cpu_ms_per_request": 1000 * clients_cpu / max(1, done),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench.machine import machine_info
    from bench.records import write_document

    kinds = [kind.strip() for kind in args.servers.split(",") if kind.strip()]
    inputs = [name.strip() for name in args.inputs.split(",") if name.strip()]
    if not set(kinds) <= set(SERVERS) or not set(inputs) <= set(INPUT_SHAPES):
        raise SystemExit(f"grpc_floor.py: error: --servers of {SERVERS}, --inputs of {tuple(INPUT_SHAPES)}")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    print(f"# server CPU per ModelInfer; {os.cpu_count()} cores on this machine", flush=True)
    print(f"{'server':>12} {'input':>10} {'C':>3} {'req/s':>8} {'server ms/req':>13} {'cores':>6} "
          f"{'clients ms/req':>14}")  # fmt: skip
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vision-floor-") as logs:
        starters: dict[str, Callable[[], Any]] = {
            "aio": lambda: Bare("aio"),
            "sync": lambda: Bare("sync"),
            "vision-serve": lambda: VisionServe(Path(logs)),
        }
        for kind in kinds:
            server = starters[kind]()
            try:
                for name in inputs:
                    for concurrency in levels:
                        point = measure(server, name, concurrency, args.seconds, args.warmup_seconds)
                        point.update(server=kind, input=name)
                        points.append(point)
                        print(
                            f"{kind:>12} {name:>10} {concurrency:>3} {point['requests_per_s']:>8.0f} "
                            f"{point['server_cpu_ms_per_request']:>13.3f} {point['server_cores']:>6.2f} "
                            f"{point['client_cpu_ms_per_request']:>14.3f}",
                            flush=True,
                        )
            finally:
                server.stop()
    write_document(args.output, {"machine": machine_info(), "command": sys.argv, "points": points})
    return 0


if __name__ == "__main__":
    sys.exit(main())
