"""The batching rule and the bounded queue, without gRPC."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest
import torch

from service.engine.batching import BatchQueue, WorkItem, collate, min_split_images
from service.errors import QueueClosedError, QueueFullError


def item(
    n: int = 1, *, side: int = 4, deadline: float | None = None, cancelled: bool = False, at: float = 0.0
) -> WorkItem:
    return WorkItem(
        pixels=torch.zeros(n, 3, side, side),
        on_result=lambda value: None,
        deadline=deadline,
        is_cancelled=lambda: cancelled,
        enqueued_at=at,
    )


def test_collate_fills_up_to_max_images_in_order() -> None:
    pending = deque([item(3), item(3), item(3), item(1)])
    first = list(pending)
    batch, expired = collate(pending, max_images=7, now=1.0)
    assert batch == [first[0], first[1], first[3]]
    assert expired == []
    assert list(pending) == [first[2]]


def test_collate_drops_expired_and_cancelled_before_compute() -> None:
    late, gone, live = item(deadline=0.5), item(cancelled=True), item(deadline=5.0)
    pending = deque([late, gone, live])
    batch, expired = collate(pending, max_images=8, now=1.0)
    assert batch == [live]
    assert expired == [late, gone]
    assert not pending


def test_collate_batches_only_one_shape_and_keeps_the_rest_in_order() -> None:
    a1, b1, a2, b2 = item(side=4), item(side=8), item(side=4), item(side=8)
    pending = deque([a1, b1, a2, b2])
    batch, _ = collate(pending, max_images=8, now=0.0)
    assert batch == [a1, a2]
    assert list(pending) == [b1, b2]


def test_collate_takes_an_oversized_first_item_alone() -> None:
    big, small = item(10), item(1)
    pending = deque([big, small])
    batch, _ = collate(pending, max_images=4, now=0.0)
    assert batch == [big]
    assert list(pending) == [small]


def test_queue_is_bounded_and_all_or_nothing() -> None:
    queue = BatchQueue(capacity_images=4)
    queue.put([item(3)])
    with pytest.raises(QueueFullError, match="full"):
        queue.put([item(1), item(1)])
    assert queue.pending_images == 3
    queue.put([item(1)])
    assert queue.pending_images == 4


def test_batch_closes_when_full_without_waiting_for_the_delay() -> None:
    queue = BatchQueue(capacity_images=64)
    queue.put([item(2, at=time.monotonic()) for _ in range(4)])
    started = time.monotonic()
    batch, expired = queue.next_batch(max_images=8, max_delay_s=3600)
    assert sum(i.size for i in batch) == 8 and not expired
    assert time.monotonic() - started < 60  # a full batch never waits for the hour-long delay


class FakeClock:
    """Time that moves only when the test moves it. A worker waiting for its window wakes on
    every move (and on every put), and says each time it waits again (``waits``)."""

    def __init__(self) -> None:
        self.time = 1000.0
        self.waits = threading.Semaphore(0)
        self._condition: threading.Condition | None = None

    def now(self) -> float:
        return self.time

    def wait(self, condition: threading.Condition, seconds: float) -> None:
        self._condition = condition
        self.waits.release()
        condition.wait()  # until advance(), a put or a close notifies

    def advance(self, seconds: float) -> None:
        assert self._condition is not None, "nothing waits"
        with self._condition:
            self.time += seconds
            self._condition.notify_all()


class Worker:
    """``next_batch`` in a thread of its own, as a model's worker calls it."""

    def __init__(self, queue: BatchQueue, max_images: int, max_delay_s: float) -> None:
        self.result: tuple[list[WorkItem], list[WorkItem]] | None = None
        self._thread = threading.Thread(target=self._run, args=(queue, max_images, max_delay_s))
        self._thread.start()

    def _run(self, queue: BatchQueue, max_images: int, max_delay_s: float) -> None:
        self.result = queue.next_batch(max_images=max_images, max_delay_s=max_delay_s)

    def waiting(self, clock: FakeClock) -> bool:
        """Whether the worker (still) waits for its window, once it has looked at the time."""
        return clock.waits.acquire(timeout=10) and self._thread.is_alive()

    def batch_images(self) -> int:
        self._thread.join(10)
        assert self.result is not None
        return sum(item.size for item in self.result[0])


def test_batch_closes_at_the_delay_with_what_arrived() -> None:
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.put([item(1, at=clock.now())])
    worker = Worker(queue, max_images=8, max_delay_s=0.05)
    assert worker.waiting(clock)
    clock.advance(0.049)
    assert worker.waiting(clock)  # 1 ms of the window left
    clock.advance(0.002)
    assert worker.batch_images() == 1


