"""A protocol front end's link to the engine: the hop for inference (``service.inference.hop``) and a gRPC
channel on the engine's Unix socket for every other call.

The link reconnects by itself: while the engine is down (it died and its supervisor is starting
it again) every call through the link is answered UNAVAILABLE at once, which clients retry; the
requests that were in flight when it died are answered the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import RelayedError, UnavailableError
from service.inference import hop

log = logging.getLogger(__name__)

RESPONSE_ROOM = 64 * 1024  # a slot holds at least this: a response of up to this many bytes needs no second copy
RECONNECT_S = (0.05, 1.0)  # first and longest wait between attempts to reach the engine
NO_SLOT = -1  # the offset of a pending answer that holds no slot (a description)


@dataclass(frozen=True)
class Slot:
    """Part of the front end's arena, held for one request."""

    offset: int
    capacity: int
    view: memoryview  # the slot's bytes, to write the request into


def engine_down() -> UnavailableError:
    return UnavailableError("the server's engine is restarting; retry in a moment")


class EngineLink:
    def __init__(self, run_dir: Path, frontend: int, *, arena_bytes: int, max_message_bytes: int) -> None:
        self._run_dir = run_dir
        self._frontend = frontend
        self._arena = hop.Arena(arena_bytes)
        self.channel = grpc.aio.insecure_channel(
            f"unix:{run_dir / hop.ENGINE_SOCKET}",
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Back as soon as the engine is: gRPC's own backoff after a refused connection grows
                # from 1 s by 1.6 times a try, and would hold the engine's calls UNAVAILABLE for
                # seconds (minutes after a long outage) once it is back.
                # (Not grpc.min_reconnect_backoff_ms: that is how long one attempt may take.)
                ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_S[0] * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(RECONNECT_S[1] * 1000)),
            ],
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[bytes], int, int]] = {}  # id -> (answer, offset, capacity)
        self._writer: asyncio.StreamWriter | None = None
        self._frames: hop.FrameWriter | None = None  # the descriptors to the engine, written together
        self._running: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._running = asyncio.create_task(self._run())

    async def _run(self) -> None:
        wait = RECONNECT_S[0]
        while True:
            try:
                reader, writer = await self._connect()
            except OSError:
                await asyncio.sleep(wait)
                wait = min(wait * 2, RECONNECT_S[1])
                continue
            wait = RECONNECT_S[0]
            self._writer = writer
            self._frames = hop.FrameWriter(writer.transport)
            self.connected.set()
            log.info("connected to the engine")
            try:
                while (payload := await hop.read_frame(reader)) is not None:
                    message = hop.decode(payload)
                    if isinstance(message, hop.Reply):
                        self._answer(message)
            except (ConnectionError, ValueError) as exc:
                log.warning("the connection to the engine failed: %s", exc)
            finally:
                self.connected.clear()
                self._writer = None
                self._frames = None
                writer.close()
                self._fail_pending()
            log.warning("lost the engine; answering UNAVAILABLE until it is back")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        hello = hop.Hello(self._frontend, os.getpid(), self._arena.size)

        def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(5.0)
                sock.connect(str(self._run_dir / hop.HOP_SOCKET))
                socket.send_fds(sock, [hello.encode()], [self._arena.fd])
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        sock = await asyncio.to_thread(connect)
        return await asyncio.open_unix_connection(sock=sock)

    def _answer(self, reply: hop.Reply) -> None:
        entry = self._pending.pop(reply.id, None)
        if entry is None:
            return
        future, offset, capacity = entry
        try:
            if future.done():
                return
            if reply.code:
                future.set_exception(RelayedError(reply.code, reply.message))
            elif reply.inline or not reply.length:
                future.set_result(reply.inline)
            else:
                future.set_result(self._arena.memory[offset : offset + reply.length])
        finally:
            if offset != NO_SLOT:
                self._arena.release(offset, capacity)  # the engine is done with the slot

    def _fail_pending(self) -> None:
        # The engine that held these slots is gone, and its mapping with it.
        pending, self._pending = self._pending, {}
        for future, offset, capacity in pending.values():
            if offset != NO_SLOT:
                self._arena.release(offset, capacity)
            if not future.done():
                future.set_exception(engine_down())

    def reserve(self, size: int) -> Slot:
        """A slot of at least ``size`` bytes for a request; give it to :meth:`send`, or :meth:`release` it."""
        if self._writer is None:
            raise engine_down()
        offset, capacity = self._arena.allocate(max(size, RESPONSE_ROOM))
        return Slot(offset, capacity, memoryview(self._arena.memory)[offset : offset + capacity])

    def release(self, slot: Slot) -> None:
        """Give back a slot that was never sent."""
        self._arena.release(slot.offset, slot.capacity)

    async def send(
        self,
        slot: Slot,
        length: int,
        timeout: float | None,
        *,
        local: bool,
        protocol: str,
        method: str,
        carrier: Mapping[str, str] | None,
        preprocessing: str = "",
        received_ns: int = 0,
        decoded_ns: tuple[int, int] = (0, 0),
    ) -> bytes:
        """The engine's serialized ModelInferResponse for the serialized ModelInferRequest in the
        first ``length`` bytes of ``slot``; its errors relayed as :class:`RelayedError`. The slot is
        the engine's until it answers (or dies), then free again."""
        writer, frames = self._writer, self._frames
        if writer is None or frames is None or writer.is_closing():
            self._arena.release(slot.offset, slot.capacity)
            raise engine_down()
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, slot.offset, slot.capacity)
        descriptor = hop.Infer(
            request_id,
            slot.offset,
            length,
            slot.capacity,
            timeout,
            local,
            protocol,
            method,
            (carrier or {}).get("traceparent", ""),
            (carrier or {}).get("tracestate", ""),
            preprocessing,
            received_ns,
            *decoded_ns,
        )
        frames.write(descriptor.encode())
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: the engine drops the work if it has not run; the slot stays
            # held until the engine answers.
            if self._writer is writer and not writer.is_closing():
                frames.write(hop.Cancel(request_id).encode())
            raise

    async def infer(
        self,
        request: bytes,
        timeout: float | None,
        *,
        local: bool,
        protocol: str,
        method: str,
        carrier: Mapping[str, str] | None,
        received_ns: int = 0,
    ) -> bytes:
        """:meth:`send` of ``request`` (a serialized ModelInferRequest), copied into a slot."""
        slot = self.reserve(len(request))
        slot.view[: len(request)] = request
        return await self.send(
            slot,
            len(request),
            timeout,
            local=local,
            protocol=protocol,
            method=method,
            carrier=carrier,
            received_ns=received_ns,
        )

    async def describe(self, model: str) -> bytes:
        """The engine's JSON of ``model``'s preprocessing (``hop.Describe``); its errors relayed."""
        writer, frames = self._writer, self._frames
        if writer is None or frames is None or writer.is_closing():
            raise engine_down()
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, NO_SLOT, 0)
        frames.write(hop.Describe(request_id, model).encode())
        return await future

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
        await self.channel.close()
