"""What keeps a request cheap on the engine and across the hop, each piece on its own: a worker's
batch gathered into memory it keeps (``runtime.HostStaging``), a batch's answers handed to the
event loop with one wake-up (``dataplane.LoopAnswers``), and the hop's frames of one round of the
loop written together (``hop.FrameWriter``). Their effect on CPU per request is measured by
``bench/ceiling.py``; here, that each does what it did before, and the one thing it saves.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np
import pytest
import torch

from service.engine.dataplane import LoopAnswers
from service.engine.runtime import HostStaging
from service.errors import InvalidInputError
from service.inference import hop


def parts(*rows: int, side: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(rows))
    return [torch.randn((n, 3, side, side), generator=generator) for n in rows]


def test_a_batch_is_gathered_into_the_same_memory_every_time() -> None:
    staging = HostStaging()
    first = parts(1, 2, 1)
    (batch,) = staging.gather(first)
    assert torch.equal(batch, torch.cat(first))
    second = parts(2, 1)
    (again,) = staging.gather(second)
    assert torch.equal(again, torch.cat(second))
    assert again.data_ptr() == batch.data_ptr()  # no new memory for a batch that fits
    (larger,) = staging.gather(parts(4, 4))  # grows once to the larger batch
    assert larger.shape == (8, 3, 8, 8) and staging.holds(larger.numpy())


def test_what_is_not_gathered_there_passes_as_it_is() -> None:
    staging = HostStaging(max_bytes=4 * 3 * 8 * 8 * 3)  # room for 3 images of 8x8
    one = parts(2)
    assert staging.gather(one) is one  # a single part needs no gathering
    shapes = [*parts(1), *parts(1, side=16)]
    assert staging.gather(shapes) is shapes  # the collator never mixes shapes; if it did, no staging
    halves = [p.half() for p in parts(1, 1)]
    assert staging.gather(halves) is halves
    too_many = parts(2, 2)
    assert staging.gather(too_many) is too_many  # over max_bytes: memory of its own, freed after
    assert not staging.holds(np.zeros(4, np.float32))


def test_a_batch_of_answers_wakes_the_loop_once() -> None:
    asyncio.run(answers_wake_the_loop_once())


async def answers_wake_the_loop_once() -> None:
    loop = asyncio.get_running_loop()
    answers = LoopAnswers(loop)
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        futures = [loop.create_future() for _ in range(5)]
        futures[3].cancel()  # its caller went away: skipped, nothing raised
        error = InvalidInputError("a refused item")

        def worker() -> None:  # a worker answering a batch, while the loop has not run yet
            for index, future in enumerate(futures):
                answers.put(future, error if index == 4 else np.full(2, index, np.float32))

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()  # the loop is held here: every answer waits for the one wake-up
        assert [list(await f) for f in futures[:3]] == [[0, 0], [1, 1], [2, 2]]
        with pytest.raises(InvalidInputError):
            await futures[4]
        assert futures[3].cancelled()
        assert wakeups == 1
        # The next batch gets its own wake-up.
        later = loop.create_future()
        threading.Thread(target=answers.put, args=(later, np.ones(1, np.float32))).start()
        assert list(await asyncio.wait_for(later, 10)) == [1.0]
        assert wakeups == 2
    finally:
        del loop.call_soon_threadsafe


def test_frames_of_one_round_go_out_in_one_write() -> None:
    asyncio.run(frames_of_one_round())


async def frames_of_one_round() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        _, writer = await asyncio.open_unix_connection(sock=ours)
        frames = hop.FrameWriter(writer.transport)
        writes: list[bytes] = []
        original = writer.transport.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            original(data)

        writer.transport.write = counted  # type: ignore[method-assign]
        replies = [hop.Reply(i, length=i) for i in range(3)]
        for reply in replies:
            frames.write(reply.encode())
        assert frames.unsent == sum(len(hop.frame(r.encode())) for r in replies) and not writes
        await asyncio.sleep(0)  # the round ends
        assert writes == [b"".join(hop.frame(r.encode()) for r in replies)]
        frames.write(hop.Cancel(9).encode())
        await asyncio.sleep(0)
        assert len(writes) == 2
        received = b""
        theirs.settimeout(10)
        while len(received) < len(writes[0]) + len(writes[1]):
            received += theirs.recv(1 << 16)
        reader = asyncio.StreamReader()
        reader.feed_data(received)
        reader.feed_eof()
        decoded = [hop.decode(payload) for _ in range(4) if (payload := await hop.read_frame(reader))]
        assert decoded == [*replies, hop.Cancel(9)]
        writer.close()
