"""Load generation: C closed-loop clients sending single-image requests, and what they saw.

Each client sends its next request as soon as the previous one is answered. The loop's
bookkeeping (when to stop, which input is next, what was answered when, what failed) is
:class:`ClosedLoopClient`, written once; ``--client threads`` drives it from one thread
and one ``tritonclient.grpc`` client per C, ``--client aio`` from C tasks on one
``tritonclient.grpc.aio`` event loop.

Mode ``pixels-shm`` sends PIXELS through Triton's system shared memory: each client has one
region (``tritonclient.utils.shared_memory``) holding every payload at its own offset, written
once before the clock starts (as a producer writing frames in place would), and room for LOGITS,
which the server writes there and the client reads back after each answer.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.inputs import infer_input
from bench.machine import process_cpu_seconds, system_busy_seconds
from bench.records import ServiceResult

WARMUP_CAP_S = 600.0  # a point whose clients cannot all finish two requests by then is an error
SHM_MODE = "pixels-shm"
OUTPUT_ROOM = 64 * 1024  # bytes of each client's region for LOGITS (one image's are 4 KB for 1000 classes)


# Each client its own TCP connection, as clients in processes of their own have: gRPC's global
# subchannel pool would otherwise carry every channel to one address over one connection (and the
# kernel spreads connections, not requests, over a server's protocol processes).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Call:
    """One request of a client: its inputs, and where its LOGITS come back."""

    inputs: list[Any]
    outputs: list[Any] | None = None
    region: Any = None  # a tritonclient shared memory handle holding LOGITS at ``offset``, or None
    offset: int = 0

    def logits(self, result: Any) -> Any:
        if self.region is None:
            return result.as_numpy("LOGITS")
        import tritonclient.utils.shared_memory as shm

        output = result.get_output("LOGITS")
        return shm.get_contents_as_numpy(self.region, np.float32, list(output.shape), self.offset)


class ClientRegion:
    """One client's system shared memory region: every payload at its own offset, then LOGITS."""

    def __init__(self, module: Any, url: str, index: int, payloads: list[np.ndarray]) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        self.name = f"bench-{os.getpid()}-{index}"
        self._url = url
        offsets = np.cumsum([0] + [p.nbytes for p in payloads]).tolist()
        output_at = offsets[-1]
        self.handle = shm.create_shared_memory_region(self.name, "/" + self.name, output_at + OUTPUT_ROOM)
        for payload, offset in zip(payloads, offsets, strict=False):
            shm.set_shared_memory_region(self.handle, [payload], offset=offset)
        with grpcclient.InferenceServerClient(url) as client:
            client.register_system_shared_memory(self.name, "/" + self.name, output_at + OUTPUT_ROOM)
        self.calls = []
        for payload, offset in zip(payloads, offsets, strict=False):
            tensor = module.InferInput("PIXELS", list(payload.shape), "FP32")
            tensor.set_shared_memory(self.name, payload.nbytes, offset)
            output = module.InferRequestedOutput("LOGITS")
            output.set_shared_memory(self.name, OUTPUT_ROOM, output_at)
            self.calls.append(Call([tensor], [output], self.handle, output_at))

    def close(self) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        try:
            with grpcclient.InferenceServerClient(self._url) as client:
                client.unregister_system_shared_memory(self.name)
        finally:
            shm.destroy_shared_memory_region(self.handle)


class Clock:
    """Shared between the clients and the conductor: when to stop, how far warm-up has got."""

    def __init__(self, clients: int) -> None:
        self.stop_at = float("inf")
        self.done = [0] * clients


@dataclass
class ClosedLoopClient:
    """One client's loop state: the inputs it cycles through and the (start, end) of each answer."""

    index: int
    clock: Clock
    inputs: list[Any]
    spans: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _sent: int = 0
    _started: float = 0.0

    def next_input(self) -> Any | None:
        """The next request's input, or None when the window is over."""
        self._started = time.perf_counter()
        if self._started >= self.clock.stop_at:
            return None
        payload = self.inputs[(self.index + self._sent) % len(self.inputs)]
        self._sent += 1
        return payload

    def answered(self) -> None:
        self.spans.append((self._started, time.perf_counter()))
        self.clock.done[self.index] += 1

    def failed(self, exc: BaseException) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}"[:300])


