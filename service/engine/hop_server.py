"""The engine's end of the hop (``service.inference.hop``): front ends' descriptors in, answers out.

Each front end holds one connection. Its first message (a :class:`~service.inference.hop.Hello`) brings the
front end's arena as a file descriptor, which the engine maps once. Every later descriptor is one
inference, run as a task of its own on the engine's event loop through the same servicer call the
gRPC and REST adapters of a single process make; a cancel stops that task (its work is dropped
before compute), and the connection's end stops all of its tasks: a front end that died has
nobody to answer.

A front end that stops reading its answers costs the engine a bounded amount and nothing else:
writing never waits (the engine's loop serves every other front end meanwhile), and once more than
:data:`UNSENT_BYTES` of a link's answers wait in the engine to be sent, or more than
:data:`MAX_IN_FLIGHT` of its requests are running, the engine closes that link and drops its work.
The front end sees its connection end, answers what it held UNAVAILABLE and connects again. A
descriptor that names memory outside the front end's arena ends the link the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from service.inference import hop
from service.transport.errors import status_for

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0
# Answers waiting in the engine (past the kernel's socket buffer) for a front end to read them. A
# front end that reads keeps this near zero: answers are descriptors of a few dozen bytes, bar a
# response too large for its slot (at most hop.MAX_FRAME_BYTES), which is always let through.
UNSENT_BYTES = 8 * 1024 * 1024
# Requests of one front end running at once. Its arena bounds a front end's own (a slot is at least
# 64 KiB of a 256 MiB arena: 4,096); more is a peer that does not wait for its answers.
MAX_IN_FLIGHT = 16_384
# Why the engine ended a front end's link (the label of vision_hop_links_closed_total).
UNREAD_ANSWERS, IN_FLIGHT, BAD_DESCRIPTOR, BAD_HELLO = "unread_answers", "in_flight", "bad_descriptor", "bad_hello"
# Counts a link the engine ended, by one of the reasons above.
LinkClosedCounter = Callable[[str], None]
# Runs one request: its serialized ModelInferRequest, descriptor and front end -> the serialized response.
Handler = Callable[[memoryview, hop.Infer, int], Awaitable[bytes]]
# A model's preprocessing for front ends that decode its images (JSON of Preprocessing.to_dict()).
Describer = Callable[[str], bytes]


class LinkClosed(Exception):
    """The engine ends a front end's link (it broke the hop's rules); the message says why, ``kind``
    names the rule."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Link:
    """One front end's connection: its arena, its running requests, and the one way answers go out."""

    def __init__(
        self, hello: hop.Hello, memory: mmap.mmap, writer: asyncio.StreamWriter, counted: LinkClosedCounter
    ) -> None:
        self.hello = hello
        self.memory = memory
        self.writer = writer
        self.frames = hop.FrameWriter(writer.transport)
        self.counted = counted
        self.running: dict[int, asyncio.Task[None]] = {}
        self.closed = False

    @property
    def name(self) -> str:
        return f"front end {self.hello.frontend} (pid {self.hello.pid})"

    def send(self, reply: hop.Reply) -> None:
        """Queue ``reply`` without waiting; a link whose answers pile up unread is closed instead."""
        if self.closed:
            return
        unsent = self.frames.unsent
        if unsent > UNSENT_BYTES:
            self.close(
                UNREAD_ANSWERS, f"it stopped reading its answers ({unsent} bytes wait to be sent, over {UNSENT_BYTES})"
            )
            return
        self.frames.write(reply.encode())

    def check(self, infer: hop.Infer) -> None:
        """Refuse a descriptor no front end of ours sends: a slot outside its arena, a reused id, too many."""
        if not (infer.length <= infer.capacity and infer.offset + infer.capacity <= len(self.memory)):
            raise LinkClosed(
                BAD_DESCRIPTOR,
                f"request {infer.id} names bytes {infer.offset}+{infer.length} (slot of {infer.capacity}) "
                f"outside its arena of {len(self.memory)}",
            )
        if infer.id in self.running:
            raise LinkClosed(BAD_DESCRIPTOR, f"request {infer.id} was sent while its namesake still runs")
        if len(self.running) >= MAX_IN_FLIGHT:
            raise LinkClosed(IN_FLIGHT, f"over {MAX_IN_FLIGHT} requests in flight without waiting for their answers")

    def close(self, kind: str, reason: str) -> None:
        """End the link now: its requests are dropped (nobody would read their answers), its unsent
        answers discarded; the front end connects again."""
        if self.closed:
            return
        self.closed = True
        self.counted(kind)
        log.warning(
            "closing the link of %s: %s; %d of its requests in flight are dropped",
            self.name,
            reason,
            len(self.running),
        )
        for task in list(self.running.values()):
            task.cancel()
        self.writer.transport.abort()


