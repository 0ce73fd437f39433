"""``vision-serve`` with ``--frontends`` of 2 or more: the parent that runs and minds the processes.

It checks every port, makes a private run directory (the engine's Unix sockets), starts the engine
(``python -m service.engine``) and, once the engine listens, the protocol front ends
(``python -m service.frontend``), each a fresh interpreter: none inherits gRPC's threads or CUDA's
state from this one. A child that dies is started again (after a pause that grows while it keeps
dying young); while the engine is down the front ends answer not ready and UNAVAILABLE. An engine
that fails before it ever loaded (bad weights, a port taken) ends the server with its exit code.
SIGTERM drains: the front ends first (they finish what they sent to the engine), then the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from service.config import ServeConfig
from service.host.ports import check_ports, listeners

log = logging.getLogger(__name__)

STARTED_MARK = "engine.started"  # written by the engine once its sockets listen
LOADED_MARK = "engine.loaded"  # written by the engine once its models have loaded
YOUNG_S = 10.0  # a child that dies sooner than this after its start waits before the next
RESTART_PAUSE_S = (0.5, 30.0)  # first and longest pause before a young child's restart
START_TIMEOUT_S = 60.0  # for the engine's sockets (models load after)


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_supervisor(supervisor_pid: int) -> None:
    """In a child: be sent SIGTERM when the supervisor dies, however it dies (even SIGKILL), and
    exit now if it is already gone: a child never outlives it, holding the ports or the devices."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:
        raise SystemExit(1)


class Child:
    """One child process and how to start it again."""

    def __init__(self, name: str, module: str, run_dir: Path, index: int, argv: Sequence[str]) -> None:
        self.name = name
        self._command = [sys.executable, "-m", module, str(run_dir), str(index), str(os.getpid()), "--", *argv]
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self._pause = RESTART_PAUSE_S[0]

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(*self._command)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def pause_before_restart(self) -> float:
        """How long to wait before starting it again: nothing after a long life, more each young death."""
        if time.monotonic() - self.started >= YOUNG_S:
            self._pause = RESTART_PAUSE_S[0]
            return 0.0
        pause, self._pause = self._pause, min(self._pause * 2, RESTART_PAUSE_S[1])
        return pause

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


def _fixed_ports(config: ServeConfig, argv: Sequence[str]) -> list[str]:
    """``argv`` with a free port in place of a gRPC or HTTP port of 0: every front end must share one."""
    import socket

    argv = list(argv)
    for flag, port in (("--grpc-port", config.grpc_port), ("--http-port", config.http_port)):
        if port == 0:
            with socket.socket() as sock:
                sock.bind((config.host, 0))
                argv += [flag, str(sock.getsockname()[1])]
    return argv


class Supervisor:
    def __init__(self, config: ServeConfig, argv: Sequence[str]) -> None:
        self._config = config
        self._run_dir = Path(tempfile.mkdtemp(prefix="vision-serve-"))  # 0700: only this user reaches it
        argv = _fixed_ports(config, argv)
        self._engine = Child("the engine", "service.engine", self._run_dir, 0, argv)
        self._frontends = [
            Child(f"front end {index}", "service.frontend", self._run_dir, index, argv)
            for index in range(config.frontend_count)
        ]
        self._stopping = asyncio.Event()

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        await self._engine.start()
        if not await self._wait_started():
            return await self._engine_failed()
        for frontend in self._frontends:
            await frontend.start()
        watchers = [asyncio.create_task(self._mind(child)) for child in [self._engine, *self._frontends]]
        stopping = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stopping, *watchers], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in done:
            if task is not stopping:
                code = task.result() or 1  # the engine failed before it ever loaded
        await self._drain()
        for task in watchers:
            task.cancel()
        return code

    async def _wait_started(self) -> bool:
        """Whether the engine's sockets listen (False: it exited first, or took too long)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self._engine.process is not None
        while time.monotonic() < deadline:
            if (self._run_dir / STARTED_MARK).exists():
                return True
            if self._engine.process.returncode is not None:
                return False
            await asyncio.sleep(0.05)
        return False

    async def _engine_failed(self) -> int:
        process = self._engine.process
        assert process is not None
        if process.returncode is None:
            process.kill()
        code = await process.wait()
        log.error("the engine did not start (exit code %s)", code)
        return code or 1

    async def _mind(self, child: Child) -> int:
        """Start ``child`` again whenever it dies; the engine's exit before it ever loaded ends the
        server (its code is returned)."""
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping.is_set():
                return 0
            if child is self._engine and not (self._run_dir / LOADED_MARK).exists():
                log.error("the engine exited (code %d) before its models loaded", code)
                return code or 1
            pause = child.pause_before_restart()
            log.warning(
                "%s (pid %d) exited with %s; starting it again%s",
                child.name,
                child.process.pid,
                f"signal {-code}" if code < 0 else f"code {code}",
                f" in {pause:.1f}s" if pause else "",
            )
            if child is self._engine:
                (self._run_dir / STARTED_MARK).unlink(missing_ok=True)
            await asyncio.sleep(pause)
            if self._stopping.is_set():
                return 0
            await child.start()

    async def _drain(self) -> None:
        """Front ends first (they answer what they hold, through the engine), then the engine."""
        grace = self._config.drain_seconds + 10.0
        for frontend in self._frontends:
            frontend.signal(signal.SIGTERM)
        await _wait_all(self._frontends, grace)
        self._engine.signal(signal.SIGTERM)
        await _wait_all([self._engine], grace)


async def _wait_all(children: Sequence[Child], timeout: float) -> None:
    processes = [c.process for c in children if c.process is not None and c.process.returncode is None]
    if not processes:
        return
    waiting = [asyncio.create_task(p.wait()) for p in processes]
    _, late = await asyncio.wait(waiting, timeout=timeout)
    if late:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        await asyncio.wait(waiting)


async def supervise(config: ServeConfig, argv: Sequence[str]) -> int:
    """Run the engine and ``config.frontend_count`` front ends until SIGTERM; the exit code."""
    check_ports(listeners(config))
    return await Supervisor(config, argv).run()
