"""A model instance (a runtime backend and what it outputs), and the worker thread that feeds it batches."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.config import TORCH
from service.engine.batching import BatchQueue, WorkItem
from service.engine.devices import device_label
from service.errors import DeadlineExceededError, InternalError
from service.host.cpus import use_torch_threads
from service.runtimes.base import FEATURES, LOGITS, Backend, Output
from service.telemetry.tracing import TracedItem, record_batch

log = logging.getLogger(__name__)


class ModelInstance:
    """What one worker runs: a backend (one network on one device, in one runtime), the output
    it serves, and for fine-tuned models a torch head applied to the backbone's features.

    Derived instances (a backbone's features, a fine-tuned head on it) share their
    base instance's weights through :meth:`Backend.share`.

    Instances that divided a CPU's cores among them (``--instances``) may also hold a ``lone``
    backend on every core, shared by them all: a batch that runs while no other instance computes
    (one client) runs there, so that dividing the cores costs nothing when only one would use them.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        output: Output = LOGITS,
        head: torch.nn.Module | None = None,
        lone: Backend | None = None,
    ) -> None:
        self.backend = backend
        self.lone = lone
        self.output: Output = FEATURES if head is not None else output
        self.head = head
        self.device = backend.device
        self.label = device_label(backend.device)

    @property
    def runtime(self) -> str:
        return self.backend.runtime

    def features(self) -> ModelInstance:
        """Another instance on the same weights that returns the backbone's features."""
        return ModelInstance(self.backend.share(), output=FEATURES, lone=self._lone_share())

    def with_head(self, head: torch.nn.Module) -> ModelInstance:
        """Another instance on the same weights that runs ``head`` (copied here) on the features."""
        head_device = self.device if self.runtime == TORCH else torch.device("cpu")
        head = copy.deepcopy(head).to(head_device, self.backend.dtype).eval()
        return ModelInstance(self.backend.share(), head=head, lone=self._lone_share())

    def _lone_share(self) -> Backend | None:
        return None if self.lone is None else self.lone.share()

    def forward(self, parts: list[torch.Tensor], *, alone: bool = False) -> np.ndarray:
        """Run the batch made of ``parts`` and return float32 outputs on the host; ``alone``: no
        other instance computes now (the batch may take every core, see the class)."""
        return self.forward_timed(parts, alone=alone)[0]

    def forward_timed(
        self, parts: list[torch.Tensor], *, alone: bool = False, staging: HostStaging | None = None
    ) -> tuple[np.ndarray, PhaseTimes]:
        """:meth:`forward`, and how long its input copy, forward pass and output copy took.

        ``staging``: the calling worker's memory to gather a batch of several parts into on the host
        (see :class:`HostStaging`). On CUDA the phases are separated by synchronizing the device;
        copies are asynchronous, so without that the forward pass would absorb them.
        """
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda device=None: None)
        with torch.inference_mode():
            started = time.monotonic()
            backend = self.lone if alone and self.lone is not None else self.backend
            if staging is not None and self.device.type == "cpu":
                parts = staging.gather(parts)
            batch = backend.gather(parts)
            sync(self.device)
            copied = time.monotonic()
            output = backend.run(batch, self.output)
            if self.head is not None:
                output = self.head(output)
            sync(self.device)
            computed = time.monotonic()
            result = output.float().cpu().numpy()
            if staging is not None and staging.holds(result):
                result = result.copy()  # the next batch is gathered there: answers keep their own
            finished = time.monotonic()
        return result, PhaseTimes(copied - started, computed - copied, finished - computed)

    def warm_up(self, shape: tuple[int, int, int]) -> None:
        self.forward([torch.zeros((1, *shape))])
        if self.lone is not None:
            self.forward([torch.zeros((1, *shape))], alone=True)


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` where the system shows it too (``top -H``, ``/proc``'s
    ``comm``, 15 bytes of it): Linux only, and nothing happens elsewhere. ``bench/ceiling.py``
    tells the forward passes' CPU from the protocol's by it."""
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_bytes(name.encode()[:15])


STAGING_MAX_BYTES = 64 * 1024 * 1024  # a larger batch is gathered into memory of its own, freed after it


class HostStaging:
    """One worker's host memory for gathering a batch's parts into one tensor, kept from batch to batch.

    A batch gathered into fresh memory costs the kernel a page fault per 4 KiB on every batch: the
    allocator maps anything of 1 MiB or more anew (``service.host.memory``) and zeroes it page by page.
    Measured: 1.5 ms of system time per batch of 8 [1,3,224,224] images, against 8 us into memory
    kept (bench/README.md, "The protocol's own ceiling"). The buffer grows to the largest batch
    the worker has gathered (at most :data:`STAGING_MAX_BYTES`) and is reused only once the batch
    before is done: a backend reads its input during :meth:`~service.runtimes.base.Backend.run`
    only, and nothing keeps it after.
    """

    def __init__(self, max_bytes: int = STAGING_MAX_BYTES) -> None:
        self._max_values = max_bytes // 4
        self._buffer: torch.Tensor | None = None

    def gather(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``parts`` as one tensor in the kept memory, where they are several float32 CPU tensors of
        one image shape; else ``parts`` as they are."""
        if len(parts) < 2:
            return parts
        shape = parts[0].shape[1:]
        if any(p.dtype != torch.float32 or p.device.type != "cpu" or p.shape[1:] != shape for p in parts):
            return parts
        rows = sum(int(p.shape[0]) for p in parts)
        values = rows * math.prod(shape)
        if values > self._max_values:
            return parts
        if self._buffer is None or self._buffer.numel() < values:
            self._buffer = torch.empty(values, dtype=torch.float32)
        batch = self._buffer[:values].view(rows, *shape)
        torch.cat(parts, out=batch)
        return [batch]

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array`` may lie in the kept memory (a network that returned its input)."""
        return self._buffer is not None and np.may_share_memory(array, self._buffer.numpy())


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds one forward pass spent copying inputs in, computing, copying outputs out."""

    input_seconds: float = 0.0
    infer_seconds: float = 0.0
    output_seconds: float = 0.0


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for metrics."""

    device: str
    images: int
    queue_seconds: list[float]
    compute_seconds: float
    phases: PhaseTimes | None = None  # None: only the total is known


class InferenceWorker:
    """A thread that takes batches from a model's queue and runs them on one instance."""

    def __init__(
        self,
        name: str,
        queue: BatchQueue,
        instance: ModelInstance,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_rejoin_s: float = 0.0,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
        warm_up_shape: tuple[int, int, int] | None = None,
        suffix: str = "",
        torch_threads: int = 1,
    ) -> None:
        """``suffix`` tells instances on one device apart in the thread's name; ``torch_threads``:
        intra-op threads of the torch operators the thread runs (a torch instance's forward passes,
        gathering a batch, a fine-tuned head)."""
        self.instance = instance
        self._model = name
        self._torch_threads = torch_threads
        self._warm_up_shape = warm_up_shape
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._queue = queue
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_rejoin_s = max_rejoin_s
        self._on_batch = on_batch
        self._staging = HostStaging()
        self._thread = threading.Thread(target=self._run, name=f"infer-{name}-{instance.label}{suffix}", daemon=True)

    def start(self) -> None:
        """Start the thread and wait until its warm-up forward pass is done."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        # The warm-up runs here, not in the thread that built the model: torch's CPU kernels
        # parallelize with OpenMP, whose thread team belongs to the thread that first uses it,
        # and every forward pass should find that team ready.
        name_os_thread(self._thread.name)
        try:
            use_torch_threads(self._torch_threads)
            if self._warm_up_shape is not None:
                self.instance.warm_up(self._warm_up_shape)
        except BaseException as exc:
            self._start_error = exc
            return
        finally:
            self._started.set()
        self._queue.attach_worker()
        try:
            while (
                taken := self._queue.next_batch(self._max_batch_size, self._max_delay_s, self._max_rejoin_s)
            ) is not None:
                batch, expired = taken
                for item in expired:
                    if not item.is_cancelled():
                        item.on_result(
                            DeadlineExceededError("the request's deadline passed while it waited in the queue")
                        )
                if batch:
                    self._run_batch(batch)
        finally:
            self._queue.detach_worker()

    def _run_batch(self, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        images = sum(item.size for item in batch)
        requests = sum(item.completes_request for item in batch)
        try:
            alone = self._queue.computing_images <= images  # no other instance's batch runs now
            outputs, phases = self.instance.forward_timed(
                [item.pixels for item in batch], alone=alone, staging=self._staging
            )
        except Exception as exc:
            log.exception("forward pass failed on %s", self.instance.label)
            error = InternalError(f"the forward pass failed on {self.instance.label}: {type(exc).__name__}")
            self._queue.answered(requests, time.monotonic() - started, images=images)
            for item in batch:
                item.on_result(error)
            return
        finished = time.monotonic()
        # Metrics first: whoever reads them after getting an answer sees this batch counted.
        self._on_batch(
            BatchStats(
                device=self.instance.label,
                images=int(outputs.shape[0]),
                queue_seconds=[started - item.enqueued_at for item in batch],
                compute_seconds=finished - started,
                phases=phases,
            )
        )
        traced = [item for item in batch if item.trace is not None]
        if traced:  # spans only for traced requests: an untraced batch builds none
            self._record_spans(traced, started, finished, phases, images, requests)
        # Before the answers: a client answered may send again before the next line runs.
        self._queue.answered(requests, finished - started, images=images)
        offset = 0
        for item in batch:
            item.on_result(outputs[offset : offset + item.size])
            offset += item.size

    def _record_spans(
        self, traced: list[WorkItem], started: float, finished: float, phases: PhaseTimes, images: int, requests: int
    ) -> None:
        try:
            record_batch(
                [TracedItem(item.trace, item.enqueued_at, item.size) for item in traced if item.trace is not None],
                started=started,
                finished=finished,
                phases=(phases.input_seconds, phases.infer_seconds, phases.output_seconds),
                model=self._model,
                device=self.instance.label,
                images=images,
                requests=requests,
            )
        except Exception:  # a trace is never worth a request: the batch is answered whatever happens here
            log.warning("recording a batch's spans failed", exc_info=True)