class HopServer:
    def __init__(
        self, path: Path, handler: Handler, describe: Describer, counted: LinkClosedCounter = lambda _: None
    ) -> None:
        self._path = path
        self._handler = handler
        self._describe = describe
        self._counted = counted
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self._path))
        os.chmod(self._path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            hello, memory = await asyncio.wait_for(asyncio.to_thread(_receive_hello, conn), HELLO_TIMEOUT_S)
        except (OSError, ValueError, struct.error, TimeoutError) as exc:
            log.warning("a front end's connection ended before its hello: %s", exc)
            if isinstance(exc, (ValueError, struct.error)):  # a hello refused (OSError, TimeoutError: a peer gone)
                self._counted(BAD_HELLO)
            conn.close()
            return
        conn.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        link = _Link(hello, memory, writer, self._counted)
        log.info("%s connected", link.name)
        try:
            while not link.closed and (payload := await hop.read_frame(reader)) is not None:
                message = hop.decode(payload)
                if isinstance(message, hop.Infer):
                    link.check(message)
                    task = asyncio.create_task(self._run(message, link))
                    link.running[message.id] = task
                    task.add_done_callback(partial(_forget, link.running, message.id))
                elif isinstance(message, hop.Describe):
                    link.send(self._description(message))
                elif isinstance(message, hop.Cancel):
                    cancelled = link.running.get(message.id)
                    if cancelled is not None:
                        cancelled.cancel()
        except LinkClosed as exc:
            link.close(exc.kind, str(exc))
        except (ConnectionError, ValueError, struct.error) as exc:
            log.warning("%s's connection failed: %s", link.name, exc)
        finally:
            for task in list(link.running.values()):
                task.cancel()
            writer.close()
            log.info("%s disconnected", link.name)
        # The mapping closes when the last view of it (a request still being read) is gone.

    async def _run(self, infer: hop.Infer, link: _Link) -> None:
        slot = memoryview(link.memory)[infer.offset : infer.offset + infer.capacity]
        try:
            response = await self._handler(slot[: infer.length], infer, link.hello.frontend)
        except asyncio.CancelledError:
            reply = hop.Reply(infer.id, "CANCELLED", "the request was cancelled")
        except hop.StalePreprocessing as exc:
            reply = hop.Reply(infer.id, hop.STALE, str(exc))
        except Exception as exc:  # mapped as the gRPC port maps it; a bug is logged there
            code, message = status_for(exc)
            reply = hop.Reply(infer.id, code.name, message)
        else:
            if len(response) <= infer.capacity:
                slot[: len(response)] = response
                reply = hop.Reply(infer.id, length=len(response))
            else:
                reply = hop.Reply(infer.id, inline=response)
        finally:
            slot.release()
        link.send(reply)

    def _description(self, describe: hop.Describe) -> hop.Reply:
        try:
            return hop.Reply(describe.id, inline=self._describe(describe.model))
        except Exception as exc:
            code, message = status_for(exc)
            return hop.Reply(describe.id, code.name, message)

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._connections):
            task.cancel()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()


def _forget(running: dict[int, asyncio.Task[None]], key: int, _: object) -> None:
    running.pop(key, None)


def _receive_hello(conn: socket.socket) -> tuple[hop.Hello, mmap.mmap]:
    """The hello and the arena it brings (blocking: run in a thread). The arena must be sealed
    against shrinking: a mapping whose file shrank under it would kill the engine on first touch."""
    conn.setblocking(True)
    conn.settimeout(HELLO_TIMEOUT_S)
    data, fds, _, _ = socket.recv_fds(conn, 1024, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("the hello came without its arena")
    try:
        hello = hop.Hello.decode(data)
        if not fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            raise ValueError("the hello's arena is not sealed against shrinking")
        memory = mmap.mmap(fds[0], hello.arena_bytes)
    finally:
        os.close(fds[0])
    return hello, memory
