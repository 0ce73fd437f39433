"""The servers a benchmark run measures: ``vision-serve`` child processes started through the
tests' own harness (:mod:`tests.support.servers`), one per model and ``--runtime``."""

from __future__ import annotations

import argparse
import os
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.inputs import infer_input
from bench.load import Target
from bench.records import EAGER, ServerRecord
from tests.support.servers import ROOT, ServerProcess, start_server

STARTUP_TIMEOUT_S = 900.0  # an empty runtime cache means exporting first


@dataclass
class BenchServer:
    process: ServerProcess
    target: Target
    ready_seconds: float


def _log_tail(process: ServerProcess, lines: int = 40) -> str:
    return "\n".join(process.log().splitlines()[-lines:])


def _start_pinned(cpus: list[int] | None, spawn: Callable[[], ServerProcess]) -> ServerProcess:
    """``spawn()`` from a thread pinned to ``cpus`` (None: as is), so the server inherits the pinning."""
    if cpus is None:
        return spawn()
    spawned: list[ServerProcess] = []

    def pinned() -> None:
        os.sched_setaffinity(0, cpus)  # this thread only: the process it forks inherits it
        spawned.append(spawn())

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    if not spawned:
        raise RuntimeError(f"could not start the server pinned to CPUs {cpus}")
    return spawned[0]


def start(
    args: argparse.Namespace, model: str, runtime: str, env: dict[str, str], log_dir: Path, root: Path = ROOT
) -> BenchServer:
    """Start a server for ``model`` under ``--runtime runtime`` and wait until it serves (the
    ``service`` package of checkout ``root``)."""
    options = [
        "--models", model, "--weights", args.weights, "--device", args.device,
        "--max-batch-size", str(args.max_batch_size),
        "--runtime", runtime, "--runtime-cache", str(args.runtime_cache),
        "--runtime-threads", str(args.runtime_threads),
        *([] if args.max_queue_delay_ms is None else ["--max-queue-delay-ms", str(args.max_queue_delay_ms)]),
        *shlex.split(args.server_args),
    ]  # fmt: skip
    directory = log_dir / f"{model}-{runtime}"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    process = _start_pinned(args.server_cpus, lambda: start_server(directory, *options, env=env, root=root))
    try:
        process.wait_serving("", timeout=STARTUP_TIMEOUT_S)
    except BaseException:
        process.stop()
        raise
    ready = time.monotonic() - started
    target = Target(
        url=process.target,
        metrics_url=process.metrics_url,
        pid=process.process.pid,
        runtime=served_runtime(process.target, model),
        alive=process.alive,
        log_tail=lambda: _log_tail(process),
    )
    return BenchServer(process, target, ready)


def served_runtime(target: str, model: str) -> str:
    """What the server runs ``model`` in, as ``vision.v1.Models`` reports it."""
    import grpc

    from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(name=model), timeout=10).runtime


def record(server: BenchServer, model: str, runtime: str, raws: dict[str, Any], jpegs: list[bytes],
           pixels: list[Any], raw_thread: Any) -> ServerRecord:  # fmt: skip
    """The server's record, with the agreement of its logits with every raw baseline's."""
    import tritonclient.grpc as grpcclient

    agreement: dict[str, float] = {}
    with grpcclient.InferenceServerClient(server.target.url) as client:
        for mode, payload in (
            ("image", np.array([jpegs[0]], dtype=np.object_)),
            ("pixels", pixels[0].unsqueeze(0).numpy()),
        ):
            got = client.infer(model, [infer_input(grpcclient, mode, payload)]).as_numpy("LOGITS")
            for baseline, raw in raws.items():
                reference = raw_thread.call(raw.forward, pixels[0].unsqueeze(0))
                a, b = got.ravel().astype(np.float64), reference.ravel().astype(np.float64)
                agreement[f"{mode}_vs_{baseline}_max_rel_diff"] = float(np.abs(a - b).max() / np.abs(b).max())
                agreement[f"{mode}_vs_{baseline}_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    worst = min(v for k, v in agreement.items() if k.endswith("cosine"))
    if worst < 0.9999:
        print(f"# WARNING {model} ({runtime}): service and raw logits differ ({agreement})", flush=True)
    assert EAGER in raws
    return ServerRecord(
        model=model,
        runtime_option=runtime,
        runtime=server.target.runtime,
        command=shlex.join(server.process.args),
        log=str(server.process.log_path),
        ready_seconds=server.ready_seconds,
        agreement=agreement,
    )