def test_items_arriving_during_the_window_join_the_batch() -> None:
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.put([item(1, at=clock.now())])
    worker = Worker(queue, max_images=8, max_delay_s=30)
    assert worker.waiting(clock)
    queue.put([item(1, at=clock.now()) for _ in range(7)])
    assert worker.batch_images() == 8 and clock.now() == 1000.0  # full: closed without the window passing


def test_the_delay_counts_from_when_the_worker_is_free() -> None:
    """Items that waited while the worker was busy still get a window for late arrivals."""
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.put([item(1, at=clock.now() - 60) for _ in range(4)])  # waited a minute already
    worker = Worker(queue, max_images=8, max_delay_s=30)
    assert worker.waiting(clock)
    clock.advance(29.9)
    assert worker.waiting(clock)  # the window runs from when the worker became free
    queue.put([item(1, at=clock.now()) for _ in range(4)])
    assert worker.batch_images() == 8


def test_close_lets_workers_finish_then_stop() -> None:
    queue = BatchQueue(capacity_images=8)
    queue.put([item(1)])
    queue.close()
    assert queue.next_batch(max_images=8, max_delay_s=10) is not None
    assert queue.next_batch(max_images=8, max_delay_s=10) is None
    with pytest.raises(QueueClosedError):
        queue.put([item(1)])


def test_depth_changes_are_reported() -> None:
    depth = []
    queue = BatchQueue(capacity_images=8, on_depth_change=depth.append)
    queue.put([item(2), item(1)])
    queue.next_batch(max_images=8, max_delay_s=0)
    assert depth == [3, -3]


# -- rejoining: the clients a worker answered come back --------------------------------------------


class RejoinWorker(Worker):
    """``next_batch`` with a rejoin allowance, as a model's worker calls it after a batch."""

    def __init__(self, queue: BatchQueue, max_images: int, max_rejoin_s: float) -> None:
        self.result = None
        self._thread = threading.Thread(
            target=lambda: setattr(self, "result", queue.next_batch(max_images, 0.0, max_rejoin_s))
        )
        self._thread.start()


def test_with_no_delay_a_worker_waits_for_the_clients_it_answered() -> None:
    """Eight closed-loop clients: four were answered by the last batch, four queued meanwhile.
    Without waiting for the four, batches of four would alternate forever."""
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.put([item(1, at=clock.now()) for _ in range(4)])  # arrived while the last batch ran
    queue.answered(4, compute_seconds=1.0)
    worker = RejoinWorker(queue, max_images=32, max_rejoin_s=0.05)
    assert worker.waiting(clock)
    queue.put([item(1, at=clock.now()) for _ in range(3)])
    assert worker.waiting(clock)  # one still expected
    queue.put([item(1, at=clock.now())])
    assert worker.batch_images() == 8 and clock.now() == 1000.0  # every answered client is back: no more waiting
    assert queue.returning == 0


def test_the_wait_for_answered_clients_is_bounded() -> None:
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.put([item(1, at=clock.now()) for _ in range(4)])  # arrived while the last batch ran
    queue.answered(4, compute_seconds=1.0)
    worker = RejoinWorker(queue, max_images=32, max_rejoin_s=0.05)
    assert worker.waiting(clock)
    clock.advance(0.049)
    assert worker.waiting(clock)
    clock.advance(0.002)  # past max_rejoin_s: the clients that did not come back are not waited for
    assert worker.batch_images() == 4


def test_the_wait_is_at_most_a_share_of_the_forward_pass() -> None:
    """A fast forward pass (a GPU) gets a short wait: idling longer than a share of it costs more than it brings."""
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.put([item(1, at=clock.now())])
    queue.answered(4, compute_seconds=0.004)  # REJOIN_SHARE of it: 1 ms
    worker = RejoinWorker(queue, max_images=32, max_rejoin_s=0.05)
    assert worker.waiting(clock)
    clock.advance(0.0011)
    assert worker.batch_images() == 1


def test_one_client_is_never_kept_waiting() -> None:
    """C=1: the one client answered comes back, and nothing else is expected."""
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.answered(1, compute_seconds=1.0)
    worker = RejoinWorker(queue, max_images=32, max_rejoin_s=0.05)  # finds the queue empty, or the item
    queue.put([item(1, at=clock.now())])
    assert worker.batch_images() == 1 and clock.now() == 1000.0
    assert not clock.waits.acquire(timeout=0)  # it never waited for a window


def test_admitted_requests_still_decoding_are_waited_for() -> None:
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.answered(0, compute_seconds=1.0)
    queue.put([item(1, at=clock.now())])
    decoding = queue.reserve(2)
    worker = RejoinWorker(queue, max_images=32, max_rejoin_s=0.05)
    assert worker.waiting(clock)
    decoding.put([item(2, at=clock.now())])
    assert worker.batch_images() == 3 and clock.now() == 1000.0