def _drive_sync(client: ClosedLoopClient, url: str, model: str, ready: threading.Barrier) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION) as triton:
        ready.wait()
        while (call := client.next_input()) is not None:
            try:
                call.logits(triton.infer(model, call.inputs, outputs=call.outputs))
            except Exception as exc:
                client.failed(exc)
                time.sleep(0.01)
            else:
                client.answered()


async def _drive_async(clients: list[ClosedLoopClient], url: str, model: str, go: threading.Event) -> None:
    import tritonclient.grpc.aio as aioclient

    async def one(client: ClosedLoopClient) -> None:
        triton = aioclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
        try:
            while (call := client.next_input()) is not None:
                try:
                    call.logits(await triton.infer(model, call.inputs, outputs=call.outputs))
                except Exception as exc:
                    client.failed(exc)
                    await asyncio.sleep(0.01)
                else:
                    client.answered()
        finally:
            await triton.close()

    await asyncio.to_thread(go.wait)
    await asyncio.gather(*(one(c) for c in clients))


def start_clients(
    kind: str,
    url: str,
    model: str,
    mode: str,
    payloads: list[np.ndarray],
    concurrency: int,
    regions: list[ClientRegion],
) -> tuple[Clock, list[ClosedLoopClient], list[threading.Thread]]:
    """Start C clients (``kind``: threads or aio); they run until ``clock.stop_at``. In shared
    memory mode each client's region is appended to ``regions`` (the caller closes them)."""
    if kind == "threads":
        import tritonclient.grpc as module
    else:
        import tritonclient.grpc.aio as module  # type: ignore[no-redef]
    clock = Clock(concurrency)
    clients = []
    for index in range(concurrency):
        if mode == SHM_MODE:
            regions.append(ClientRegion(module, url, index, payloads))
            calls = regions[-1].calls
        else:
            calls = [Call([infer_input(module, mode, p)]) for p in payloads]
        clients.append(ClosedLoopClient(index, clock, calls))
    if kind == "threads":
        barrier = threading.Barrier(concurrency + 1)
        threads = [threading.Thread(target=_drive_sync, args=(c, url, model, barrier), daemon=True) for c in clients]
        for thread in threads:
            thread.start()
        barrier.wait()
    else:
        go = threading.Event()
        threads = [threading.Thread(target=lambda: asyncio.run(_drive_async(clients, url, model, go)), daemon=True)]
        threads[0].start()
        time.sleep(0.2)  # let the loop create its channels before the clock starts
        go.set()
    return clock, clients, threads


def server_histograms(metrics_url: str, model: str) -> dict[str, float]:
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
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
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
            for suffix in ("_sum", "_count"):
                if sample.name.endswith(suffix):
                    out[key + suffix] = out.get(key + suffix, 0.0) + sample.value
    return out


@dataclass
class Target:
    """The server under load: where to send, where its metrics are, how to check on it."""

    url: str
    metrics_url: str
    pid: int
    runtime: str
    alive: Callable[[], bool]
    log_tail: Callable[[], str]


