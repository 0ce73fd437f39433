"""The engine's end of the hop (``service.hop``): front ends' descriptors in, answers out.

Each front end holds one connection. Its first message (a :class:`~service.hop.Hello`) brings the
front end's arena as a file descriptor, which the engine maps once. Every later descriptor is one
inference, run as a task of its own on the engine's event loop through the same servicer call the
gRPC and REST adapters of a single process make; a cancel stops that task (its work is dropped
before compute), and the connection's end stops all of its tasks: a front end that died has
nobody to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from service import hop
from service.transport.errors import status_for

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0
# Runs one request: its serialized ModelInferRequest, descriptor and front end -> the serialized response.
Handler = Callable[[memoryview, hop.Infer, int], Awaitable[bytes]]
# A model's preprocessing for front ends that decode its images (JSON of Preprocessing.to_dict()).
Describer = Callable[[str], bytes]


class HopServer:
    def __init__(self, path: Path, handler: Handler, describe: Describer) -> None:
        self._path = path
        self._handler = handler
        self._describe = describe
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
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("a front end's connection ended before its hello: %s", exc)
            conn.close()
            return
        conn.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        log.info("front end %d (pid %d) connected", hello.frontend, hello.pid)
        running: dict[int, asyncio.Task[None]] = {}
        try:
            while (payload := await hop.read_frame(reader)) is not None:
                message = hop.decode(payload)
                if isinstance(message, hop.Infer):
                    task = asyncio.create_task(self._run(message, hello.frontend, memory, writer))
                    running[message.id] = task
                    task.add_done_callback(partial(_forget, running, message.id))
                elif isinstance(message, hop.Describe):
                    writer.write(hop.frame(self._description(message).encode()))
                elif isinstance(message, hop.Cancel):
                    cancelled = running.get(message.id)
                    if cancelled is not None:
                        cancelled.cancel()
        except (ConnectionError, ValueError) as exc:
            log.warning("front end %d's connection failed: %s", hello.frontend, exc)
        finally:
            for task in list(running.values()):
                task.cancel()
            writer.close()
            log.info("front end %d (pid %d) disconnected", hello.frontend, hello.pid)
        # The mapping closes when the last view of it (a request still being read) is gone.

    async def _run(self, infer: hop.Infer, frontend: int, memory: mmap.mmap, writer: asyncio.StreamWriter) -> None:
        slot = memoryview(memory)[infer.offset : infer.offset + infer.capacity]
        try:
            response = await self._handler(slot[: infer.length], infer, frontend)
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
        if not writer.is_closing():
            writer.write(hop.frame(reply.encode()))

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
    """The hello and the arena it brings (blocking: run in a thread)."""
    conn.setblocking(True)
    conn.settimeout(HELLO_TIMEOUT_S)
    data, fds, _, _ = socket.recv_fds(conn, 1024, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("the hello came without its arena")
    try:
        hello = hop.Hello.decode(data)
        memory = mmap.mmap(fds[0], hello.arena_bytes)
    finally:
        os.close(fds[0])
    return hello, memory