def test_rejoining_is_off_at_zero() -> None:
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.put([item(1, at=clock.now()) for _ in range(4)])  # arrived while the last batch ran
    queue.answered(4, compute_seconds=1.0)
    worker = RejoinWorker(queue, max_images=32, max_rejoin_s=0.0)
    assert worker.batch_images() == 4 and clock.now() == 1000.0


# -- several workers (model instances) on one queue ----------------------------------------------


def test_one_worker_takes_all_it_may() -> None:
    queue = BatchQueue(capacity_images=64)
    queue.attach_worker()
    queue.put([item(1) for _ in range(20)])
    assert queue.share(32) == 32
    batch, _ = queue.next_batch(max_images=32, max_delay_s=0)
    assert len(batch) == 20


def test_instances_share_the_clients_out() -> None:
    """Two workers, 32 queued: each batch takes half, so that both instances compute."""
    queue = BatchQueue(capacity_images=64)
    queue.attach_worker()
    queue.attach_worker()
    queue.put([item(1) for _ in range(32)])
    first, _ = queue.next_batch(max_images=32, max_delay_s=0)
    second, _ = queue.next_batch(max_images=32, max_delay_s=0)
    assert (len(first), len(second)) == (16, 16)
    assert queue.pending_images == 0


def test_a_share_counts_what_other_instances_compute_and_what_comes_back() -> None:
    """Steady state with 32 closed-loop clients and two instances: one computes 16 while the other
    answered 16; the free one waits for its 16 and takes no more than them."""
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock)
    queue.attach_worker()
    queue.attach_worker()
    queue.put([item(1, at=clock.now()) for _ in range(32)])
    computing, _ = queue.next_batch(max_images=32, max_delay_s=0)  # the other instance's batch
    answered, _ = queue.next_batch(max_images=32, max_delay_s=0)
    queue.answered(len(answered), compute_seconds=1.0, images=len(answered))
    worker = RejoinWorker(queue, max_images=32, max_rejoin_s=0.05)
    queue.put([item(1, at=clock.now()) for _ in range(15)])
    assert worker.waiting(clock)  # one of its 16 is still on its way
    queue.put([item(1, at=clock.now())])  # its last one
    assert worker.batch_images() == 16 and clock.now() == 1000.0
    assert len(computing) == 16


def test_a_share_takes_a_large_request_whole() -> None:
    queue = BatchQueue(capacity_images=64)
    queue.attach_worker()
    queue.attach_worker()
    queue.put([item(12)])
    batch, _ = queue.next_batch(max_images=32, max_delay_s=0)
    assert [i.size for i in batch] == [12]


def test_a_worker_that_leaves_no_longer_counts() -> None:
    queue = BatchQueue(capacity_images=64)
    queue.attach_worker()
    queue.attach_worker()
    queue.detach_worker()
    queue.put([item(1) for _ in range(8)])
    assert queue.share(32) == 32


def test_work_below_the_split_minimum_stays_in_one_batch() -> None:
    """A network whose groups must have 9 images: 8 clients stay one batch (every core takes it),
    16 too; 32 split into two groups of 16."""
    for known, expected in [(8, 8), (16, 16), (18, 9), (32, 16)]:
        queue = BatchQueue(capacity_images=64, min_split_images=9)
        queue.attach_worker()
        queue.attach_worker()
        queue.put([item(1) for _ in range(known)])
        assert queue.share(32) == expected, known
        batch, _ = queue.next_batch(max_images=32, max_delay_s=0)
        assert len(batch) == expected


def test_an_idle_worker_waits_for_the_clients_another_answered() -> None:
    """One batch at a time, two workers: the one that has idled since long before the last answer
    still waits for the answered clients to come back, instead of taking the first of them alone."""
    clock = FakeClock()
    queue = BatchQueue(capacity_images=64, clock=clock, min_split_images=9)
    queue.attach_worker()
    queue.attach_worker()
    idle = RejoinWorker(queue, max_images=32, max_rejoin_s=0.05)  # free since 1000.0, queue empty
    clock.time += 5.0  # the other worker computes 8 images meanwhile...
    queue.answered(8, compute_seconds=1.0)  # ...and answers them
    queue.put([item(1, at=clock.now())])
    assert idle.waiting(clock)  # 7 more are on their way
    queue.put([item(1, at=clock.now()) for _ in range(7)])
    assert idle.batch_images() == 8 and clock.now() == 1005.0


@pytest.mark.parametrize(("model", "expected"), [("alexnet", 9), ("vgg16", 1), ("resnet101", 1)])
def test_split_minimum_of_each_model(model: str, expected: int) -> None:
    """AlexNet reads 244 MB of weights for 0.7 G multiply-adds an image; the others do 10-15 times the work per byte."""
    from service.models import get_model_spec

    assert min_split_images(get_model_spec(model).multiply_adds_per_weight_byte) == expected