def requests_served(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Requests served in the window [t0, t1], each counted by the share of its span inside it.

    Counting the requests that *end* inside the window is biased when answers come in bursts: a
    batching server answers a whole batch of clients at once, and the window opens just after
    warm-up saw an answer, so a window 3.3 passes long counts 3 of them every time (ResNet101's
    passes of 16 images on one thread last 3 s: 10% low in a 10 s window). A closed-loop client's
    requests tile its time, so their shares of the window add up to what it was served there,
    whatever the phase of the passes.
    """
    served = 0.0
    for start, end in spans:
        inside = min(end, t1) - max(start, t0)
        if inside > 0:
            served += inside / (end - start)
    return served


def measure_service(target: Target, model: str, mode: str, concurrency: int, payloads: list[np.ndarray],
                    *, window_s: float, warmup_s: float, client: str) -> ServiceResult:  # fmt: skip
    """C closed-loop clients; images/s and latency over a window after warm-up."""
    regions: list[ClientRegion] = []
    try:
        return _measure(target, model, mode, concurrency, payloads, window_s, warmup_s, client, regions)
    finally:
        for region in regions:
            region.close()


def _measure(target: Target, model: str, mode: str, concurrency: int, payloads: list[np.ndarray], window_s: float,
             warmup_s: float, client: str, regions: list[ClientRegion]) -> ServiceResult:  # fmt: skip
    clock, clients, threads = start_clients(client, target.url, model, mode, payloads, concurrency, regions)
    try:
        # Warm-up: warmup_s, and until every client has had two answers (the first batches
        # of each size are slow while oneDNN primes them; slow models need seconds per batch).
        begun = time.perf_counter()
        while time.perf_counter() - begun < warmup_s or min(clock.done) < 2:
            if time.perf_counter() - begun > WARMUP_CAP_S:
                errors = [e for c in clients for e in c.errors]
                raise RuntimeError(f"warm-up did not finish in {WARMUP_CAP_S:.0f}s; errors: {errors[:3]}\n"
                                   f"{target.log_tail()}")  # fmt: skip
            if not target.alive():
                raise RuntimeError(f"vision-serve died:\n{target.log_tail()}")
            time.sleep(0.05)
        warmed = time.perf_counter() - begun

        metrics0 = server_histograms(target.metrics_url, model)
        busy0, server0, client0 = system_busy_seconds(), process_cpu_seconds(target.pid), time.process_time()
        t0 = time.perf_counter()
        t1 = t0 + window_s
        clock.stop_at = t1
        time.sleep(max(0.0, t1 - time.perf_counter()))
        busy1, server1, client1 = system_busy_seconds(), process_cpu_seconds(target.pid), time.process_time()
        metrics1 = server_histograms(target.metrics_url, model)
    except BaseException:
        clock.stop_at = 0.0  # clients stop after their current request
        raise
    for thread in threads:
        thread.join()  # in-flight requests finish: the part of them inside the window counts

    spans = [span for c in clients for span in c.spans]
    ended = [(s, e) for (s, e) in spans if t0 <= e <= t1]
    served = requests_served(spans, t0, t1)
    latencies_ms = np.array([1000 * (e - s) for s, e in ended]) if ended else np.array([float("nan")])
    errors = [e for c in clients for e in c.errors]
    delta = {k: metrics1.get(k, 0.0) - metrics0.get(k, 0.0) for k in metrics1}
    batches = delta.get("batch_size_count", 0.0)
    requests = delta.get("request_seconds_count", 0.0)
    queued = delta.get("queue_seconds_count", 0.0)
    compute = delta.get("compute_seconds_sum", 0.0)
    return ServiceResult(
        runtime=target.runtime,
        concurrency=concurrency,
        client=client,
        warmup_s=warmed,
        seconds=window_s,
        requests=len(ended),
        images_per_s=served / window_s,
        latency_ms_p50=float(np.percentile(latencies_ms, 50)),
        latency_ms_p90=float(np.percentile(latencies_ms, 90)),
        latency_ms_p99=float(np.percentile(latencies_ms, 99)),
        latency_ms_mean=float(latencies_ms.mean()),
        errors=len(errors),
        error_examples=sorted(set(errors))[:3],
        server_cpu_cores_used=(server1 - server0) / window_s,
        server_cpu_seconds_per_image=(server1 - server0) / served if served else None,
        client_cpu_cores_used=(client1 - client0) / window_s,
        other_processes_cpu_cores=max(0.0, (busy1 - busy0 - (server1 - server0) - (client1 - client0)) / window_s),
        server_batches=batches,
        server_batch_size_mean=delta.get("batch_size_sum", 0.0) / batches if batches else None,
        server_compute_busy_fraction=compute / window_s,
        server_compute_ms_per_batch_mean=1000 * compute / batches if batches else None,
        server_queue_ms_mean=1000 * delta.get("queue_seconds_sum", 0.0) / queued if queued else None,
        server_request_ms_mean=1000 * delta.get("request_seconds_sum", 0.0) / requests if requests else None,
    )
