"""Dynamic batching: a bounded queue per model and the rule that closes a batch.

A request becomes one or more :class:`WorkItem` (a slice of at most
``max_batch_size`` images). Workers call :meth:`BatchQueue.next_batch`, which
waits for the first item, then lets the batch fill until it holds
``max_batch_size`` images or ``max_queue_delay`` has passed, whichever comes
first. The delay counts from when the batch could have started: the oldest
item's arrival, or, if the worker was busy then, the moment it became free.
So an item never waits more than the delay for a free worker, and clients
answered by the previous batch have that long to join the next one (with
closed-loop clients, counting from the oldest arrival alone would split them
into two half-size batches that alternate forever).

With no delay (the default) the same split would happen at once: a free worker takes whatever is
queued, while the clients it has just answered are still on their way back. So a worker that
answered requests waits, after its window, for as many arrivals as it answered and for requests
already admitted that are still decoding (see :meth:`BatchQueue.answered`), at most
``max_rejoin_s`` and at most :data:`REJOIN_SHARE` of its last forward pass. Requests it did not
answer and nobody is decoding are never waited for: one closed-loop client gets no wait at all,
and open-loop traffic loses at most that share.

Several workers (model instances, ``--instances``) share one queue. Each batch then takes at most
an equal part of the work the queue knows of (queued, decoding, expected back, being computed by
the other workers; :meth:`BatchQueue.share`): without that, one worker would take every client
into its batch while the others idle, and with it C closed-loop clients settle into one group of
C/N per instance. Groups are never smaller than the queue's ``min_split_images`` (see
:func:`min_split_images`): below that the work stays in one batch, which on a CPU runs on every
core. The wait for answered clients counts from the latest answer, whichever worker gave it, so
that a worker that was idle waits for another's clients as the one that answered them would.
:func:`collate` is the pure rule that picks the batch:
items whose deadline passed, or whose caller went away, are taken out and
answered, never computed. Only items of the same image shape share a batch.

Admission comes before work: a request first reserves room (:meth:`BatchQueue.reserve`)
for all of its images, before any of them is decoded, so that a request the
queue cannot take is refused at once and concurrent requests cannot all
decode and then find the queue full. The reservation is then spent by
:meth:`Reservation.put`, or given back when the request fails.

Time is ``time.monotonic()`` throughout, read through a :class:`Clock` that tests replace
with one they move by hand (so that a batching window is tested without waiting for it).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from service.errors import QueueClosedError, QueueFullError

if TYPE_CHECKING:
    from service.telemetry.tracing import ItemTrace

REJOIN_SHARE = 0.25  # of the last forward pass's time: the most a worker waits for answered clients to return
# Multiply-adds per byte of weights that a group of images must do for splitting work into groups to
# pay, where one batch could run on every core instead: each group's forward pass reads all the weights.
# Measured on a 2-core CPU with two instances and 8 clients (bench/README.md): AlexNet's groups of 4
# (12 per byte) served 8-19% fewer images/s than one batch of 8, its groups of 16 (47) gained;
# ResNet101's groups of 4 (175) gained.
SPLIT_MIN_INTENSITY = 24.0


def min_split_images(multiply_adds_per_weight_byte: float) -> int:
    """The fewest images a group may have when work is split among instances, for a network that
    does ``multiply_adds_per_weight_byte`` per image (:data:`SPLIT_MIN_INTENSITY`)."""
    return max(1, math.ceil(SPLIT_MIN_INTENSITY / multiply_adds_per_weight_byte))


class Clock(Protocol):
    """Where a queue reads the time, and how it waits on its condition for some of it to pass."""

    def now(self) -> float: ...

    def wait(self, condition: threading.Condition, seconds: float) -> None:
        """Wait on ``condition`` (held) until notified or ``seconds`` have passed."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, seconds: float) -> None:
        condition.wait(seconds)


MONOTONIC = MonotonicClock()


@dataclass(eq=False)
class WorkItem:
    """Images of one request waiting for a forward pass, and how to answer them."""

    pixels: torch.Tensor  # [n, 3, H, W] float32 on the CPU
    on_result: Callable[[object], None]  # called with an np.ndarray [n, C] or an exception
    deadline: float | None = None  # monotonic seconds; None: no deadline
    is_cancelled: Callable[[], bool] = lambda: False
    enqueued_at: float = field(default_factory=time.monotonic)
    # The last part of its request: answering it lets a closed-loop client send again (see answered()).
    completes_request: bool = True
    # The request's trace context (None: not traced). This is the one piece of a request's trace that
    # travels with its work; where work items cross processes, its W3C form (ItemTrace.traceparent)
    # is what to serialise (see service/telemetry/tracing.py).
    trace: ItemTrace | None = None

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def shape_key(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape[1:])

    def expired(self, now: float) -> bool:
        return self.is_cancelled() or (self.deadline is not None and now >= self.deadline)


