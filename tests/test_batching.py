"""The batching rule and the bounded queue, without gRPC."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest
import torch

from service.batching import BatchQueue, WorkItem, collate
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


def test_batch_closes_at_the_delay_with_what_arrived() -> None:
    queue = BatchQueue(capacity_images=64)
    queue.put([item(1, at=time.monotonic())])
    batch, _ = queue.next_batch(max_images=8, max_delay_s=0.05)
    assert len(batch) == 1


def test_items_arriving_during_the_window_join_the_batch() -> None:
    queue = BatchQueue(capacity_images=64)
    queue.put([item(1, at=time.monotonic())])

    def later() -> None:
        time.sleep(0.05)
        queue.put([item(1) for _ in range(7)])

    thread = threading.Thread(target=later)
    thread.start()
    batch, _ = queue.next_batch(max_images=8, max_delay_s=30)
    thread.join()
    assert sum(i.size for i in batch) == 8


def test_the_delay_counts_from_when_the_worker_is_free() -> None:
    """Items that waited while the worker was busy still get a window for late arrivals."""
    queue = BatchQueue(capacity_images=64)
    queue.put([item(1, at=time.monotonic() - 60) for _ in range(4)])  # waited a minute already

    def later() -> None:
        time.sleep(0.05)
        queue.put([item(1) for _ in range(4)])

    thread = threading.Thread(target=later)
    thread.start()
    batch, _ = queue.next_batch(max_images=8, max_delay_s=30)
    thread.join()
    assert sum(i.size for i in batch) == 8


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