def collate(pending: deque[WorkItem], max_images: int, now: float) -> tuple[list[WorkItem], list[WorkItem]]:
    """Take (batch, expired) out of ``pending``; what is left keeps its order.

    The batch starts with the oldest live item and adds, in arrival order,
    every live item of the same shape that still fits in ``max_images``.
    """
    batch: list[WorkItem] = []
    expired: list[WorkItem] = []
    kept: list[WorkItem] = []
    total = 0
    while pending:
        item = pending.popleft()
        if item.expired(now):
            expired.append(item)
        elif not batch or (item.shape_key == batch[0].shape_key and total + item.size <= max_images):
            batch.append(item)
            total += item.size
            if total >= max_images:
                break
        else:
            kept.append(item)
    pending.extendleft(reversed(kept))
    return batch, expired


class BatchQueue:
    """A bounded, thread-safe queue of work items for one model."""

    def __init__(
        self,
        *,
        capacity_images: int,
        on_depth_change: Callable[[int], None] | None = None,
        clock: Clock = MONOTONIC,
        min_split_images: int = 1,
    ) -> None:
        """``min_split_images``: the fewest images of a group when work is split among workers (:meth:`share`)."""
        self._clock = clock
        self._min_split = max(1, min_split_images)
        self._pending: deque[WorkItem] = deque()
        self._images = 0
        self._reserved = 0
        self._capacity = capacity_images
        self._closed = False
        self._returning = 0  # items answered whose clients have not sent again yet
        self._last_compute_s = 0.0
        self._answered_at = -math.inf  # when a worker last answered requests
        self._workers = 0  # workers taking batches from this queue (model instances)
        self._computing = 0  # images in batches that workers took and have not answered yet
        self._cond = threading.Condition()
        self._on_depth_change = on_depth_change or (lambda delta: None)

    @property
    def pending_images(self) -> int:
        return self._images

    @property
    def reserved_images(self) -> int:
        """Room promised to requests that are still decoding."""
        return self._reserved

    def reserve(self, images: int) -> Reservation:
        """Promise room for ``images`` images, or raise at once if there is none."""
        with self._cond:
            self._check_room(images)
            self._reserved += images
        return Reservation(self, images)

    def put(self, items: list[WorkItem]) -> None:
        """Enqueue all of ``items`` or none of them (without a reservation)."""
        size = sum(item.size for item in items)
        with self._cond:
            self._check_room(size)
            self._enqueue(items, size)
        self._on_depth_change(size)

    def _check_room(self, images: int) -> None:
        if self._closed:
            raise QueueClosedError("the model was replaced or is shutting down and takes no new work")
        taken = self._images + self._reserved
        if taken + images > self._capacity:
            raise QueueFullError(
                f"the model's queue is full ({self._images} images waiting and {self._reserved} being decoded, "
                f"capacity {self._capacity}, --max-queue-size; this request has {images}); "
                "retry with backoff or add replicas"
            )

    def _enqueue(self, items: list[WorkItem], size: int) -> None:
        self._pending.extend(items)
        self._images += size
        self._returning = max(0, self._returning - len(items))
        self._cond.notify_all()

    @property
    def min_split_images(self) -> int:
        return self._min_split

    def set_min_split_images(self, images: int) -> None:
        """The fewest images of a group when work is split among workers (:meth:`share`), set by
        whoever starts them: it knows whether a batch kept whole may take every core."""
        with self._cond:
            self._min_split = max(1, images)

    def attach_worker(self) -> None:
        """A worker starts taking batches from this queue (see :meth:`share`)."""
        with self._cond:
            self._workers += 1

    def detach_worker(self) -> None:
        with self._cond:
            self._workers -= 1
            self._cond.notify_all()

    def answered(self, items: int, compute_seconds: float, *, images: int = 0) -> None:
        """A worker is answering ``items`` requests (work items that complete their request) after a
        forward pass of ``compute_seconds`` on ``images`` images it took with :meth:`next_batch`;
        it calls this before it hands out the answers.

        Closed-loop clients send again as soon as they are answered: the worker's next batch may
        wait for that many arrivals (see :meth:`next_batch`)."""
        with self._cond:
            self._returning += items
            self._answered_at = self._clock.now()
            self._last_compute_s = compute_seconds
            self._computing = max(0, self._computing - images)

    @property
    def returning(self) -> int:
        """Items answered whose senders have not sent again (arrivals count them off; those not back
        when a worker's wait for them ends are not expected any more)."""
        return self._returning

    @property
    def computing_images(self) -> int:
        """Images in batches that workers took and have not answered yet."""
        return self._computing

    def share(self, max_images: int) -> int:
        """The most images the next batch takes: ``max_images`` while one worker serves the queue;
        with N, also at most an equal part of the images the queue knows of (queued, decoding,
        expected back, in other workers' batches), split into as many groups as there are
        workers but none smaller than ``min_split_images``, so that every instance gets work."""
        with self._cond:  # reentrant: next_batch asks holding it
            if self._workers <= 1:
                return max_images
            known = self._images + self._reserved + self._returning + self._computing
            groups = max(1, min(self._workers, known // self._min_split))
            return max(1, min(max_images, -(-known // groups)))

    def _put_reserved(self, items: list[WorkItem], reserved: int) -> None:
        size = sum(item.size for item in items)
        with self._cond:
            self._reserved -= reserved
            if self._closed:
                raise QueueClosedError("the model was replaced or is shutting down and takes no new work")
            self._enqueue(items, size)
        self._on_depth_change(size)

    def _release(self, reserved: int) -> None:
        with self._cond:
            self._reserved -= reserved

    def next_batch(
        self, max_images: int, max_delay_s: float, max_rejoin_s: float = 0.0
    ) -> tuple[list[WorkItem], list[WorkItem]] | None:
        """Block until a batch closes; ``None`` once the queue is closed and empty.

        The batch closes when full (:meth:`share` images), or ``max_delay_s`` after it could have
        started; while answered clients are expected back or admitted requests are decoding, it may
        stay open until ``min(max_rejoin_s, REJOIN_SHARE * last forward pass)`` after the worker
        became free or, if later, after the last answer.
        """
        free_since = self._clock.now()
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return None
                close_at = max(self._pending[0].enqueued_at, free_since) + max_delay_s
                while self._images < self.share(max_images) and not self._closed:
                    expecting = self._returning > 0 or self._reserved > 0
                    rejoin_s = min(max_rejoin_s, REJOIN_SHARE * self._last_compute_s)
                    rejoin_at = max(free_since, self._answered_at) + rejoin_s
                    remaining = (max(close_at, rejoin_at) if expecting else close_at) - self._clock.now()
                    if remaining <= 0:
                        self._returning = 0  # those not back by now are not waited for again
                        break
                    self._clock.wait(self._cond, remaining)
                    if not self._pending:
                        break
                batch, expired = collate(self._pending, self.share(max_images), self._clock.now())
                computing = sum(item.size for item in batch)
                taken = computing + sum(item.size for item in expired)
                self._images -= taken
                self._computing += computing
                if taken:
                    self._on_depth_change(-taken)
                    return batch, expired

    def close(self) -> None:
        """Wake the workers; they finish what is queued, then get ``None``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close_rejecting(self, error: Exception) -> int:
        """Close, and answer everything still queued with ``error`` instead of running it.

        The batch a worker already took still runs. Returns how many items were refused.
        """
        with self._cond:
            self._closed = True
            refused = list(self._pending)
            self._pending.clear()
            images, self._images = self._images, 0
            self._cond.notify_all()
        if images:
            self._on_depth_change(-images)
        for item in refused:
            if not item.is_cancelled():
                item.on_result(error)
        return len(refused)


class Reservation:
    """Room in a :class:`BatchQueue` held for one request while its images are decoded.

    Use it as a context manager: leaving the block gives back whatever
    :meth:`put` did not spend (a failed decode, a cancelled caller).
    """

    def __init__(self, queue: BatchQueue, images: int) -> None:
        self._queue = queue
        self._images = images
        self._spent = False

    @property
    def images(self) -> int:
        return self._images

    def put(self, items: list[WorkItem]) -> None:
        """Enqueue ``items`` in the reserved room (all of them, at once)."""
        if self._spent:
            raise RuntimeError("this reservation was already used")
        size = sum(item.size for item in items)
        if size > self._images:
            raise ValueError(f"{size} images do not fit a reservation of {self._images}")
        self._spent = True
        self._queue._put_reserved(items, self._images)

    def release(self) -> None:
        """Give the room back unless :meth:`put` spent it (idempotent)."""
        if not self._spent:
            self._spent = True
            self._queue._release(self._images)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
